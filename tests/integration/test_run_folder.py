"""The run folder's life cycle (issue 11): what a rerun may load, refuse, keep and report. Each test runs the
real `sct.train.main` on the toy (a few steps, seconds) and fails on the code before sct/run_folder.py.

Payload tests plant a real pickle whose __reduce__ creates a marker file when unpickled; each checks
first (with a plain `torch.load(weights_only=False)`) that the payload is live, then that the run never
ran it. Faults are real (a killed worker, a stopped S3 server, a held lock); where a test injects one
through a patched function (NaN loss, a signal at a chosen moment) its docstring says so.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sct import exit_codes, train
from sct.checkpoint import latest_training_state

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64", "run.log_every=1",
         "run.sample_every=1000", "run.snapshot_every=1000", "sampling.num=64"]
TOY = ["--config", "configs/toy_sct.yaml", *SMALL]


class Payload:
    """Unpickling this creates `path` (builtins.open(path, "w")): code execution, made visible."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(path: Path, marker: Path) -> None:
    torch.save({"step": 3, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()
    marker.unlink()


def reseal(step_dir: Path) -> None:
    """Rewrite the COMPLETE marker so that it vouches for the folder's present content (what an attacker can do)."""
    files = {p.relative_to(step_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != "COMPLETE"}
    (step_dir / "COMPLETE").write_text(json.dumps({"step": int(step_dir.name[5:]), "time": 0, "files": files}))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def finished_toy(tmp_path: Path, steps: int, *extra: str) -> tuple[list[str], Path, Path]:
    """(its arguments, its last checkpoint folder, the marker a planted payload would create) of a finished toy run."""
    run_dir = tmp_path / "run"
    args = [*TOY, f"run.dir={run_dir}", f"run.total_steps={steps}", f"run.checkpoint_every={steps}", *extra]
    assert train.main(args) == 0
    return args, run_dir / "checkpoints" / f"step_{steps:09d}", tmp_path / "PWNED"


def test_planted_state_pt_is_refused_not_executed(tmp_path):
    args, step_dir, marker = finished_toy(tmp_path, 3)
    plant(step_dir / "state.pt", marker)
    reseal(step_dir)
    assert latest_training_state(step_dir.parents[1]) == step_dir  # a valid COMPLETE marker: checksums alone cannot tell
    assert train.main([*args, "run.total_steps=5"]) == exit_codes.STATE
    assert not marker.exists()
    log = (step_dir.parents[1] / "log.txt").read_text()
    assert "fatal (status 6, state error): cannot load" in log and "weights_only" in log


def test_engine_files_writable_by_others_or_not_ours_are_never_handed_to_deepspeed(tmp_path):
    """DeepSpeed unpickles its own engine files (weights_only=False): the owner/permission check must stop the
    run before DeepSpeed reads them."""
    args, step_dir, marker = finished_toy(tmp_path, 2, "dist.engine=deepspeed")
    engine_file = next((step_dir / "engine").rglob("mp_rank_00_model_states.pt"))
    plant(engine_file, marker)
    reseal(step_dir)
    engine_file.chmod(0o664)  # group-writable: anyone in the group could have planted it
    assert train.main([*args, "run.total_steps=4"]) == exit_codes.STATE
    assert not marker.exists()
    if os.geteuid() == 0:  # only root can give a file away; another user's file is refused the same way
        engine_file.chmod(0o644)
        os.chown(engine_file, 65534, 65534)
        assert train.main([*args, "run.total_steps=4"]) == exit_codes.STATE
        assert not marker.exists()


def test_refusals_name_the_cause(tmp_path, capsys):
    args, step_dir, marker = finished_toy(tmp_path, 2)
    plant(step_dir / "state.pt", marker)
    reseal(step_dir)
    step_dir.chmod(0o777)
    capsys.readouterr()
    assert train.main(args) == exit_codes.STATE
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "step_000000002 is writable by group (mode 0777)" in err and "chmod -R go-w" in err
    assert not marker.exists()


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, capsys):
    args, step_dir, _ = finished_toy(tmp_path, 3)
    run_dir = step_dir.parents[1]
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}
    capsys.readouterr()
    assert train.main([*args, "optimizer.lr=2e-3", "run.seed=1", "run.total_steps=5"]) == exit_codes.CONFIG
    err = capsys.readouterr().err
    assert "\nconfig error:" in f"\n{err}" and "differs in optimizer.lr 0.001 -> 0.002, run.seed 0 -> 1 (" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert train.main([*args, "run.total_steps=5", "run.log_every=2", "run.checkpoint_every=5"]) == 0  # operational keys may change
    assert records(run_dir)[-1]["step"] == 5


def test_a_second_job_on_the_same_run_dir_is_refused_naming_the_holder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*TOY, f"run.dir={run_dir}", "run.checkpoint_every=100000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    holder = subprocess.Popen([sys.executable, "-m", "sct.train", *args, "run.total_steps=100000"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics = run_dir / "metrics.jsonl"
        while holder.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.05)
        capsys.readouterr()
        assert train.main([*args, "run.total_steps=3"]) == exit_codes.BUSY
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use by another job" in err
    finally:
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=120) == exit_codes.PREEMPTED
    assert train.main([*args, "run.total_steps=3"]) == 0  # the lock ended with its holder


