"""The training loop: accumulation, backward, step, EMA, and the cadence of ticks, checkpoints,
snapshots and sample grids. Knows nothing of the objective's math or the engine's sharding.

Resume is exact by construction: the RNG is reseeded from (seed, step, rank) at every step, the LR is
a function of the step, and the checkpoint holds engine, EMA, data position and counters.

Multi-rank: every rank runs this loop; collectives (stats reduction, checkpoint, EMA consolidation,
the preemption flag) are called by all ranks at the same points, and rank 0 writes the files.
A preemption signal ends the run at the next step boundary with a checkpoint and `Preempted`.
"""
from __future__ import annotations

import random
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from torch import nn

from sct import exit_codes, stats
from sct.checkpoint import (
    STATE_FILE,
    atomic_checkpoint_dir,
    latest_training_state,
    load_training_state,
    save_snapshot,
)
from sct.config import ConfigError
from sct.dist import Dist, all_gather_objects, all_reduce_max, barrier
from sct.dist.preempt import Preemption
from sct.images import plot_losses


@dataclass
class LoopConfig:
    dir: str = "runs/demo"  # run folder: config.yaml, log.txt, metrics.jsonl, checkpoints/, snapshots/, samples/
    seed: int = 0
    total_steps: int = 1000
    batch_size: int = 64  # global batch per optimizer step
    grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: backbone under autocast; time, tangent and loss stay fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = 50  # steps per tick (metrics line + JSONL record)
    checkpoint_every: int = 500
    snapshot_every: int = 500  # EMA inference snapshot
    sample_every: int = 500  # sample grids (PNG)
    keep_checkpoints: int = 2
    max_nonfinite_in_a_row: int = 10  # consecutive skipped steps (NaN/Inf loss or gradient) before the run stops
    max_steps_per_job: int = 0  # checkpoint and exit after this many steps (time-limited allocations); 0 = no limit

    def check(self) -> None:
        for key in ("total_steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "snapshot_every", "sample_every", "keep_checkpoints", "max_nonfinite_in_a_row"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError("grad_accum", f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.max_steps_per_job < 0:
            raise ConfigError("max_steps_per_job", f"must be >= 0, got {self.max_steps_per_job}")


class NonFiniteLossError(RuntimeError):
    pass


class Preempted(Exception):
    """Raised after the checkpoint that a preemption signal asked for; `.step` is the step it holds."""

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpointed at step {step}")
        self.step = step


@dataclass
class Parts:
    """What the loop drives. `engine` has backward(loss) / step(lr) -> bool and either
    state_dict/load_state_dict (one process) or save(dir)/load(dir) (DeepSpeed, collective).
    `ema` is `sct.ema.EMA` or `sct.dist.ema_sharded.ShardedEMA` (ZeRO-3)."""

    net: nn.Module
    objective: nn.Module
    engine: object
    ema: object
    data: Iterator[dict]
    lr: Callable[[int], float]
    snapshot_config: dict  # model + sampling config stored with each snapshot
    write_samples: Callable[[nn.Module, Path], list[Path] | None]  # EMA model, output stem -> PNG grids written
    dist: Dist = field(default_factory=Dist)
    preempt: Preemption | None = None
    config_text: str = ""  # the resolved YAML, stored in each checkpoint
    flops_per_sample: float | None = None  # one training step (forward, JVP, teacher, backward)
    trackers: Callable[[int], list] | None = None  # start step -> tracking sinks (sct.tracking.open_sinks); rank 0
    peak_flops: float | None = None  # per device; None: no MFU (CPU)
    evaluate: Callable[[nn.Module, int], None] | None = None  # EMA model, step -> metrics (sct.eval_training); every rank
    eval_every: int = 0


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 10_007 + rank


def _ema_model(ema) -> nn.Module:
    """The EMA as a plain module (a collective for the sharded EMA: every rank must call it)."""
    return ema.full_model() if hasattr(ema, "full_model") else ema.model


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "python": random.getstate()}


def _checkpoint(run_dir: Path, step: int, parts: Parts, counters: dict, keep: int) -> Path:
    d = parts.dist
    ema = parts.ema.state_dict()  # full (consolidated) EMA: independent of the number of ranks
    data, rng = all_gather_objects(parts.data.state_dict()), all_gather_objects(_rng_state())
    with atomic_checkpoint_dir(run_dir, step, keep, rank=d.rank, barrier=barrier if d.world_size > 1 else None) as tmp:
        engine = None
        if hasattr(parts.engine, "save"):
            parts.engine.save(tmp)  # every rank writes its own DeepSpeed shard files
        else:
            engine = parts.engine.state_dict()
        if d.rank == 0:
            state = {"step": step, "engine": engine, "ema": ema, "data": data, "rng": rng, "counters": counters,
                     "world_size": d.world_size, "config": parts.config_text}
            torch.save(state, tmp / STATE_FILE)
    path = Path(run_dir) / "checkpoints" / f"step_{step:09d}"
    logger.info(f"checkpoint: {path}")
    return path


