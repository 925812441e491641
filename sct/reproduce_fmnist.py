"""The Fashion-MNIST reproduction, one command: `python -m sct.reproduce_fmnist [--out runs/fmnist] [--report docs]`.

Runs the user's own commands as subprocesses, two at a time on the machine's cores (`--jobs`):
  1. `python -m sct.fmnist_classifier train`: the domain feature extractor (its FD works offline);
  2. `python -m sct.train --config configs/fmnist_diffusion.yaml`: the TrigFlow diffusion teacher;
  3. `sct.train` of configs/fmnist_scd.yaml and fmnist_sct.yaml from that teacher (Algorithm 1: the student
     starts as the teacher), once per adaptive weighting (`objective.adaptive_weighting`: paper, decoupled, off;
     paper and decoupled also with the head fed ln(σd tan t)), and configs/fmnist_ict.yaml from scratch;
  4. `python -m sct.evaluate --feature-extractor fmnist` of every snapshot at 1 and 2 steps, and of the
     teacher's Heun ODE sampler at `--ode-steps` intervals; the FD of real training images is the floor.
Writes results.json, report.md (the table, the issue's targets met or not, wall times) and samples.png
(20 samples per row, class i mod 10) into --out; --report DIR copies them there as
fmnist_reproduction_results.md and fmnist_reproduction.png. A finished stage (its snapshot, classifier or JSON exists) is not rerun, and
an interrupted training resumes from its checkpoint, so rerunning the command continues where it stopped.
SIGTERM or Ctrl-C stops the running stages (sct.train checkpoints and exits 75) and exits 75.
`--set KEY=VALUE` overrides every training config (the e2e test shrinks the network that way).
Tests: tests/e2e/test_fmnist_reproduction.py.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sct.cli_errors import UsageError, guarded
from sct.exit_codes import PREEMPTED

REFERENCE = "array:fashion_mnist:test"
VARIANTS = {  # name -> (config, overrides): the adaptive weightings of MATH §3 for sCD and sCT
    "scd-paper": ("fmnist_scd", ["objective.adaptive_weighting=paper"]),
    "scd-paper-logsigma": ("fmnist_scd", ["objective.adaptive_weighting=paper", "objective.adaptive_input=log_sigma"]),
    "scd-decoupled": ("fmnist_scd", ["objective.adaptive_weighting=decoupled"]),
    "scd-decoupled-logsigma": ("fmnist_scd", ["objective.adaptive_weighting=decoupled", "objective.adaptive_input=log_sigma"]),
    "scd-off": ("fmnist_scd", ["objective.adaptive_weighting=off"]),
    "sct-paper": ("fmnist_sct", ["objective.adaptive_weighting=paper"]),
    "sct-decoupled": ("fmnist_sct", ["objective.adaptive_weighting=decoupled"]),
    "sct-decoupled-logsigma": ("fmnist_sct", ["objective.adaptive_weighting=decoupled", "objective.adaptive_input=log_sigma"]),
    "sct-off": ("fmnist_sct", ["objective.adaptive_weighting=off"]),
}
STOPS = (signal.SIGTERM, signal.SIGINT)
TARGETS = {"scd": 1.3, "sct": 2.0}  # issue 13: 2-step domain FD within this factor of the teacher's ODE sampler


@dataclass
class Job:
    name: str
    argv: list[str]
    output: Path  # exists once the job has finished; a rerun skips the job then
    needs: tuple[str, ...] = ()
    proc: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float | None = None
    log: Path = field(default_factory=Path)


def snapshot_of(run_dir: Path, steps: int) -> Path:
    return run_dir / "snapshots" / f"snapshot_{steps:09d}.safetensors"


def steps_of(a: argparse.Namespace, name: str) -> int:
    """Training steps of a stage: the teacher's, iCT's, or the students' (every variant)."""
    return {"teacher": a.teacher_steps, "ict": a.ict_steps}.get(name, a.student_steps)


def train_argv(config: str, run_dir: Path, steps: int, extra: list[str]) -> list[str]:
    cadence = [f"run.total_steps={steps}", f"run.snapshot_every={steps}", f"run.sample_every={steps}",
               f"run.checkpoint_every={min(200, steps)}", f"run.log_every={max(1, min(50, steps // 10))}"]
    return [sys.executable, "-m", "sct.train", "--config", f"configs/{config}.yaml", f"run.dir={run_dir}", *cadence, *extra]


