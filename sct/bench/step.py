"""`python -m sct.bench step`: training-step speed on one device (s/step, img/s, the time split, MFU, memory) as a table.

    python -m sct.bench step --configs configs/sCT_xl_512.yaml --objectives diffusion sct scd \
        --backbones edm2-xl dit-xl/2 --engines torch zero1 zero3 --batch 32 --steps 20 --warmup 5 \
        --precision bf16 [--guidance W] [--isolate] [--profile DIR] [--out FILE] [key=value ...]     # GPU: minutes
    OMP_NUM_THREADS=1 python -m sct.bench step --config configs/toy_sct.yaml --steps 3      # CPU (`--config` = `--configs`)

One process, synthetic batches of the config's shape (random normal images, one-hot labels, pinned host memory;
the `data` section is their copy to the device; no shards, checkpoints or sample grids). Each case (config x
objective x backbone x engine) builds its parts with the training code itself (`sct.experiment` builders,
`sct.train.build_engine`: TorchEngine or DeepSpeed ZeRO 0-3 on one rank, `sct.models.speed.finish`) and runs
`sct.loop.train_step`: `--warmup` untimed steps, then `--steps` timed ones; the table shows medians per step.
Backbones: `config` (the config's own) or a preset (edm2-s..xxl, dit-*/1,2,4; 64x64x4 latents, 1000 classes).
sCD distills from a random teacher of the student's shape (zero-initialised layers of student and teacher
get small random values, so no loss or gradient is trivially 0), guided at `--guidance` (default: the
config's sCD guidance, else 1.2 with classes, 1 without; > 1 is two teacher passes). `key=value` overrides
apply to every case after its objective/backbone/engine are set (e.g. model.channels_last=true).

Timing: on GPU the step is timed with CUDA events and the sections (data, teacher, JVP, forward = objective -
teacher - JVP, backward, optimizer, EMA) with `sct.stats` CUDA events (no host sync inside the step); on CPU
with perf_counter. MFU counts the step's FLOPs with `sct.dist.flops` against the device's dense peak (none on
CPU). `peak GiB`: torch.cuda.max_memory_allocated over the timed steps on GPU; on CPU the ZeRO formula's model
states (fp32 weights, grads, Adam, EMA, teacher) plus the measured activations. `act GiB`: the peak one
objective + backward allocates above what was live before it (`sct.bench.memory.peak_bytes`: allocator
statistics on GPU, exact storage accounting on CPU). `--isolate` runs each case in a fresh process (clean
peak memory; no ZeRO-3 hooks left over). `--profile DIR`: a torch.profiler trace per case and the kernel
breakdown (`sct.bench.profile`).

Tests: `pytest tests/unit/test_bench_step.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from pipelines.data import data_shape, num_classes
from sct import dist, loop, stats
from sct.bench.memory import peak_bytes
from sct.config import ConfigError, apply_overrides, from_dict
from sct.dist.flops import peak_flops, step_flops_per_sample, zero_model_state_bytes
from sct.experiment import TrainConfig, build_model, count_parameters
from sct.models import speed
from sct.models.dit import DIT_PRESETS
from sct.models.unet import UNET_PRESETS
from sct.objectives.diffusion import DiffusionConfig, TrigFlowDiffusion
from sct.objectives.scm import SCM, DataVelocity, SCDConfig, SCTConfig, TeacherVelocity
from sct.optim import lr_at
from sct.train import build_engine

OBJECTIVES = {"diffusion": DiffusionConfig, "sct": SCTConfig, "scd": SCDConfig}
ENGINES = ("torch", "zero0", "zero1", "zero2", "zero3")
SECTIONS = ("data", "teacher", "jvp", "forward", "backward", "optimizer", "ema")
COLUMNS = ("s/step", "img/s", *SECTIONS, "TFLOP/s", "MFU", "peak GiB", "act GiB", "loss")
RANDOM_TEACHER = "<random teacher of the student's shape>"
DEFAULT_GUIDANCE = 1.2  # Lu & Song 2024 Table 5, sCD XXL 2-step guidance


def backbone_name(preset: str) -> str:
    if preset == "config":
        return preset
    if preset in UNET_PRESETS:
        return "unet"
    if preset in DIT_PRESETS:
        return "dit"
    raise ConfigError("--backbones", f"unknown backbone {preset!r} (config; U-Net: {', '.join(UNET_PRESETS)}; DiT: {', '.join(DIT_PRESETS)})")


def case_config(config: str, objective: str, preset: str, engine: str, batch: int | None, precision: str | None,
                overrides: list[str], guidance: float | None = None) -> TrainConfig:
    """The config file with the case's objective, backbone preset, engine, batch and precision (None: the
    config's), then `overrides`."""
    raw = yaml.safe_load(Path(config).read_text()) or {}
    consistency = {"sct", "scd"}
    old = raw.get("objective", {})
    keep = (old.get("name") in consistency) == (objective in consistency)  # p_mean etc. mean the same thing
    fields = {f.name for f in dataclasses.fields(OBJECTIVES[objective])}
    obj = {k: v for k, v in old.items() if keep and k in fields} | {"name": objective}
    if objective == "scd":
        obj = {"guidance_scale": DEFAULT_GUIDANCE, **obj, "teacher": RANDOM_TEACHER}
        if guidance is not None:
            obj["guidance_scale"] = guidance
    old_bb = raw.get("model", {}).get("backbone", {})
    bb = old_bb
    if preset != "config":
        name = backbone_name(preset)
        bb = {k: v for k, v in old_bb.items() if old_bb.get("name") == name and k != "preset"} | {"name": name, "preset": preset}
    raw["objective"] = obj
    raw["model"] = {**raw.get("model", {}), "backbone": bb, "init_from": ""}
    raw["sampling"] = {"method": "ode" if objective == "diffusion" else "consistency"}
    raw["dist"] = {**raw.get("dist", {}), "engine": "torch" if engine == "torch" else "deepspeed",
                   "zero_stage": 0 if engine == "torch" else int(engine[4:])}
    run = {"batch_size": batch, "precision": precision}
    raw["run"] = {**raw.get("run", {}), "grad_accum": 1, **{k: v for k, v in run.items() if v is not None}}
    raw, overridden = apply_overrides(raw, overrides)
    cfg = from_dict(TrainConfig, raw, source=f"{config} ({objective}, {preset}, {engine})", overridden=overridden)
    if objective == "scd" and not num_classes(cfg.data) and guidance is None and "objective.guidance_scale" not in overridden:
        cfg.objective.guidance_scale = 1.0  # no classes: no guidance
    return cfg