def _resume(latest: Path | None, parts: Parts) -> tuple[int, dict] | None:
    """Load the checkpoint sct.run_folder chose (rank 0 checked its owner and permissions for every rank)."""
    if latest is None:
        return None
    d = parts.dist
    try:
        state = load_training_state(latest)
    except Exception as e:  # noqa: BLE001 - weights_only refuses anything but tensors and plain containers
        raise exit_codes.Fatal(exit_codes.STATE, f"cannot load {latest / STATE_FILE} as plain data (torch.load weights_only): "
                                                 f"{exit_codes.one_line(e)}") from None
    if hasattr(parts.engine, "load"):
        parts.engine.load(latest, state["world_size"])
    else:
        parts.engine.load_state_dict(state["engine"])
    parts.ema.load_state_dict(state["ema"])
    same = state["world_size"] == d.world_size
    if not same:
        logger.warning(f"resuming {state['world_size']} ranks' checkpoint on {d.world_size}: the data positions are remapped")
    try:
        parts.data.load_state_dict({**state["data"][d.rank if same else 0], "ranks": state["data"]})  # all ranks': for a remap
    except ValueError as e:
        raise exit_codes.Fatal(exit_codes.STATE, f"{latest}: {e}") from None
    if same:
        torch.set_rng_state(state["rng"][d.rank]["torch"])
        random.setstate(state["rng"][d.rank]["python"])
    logger.info(f"resumed from {latest} at step {state['step']}")
    return state["step"], state["counters"]


def _snapshot(run_dir: Path, step: int, parts: Parts, model: nn.Module) -> Path:
    path = run_dir / "snapshots" / f"snapshot_{step:09d}.safetensors"
    if parts.dist.rank == 0:
        save_snapshot(path, model.state_dict(), parts.snapshot_config, extra={"step": step})
    return path


def _never_fatal(what: str, fn: Callable, *args) -> None:
    """Pictures (sample grids, loss.png): any failure is one logged line, never the end of the run."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - whatever broke a picture, training goes on
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        logger.error(f"{what}, training continues: {type(e).__name__}: {reason}")


def _draw_samples(parts: Parts, model: nn.Module, stem: Path, step: int) -> None:
    stats.publish_images(parts.write_samples(model, stem), step)  # PNG grids, then to the tracking sinks


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)


def _tick_record(cfg: LoopConfig, parts: Parts, done: int, steps: int, seconds: float, device: torch.device) -> dict:
    """Metrics of the last `steps` steps, pooled over ranks (a collective)."""
    for name, total in stats.collect_times().items():
        stats.report(f"time/{name}", total / steps)  # seconds per step on this rank
    stats.report("mem/peak_gib", _peak_memory_gib(device))
    pooled = stats.collect(reduce=True)
    record = {k: v for k, v in pooled.items() if not (k.startswith(("time/", "mem/")) and k.endswith("/std"))}
    if "time/objective" in record:  # objective = teacher + JVP + gradient forward (and loss arithmetic)
        record["time/forward"] = record.pop("time/objective") - record.get("time/teacher", 0.0) - record.get("time/jvp", 0.0)
    record["mem/peak_gib_max"] = all_reduce_max(record["mem/peak_gib"], device)
    record |= {"step": done, "lr": parts.lr(done - 1), "sec_per_step": seconds / steps, "images_per_s": cfg.batch_size * steps / seconds}
    if parts.flops_per_sample:
        record["tflops_per_device"] = parts.flops_per_sample * record["images_per_s"] / parts.dist.world_size / 1e12
        if parts.peak_flops:
            record["mfu"] = record["tflops_per_device"] * 1e12 / parts.peak_flops
    return record


def step_autocast(cfg: LoopConfig, parts: Parts, device: torch.device) -> torch.autocast:
    """bf16 autocast of the objective (a no-op under fp32)."""
    # ZeRO-3 frees gathered weights after each module: autocast's cache of their bf16 copies would go stale
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16", cache_enabled=parts.dist.zero_stage != 3)


def train_step(cfg: LoopConfig, parts: Parts, step: int, device: torch.device, autocast: torch.autocast) -> bool:
    """One optimizer step (grad_accum micro-batches, engine step, EMA), timed into sections
    data/objective/backward/optimizer/ema; returns False when the engine skipped a non-finite step."""
    torch.manual_seed(step_seed(cfg.seed, step, parts.dist.rank))
    parts.net.train()
    for _ in range(cfg.grad_accum):
        with stats.timed("data"):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(parts.data).items()}
        with autocast, stats.timed("objective"):
            loss = parts.objective(parts.net, batch, step)
        stats.report("loss", loss.detach())
        with stats.timed("backward"):
            parts.engine.backward(loss.mean())
    with stats.timed("optimizer"):
        took = parts.engine.step(parts.lr(step))
    stats.report("grad_norm", parts.engine.last_grad_norm)  # global, before clipping; non-finite ones are counted
    if took:
        with stats.timed("ema"):
            parts.ema.update(parts.net, step)
    return took


def _data_counters(stream) -> dict:
    """The streams' retry, bad-shard and skipped-sample counts since this job started, over all ranks (a collective)."""
    if not hasattr(stream, "counters"):
        return {}
    gathered = all_gather_objects((stream.counters, sorted(stream.bad)))
    return {"data/retries": sum(c.get("retries", 0) for c, _ in gathered),
            "data/skipped_samples": sum(c.get("skipped_samples", 0) for c, _ in gathered),
            "data/bad_shards": len(set().union(*[bad for _, bad in gathered]))}