def plan(a: argparse.Namespace) -> list[Job]:
    """Every stage with its command, its output and what it waits for."""
    out, cls = a.out, a.out / "fmnist_cnn.safetensors"
    teacher = snapshot_of(out / "teacher", a.teacher_steps)
    jobs = [Job("classifier", [sys.executable, "-m", "sct.fmnist_classifier", "train", "--out", str(cls), "--epochs", str(a.classifier_epochs)], cls),
            Job("teacher", train_argv("fmnist_diffusion", out / "teacher", a.teacher_steps, a.set), teacher),
            Job("ict", train_argv("fmnist_ict", out / "ict", a.ict_steps, a.set), snapshot_of(out / "ict", a.ict_steps))]
    for name in a.variants:
        config, overrides = VARIANTS[name]
        init = [f"model.init_from={teacher}"] + ([f"objective.teacher={teacher}"] if config == "fmnist_scd" else [])
        jobs.append(Job(name, train_argv(config, out / name, a.student_steps, [*overrides, *init, *a.set]), snapshot_of(out / name, a.student_steps), ("teacher",)))
    jobs.append(Job("data", [sys.executable, "-m", "sct.reproduce_fmnist", "--data-fd", "--out", str(out), "--num-samples", str(a.num_samples)],
                    out / "eval" / "data.json", ("classifier",)))
    evals = [("teacher", teacher, a.ode_steps)] + [(j.name, j.output, k) for j in jobs if j.name == "ict" or j.name in a.variants for k in (1, 2)]
    for name, snapshot, steps in evals:  # in this order: the data floor and the teacher's long ODE evaluation start first
        argv = [sys.executable, "-m", "sct.evaluate", "--snapshot", str(snapshot), "--reference", REFERENCE, "--num-samples", str(a.num_samples),
                "--steps", str(steps), "--metrics", "fid", "--feature-extractor", "fmnist", "--domain-classifier", str(cls),
                "--cache", str(out / "eval_cache"), "--out", str(out / "eval" / f"{name}_{steps}.json")]
        jobs.append(Job(f"eval {name} {steps}", argv, out / "eval" / f"{name}_{steps}.json", (name, "data")))  # "data" fills the cache first
    for j in jobs:
        j.log = out / "logs" / (j.name.replace(" ", "_") + ".log")
    first = [j for j in jobs if j.name in ("classifier", "teacher", "data", f"eval teacher {a.ode_steps}")]
    return first + [j for j in jobs if j not in first]


class Stop(Exception):
    """SIGTERM/SIGINT reached the orchestrator."""


def run_jobs(jobs: list[Job], parallel: int) -> None:
    """Run the jobs whose needs are done, `parallel` at a time, each with cores/parallel threads; a status line a minute."""
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    done = {j.name for j in jobs if j.output.exists()}
    for j in jobs:
        if j.name in done:
            print(f"reproduce: {j.name}: done before ({j.output})", flush=True)
    pending, running, begun, last_status = [j for j in jobs if j.name not in done], [], time.time(), time.time()

    stops = []  # the handler only records the signal: the loop stops between two bookkeeping steps, never inside one
    old = {s: signal.signal(s, lambda signum, _: stops.append(signum)) for s in STOPS}
    try:
        while pending or running:
            if stops:
                raise Stop
            for j in [j for j in pending if all(n in done for n in j.needs)][: parallel - len(running)]:
                j.log.parent.mkdir(parents=True, exist_ok=True)
                with open(j.log, "ab") as log:
                    j.proc, j.started = subprocess.Popen(j.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True), time.time()
                pending.remove(j)
                running.append(j)
                print(f"reproduce: {j.name}: started ({len(done)}/{len(jobs)} done; log {j.log})", flush=True)
            time.sleep(0.5)
            for j in [j for j in running if j.proc.poll() is not None]:
                running.remove(j)
                j.seconds = time.time() - j.started
                if j.proc.returncode != 0 or not j.output.exists():
                    tail = "\n".join(j.log.read_text(errors="replace").splitlines()[-15:])
                    raise RuntimeError(f"{j.name} failed (exit {j.proc.returncode}) after {j.seconds:.0f} s: {' '.join(j.argv)}\n"
                                       f"last lines of {j.log}:\n{tail}")
                done.add(j.name)
                print(f"reproduce: {j.name}: done in {j.seconds:.0f} s ({len(done)}/{len(jobs)} done, {time.time() - begun:.0f} s so far)", flush=True)
            if running and time.time() - last_status > 60:
                last_status = time.time()
                for j in running:
                    lines = j.log.read_text(errors="replace").splitlines()
                    print(f"reproduce: {j.name} ({time.time() - j.started:.0f} s): {lines[-1][-140:] if lines else ''}", flush=True)
    finally:
        for j in running:  # sct.train checkpoints on SIGTERM and exits 75; a rerun resumes it
            os.killpg(j.proc.pid, signal.SIGTERM)
        for j in running:
            j.proc.wait()
        for s, h in old.items():
            signal.signal(s, h)


