"""Step time, throughput, MFU and peak memory per config and ZeRO stage, as a table:

    python -m sct.bench dist --configs configs/A.yaml configs/B.yaml --stages 2 3 --steps 20 [--nproc 8] [key=value ...]

Each (config, stage) runs `sct.train` for `--steps` steps in a fresh run dir under `--out` (torchrun
when --nproc > 1), with no snapshots or sample grids, and reports its second tick (the first one holds
start-up and compilation). Overrides apply to every run (e.g. run.batch_size=32 run.precision=bf16).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

NEVER = 10**9


def run_one(config: str, stage: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.out) / f"{Path(config).stem}_z{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    half = max(args.steps // 2, 1)
    overrides = [f"run.dir={run_dir}", "dist.engine=deepspeed", f"dist.zero_stage={stage}", f"run.total_steps={NEVER}",
                 f"run.max_steps_per_job={2 * half}", f"run.log_every={half}", f"run.checkpoint_every={NEVER}",
                 f"run.snapshot_every={NEVER}", f"run.sample_every={NEVER}", *args.overrides]
    entry = [str(Path(__file__).resolve().parent / "train.py"), "--config", config, *overrides]
    cmd = [sys.executable, *entry] if args.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), *entry]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{config} ZeRO-{stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", required=True)
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--out", default="runs/bench_dist")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    cols = ["sec_per_step", "images_per_s", "time/jvp", "time/forward", "time/backward", "time/optimizer", "mfu", "mem/peak_gib_max"]
    print("| config | ZeRO | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for config in args.configs:
        for stage in args.stages:
            r = run_one(config, stage, args)
            cells = [f"{r[c]:.4g}" if c in r else "-" for c in cols]
            print(f"| {Path(config).stem} | {stage} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
