"""Exit statuses of `python -m sct.train`, in one place (what to do with each: docs/distributed.md,
"Failure modes"), and the mapping from the errors that end a run to them.

    0   done (total_steps reached, or run.max_steps_per_job steps taken: rerun to continue)
    1   a bug: an unexpected exception, with its traceback
    2   config or input error: fix the config / command line (`config error: ...` on stderr), includes a
        resume whose config changed outside the allowed keys (sct.run_folder.OPERATIONAL_KEYS)
    3   non-finite stop: run.max_nonfinite_in_a_row skipped steps in a row; the last good checkpoint is kept
    4   data error: more than data.max_bad_shards unreadable shards, or a data worker process died
    5   storage error: storage still failing after data.retry_seconds of retries, or a local write failed
    6   state error: the run folder cannot be resumed safely (checkpoint owned or writable by others, a
        state.pt that is not plain data, every checkpoint invalid, a saved state that does not fit the run)
    7   run folder busy: another job holds run.dir's lock (the message names it)
    75  preempted (SIGTERM/SIGUSR1): checkpointed (or stopped during start-up): rerun the same command

Every fatal status is logged as one line, `fatal (status N, <name>): <reason>`, on every rank (rank 0's
log.txt sink and, on other ranks, an ERROR-level sink on the same log.txt).
"""
from __future__ import annotations

DONE = 0
CONFIG = 2
NONFINITE = 3
DATA = 4
STORAGE = 5
STATE = 6
BUSY = 7
PREEMPTED = 75  # EX_TEMPFAIL: try again later

NAMES = {CONFIG: "config error", NONFINITE: "non-finite stop", DATA: "data error", STORAGE: "storage error",
         STATE: "state error", BUSY: "run folder busy", PREEMPTED: "preempted"}


class Fatal(Exception):
    """An error that ends the run with `status` (one of the above); `str()` is the one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(exc: BaseException) -> str:
    """The reason in one line: an exception re-raised from a DataLoader worker carries the worker's whole
    traceback in its message; its last line is the original error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def status_of(exc: BaseException) -> int | None:
    """The documented status an exception ends a run with; None for anything else (a bug: traceback, 1)."""
    from pipelines.s3 import StorageError
    from pipelines.stream import DataError
    from sct.loop import NonFiniteLossError

    if isinstance(exc, Fatal):
        return exc.status
    if isinstance(exc, NonFiniteLossError):
        return NONFINITE
    if isinstance(exc, DataError) or str(exc).startswith("DataLoader worker (pid"):  # a worker killed or gone silent
        return DATA
    if isinstance(exc, (StorageError, OSError)):
        return STORAGE
    return None


def fatal_line(status: int, exc: BaseException | str) -> str:
    reason = exc if isinstance(exc, str) else one_line(exc)
    return f"fatal (status {status}, {NAMES.get(status, 'error')}): {reason}"
