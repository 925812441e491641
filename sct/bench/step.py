"""`python -m sct.bench step`: one training step of a config's shape, timed section by section, in one process.

    python -m sct.bench step --config configs/sCT_xl_512.yaml --objectives diffusion sct scd \
        --backbones edm2-xl dit-xl/2 --engines torch zero1 zero2 zero3 --warmup 5 --steps 20 \
        run.batch_size=32 run.precision=bf16                                     # GPU: a few minutes
    python -m sct.bench step --config configs/demo_cpu.yaml --steps 3 model.backbone.model_channels=8   # CPU

For each (objective, backbone, engine) it builds the model, the objective and the engine as `sct.train` does,
feeds synthetic batches of the data config's shape (random normal images, one-hot labels; no shards, no
checkpoints, no snapshots, no sample grids), runs `--warmup` steps, then times `--steps` steps and prints one row:
s/step, img/s, the split (data = host-to-device copy, teacher, JVP, forward = the objective less teacher and JVP,
backward, optimizer, EMA; seconds per step), MFU (sct.dist.flops; none on CPU) and peak memory (CUDA allocator
peak; on CPU the process's peak RSS, which includes everything before). Sections are timed with CUDA events on
GPU (no synchronization inside the step) and perf_counter on CPU, through the same `sct.stats.timed` sections as
the training loop. sCD's teacher is a randomly initialized copy of the student's architecture (a real snapshot is
not needed to time it); `--guidance` sets its classifier-free guidance scale (> 1: two teacher passes).
Backbones: `config` (the config's own) or a preset name (edm2-s..xxl, dit-*; 64x64x4 latents, 1000 classes).
Engines: `torch`, `zero0`..`zero3` (DeepSpeed on one rank). Tests: tests/unit/test_bench_step.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import sys
import time

import torch
from torch import nn

from pipelines.data import data_shape, num_classes
from sct import dist, stats
from sct.config import ConfigError, from_dict, load
from sct.dist.engine import DeepSpeedEngine, TorchEngine
from sct.dist.flops import peak_flops, step_flops_per_sample
from sct.ema import EMA
from sct.experiment import TrainConfig, build_model
from sct.models.dit import DIT_PRESETS, DiTConfig
from sct.models.unet import UNET_PRESETS, UNetConfig
from sct.objectives.diffusion import DiffusionConfig, TrigFlowDiffusion
from sct.objectives.scm import SCM, DataVelocity, SCDConfig, SCTConfig, TeacherVelocity
from sct.optim import build_optimizer

SECTIONS = ("data", "teacher", "jvp", "forward", "backward", "optimizer", "ema")
OBJECTIVES = {"diffusion": DiffusionConfig, "sct": SCTConfig, "scd": SCDConfig}


def with_backbone(cfg: TrainConfig, backbone: str) -> TrainConfig:
    """The config with a preset backbone (its own when `backbone` is 'config')."""
    if backbone == "config":
        return cfg
    kind = UNetConfig if backbone in UNET_PRESETS else DiTConfig if backbone in DIT_PRESETS else None
    if kind is None:
        raise ConfigError("--backbones", f"unknown backbone {backbone!r} (config, {', '.join([*UNET_PRESETS, *DIT_PRESETS])})")
    net = from_dict(kind, {"preset": backbone}, source=f"--backbones {backbone}")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=net, init_from=""))


def build_objective(cfg: TrainConfig, name: str, guidance: float) -> nn.Module:
    """The objective `name` with the config's settings when the config trains it, else its defaults."""
    obj = cfg.objective if cfg.objective.name == name else OBJECTIVES[name]()
    sigma_data = cfg.model.precond.sigma_data
    if name == "diffusion":
        return TrigFlowDiffusion(obj, sigma_data)
    if name == "sct":
        return SCM(obj, sigma_data, DataVelocity())
    teacher = build_model(cfg.model)  # random weights: the step's cost does not depend on them
    return SCM(obj, sigma_data, TeacherVelocity(teacher, guidance))


def synthetic_batches(cfg: TrainConfig, micro: int, n: int = 2) -> list[dict]:
    """`n` host batches of the data config's shape, cycled (the 'data' section is their copy to the device)."""
    shape, classes = data_shape(cfg.data), num_classes(cfg.data)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        batch = {"x": torch.randn(micro, *shape, generator=gen)}
        if classes:
            batch["labels"] = nn.functional.one_hot(torch.randint(classes, (micro,), generator=gen), classes).float()
        out.append({k: v.pin_memory() if torch.cuda.is_available() else v for k, v in batch.items()})
    return out


