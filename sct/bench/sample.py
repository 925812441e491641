"""Sampling cost: the exported 1- and 2-step samplers against the teacher's ODE sampler, on the same backbone.

    python -m sct.bench sample --export export/ --teacher runs/teacher/snapshots/snapshot_X.safetensors \
        [--batch 16] [--ode-steps 32 63] [--guidance 2.0] [--repeats 3] [--out bench_sample.json]

One run times, per batch of --batch samples: the export's 1- and 2-step samplers (its standalone sampler.py),
and the teacher's TrigFlow PF-ODE (`sct.samplers.ode_sample`, its configured solver: Heun costs 2 evaluations
an interval but the last) at each --ode-steps, without guidance and with --guidance (classifier-free guidance
evaluates the network twice: conditional and unconditional). Reported: network evaluations, median
latency of --repeats timed batches after one warm-up, images/s, and each row's latency over the export's 2-step
latency. The student and the teacher must have the same backbone config (else exit 2).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sct.cli_errors import UsageError, guarded, open_snapshot


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall seconds of fn() over `repeats` runs after one warm-up."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(export: Path, teacher_path: Path, batch: int, ode_steps: list[int], guidance: float, repeats: int, device: torch.device) -> list[dict]:
    from sct.config import from_dict
    from sct.export import load_export
    from sct.samplers import SamplingConfig, ode_sample

    student = load_export(export, str(device))
    teacher, stored = open_snapshot(teacher_path)
    sampling = from_dict(SamplingConfig, stored["sampling"], source=str(teacher_path))
    if sampling.method != "ode":
        raise UsageError(f"--teacher {teacher_path} is not a diffusion (ODE) snapshot")
    if stored["model"]["backbone"] != student.spec["model"]["backbone"]:
        raise UsageError(f"--teacher {teacher_path} and --export {export} have different backbone configs; the comparison needs the same backbone")
    teacher = teacher.to(device)
    seeds, classes = list(range(batch)), [i % max(student.classes, 1) for i in range(batch)]
    labels = torch.nn.functional.one_hot(torch.tensor(classes), student.classes).float().to(device) if student.classes else None
    rows = [{"sampler": f"export {k}-step", "evaluations": k, "guidance": student.spec["guidance"],
             "seconds": _timed(lambda k=k: student.sample(seeds, classes if student.classes else None, k), repeats, device)}
            for k in (1, 2) if str(k) in student.spec["mids"]]
    scales = [1.0] + ([guidance] if guidance != 1.0 and student.classes else [])
    for steps in ode_steps:
        for g in scales:
            nfe = (2 * steps - 1 if sampling.solver == "heun" else steps) * (2 if g != 1.0 else 1)
            run = lambda steps=steps, g=g: ode_sample(teacher, seeds, student.shape, labels, steps, sampling.solver, g, device)
            rows.append({"sampler": f"teacher ODE {sampling.solver} {steps} steps", "evaluations": nfe, "guidance": g, "seconds": _timed(run, repeats, device)})
    two = next((r["seconds"] for r in rows if r["sampler"] == "export 2-step"), rows[0]["seconds"])
    for r in rows:
        r |= {"images_per_s": batch / r["seconds"], "latency_vs_export_2step": r["seconds"] / two}
    return rows


def table(rows: list[dict], batch: int, device: torch.device) -> str:
    lines = [f"batch {batch} on {device}", "| sampler | guidance | network evaluations | latency ms | images/s | x export 2-step |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['sampler']} | {r['guidance']:g} | {r['evaluations']} | {1000 * r['seconds']:.1f} | {r['images_per_s']:.1f} | "
              f"{r['latency_vs_export_2step']:.2f} |" for r in rows]
    return "\n".join(lines)


@guarded
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m sct.bench sample", description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, required=True, help="a folder written by python -m sct.export")
    p.add_argument("--teacher", type=Path, required=True, help="the diffusion snapshot the student was distilled from (same backbone)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ode-steps", type=int, nargs="+", default=[32, 63])
    p.add_argument("--guidance", type=float, default=2.0, help="the guided rows' scale (class-conditional models only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or min(args.ode_steps) < 1:
        raise UsageError("--batch, --repeats and --ode-steps must be >= 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = measure(args.export, args.teacher, args.batch, args.ode_steps, args.guidance, args.repeats, device)
    print(table(rows, args.batch, device))
    if args.out:
        args.out.write_text(json.dumps({"batch": args.batch, "device": str(device), "rows": rows}, indent=2) + "\n")
    return 0
