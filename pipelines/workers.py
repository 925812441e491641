"""DataLoader worker processes that leave preemption signals to the trainer.

A scheduler or a terminal signals a whole process group (SLURM's `scancel --signal`, the time-limit SIGTERM,
Ctrl-\\): DataLoader workers, multiprocessing's forkserver and its resource tracker get SIGTERM/SIGUSR1 too.
By default SIGUSR1 kills all three and SIGTERM kills the workers, so the trainer, which checkpoints at the next
step boundary (sct.dist.preempt), found its workers dead and the relaunched resource tracker printed a
`KeyError` traceback for every semaphore it had never seen. Here only the main process handles them:

    start_helpers(start_method)                        # the forkserver and the resource tracker ignore them
    DataLoader(..., worker_init_fn=ignore_signals)     # and so does every worker (spawn/fork/forkserver alike)

Tests: tests/integration/test_latent_runs.py::test_sigusr1_to_the_group_with_two_workers_exits_75_without_tracebacks.
"""
from __future__ import annotations

import signal
import threading
from multiprocessing import forkserver, resource_tracker

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # sct.dist.preempt's signals


def ignore_signals(_worker_id: int = 0) -> None:
    """worker_init_fn: the trainer handles preemption; a worker ends when the trainer closes its loader."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


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