def train_seconds(run_dir: Path) -> float:
    """Σ sec_per_step × steps per logged tick of metrics.jsonl: training time without start-up, across resumes."""
    total, last = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "sec_per_step" in row:
            total, last = total + row["sec_per_step"] * (row["step"] - last), row["step"]
    return total


def data_fd(out: Path, num: int) -> None:
    """FD of the first `num` training images against the reference: the floor no generator can beat at this `num`."""
    from sct.evaluate import EvalConfig, extractor_weights, fidelity
    from sct.reference import load_reference

    cfg = EvalConfig(metrics=("fid",), feature_extractor="fmnist", domain_classifier=str(out / "fmnist_cnn.safetensors"), reference=REFERENCE, num=num)
    values, ref = fidelity(load_reference("array:fashion_mnist:train", num, 16), cfg, extractor_weights(cfg), out / "eval_cache")
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "data.json").write_text(json.dumps({"metrics": values, "protocol": {"source": "array:fashion_mnist:train", **ref}}, indent=2) + "\n")


def collect(a: argparse.Namespace) -> dict:
    """results.json: every FD, its ratio to the teacher's, training steps and seconds."""
    from sct.fmnist_classifier import load_classifier

    fd = lambda name: json.loads((a.out / "eval" / f"{name}.json").read_text())["metrics"]["frechet_inception_distance"]
    teacher = fd(f"teacher_{a.ode_steps}")
    rows = {"data": {"fd": fd("data")}, "teacher": {"fd": teacher, "steps": a.teacher_steps, "train_s": train_seconds(a.out / "teacher"), "nfe": 2 * a.ode_steps - 1}}
    for name in ["ict", *a.variants]:
        one, two = fd(f"{name}_1"), fd(f"{name}_2")
        rows[name] = {"fd_1": one, "fd_2": two, "ratio_1": one / teacher, "ratio_2": two / teacher, "steps": steps_of(a, name),
                      "train_s": train_seconds(a.out / name)}
    protocol = json.loads((a.out / "eval" / f"teacher_{a.ode_steps}.json").read_text())["protocol"]
    return {"rows": rows, "num_samples": a.num_samples, "ode_steps": a.ode_steps, "reference": REFERENCE, "protocol": protocol,
            "classifier": load_classifier(a.out / "fmnist_cnn.safetensors")[1]}


