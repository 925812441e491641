"""Preemption: SIGTERM / SIGUSR1 -> checkpoint at the next step boundary, then exit with EXIT_PREEMPTED.

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

from sct import supervise
from sct.dist import all_reduce_max, launcher

EXIT_PREEMPTED = supervise.EXIT_PREEMPTED  # 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self) -> None:
        self.signum: int | None = None
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

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def requested_anywhere(self, device: torch.device) -> bool:
        return all_reduce_max(1.0 if self.signum is not None else 0.0, device) > 0
