"""Training entry point, alike under every launcher:

    python -m sct.train --config configs/demo_cpu.yaml [key=value ...] [--dry-run [--world-size N] [--gpu-memory-gib 80]]
    torchrun --nproc_per_node 8 sct/train.py --config X.yaml dist.engine=deepspeed dist.zero_stage=3
    deepspeed sct/train.py --config X.yaml                       (DS_ACCELERATOR=cpu on a CPU host)

Builds the pieces a config names and hands them to `sct.loop.run`. The resolved config is saved as
`<run.dir>/config.yaml`, and the folder created, only after every start-up check has passed (config, device,
run.dir, storage, init_from, teacher, then sct.run_folder: one job per run.dir, config changes and unsafe
checkpoints refused): a rejected start leaves no folder and changes no file in an existing one.
Rerunning the same command resumes from the latest complete checkpoint.
`--restart-if-no-valid-checkpoint`: when every checkpoint is invalid, move them aside and start at step 0.
Exit statuses (0 done, 2 config error, 3 non-finite, 4 data, 5 storage, 6 state, 7 busy, 75 preempted):
sct/exit_codes.py.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed sct/train.py` / `torchrun sct/train.py` run this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from loguru import logger
from torch import nn

from pipelines.data import build_stream, data_shape, num_classes
from sct import dist, exit_codes, loop, phema, run_folder, startup, stats
from sct.config import ConfigError, parse_cli, save_yaml, to_yaml
from sct.decode import Pictures
from sct.dist.ema_sharded import ShardedEMA
from sct.dist.engine import DeepSpeedEngine, TorchEngine
from sct.dist.flops import lowest_zero_stage, peak_flops, step_flops_per_sample, zero_model_state_bytes
from sct.dist.preempt import EXIT_PREEMPTED, Preemption, StartupPreempted
from sct.ema import EMA
from sct.estimate import activation_line, model_line
from sct.eval_training import build_training_eval
from sct.experiment import (
    TrainConfig,
    build_model,
    build_objective,
    count_parameters,
    init_from_snapshot,
    snapshot_config,
)
from sct.models import speed
from sct.optim import build_optimizer, lr_at
from sct.sample import write_grids
from sct.supervise import reports_exit
from sct.tracking import open_sinks


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def dry_run(cfg: TrainConfig, world: int, gpu_memory_gib: float | None = None) -> None:
    print(to_yaml(cfg), end="")
    with torch.device("meta"):
        n = count_parameters(build_model(cfg.model).backbone)
    print(model_line(cfg.model.backbone, n))
    stage = cfg.dist.zero_stage if cfg.dist.engine == "deepspeed" else 0
    frozen = n if cfg.objective.name == "scd" else 0
    mem = zero_model_state_bytes(n, stage, world, "fp32", n_frozen=frozen, ema_sharded=stage == 3)  # bf16 = autocast: states stay fp32
    parts = ", ".join(f"{k} {_size(v)}" for k, v in mem.items() if k != "total")
    print(f"# model states per GPU, ZeRO-{stage} on {world} ranks (fp32 weights, grads, Adam): {_size(mem['total'])} ({parts})"
          + ("; sCD teacher taken as the student's size" if frozen else ""))
    print(activation_line(cfg, max(1, cfg.run.batch_size // (cfg.run.grad_accum * world))))
    if cfg.ema.posthoc.sigma_rels:  # each profile is one more fp32 EMA, sharded like the EMA under ZeRO-3
        print(f"# post-hoc EMA: {len(cfg.ema.posthoc.sigma_rels)} profiles, {_size(4 * n / (world if stage == 3 else 1))} per GPU each, {_size(4 * n)} per stored file")
    if gpu_memory_gib:
        print(zero_advice(n, frozen, world, gpu_memory_gib, extra_bytes=4 * n * len(cfg.ema.posthoc.sigma_rels)))


def zero_advice(n: int, frozen: int, world: int, gpu_memory_gib: float, extra_bytes: float = 0.0) -> str:
    """`--gpu-memory-gib`: the lowest ZeRO stage whose model states (+ `extra_bytes` per GPU: post-hoc EMA profiles,
    counted unsharded) fit the GPU, and what it leaves for activations."""
    stage, mem = lowest_zero_stage(n, world, gpu_memory_gib * 2**30 - extra_bytes, n_frozen=frozen)
    mem = {**mem, "total": mem["total"] + extra_bytes}
    if stage is None:
        return f"# no ZeRO stage fits {gpu_memory_gib:g} GiB per GPU on {world} ranks (ZeRO-3 needs {_size(mem['total'])}): add ranks"
    return (f"# recommended: dist.zero_stage={stage} (lowest stage whose model states fit {gpu_memory_gib:g} GiB per GPU on {world} ranks: "
            f"{_size(mem['total'])}, leaving {_size(gpu_memory_gib * 2**30 - mem['total'])} for activations; "
            "measure them with python -m sct.bench step)")


def build_engine(cfg: TrainConfig, net: nn.Module, objective: nn.Module, d: dist.Dist) -> tuple[object, object]:
    """(engine, EMA) for the config's dist section: TorchEngine + EMA, or DeepSpeed ZeRO 0-3 (+ ShardedEMA under ZeRO-3)."""
    module = nn.ModuleDict({"net": net, "objective": objective})
    optimizer = build_optimizer(cfg.optimizer, module.parameters())
    if cfg.dist.engine == "deepspeed":
        ema = EMA(net, cfg.ema) if cfg.dist.zero_stage < 3 else None  # before DeepSpeed casts or partitions
        ds_cfg = dist.ds_config(cfg.dist, batch_size=cfg.run.batch_size, grad_accum=cfg.run.grad_accum, world_size=d.world_size,
                                grad_clip=cfg.optimizer.grad_clip)
        engine = DeepSpeedEngine(dist.build_deepspeed_engine(module, optimizer, ds_cfg), cfg.run.grad_accum)
        ema = ema or ShardedEMA(net, cfg.ema, make_model=lambda: build_model(cfg.model).to(d.device))
    else:
        engine, ema = TorchEngine(module, optimizer, cfg.optimizer.grad_clip, cfg.run.grad_accum), EMA(net, cfg.ema)
    return engine, ema