def run(cfg: LoopConfig, parts: Parts, run_dir: Path, device: torch.device, resume_from: Path | None = None) -> int:
    """Train until total_steps (or max_steps_per_job) from `resume_from` (a checkpoint folder, or None: step 0);
    returns the step reached. Raises `Preempted`."""
    counters = {"skipped": 0, "in_a_row": 0}
    start = 0
    resumed = _resume(resume_from, parts)
    if resumed is not None:
        start, counters = resumed
    if parts.trackers is not None:
        stats.add_sinks(parts.trackers(start))  # TensorBoard / W&B continue the run after step `start`
    stop = cfg.total_steps if not cfg.max_steps_per_job else min(cfg.total_steps, start + cfg.max_steps_per_job)
    metrics = stats.JSONLWriter(run_dir / "metrics.jsonl", parts.dist.rank)
    progress = stats.Progress(cfg.total_steps, start)
    autocast = step_autocast(cfg, parts, device)
    stats.set_sync(torch.cuda.synchronize if device.type == "cuda" else None)
    stats.collect_times()
    stats.collect()  # drop what was reported before step 0 (the FLOP probe's objective call)
    tick_start, tick_step = time.monotonic(), start
    for step in range(start, stop):
        if train_step(cfg, parts, step, device, autocast):
            counters["in_a_row"] = 0
        else:
            counters["skipped"] += 1
            counters["in_a_row"] += 1
            logger.warning(f"step {step}: non-finite loss or gradient, step skipped ({counters['in_a_row']} in a row)")
            if counters["in_a_row"] >= cfg.max_nonfinite_in_a_row:
                good = latest_training_state(run_dir)
                raise NonFiniteLossError(
                    f"{counters['in_a_row']} non-finite steps in a row at step {step}: stopping. "
                    f"The last good checkpoint is intact: {good or 'none written yet'}. Lower optimizer.lr or check the data."
                )
        done = step + 1
        progress.update(done)
        if done % cfg.log_every == 0 or done == stop:
            record = _tick_record(cfg, parts, done, done - tick_step, time.monotonic() - tick_start, device)
            record["skipped"] = counters["skipped"]
            record |= _data_counters(parts.data)
            metrics.write(record)
            stats.publish(record)
            mfu = f"  MFU {record['mfu']:.1%}" if "mfu" in record else ""
            logger.info(f"{progress.line()}  loss {record.get('loss', float('nan')):.4f}  lr {record['lr']:.2e}  "
                        f"{record['images_per_s']:.1f} img/s{mfu}  skipped {counters['skipped']}")
            tick_start, tick_step = time.monotonic(), done
        last = done == cfg.total_steps
        snap, grid = done % cfg.snapshot_every == 0 or last, done % cfg.sample_every == 0 or last
        evaluate = parts.evaluate is not None and (done % parts.eval_every == 0 or last)
        model = _ema_model(parts.ema) if snap or grid or evaluate else None
        if snap:
            _snapshot(run_dir, done, parts, model)
        if evaluate:
            parts.evaluate(model, done)
        if not grid or parts.dist.rank != 0:
            model = None  # only rank 0 draws, and only after the checkpoint
        preempted = parts.preempt is not None and parts.preempt.requested_anywhere(device)
        # on the cadence only healthy states; at a stop always (a skipped step changed no weight: resume stays exact)
        if (counters["in_a_row"] == 0 and done % cfg.checkpoint_every == 0) or done == stop or preempted:
            _checkpoint(run_dir, done, parts, counters, cfg.keep_checkpoints)
            if parts.dist.rank == 0:
                _never_fatal(f"step {done}: loss.png not written", plot_losses, run_dir)
        if model is not None:  # after the checkpoint: a grid never costs the step it belongs to
            _never_fatal(f"step {done}: sample grid failed", _draw_samples, parts, model, run_dir / "samples" / f"step_{done:09d}", done)
            del model
        if preempted:
            raise Preempted(done)
    return stop
