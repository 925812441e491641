"""Run-time failures end `sct.train` with their documented status (sct/exit_codes.py) and a one-line reason in
log.txt, never a bare traceback; data workers' warnings and the stream's counters reach log.txt and
metrics.jsonl. The toy trains from real local shards (or shards on the loopback S3 server) read by a real
DataLoader worker process. The non-finite stop (status 3) is in test_train_loop.py, its 2-rank version in
test_distributed.py."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import yaml

from pipelines.shards import write_arrays
from sct import exit_codes, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64", "run.log_every=1",
         "run.sample_every=1000", "run.snapshot_every=1000", "run.checkpoint_every=1000", "sampling.num=16"]


def shard_config(tmp_path: Path, url: str, **data) -> Path:
    """configs/toy_sct.yaml reading 2-D points from shards at `url` instead of the in-memory mixture."""
    cfg = yaml.safe_load((ROOT / "configs" / "toy_sct.yaml").read_text())
    cfg["data"] = {"name": "shards", "url": url, "shape": [2], "class_conditional": False, "num_workers": 1,
                   "shuffle_buffer": 1, "prefetch_factor": 1, **data}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_points(url: str, shards: int = 4, per_shard: int = 64) -> None:
    x = np.random.default_rng(0).normal(size=(shards * per_shard, 2)).astype(np.float32)
    write_arrays(x, None, url, per_shard)


def fatal_lines(run_dir: Path) -> list[str]:
    return [line for line in (run_dir / "log.txt").read_text().splitlines() if "fatal (status" in line]


def test_bad_shards_are_logged_counted_and_past_the_threshold_stop_with_status_4(tmp_path):
    data = tmp_path / "shards"
    write_points(str(data))
    shard = data / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-512])  # truncated
    run_dir = tmp_path / "tolerated"
    args = ["--config", str(shard_config(tmp_path, str(data), max_bad_shards=1)), *SMALL, "run.total_steps=6", f"run.dir={run_dir}"]
    assert train.main(args) == 0
    log = (run_dir / "log.txt").read_text()
    assert "data worker 0 (rank 0): data: skipping shard" in log and "shard-000001.tar" in log  # the worker's own warning
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["data/bad_shards"] == 1 and last["data/skipped_samples"] == 64 and last["data/retries"] == 0
    run_dir = tmp_path / "stopped"
    args = ["--config", str(shard_config(tmp_path, str(data), max_bad_shards=0)), *SMALL, "run.total_steps=6", f"run.dir={run_dir}"]
    assert train.main(args) == exit_codes.DATA
    (line,) = fatal_lines(run_dir)
    assert "(status 4, data error)" in line and "more than data.max_bad_shards=0" in line


def test_a_killed_data_worker_stops_the_run_with_status_4(tmp_path, monkeypatch):
    """The worker kills itself with SIGKILL at its 100th sample (a patched decode, inherited through fork)."""
    from pipelines import stream

    real, calls = stream.SlotReader.decode, []

    def decode(self, fields, epoch, gid):
        calls.append(gid)
        if len(calls) == 100:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, fields, epoch, gid)

    monkeypatch.setattr(stream.SlotReader, "decode", decode)
    data, run_dir = tmp_path / "shards", tmp_path / "run"
    write_points(str(data))
    args = ["--config", str(shard_config(tmp_path, str(data), worker_start="fork")), *SMALL, "run.total_steps=20", f"run.dir={run_dir}"]
    assert train.main(args) == exit_codes.DATA
    (line,) = fatal_lines(run_dir)
    assert "(status 4, data error): DataLoader worker (pid" in line  # "... is killed by signal" or "... exited unexpectedly"


def test_storage_failing_past_retry_seconds_stops_the_run_with_status_5(tmp_path, monkeypatch, s3_server):
    """The S3 server is stopped right after the stream checked the manifest (a wrapped build_stream)."""
    url = s3_server.bucket_url()
    write_points(url)
    real = train.build_stream

    def then_outage(*a, **kw):
        stream = real(*a, **kw)
        s3_server.stop()
        return stream

    monkeypatch.setattr(train, "build_stream", then_outage)
    run_dir = tmp_path / "run"
    args = ["--config", str(shard_config(tmp_path, url, num_workers=0, retry_seconds=1.0)), *SMALL, "run.total_steps=4", f"run.dir={run_dir}"]
    assert train.main(args) == exit_codes.STORAGE
    (line,) = fatal_lines(run_dir)
    assert "(status 5, storage error)" in line and "data.retry_seconds=1" in line


BUGGY_TRAIN = """
import sys
from sct import loop, train

def buggy_step(*args):
    if args[2] == 2:  # step 2: an unexpected error, a bug rather than a documented failure
        raise RuntimeError("injected bug")
    return real_step(*args)

if __name__ == "__main__":  # DataLoader workers start from a forkserver: never re-run this
    real_step, loop.train_step = loop.train_step, buggy_step
    sys.exit(train.main(sys.argv[1:]))
"""


def test_an_unexpected_error_ends_the_process_promptly_with_its_data_workers(tmp_path):
    """A bug (not a documented failure) propagates as a traceback, and the process exits: its data workers ignore
    SIGTERM (preemption is the trainer's), so the stream is closed explicitly; before, the process hung at exit
    joining them and a multi-rank job sat until the collective timeout."""
    import subprocess
    import sys
    import time

    url = str(tmp_path / "points")
    write_points(url)
    script = tmp_path / "buggy_train.py"
    script.write_text(BUGGY_TRAIN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), "--config", str(shard_config(tmp_path, url)), *SMALL,
                           f"run.dir={tmp_path / 'run'}", "run.total_steps=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    took = time.monotonic() - start
    assert proc.returncode == 1 and "RuntimeError: injected bug" in proc.stderr, proc.stderr[-3000:]
    assert took < 90, f"exited only after {took:.0f} s"
