"""The rendered sbatch script on a real SLURM cluster (tests/integration/slurm_cluster.py: munge, slurmctld and
two slurmd on this machine): 2-node CPU runs of the demo config, shrunk by overrides (tiny U-Net, 12 steps,
gloo, ZeRO-1 so both ranks write checkpoint shards), under torchrun (c10d), srun alone and the deepspeed
launcher; then a run signalled mid-way as `--signal=B:USR1@<s>` would (`scancel --signal=USR1 --batch`):
it must checkpoint, exit 75, requeue itself, and the requeued job must resume: its loss sequence equals
the uninterrupted torchrun run's. A planted secret in the submitting environment appears in no file.

Marked `slurm` (needs root and Debian's slurm-wlm + munge; `.ci/run` installs them and runs
`pytest -m slurm`). About 3 minutes on 2 shared cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, available

from sct.dist.launcher import expand_hostlist

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(available() is not None, reason=str(available()))]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
TINY = ["data.dataset=digits", "model.backbone.model_channels=8", "model.backbone.channel_mult=[1,2]", "run.batch_size=8", f"run.total_steps={STEPS}",
        "run.log_every=1", "run.checkpoint_every=1000", "run.snapshot_every=1000", "run.sample_every=1000", "sampling.num=4",
        "sampling.steps=[1]", "dist.engine=deepspeed", "dist.zero_stage=1", "dist.backend=gloo", "optimizer.warmup_steps=0"]
PLANTED = "planted-secret-value-4f1c9a"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", AWS_SECRET_ACCESS_KEY=PLANTED)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SCT_RANKS_DIR"):
        env.pop(key, None)
    return env


def render(out: Path, run_dir: Path, launcher: str) -> Path:
    cmd = [sys.executable, "-m", "infra.launch", "slurm", "--config", "configs/demo_cpu.yaml", "--nodes", "2", "--launcher", launcher,
           "--python", sys.executable, "--workdir", str(ROOT), "--time", "00:10:00", "--signal-seconds", "120", "--exclusive",
           *TINY, f"run.dir={run_dir}", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return out / "job.sbatch"


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def job_field(cluster: SlurmCluster, job: int, key: str) -> str:
    text = cluster.accounting(job)
    return next(w.split("=", 1)[1] for w in text.split() if w.startswith(f"{key}="))


def check_run(cluster: SlurmCluster, job: int, out: Path, run_dir: Path) -> None:
    log = (out / f"slurm-{job}.out").read_text()
    assert job_field(cluster, job, "ExitCode") == "0:0", log[-4000:] + cluster.logs()
    assert len(losses(run_dir)) == STEPS, log[-4000:]
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:09d}"
    assert (ckpt / "COMPLETE").is_file()
    assert torch.load(ckpt / "state.pt", weights_only=False)["world_size"] == 2  # one job of 2 ranks, not 2 jobs of 1
    assert len(list((ckpt / "engine").rglob("*optim_states.pt"))) == 2  # ZeRO-1: a shard from each node's rank
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir())


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Path:
    """The uninterrupted 2-node torchrun run (also the reference loss sequence for the requeue test)."""
    out = tmp_path_factory.mktemp("torchrun")
    run_dir = out / "run"
    job = cluster.sbatch(render(out, run_dir, "torchrun"), env=_env())
    cluster.wait(job, timeout=240)
    check_run(cluster, job, out, run_dir)
    return run_dir


def test_hostlists_expand_as_scontrol_does(cluster):
    for hostlist in ("n[1-2]", "gpu[01-03,07],login1", "a[1-2]b[3-4]"):
        assert expand_hostlist(hostlist) == cluster.run("scontrol", "show", "hostnames", hostlist).split()


def test_two_node_torchrun_job_trains(reference):
    assert len(losses(reference)) == STEPS


@pytest.mark.parametrize("launcher", ["srun", "deepspeed"])
def test_two_node_job_under_other_launchers_trains_the_same(cluster, reference, launcher, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.sbatch(render(tmp_path, run_dir, launcher), env=_env())
    cluster.wait(job, timeout=240)
    check_run(cluster, job, tmp_path, run_dir)
    assert losses(run_dir) == losses(reference)  # sct.dist.init formed the same 2-rank job


def test_signalled_job_checkpoints_requeues_and_resumes(cluster, reference, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.sbatch(render(tmp_path, run_dir, "torchrun"), env=_env())
    metrics, end = run_dir / "metrics.jsonl", time.monotonic() + 240
    while time.monotonic() < end and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    assert metrics.exists(), cluster.logs()
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@<s> does before the time limit
    cluster.wait(job, timeout=300)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert "requeueing job" in log and job_field(cluster, job, "Restarts") == "1", log[-4000:]
    first = [int(d.name.split("_")[1]) for d in (run_dir / "checkpoints").iterdir() if d.name.startswith("step_")]
    assert min(first) < STEPS, "the signal came after the last step: nothing to resume"
    check_run(cluster, job, tmp_path, run_dir)
    assert f"resumed from {run_dir}/checkpoints/step_{min(first):09d}" in log
    assert losses(run_dir) == losses(reference)  # resumed, not restarted: the same sequence as the uninterrupted run
    for folder in (tmp_path, run_dir):
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix not in (".pt", ".safetensors", ".png"):
                assert PLANTED not in f.read_text(errors="replace"), f
