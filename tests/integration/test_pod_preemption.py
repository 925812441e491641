"""Preemption as a pod sees it: `python -m sct.supervise -- <launcher> ...` is the container's first
process, and SIGTERM goes to that process only (what the kubelet does). Under torchrun and under the
deepspeed launcher (which forwards nothing on one node), every rank must checkpoint and exit 75, and so
must the top process. 2 ranks, gloo, ZeRO-2, the tiny sCT toy; about 30 s per launcher on 2 cores."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sct.dist.preempt import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config", "configs/toy_sct.yaml", "model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=16",
        "run.log_every=1", "run.sample_every=100000", "run.snapshot_every=100000", "run.checkpoint_every=100000",
        "sampling.num=8", "run.total_steps=100000", "dist.engine=deepspeed", "dist.zero_stage=2", "optimizer.warmup_steps=0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SCT_RANKS_DIR"):
        env.pop(key, None)
    return env


LAUNCHERS = {
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sct.train"],
    "deepspeed": lambda: [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()), "--module", "sct.train"],
}


@pytest.mark.parametrize("kind", sorted(LAUNCHERS))
def test_sigterm_to_the_top_process_checkpoints_every_rank_and_exits_75(kind, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "sct.supervise", "--", *LAUNCHERS[kind](), *ARGS, f"run.dir={run_dir}"]
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        top = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            metrics, end = run_dir / "metrics.jsonl", time.monotonic() + 240
            while top.poll() is None and time.monotonic() < end and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
                time.sleep(0.05)
            assert top.poll() is None, log.read_text()[-4000:]
            top.send_signal(signal.SIGTERM)  # the top process only, as a pod's first process gets it
            rc = top.wait(timeout=120)
        finally:
            if top.poll() is None:
                os.killpg(top.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == EXIT_PREEMPTED, text[-4000:]
    statuses = re.search(r"sct\.supervise: ranks exited with (\{.*\})", text)
    assert statuses, text[-4000:]
    assert sorted(json.loads(statuses.group(1)).values()) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    # what the launcher itself returned: torchrun 1 (ChildFailedError), deepspeed the rank's 75
    assert ("ChildFailedError" in text) if kind == "torchrun" else ("exits with return code = 75" in text), text[-4000:]
    steps = len(metrics.read_text().splitlines())
    ckpt = run_dir / "checkpoints" / f"step_{steps:09d}"
    assert (ckpt / "COMPLETE").is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    shards = sorted(p.name for p in (ckpt / "engine").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # ZeRO-2: one optimizer-state shard written by each rank