def _engine(cfg: TrainConfig, engine: str, module: nn.ModuleDict, device: torch.device, d: dist.Dist):
    """(engine, EMA) as sct.train builds them for a torch engine or DeepSpeed ZeRO-k on this one rank."""
    net = module["net"]
    optimizer = build_optimizer(cfg.optimizer, module.parameters())
    if engine == "torch":
        return TorchEngine(module, optimizer, cfg.optimizer.grad_clip, cfg.run.grad_accum), EMA(net, cfg.ema)
    from sct.dist.ema_sharded import ShardedEMA

    stage = int(engine.removeprefix("zero"))
    ema = EMA(net, cfg.ema) if stage < 3 else None  # before DeepSpeed partitions the parameters
    ds_cfg = dist.ds_config(dataclasses.replace(cfg.dist, engine="deepspeed", zero_stage=stage), batch_size=cfg.run.batch_size,
                            grad_accum=cfg.run.grad_accum, world_size=d.world_size, grad_clip=cfg.optimizer.grad_clip)
    wrapped = DeepSpeedEngine(dist.build_deepspeed_engine(module, optimizer, ds_cfg), cfg.run.grad_accum)
    return wrapped, ema or ShardedEMA(net, cfg.ema, make_model=lambda: build_model(cfg.model).to(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(cfg: TrainConfig, objective_name: str, engine: str, warmup: int, steps: int, guidance: float = 1.0) -> dict:
    """One row of the table: seconds per step and per section (mean over `steps` after `warmup`), img/s, MFU, peak GiB."""
    stage = -1 if engine == "torch" else int(engine.removeprefix("zero"))
    d = dist.init(dataclasses.replace(cfg.dist, engine="torch" if stage < 0 else "deepspeed", zero_stage=max(stage, 0)), cfg.run.device)
    device = d.device
    micro = cfg.run.batch_size // (cfg.run.grad_accum * d.world_size)
    torch.manual_seed(cfg.run.seed)
    net = build_model(cfg.model).to(device)
    objective = build_objective(cfg, objective_name, guidance).to(device)
    batches = synthetic_batches(cfg, micro)
    bf16 = cfg.run.precision == "bf16"
    probe = {k: v[:1].to(device) for k, v in batches[0].items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        flops = step_flops_per_sample(objective, net, probe, 0)
    teacher = getattr(getattr(objective, "velocity", None), "teacher", None)
    module = nn.ModuleDict({"net": net, "objective": objective})
    engine_, ema = _engine(cfg, engine, module, device, d)
    if teacher is not None:
        stats.time_module(teacher, "teacher")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=stage != 3)
    stats.set_cuda_events(device.type == "cuda")
    stats.set_sync(None)

    def step(i: int) -> None:  # the body of sct.loop.run, without ticks, checkpoints or grids
        torch.manual_seed(i)
        net.train()
        for j in range(cfg.run.grad_accum):
            with stats.timed("data"):
                batch = {k: v.to(device, non_blocking=True) for k, v in batches[(i + j) % len(batches)].items()}
            with autocast, stats.timed("objective"):
                loss = objective(net, batch, i)
            with stats.timed("backward"):
                engine_.backward(loss.mean())
        with stats.timed("optimizer"):
            took = engine_.step(cfg.optimizer.lr)
        if took:
            with stats.timed("ema"):
                ema.update(net, i)

    try:
        for i in range(warmup):
            step(i)
        _sync(device)
        stats.collect_times()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        _sync(device)
        seconds = (time.perf_counter() - start) / steps
        split = {k: v / steps for k, v in stats.collect_times().items()}
    finally:
        stats.set_cuda_events(False)
    split["forward"] = split.pop("objective", 0.0) - split.get("teacher", 0.0) - split.get("jvp", 0.0)
    row = {"s_per_step": seconds, "img_per_s": cfg.run.batch_size / seconds, **{k: split.get(k) for k in SECTIONS}}
    peak = peak_flops(device, cfg.run.precision)
    row["mfu"] = flops * row["img_per_s"] / d.world_size / peak if peak else None
    row["peak_gib"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                       else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    del engine_, ema, module, net, objective
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sct.bench step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="training config whose data shape, model, optimizer and run.* are used")
    parser.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=["sct"])
    parser.add_argument("--backbones", nargs="+", default=["config"], help="config, or preset names (edm2-xl, dit-xl/2, ...)")
    parser.add_argument("--engines", nargs="+", choices=["torch", "zero0", "zero1", "zero2", "zero3"], default=["torch"])
    parser.add_argument("--warmup", type=int, default=3, help="steps run before timing (compilation, allocator warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="sCD teacher's classifier-free guidance scale")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for sct.train")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        base = load(TrainConfig, args.config, args.overrides)
        configs = {b: with_backbone(base, b) for b in args.backbones}
        for cfg in configs.values():
            cfg.check()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    cols = ["s/step", "img/s", *SECTIONS, "MFU", "peak GiB"]
    print(f"| objective | backbone | engine | {' | '.join(cols)} |\n|---|---|---|" + "---:|" * len(cols), flush=True)
    for backbone, cfg in configs.items():
        for objective in args.objectives:
            for engine in args.engines:
                r = measure(cfg, objective, engine, args.warmup, args.steps, args.guidance)
                cells = [_cell(r["s_per_step"], ".4g"), _cell(r["img_per_s"], ".1f"), *(_cell(r[k], ".4g") for k in SECTIONS),
                         _cell(r["mfu"], ".1%"), _cell(r["peak_gib"], ".2f")]
                print(f"| {objective} | {backbone} | {engine} | " + " | ".join(cells) + " |", flush=True)
    if dist.is_distributed():
        dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