def build_objective(cfg: TrainConfig) -> torch.nn.Module:
    """As `sct.experiment.build_objective`, but sCD's teacher is a random TrigFlow model of the student's shape."""
    obj, sd = cfg.objective, cfg.model.precond.sigma_data
    if isinstance(obj, DiffusionConfig):
        return TrigFlowDiffusion(obj, sd)
    if isinstance(obj, SCDConfig):
        return SCM(obj, sd, TeacherVelocity(build_model(cfg.model)))  # SCM sets the scale from obj.guidance_scale
    return SCM(obj, sd, DataVelocity())


@torch.no_grad()
def unzero(*modules: torch.nn.Module, std: float = 1e-3) -> None:
    """Give zero-initialised parameters (fresh nets output 0, so a random teacher's velocity and the sCD loss
    would be exactly 0) small random values, so that every loss and gradient of the benchmark is non-trivial."""
    for module in modules:
        for p in module.parameters():
            if not p.any():
                p.normal_(0.0, std)


def synthetic_batch(cfg: TrainConfig, micro: int, device: torch.device) -> dict:
    """One host batch of the data config's shape (pinned on GPU: the loop's copy to the device is the data section)."""
    batch = {"x": torch.randn(micro, *data_shape(cfg.data))}
    if num_classes(cfg.data):
        batch["labels"] = torch.nn.functional.one_hot(torch.randint(num_classes(cfg.data), (micro,)), num_classes(cfg.data)).float()
    return {k: v.pin_memory() if device.type == "cuda" else v for k, v in batch.items()}


