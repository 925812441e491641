"""Preemption in one plain `python` process (no launcher in between): SIGUSR1 -> checkpoint at the
next step boundary and exit status 75 (sct.dist.preempt.EXIT_PREEMPTED); the same command resumes and
the loss sequence equals an uninterrupted run. The 2-rank version is in test_distributed.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sct import train
from sct.dist.preempt import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config", "configs/toy_sct.yaml", "model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64",
        "run.log_every=1", "run.sample_every=100000", "run.snapshot_every=100000", "run.checkpoint_every=100000",
        "sampling.num=16", "run.total_steps=60"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_signal_checkpoints_exits_75_and_the_same_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [*ARGS, f"run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "sct.train", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    stopped = len(losses(run_dir))
    assert 3 <= stopped < 60 and (run_dir / "checkpoints" / f"step_{stopped:09d}" / "COMPLETE").is_file()
    assert train.main(args) == 0  # the same command resumes
    whole = tmp_path / "whole"
    assert train.main([*ARGS, f"run.dir={whole}"]) == 0
    assert losses(run_dir) == losses(whole)


def test_sigterm_to_the_whole_process_group_spares_the_data_workers(tmp_path):
    """As a scheduler does, SIGTERM goes to every process of the job, DataLoader workers included: the workers
    must leave it to the trainer, which checkpoints and exits 75 (a dead worker would be a data error, 4)."""
    from pipelines.shards import write_arrays

    data = tmp_path / "shards"
    write_arrays(np.random.default_rng(0).normal(size=(256, 2)).astype(np.float32), None, str(data), 64)
    run_dir = tmp_path / "run"
    shards = f"data={{name: shards, url: '{data}', shape: [2], class_conditional: false, num_workers: 1, shuffle_buffer: 1}}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "sct.train", *ARGS, shards, f"run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert (run_dir / "checkpoints" / f"step_{len(losses(run_dir)):09d}" / "COMPLETE").is_file()
