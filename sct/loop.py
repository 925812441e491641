"""The training loop: accumulation, backward, step, EMA, and the cadence of ticks, checkpoints,
snapshots and sample grids. Knows nothing of the objective's math or the engine's sharding.

Resume is exact by construction: the RNG is reseeded from (seed, step, rank) at every step, the LR is
a function of the step, and the checkpoint holds engine, EMA, data position and counters.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from loguru import logger
from torch import nn

from sct import stats
from sct.checkpoint import latest_training_state, load_training_state, save_snapshot, save_training_state
from sct.config import ConfigError
from sct.ema import EMA


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


@dataclass
class Parts:
    """What the loop drives. `engine` has backward(loss) / step(lr) -> bool / state_dict / load_state_dict."""

    net: nn.Module
    objective: nn.Module
    engine: object
    ema: EMA
    data: Iterator[dict]
    lr: Callable[[int], float]
    snapshot_config: dict  # model + sampling config stored with each snapshot
    write_samples: Callable[[nn.Module, Path], None]  # EMA model, output stem -> PNG grids
    rank: int = 0


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 10_007 + rank


def _checkpoint(run_dir: Path, step: int, parts: Parts, counters: dict, keep: int) -> None:
    state = {"step": step, "engine": parts.engine.state_dict(), "ema": parts.ema.state_dict(), "data": parts.data.state_dict(), "counters": counters}
    path = save_training_state(run_dir, step, state, keep_last=keep)
    logger.info(f"checkpoint: {path}")


def _snapshot(run_dir: Path, step: int, parts: Parts) -> Path:
    path = run_dir / "snapshots" / f"snapshot_{step:09d}.safetensors"
    save_snapshot(path, parts.ema.model.state_dict(), parts.snapshot_config, extra={"step": step})
    return path


def run(cfg: LoopConfig, parts: Parts, run_dir: Path, device: torch.device) -> int:
    """Train until total_steps (or max_steps_per_job); returns the step reached."""
    counters = {"skipped": 0, "in_a_row": 0}
    start = 0
    latest = latest_training_state(run_dir)
    if latest is not None:
        state = load_training_state(latest)
        parts.engine.load_state_dict(state["engine"])
        parts.ema.load_state_dict(state["ema"])
        parts.data.load_state_dict(state["data"])
        counters, start = state["counters"], state["step"]
        logger.info(f"resumed from {latest} at step {start}")
    stop = cfg.total_steps if not cfg.max_steps_per_job else min(cfg.total_steps, start + cfg.max_steps_per_job)
    metrics = stats.JSONLWriter(run_dir / "metrics.jsonl", parts.rank)
    progress = stats.Progress(cfg.total_steps, start)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    tick_start, tick_step = time.monotonic(), start
    for step in range(start, stop):
        torch.manual_seed(step_seed(cfg.seed, step, parts.rank))
        parts.net.train()
        for _ in range(cfg.grad_accum):
            batch = {k: v.to(device, non_blocking=True) for k, v in next(parts.data).items()}
            with autocast:
                loss = parts.objective(parts.net, batch, step)
            stats.report("loss", loss.detach())
            parts.engine.backward(loss.mean())
        if parts.engine.step(parts.lr(step)):
            parts.ema.update(parts.net, step)
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
            record = {"step": done, "lr": parts.lr(step), "skipped": counters["skipped"], **stats.collect()}
            record["sec_per_step"] = (time.monotonic() - tick_start) / (done - tick_step)
            metrics.write(record)
            logger.info(f"{progress.line()}  loss {record.get('loss', float('nan')):.4f}  lr {record['lr']:.2e}  skipped {counters['skipped']}")
            tick_start, tick_step = time.monotonic(), done
        last = done == cfg.total_steps
        if done % cfg.snapshot_every == 0 or last:
            _snapshot(run_dir, done, parts)
        if done % cfg.sample_every == 0 or last:
            parts.write_samples(parts.ema.model, run_dir / "samples" / f"step_{done:09d}")
        if (done % cfg.checkpoint_every == 0 or done == stop) and counters["in_a_row"] == 0:  # only healthy states
            _checkpoint(run_dir, done, parts, counters, cfg.keep_checkpoints)
    return stop
