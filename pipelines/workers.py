"""The multiprocessing helpers of DataLoader workers leave preemption signals to the trainer.

A scheduler or a terminal signals a whole process group (SLURM's `scancel --signal`, the time-limit SIGTERM):
DataLoader workers, multiprocessing's forkserver and its resource tracker get SIGTERM/SIGUSR1 too. The workers
ignore them (`_Slots.__iter__` in pipelines/stream.py); by default SIGUSR1 also killed the forkserver and the
resource tracker, and the relaunched tracker printed a `KeyError` traceback for every semaphore it had never
seen. `start_helpers(start_method)`, called before the DataLoader starts its workers, starts both with the
signals ignored (an ignored disposition survives fork and exec), so only the trainer acts on them.

Tests: tests/integration/test_latent_runs.py::test_sigusr1_to_the_group_with_two_workers_exits_75_without_tracebacks.
"""
from __future__ import annotations

import signal
import threading
from multiprocessing import forkserver, resource_tracker

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # sct.dist.preempt's signals


def start_helpers(start_method: str) -> None:
    """Start the resource tracker (and the forkserver) now, with SIGNALS ignored; an ignored disposition
    survives fork and exec, so they and every worker the forkserver forks keep ignoring them."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        resource_tracker.ensure_running()
        if start_method == "forkserver":
            forkserver.ensure_running()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