class Repeat:
    """The same in-memory batch forever (the loop's data iterator)."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.batch


class StepTimer:
    """Seconds of one step: CUDA events on GPU, perf_counter + synchronize elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def _median_sections(per_step: list[dict]) -> dict[str, float | None]:
    """Median seconds per section; None for a section no step ran (no teacher outside sCD, no JVP in diffusion)."""
    out = {}
    for name in ("data", "teacher", "jvp", "backward", "optimizer", "ema"):
        out[name] = statistics.median(s.get(name, 0.0) for s in per_step) if any(name in s for s in per_step) else None
    forward = [s.get("objective", 0.0) - s.get("teacher", 0.0) - s.get("jvp", 0.0) for s in per_step]
    return out | {"forward": statistics.median(forward)}


def run_case(cfg: TrainConfig, args: argparse.Namespace, case: tuple[str, str, str, str]) -> dict:
    """Build the case's parts, warm up, time `args.steps` steps; one table row (plus the profile if asked)."""
    d = dist.init(cfg.dist, cfg.run.device)
    device = d.device
    stats.set_sync(None)
    stats.set_cuda_events(device.type == "cuda")  # sections on the stream, no host sync inside the step
    torch.manual_seed(cfg.run.seed)
    net = build_model(cfg.model).to(device)
    objective = build_objective(cfg).to(device)
    unzero(net, objective)
    micro = cfg.run.batch_size // d.world_size
    batch = synthetic_batch(cfg, micro, device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16"):
        flops = step_flops_per_sample(objective, net, {k: v[:1] for k, v in batch.items()}, 0)
    engine, ema = build_engine(cfg, net, objective, d)
    speed.finish([net, objective], cfg.model, cfg.dist.engine)
    teacher = getattr(objective.velocity, "teacher", None) if hasattr(objective, "velocity") else None
    if teacher is not None:
        stats.time_module(teacher, "teacher")
    parts = loop.Parts(net=net, objective=objective, engine=engine, ema=ema, data=Repeat(batch),
                       lr=partial(lr_at, cfg.optimizer, total_steps=cfg.run.total_steps),
                       snapshot_config={}, write_samples=lambda *_: None, dist=d)
    autocast = loop.step_autocast(cfg.run, parts, device)
    step = 0
    for step in range(args.warmup):
        loop.train_step(cfg.run, parts, step, device, autocast)
    stats.collect_times()
    stats.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds, sections = [], []
    for step in range(args.warmup, args.warmup + args.steps):
        with StepTimer(device) as timer:
            loop.train_step(cfg.run, parts, step, device, autocast)
        seconds.append(timer.seconds)
        sections.append(stats.collect_times())
    loss = stats.collect().get("loss", float("nan"))
    peak_cuda = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    act = _activation_bytes(parts, {k: v.to(device) for k, v in batch.items()}, step + 1, device, autocast)
    stats.collect_times()
    stats.collect()
    n = count_parameters(net.backbone)
    if peak_cuda is None:
        states = zero_model_state_bytes(n, cfg.dist.zero_stage, d.world_size, "fp32", n_frozen=n if teacher is not None else 0,
                                        ema_sharded=cfg.dist.zero_stage == 3)["total"]
        peak = (states + act) / 2**30
    else:
        peak = peak_cuda
    sec = statistics.median(seconds)
    tflops = flops * cfg.run.batch_size / sec / 1e12
    peak_device = peak_flops(device, cfg.run.precision)
    label = _label(case)
    row = {"case": label, **dict(zip(("config", "objective", "backbone", "engine"), (Path(case[0]).stem, *case[1:]))),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "params": n,
           "s/step": sec, "img/s": cfg.run.batch_size / sec, **_median_sections(sections), "TFLOP/s": tflops,
           "MFU": tflops * 1e12 / peak_device if peak_device else None, "peak GiB": peak, "act GiB": act / 2**30, "loss": loss}
    if args.profile:
        from sct.bench.profile import profile_steps

        row["profile"] = profile_steps(lambda s: loop.train_step(cfg.run, parts, s, device, autocast), step + 2,
                                       args.profile_steps, device, Path(args.profile) / f"{_slug(label)}.json")
    stats.set_cuda_events(False)
    return row


def _activation_bytes(parts: loop.Parts, batch: dict, step: int, device: torch.device, autocast: torch.autocast) -> int:
    """Peak bytes one objective + backward allocates above what was live (then the engine steps, as the loop would)."""

    def objective_and_backward():
        with autocast:
            out = parts.objective(parts.net, batch, step)
        parts.engine.backward(out.mean())

    _, act = peak_bytes(objective_and_backward, device)
    parts.engine.step(parts.lr(step))
    return act


def _free_device_memory() -> None:
    """After a case: its parts are unreachable; return their memory before the next case builds its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _label(case: tuple[str, str, str, str]) -> str:
    return f"{Path(case[0]).stem} {case[1]} {case[2]} {case[3]}"


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def format_table(rows: list[dict]) -> str:
    keys = ("config", "objective", "backbone", "engine")
    lines = ["| " + " | ".join(keys) + " | params | " + " | ".join(COLUMNS) + " |", "|---|---|---|---|---:|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append("-" if v is None else f"{v:.1%}" if c == "MFU" else f"{v:.4g}")
        lines.append("| " + " | ".join(r[k] for k in keys) + f" | {r['params'] / 1e6:.3g}M | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cases(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    return [(c, o, b, e) for c in args.configs for o in args.objectives for b in args.backbones for e in args.engines]


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _run_isolated(case: tuple[str, str, str, str], args: argparse.Namespace, argv: list[str]) -> dict:
    config, objective, preset, engine = case
    passthrough = [a for a in argv if _is_override(a)]
    optional = [*(["--batch", str(args.batch)] if args.batch else []), *(["--precision", args.precision] if args.precision else []),
                *(["--guidance", str(args.guidance)] if args.guidance is not None else []),
                *(["--profile", args.profile, "--profile-steps", str(args.profile_steps)] if args.profile else [])]
    cmd = [sys.executable, "-m", "sct.bench", "step", "--configs", config, "--objectives", objective, "--backbones", preset,
           "--engines", engine, "--steps", str(args.steps), "--warmup", str(args.warmup), "--json", *optional, *passthrough]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"case {case} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m sct.bench step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", "--config", nargs="+", required=True, help="training configs (data shape, model, optimizer, run.*)")
    parser.add_argument("--objectives", nargs="+", choices=list(OBJECTIVES), default=["sct"])
    parser.add_argument("--backbones", nargs="+", default=["config"], help="config (its own), or presets: edm2-s..xxl, dit-s/2..dit-xl/2 (/1, /4)")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["torch"])
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's run.batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator warm-up)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: the config's run.precision")
    parser.add_argument("--guidance", type=float, default=None, help="sCD teacher's classifier-free guidance scale")
    parser.add_argument("--isolate", action="store_true", help="run each case in a fresh process")
    parser.add_argument("--profile", metavar="DIR", default=None, help="torch.profiler trace per case into DIR + kernel breakdown")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--out", metavar="FILE", default=None, help="also write the table (markdown) and FILE.jsonl rows")
    parser.add_argument("--json", action="store_true", help="print each row as one JSON line instead of the table")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    overrides = [a for a in argv if _is_override(a)]  # anywhere, even after a list option such as --backbones
    args = parser.parse_args([a for a in argv if not _is_override(a)])
    args.overrides = overrides
    if args.steps < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        print("config error: --steps and --batch must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    rows = []
    try:
        configs = [case_config(*case, args.batch, args.precision, args.overrides, args.guidance) for case in _cases(args)]  # all checked first
        for case, cfg in zip(_cases(args), configs):
            print(f"# {_label(case)} ...", file=sys.stderr, flush=True)
            row = _run_isolated(case, args, argv) if args.isolate else run_case(cfg, args, case)
            _free_device_memory()
            rows.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            elif "profile" in row:
                print(f"\n## profile: {row['case']}\n\n{row['profile']}\n", flush=True)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # the one-rank process group of the ZeRO cases stays up until exit: DeepSpeed caches its groups, so a
    # destroyed and re-created group would break the next call in this process
    if args.json:
        return 0
    table = format_table(rows)
    device = rows[0]["device"] if rows else "?"
    text = f"device: {device}; median of {args.steps} steps after {args.warmup} warm-up; times in seconds per step\n\n{table}"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(f"{args.out}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(text, flush=True)
    return 0