@reports_exit  # the status, for a supervisor above the launcher (sct.supervise); also as the sct-train script
def main(argv: list[str] | None = None) -> int:
    preempt = Preemption().install()  # first of all: a signal during start-up exits 75 too (StartupPreempted)
    try:
        return _main(argv, preempt)
    except StartupPreempted as e:
        print(f"{e}; exiting with status {EXIT_PREEMPTED} (rerun the same command)", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        preempt.uninstall()


def _main(argv: list[str] | None, preempt: Preemption) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=None, help="--dry-run: ranks for the memory estimate (default $WORLD_SIZE or 1)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="--dry-run: recommend the lowest ZeRO stage whose model states fit this")
    parser.add_argument("--restart-if-no-valid-checkpoint", action="store_true",
                        help="when run.dir has checkpoints but none is valid, move them aside and start at step 0 (default: refuse, status 6)")
    try:
        cfg, args = parse_cli(sys.argv[1:] if argv is None else argv, TrainConfig, parser)
        if args.world_size is not None and args.world_size < 1:
            raise ConfigError("--world-size", f"must be >= 1, got {args.world_size}")
        if args.dry_run:
            dry_run(cfg, args.world_size or dist.launcher_world_size(), args.gpu_memory_gib)
            return 0
        startup.check_device(cfg.run.device)
        d = dist.init(cfg.dist, cfg.run.device)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as on_exit:  # the run folder's lock, once taken, is released with it
            return _train(cfg, args, d, preempt, on_exit)
    finally:
        if d.owns_group:
            dist.shutdown()


def _train(cfg: TrainConfig, args, d: dist.Dist, preempt: Preemption, on_exit: contextlib.ExitStack) -> int:
    run_dir = Path(cfg.run.dir)
    stats.setup_logging(None, d.rank)  # console only: the run folder is touched once every start-up check has passed
    device = d.device
    micro = cfg.run.batch_size // (cfg.run.grad_accum * d.world_size)
    try:
        startup.check_run_dir(run_dir)
        # storage problems (credentials, bucket, manifest vs config) fail here, before any model is built
        data = build_stream(cfg.data, micro, rank=d.rank, world_size=d.world_size)
        torch.manual_seed(cfg.run.seed)
        net = build_model(cfg.model).to(device)
        if cfg.model.init_from:
            init_from_snapshot(net, cfg.model.init_from)
        objective = build_objective(cfg).to(device)
        # the manifest's latent record: evaluation decodes latents through the VAE, as the snapshots and grids do
        evaluator = build_training_eval(cfg, snapshot_config(cfg, getattr(data, "manifest", None)), run_dir, device, d.rank)
    except ConfigError as e:
        print(f"config error: {args.config}: {e}", file=sys.stderr)
        return 2
    try:  # locks and checks the folder (config diff, ownership); chooses the checkpoint to resume from
        folder = on_exit.enter_context(run_folder.open_run(run_dir, cfg, d, restart=args.restart_if_no_valid_checkpoint))
    except ConfigError as e:
        print(f"config error: {args.config}: {e}", file=sys.stderr)
        return 2
    except exit_codes.Fatal as e:
        print(exit_codes.fatal_line(e.status, e), file=sys.stderr)
        return e.status
    startup.open_run_dir(run_dir, d.rank)  # accepted: now create the folder, log.txt and config.yaml
    dist.log_setup(d)
    if d.rank == 0:
        save_yaml(cfg, run_dir / "config.yaml")
    logger.info(f"{cfg.objective.name}: backbone {cfg.model.backbone.name} with {count_parameters(net.backbone):,} parameters on {device}")
    probe = {"x": torch.randn(1, *data_shape(cfg.data), device=device)}  # shape-only input for the FLOP count
    if num_classes(cfg.data):
        probe["labels"] = torch.eye(num_classes(cfg.data), device=device)[:1]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16"):
        flops = step_flops_per_sample(objective, net, probe, 0)
    torch.manual_seed(cfg.run.seed)
    engine, ema = build_engine(cfg, net, objective, d)
    snap_cfg = snapshot_config(cfg, getattr(data, "manifest", None))  # a shard stream carries its manifest
    ema = phema.attach(ema, net, cfg.ema.posthoc, run_dir / "phema", snap_cfg, d.rank, cfg.run.total_steps)
    speed.finish([net, objective], cfg.model, cfg.dist.engine)  # after the EMA copy and the engine
    teacher = getattr(getattr(objective, "velocity", None), "teacher", None)
    if teacher is not None:
        stats.time_module(teacher, "teacher")
    parts = loop.Parts(
        net=net,
        objective=objective,
        engine=engine,
        ema=ema,
        data=data,
        lr=partial(lr_at, cfg.optimizer, total_steps=cfg.run.total_steps),
        snapshot_config=snap_cfg,
        write_samples=partial(write_grids, cfg=cfg.sampling, shape=data_shape(cfg.data), classes=num_classes(cfg.data),
                              pictures=Pictures(snap_cfg["latent"], device), device=device),
        dist=d,
        preempt=preempt,
        config_text=to_yaml(cfg),
        flops_per_sample=flops,
        peak_flops=peak_flops(device, cfg.run.precision),
        evaluate=evaluator,
        eval_every=cfg.eval.every,
        trackers=partial(open_sinks, cfg.tracking, run_dir, config_text=to_yaml(cfg)) if d.rank == 0 else None,
    )
    preempt.defer()  # from here a signal waits for the next step boundary and its checkpoint
    try:
        reached = loop.run(cfg.run, parts, run_dir, device, resume_from=folder.checkpoint)
    except loop.Preempted as p:
        logger.warning(f"{p}; exiting with status {EXIT_PREEMPTED} (rerun the same command to resume)")
        return EXIT_PREEMPTED
    except Exception as e:  # the documented fatal errors end with their status, anything else is a bug
        status = exit_codes.status_of(e)
        if status is None:
            raise
        logger.error(exit_codes.fatal_line(status, e))
        return status
    finally:
        stats.close_sinks()
        close = getattr(data, "close", None)
        if close is not None:  # the data workers exit now, whatever ended the run (an uncaught error would hang at exit)
            close()
    logger.info(f"stopped at step {reached}/{cfg.run.total_steps}; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