def test_preemption_or_the_end_on_a_skipped_step_still_checkpoints(tmp_path, monkeypatch, capsys):
    """The loss is NaN from step 5 on (a patched objective); the preemption signal is sent from inside step 6."""
    from sct.objectives import scm

    real = scm.SCM.forward

    def poisoned(self, net, batch, step):
        if step == 6 and os.environ.get("SEND_SIGNAL"):
            os.kill(os.getpid(), signal.SIGUSR1)
        loss = real(self, net, batch, step)
        return loss * float("nan") if step >= 5 else loss

    monkeypatch.setattr(scm.SCM, "forward", poisoned)
    monkeypatch.setenv("SEND_SIGNAL", "1")
    run_dir = tmp_path / "preempted"
    base = [*TOY, "run.checkpoint_every=100", "run.max_nonfinite_in_a_row=100"]
    assert train.main([*base, f"run.dir={run_dir}", "run.total_steps=20"]) == exit_codes.PREEMPTED
    assert latest_training_state(run_dir).name == "step_000000007"  # the step the exit message claims
    monkeypatch.delenv("SEND_SIGNAL")
    ended = tmp_path / "ended"
    assert train.main([*base, f"run.dir={ended}", "run.total_steps=6"]) == 0  # the last step is skipped
    assert latest_training_state(ended).name == "step_000000006"


def test_signal_during_start_up_exits_75(tmp_path):
    """SIGTERM is sent while the model is being built (a patched build_model signals its own process)."""
    script = ("import os, signal, sys\nfrom sct import train\nreal = train.build_model\n"
              "def build(cfg):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(cfg)\n"
              "train.build_model = build\nsys.exit(train.main(sys.argv[1:]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, *TOY, f"run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == exit_codes.PREEMPTED, proc.stderr[-2000:]
    assert "preempted during start-up by SIGTERM" in proc.stderr and "Traceback" not in proc.stderr


def test_metrics_keep_only_records_up_to_the_resumed_step(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TOY, f"run.dir={run_dir}", "run.checkpoint_every=4", "run.keep_checkpoints=5"]
    assert train.main([*args, "run.total_steps=6"]) == 0
    ckpt = run_dir / "checkpoints" / "step_000000006"
    for p in sorted(ckpt.rglob("*"), reverse=True):  # killed after step 6's tick, before its checkpoint was sealed
        p.unlink() if p.is_file() else p.rmdir()
    ckpt.rmdir()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # and a torn line
    assert train.main([*args, "run.total_steps=8"]) == 0
    assert [r["step"] for r in records(run_dir)] == list(range(1, 9))


def test_every_checkpoint_invalid_is_refused_unless_asked_to_restart(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [*TOY, f"run.dir={run_dir}", "run.total_steps=4", "run.checkpoint_every=2"]
    assert train.main(args) == 0
    ckpts = run_dir / "checkpoints"
    blob = bytearray((ckpts / "step_000000004" / "state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (ckpts / "step_000000004" / "state.pt").write_bytes(bytes(blob))
    (ckpts / "step_000000002" / "COMPLETE").unlink()
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train.main(args) == exit_codes.STATE
    err = capsys.readouterr().err
    assert "step_000000004: checksum mismatch in state.pt" in err and "step_000000002: no COMPLETE marker" in err
    assert "--restart-if-no-valid-checkpoint" in err and (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert train.main(["--restart-if-no-valid-checkpoint", *args]) == 0
    rejected = [p for p in ckpts.iterdir() if p.name.startswith("rejected-")]
    assert len(rejected) == 1 and sorted(p.name for p in rejected[0].iterdir()) == ["step_000000002", "step_000000004"]
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]


def test_file_modes_leftovers_and_a_garbage_marker(tmp_path, capsys):
    from pipelines.shards import write_arrays

    old = os.umask(0o022)
    try:
        write_arrays(np.zeros((4, 2), np.float32), None, str(tmp_path / "shards"), shard_size=2)
        assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "shards").iterdir()} == {"0o644"}
        run_dir = tmp_path / "run"
        args = [*TOY, f"run.dir={run_dir}", "run.total_steps=2", "run.checkpoint_every=2", "run.snapshot_every=2"]
        assert train.main(args) == 0
        assert {oct(p.stat().st_mode & 0o777) for p in (run_dir / "snapshots").iterdir()} == {"0o644"}
    finally:
        os.umask(old)
    ckpts = run_dir / "checkpoints"
    (ckpts / ".tmp-step_000000009").mkdir()  # a dead job's unsealed checkpoint
    os.rename(ckpts / "step_000000002", ckpts / f".old-step_000000002-{12345}")  # a replace cut between its renames
    assert train.main(args) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000000002"]
    (ckpts / "step_000000002" / "COMPLETE").write_bytes(b"\x1b[31mPWNED\x80\n" * 3)
    capsys.readouterr()
    assert train.main(args) == exit_codes.STATE
    err = capsys.readouterr().err
    assert "invalid COMPLETE marker (36 bytes, sha256 " in err and "PWNED" not in err and "\x1b" not in err
