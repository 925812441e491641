"""DataLoader workers survive the preemption signals that SLURM (every process of a task) and torchrun
(killpg of each worker's group) deliver to them: the rank checkpoints on the signal and needs its
workers until it does. 2 real forkserver workers over local shards (helpers from test_stream.py)."""
import os
import signal

from test_stream import ids_of, stream, take, write_dataset


def test_workers_ignore_sigterm_and_sigusr1_and_the_stream_goes_on(tmp_path):
    url = str(tmp_path / "shards")
    write_dataset(url)
    whole = ids_of(take(stream(url), 12))[0]
    s = stream(url)
    head = ids_of(take(s, 4))[0]
    workers = [w.pid for w in s._it._workers]  # the DataLoader's worker processes
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    assert head + ids_of(take(s, 8))[0] == whole
    assert all(w.is_alive() for w in s._it._workers)
    s.close()
