"""The top process of a pod or a SLURM task: it starts a launcher (torchrun, the deepspeed launcher, or
sct.train itself), hands every preemption signal it receives to every training rank below it, and
exits 75 when the ranks checkpointed and exited 75.

    python -m sct.supervise -- torchrun --nproc-per-node 8 -m sct.train --config X.yaml
    python -m sct.supervise -- deepspeed --num_gpus 8 --module sct.train --config X.yaml

Why it exists: Kubernetes sends SIGTERM to a container's first process only, SLURM's `--signal=B:USR1`
reaches the batch shell only, and the launchers differ. torchrun forwards SIGTERM, SIGINT, SIGHUP and
SIGQUIT to its workers (SIGUSR1 kills it unless `--signals-to-handle` lists it) and exits 1 whatever its
workers returned. The `deepspeed` runner forwards nothing on one node: SIGTERM kills it and leaves its
`deepspeed.launcher.launch` child and the ranks training; when a rank exits non-zero it returns that
rank's status (`launch` stops the other ranks with SIGTERM, then SIGKILL after 30 s).

How, whatever the launcher:
- a rank registers when it installs its preemption handler (`adopt`, called by
  `sct.dist.preempt.Preemption.install`): its pid becomes a file in $SCT_RANKS_DIR, a temp dir this
  process exports, and `record_exit` writes the status it exits with next to it (`sct.train.main` is
  decorated with `reports_exit`);
- SIGTERM and SIGUSR1 to this process are sent on to every registered rank that is still running and
  is a descendant of this process; the launchers in between are not signalled, so they neither die nor
  kill ranks in the middle of a checkpoint. A signal received before a rank registered reaches it when
  it registers. The launcher starts with SIGUSR1 ignored (SLURM signals every process of a task);
  a rank's own handler replaces that;
- this process is a child subreaper (prctl PR_SET_CHILD_SUBREAPER) and waits for every descendant, not
  just the launcher: if a launcher dies anyway, its ranks are re-parented here and the pod or task
  stays alive while they checkpoint (other leftovers get STRAGGLER_S once the launcher and the ranks
  are gone);
- each rank under a launcher also asks for SIGTERM when its parent dies (PR_SET_PDEATHSIG), so a rank
  whose launcher was killed checkpoints instead of training on as an orphan;
- exit status: 75 when at least one rank registered and every registered rank recorded 75 (every rank
  agrees to stop, sct.dist.preempt); otherwise the launcher's own status (128 + N if signal N killed it).

Bound: after the signal each rank finishes its current step (all `run.grad_accum` micro-batches, and
a snapshot or sample grid if one falls due at that step), the ranks agree in one all-reduce, write one
checkpoint and exit; give the scheduler's grace period (Kubernetes `terminationGracePeriodSeconds`,
SLURM's `--signal=B:USR1@<s>`) at least one step plus one checkpoint plus start-up slack.

Tests: `pytest tests/unit/test_supervise.py tests/integration/test_pod_preemption.py` (torchrun and
deepspeed, SIGTERM to the top process only).
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sct.exit_codes import PREEMPTED as EXIT_PREEMPTED  # 75; imports no torch, like this module (it is PID 1)

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
RANKS_DIR = "SCT_RANKS_DIR"
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36  # <linux/prctl.h>
STRAGGLER_S = 10.0  # once the launcher and every rank are gone, how long other adopted processes may linger


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value}) failed")


# ---- the ranks' side ----------------------------------------------------------------------------------

def adopt(under_launcher: bool) -> None:
    """Called by each rank when its preemption handler is installed: register with a supervisor (if one
    exported SCT_RANKS_DIR) and, under a launcher, ask for SIGTERM when the parent process dies."""
    if under_launcher and sys.platform == "linux":
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() == 1:  # the launcher died before the request above: act as if it had just died
            os.kill(os.getpid(), signal.SIGTERM)
    where = os.environ.get(RANKS_DIR)
    if where and Path(where).is_dir():
        (Path(where) / str(os.getpid())).touch()


def record_exit(code: int) -> int:
    """The status this rank exits with, for the supervisor; returns `code`."""
    where = os.environ.get(RANKS_DIR)
    if where and (Path(where) / str(os.getpid())).exists():
        tmp = Path(where) / f".{os.getpid()}.exit"
        tmp.write_text(str(code))
        tmp.rename(tmp.with_name(f"{os.getpid()}.exit"))  # atomic: the supervisor never reads half a status
    return code


def reports_exit(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate an entry point's `main` (whose int is the exit status) so the status is recorded."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        return record_exit(main(*args, **kwargs))
    return wrapper


# ---- the top process ----------------------------------------------------------------------------------

def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # fields after "(comm)": state, ppid, ...


def _is_descendant(pid: int, root: int) -> bool:
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == root:
                return True
    except (OSError, ValueError):
        return False
    return False


def _launcher_ignores_usr1() -> None:
    """In the launcher's process, before exec: ignore SIGUSR1 (inherited through exec; a rank overrides it
    with its preemption handler). SLURM delivers a step's signal to every process of a task, and
    torchrun and the deepspeed launcher would die of SIGUSR1 with their ranks still checkpointing."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class Supervisor:
    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.dir = Path(tempfile.mkdtemp(prefix="sct-ranks-"))
        self.received: list[int] = []  # signals received, in order
        self.delivered: dict[int, set[int]] = {}  # rank pid -> signals sent to it

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signum)

    def ranks(self) -> list[int]:
        return sorted(int(p.name) for p in self.dir.iterdir() if p.name.isdigit())

    def exits(self) -> dict[int, int]:
        out = {}
        for p in self.dir.glob("*.exit"):
            out[int(p.stem)] = int(p.read_text())
        return out

    def _forward(self) -> None:
        if not self.received:
            return
        exited = self.exits()
        for pid in self.ranks():
            if pid in exited or not _is_descendant(pid, os.getpid()):
                continue
            sent = self.delivered.setdefault(pid, set())
            for signum in self.received:
                if signum not in sent:
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass
                    sent.add(signum)

    def run(self) -> int:
        if sys.platform == "linux":
            _prctl(PR_SET_CHILD_SUBREAPER, 1)
        for s in FORWARDED:
            signal.signal(s, self._on_signal)
        child = subprocess.Popen(self.cmd, env=dict(os.environ, **{RANKS_DIR: str(self.dir)}), preexec_fn=_launcher_ignores_usr1)  # noqa: PLW1509 (no threads here)
        status, deadline = None, None
        try:
            while True:
                self._forward()
                try:
                    pid, raw = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:  # no child and no adopted orphan left
                    break
                if pid == 0:
                    if status is not None and not self._ranks_running():
                        deadline = deadline or time.monotonic() + STRAGGLER_S
                        if time.monotonic() > deadline:  # what is left is no rank (a leaked daemon): do not hold the pod
                            break
                    time.sleep(0.1)
                elif pid == child.pid:
                    code = os.waitstatus_to_exitcode(raw)
                    status = 128 - code if code < 0 else code
            return self.status(status)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _ranks_running(self) -> bool:
        exited = self.exits()
        return any(pid not in exited and Path(f"/proc/{pid}").exists() for pid in self.ranks())

    def status(self, launcher_status: int | None) -> int:
        ranks, exits = self.ranks(), self.exits()
        if ranks:
            print(f"sct.supervise: ranks exited with {json.dumps({pid: exits.get(pid) for pid in ranks})}", file=sys.stderr, flush=True)
        if ranks and all(exits.get(pid) == EXIT_PREEMPTED for pid in ranks):
            return EXIT_PREEMPTED
        return 1 if launcher_status is None else launcher_status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m sct.supervise -- LAUNCHER [ARGS ...]", file=sys.stderr)
        return 2
    return Supervisor(argv).run()


if __name__ == "__main__":
    sys.exit(main())