def figure(a: argparse.Namespace, path: Path) -> None:
    """samples.png: one row per sampler (20 samples, seeds 0-19, class i mod 10), the teacher's ODE on top."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    from sct.evaluate import ModelSource

    rows = [(f"teacher ODE ({2 * a.ode_steps - 1} NFE)", snapshot_of(a.out / "teacher", a.teacher_steps), a.ode_steps)]
    rows += [(f"{name} {k}-step", snapshot_of(a.out / name, steps_of(a, name)), k) for name in [*a.variants, "ict"] for k in (1, 2)]
    fig = Figure(figsize=(10, 0.62 * len(rows)))
    for i, (label, snapshot, steps) in enumerate(rows):
        images = ModelSource.from_snapshot(snapshot, torch.device("cpu")).images(list(range(20)), 0, steps, None)[:, 0].numpy()
        ax = fig.add_subplot(len(rows), 1, i + 1)
        ax.imshow(np.concatenate(list(np.pad(images, ((0, 0), (1, 1), (1, 1)), constant_values=128)), axis=1), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, hspace=0.08)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    Image.open(path).convert("L").save(path, optimize=True)  # all grey: a third of the RGBA file


def report(res: dict, a: argparse.Namespace) -> str:
    """The Markdown table, the targets and how the numbers were produced."""
    r = res["rows"]
    lines = [(f"Domain FD (`python -m sct.evaluate --feature-extractor fmnist`, {res['num_samples']} samples, seeds 0-{res['num_samples'] - 1}, "
             f"class i mod 10, against the first {res['num_samples']} test images); ratio = FD / the teacher's ODE FD; train s = Σ s/step "
             "from metrics.jsonl (no start-up)."), "",
             "| sampler | steps trained | train s | FD 1-step | FD 2-step | 1-step / teacher | 2-step / teacher |", "|---|---:|---:|---:|---:|---:|---:|",
             f"| training images (the floor at this sample count) | - | - | - | {r['data']['fd']:.2f} | - | - |",
             (f"| teacher ODE, Heun {a.ode_steps} intervals ({r['teacher']['nfe']} NFE) | {r['teacher']['steps']} | {r['teacher']['train_s']:.0f} | - | "
              f"{r['teacher']['fd']:.2f} | - | 1.00 |")]
    for name in [*a.variants, "ict"]:
        x = r[name]
        lines.append(f"| {name} | {x['steps']} | {x['train_s']:.0f} | {x['fd_1']:.2f} | {x['fd_2']:.2f} | {x['ratio_1']:.2f} | {x['ratio_2']:.2f} |")
    lines += ["", "Targets (issue 13: 2-step FD within the factor of the teacher's):", ""]
    for name in a.variants:
        limit = TARGETS[name[:3]]
        lines.append(f"- {name}: 2-step {r[name]['ratio_2']:.2f}x the teacher, target <= {limit}x: **{'met' if r[name]['ratio_2'] <= limit else 'not met'}**")
    return "\n".join(lines) + "\n"


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sct.reproduce_fmnist", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/fmnist"), help="folder of every run, evaluation, log and the report")
    p.add_argument("--report", type=Path, help="also copy report.md and samples.png here (fmnist_reproduction_results.md, fmnist_reproduction.png)")
    p.add_argument("--jobs", type=int, default=2, help="stages at a time (each gets cores/jobs threads)")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--student-steps", type=int, default=600, help="sCD and sCT training steps")
    p.add_argument("--ict-steps", type=int, default=3000)
    p.add_argument("--ode-steps", type=int, default=32, help="Heun intervals of the teacher's ODE sampler")
    p.add_argument("--num-samples", type=int, default=5000, help="generated and reference images per FD")
    p.add_argument("--classifier-epochs", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every training config (repeatable)")
    p.add_argument("--data-fd", action="store_true", help=argparse.SUPPRESS)  # the "data" stage, run as a subprocess
    a = p.parse_args(argv)
    if a.data_fd:
        data_fd(a.out, a.num_samples)
        return 0
    a.variants = [v for v in a.variants.split(",") if v]
    if unknown := [v for v in a.variants if v not in VARIANTS]:
        raise UsageError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    for key in ("jobs", "teacher_steps", "student_steps", "ict_steps", "ode_steps", "num_samples", "classifier_epochs"):
        if getattr(a, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')}: must be >= 1, got {getattr(a, key)}")
    if bad := [s for s in a.set if "=" not in s]:
        raise UsageError(f"--set: expected KEY=VALUE, got {bad}")
    begun = time.time()
    try:
        run_jobs(plan(a), a.jobs)
    except Stop:
        print("reproduce: stopped; the running trainings checkpointed, rerun the same command to continue", file=sys.stderr)
        return PREEMPTED
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    res = collect(a)
    res["wall_s"] = time.time() - begun
    (a.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    figure(a, a.out / "samples.png")
    (a.out / "report.md").write_text(report(res, a))
    print((a.out / "report.md").read_text())
    if a.report:
        a.report.mkdir(parents=True, exist_ok=True)
        shutil.copy(a.out / "report.md", a.report / "fmnist_reproduction_results.md")
        shutil.copy(a.out / "samples.png", a.report / "fmnist_reproduction.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
