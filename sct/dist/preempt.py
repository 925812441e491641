"""Preemption: SIGTERM / SIGUSR1 -> checkpoint at the next step boundary, then exit with EXIT_PREEMPTED.

The handler is installed first thing in `sct.train.main`. Until `defer()` (called just before the loop)
a signal raises `StartupPreempted` at once: nothing is worth saving yet, and start-up (model build,
DeepSpeed init, a teacher load) can outlast the grace time before SIGKILL; the run exits 75 all the same.

EXIT_PREEMPTED = 75 (EX_TEMPFAIL, "try again later"): a launcher or an sbatch wrapper requeues on it,
e.g. `srun python sct/train.py ...; [ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`, or SLURM's
`--signal=B:USR1@120` to get the signal before the time limit. Rerunning the same command resumes.
Under torchrun / the deepspeed launcher each worker exits 75 and the launcher reports its own status;
`python -m sct.supervise -- LAUNCHER ...` (infra/ renders it) delivers the signal to every rank
and exits 75 (see there); `install` registers the rank with it (`supervise.adopt`). Every rank must
agree to stop: `requested_anywhere` takes the max of the flag over ranks (one all-reduce per step).

Tests: `pytest tests/integration/test_distributed.py -k preempt`.
"""
from __future__ import annotations

import signal

import torch

from sct import exit_codes, supervise
from sct.dist import all_reduce_max, launcher

EXIT_PREEMPTED = exit_codes.PREEMPTED
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StartupPreempted(BaseException):
    """A preemption signal during start-up (BaseException: no library's `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(f"preempted during start-up by {signal.Signals(signum).name}: nothing to checkpoint yet")
        self.signum = signum


class Preemption:
    def __init__(self) -> None:
        self.signum: int | None = None
        self.immediate = True  # start-up: raise StartupPreempted from the handler
        self._previous: dict[int, object] = {}

    def install(self) -> "Preemption":
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        supervise.adopt(under_launcher=launcher.from_env().kind != "single")
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def defer(self) -> None:
        """From now on a signal only sets the flag; the loop checkpoints at the next step boundary."""
        self.immediate = False

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if self.immediate:
            raise StartupPreempted(signum)

    def requested_anywhere(self, device: torch.device) -> bool:
        return all_reduce_max(1.0 if self.signum is not None else 0.0, device) > 0
