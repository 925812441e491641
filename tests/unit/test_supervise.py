"""sct.supervise with small stand-in processes (a real launcher and sct.train ranks are in
tests/integration/test_pod_preemption.py): the ranks use the real `adopt` / `record_exit`; the "launcher" is
a script that starts them and then dies or waits. Checks what the real launchers make hard to provoke:
a launcher killed outright (its ranks are adopted and waited for), a signal that arrives before any rank
registered (delivered at registration), and the exit status rule."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RANK = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from sct.supervise import adopt, record_exit
    out = Path(sys.argv[1])
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # as Preemption.install: handler first, then adopt
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    adopt(under_launcher=True)
    (out / f"ready-{os.getpid()}").touch()
    while not got:
        time.sleep(0.05)
    time.sleep(0.5)  # the checkpoint
    (out / f"checkpointed-{os.getpid()}").touch()
    sys.exit(record_exit(75))
""")

LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    time.sleep(float(sys.argv[2]))
    ranks = [subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1]]) for _ in range(2)]
    for r in ranks:
        r.wait()
    sys.exit(1)  # as torchrun: a worker failed
""")


def start(tmp_path: Path, delay: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "SCT_RANKS_DIR"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "sct.supervise", "--", sys.executable, "-c", LAUNCHER, str(tmp_path), str(delay), RANK]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(tmp_path: Path, prefix: str, n: int, timeout: float = 60) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = [int(p.name.split("-")[1]) for p in tmp_path.glob(f"{prefix}-*")]
        if len(pids) >= n:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{n} x {prefix} not seen in {timeout} s")


def _launcher_pid(top: int) -> int:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            stat = (p / "stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) == top:
                return int(p.name)
    raise AssertionError("no launcher under the supervisor")


def test_ranks_of_a_killed_launcher_are_adopted_checkpoint_and_exit_75(tmp_path):
    top = start(tmp_path, 0)
    try:
        wait_for(tmp_path, "ready", 2)
        os.kill(_launcher_pid(top.pid), signal.SIGKILL)  # the launcher dies outright: PDEATHSIG tells its ranks
        _, err = top.communicate(timeout=60)
    finally:
        if top.poll() is None:
            os.killpg(top.pid, signal.SIGKILL)
    assert top.returncode == 75, err
    assert len(wait_for(tmp_path, "checkpointed", 2, timeout=1)) == 2  # the supervisor waited for the adopted ranks


def test_a_signal_before_the_ranks_registered_reaches_them(tmp_path):
    top = start(tmp_path, 1.5)
    try:
        time.sleep(0.5)
        top.send_signal(signal.SIGTERM)  # no rank exists yet
        _, err = top.communicate(timeout=60)
    finally:
        if top.poll() is None:
            os.killpg(top.pid, signal.SIGKILL)
    assert top.returncode == 75, err
    assert len(wait_for(tmp_path, "checkpointed", 2, timeout=1)) == 2


def test_status_without_ranks_is_the_launchers(tmp_path):
    res = subprocess.run([sys.executable, "-m", "sct.supervise", "--", "sh", "-c", "exit 3"], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert res.returncode == 3
    res = subprocess.run([sys.executable, "-m", "sct.supervise", "--", "sh", "-c", "kill -9 $$"], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert res.returncode == 128 + 9


def test_a_leaked_daemon_does_not_hold_the_pod(tmp_path):
    """The launcher exits 0 and leaves a detached process behind: adopted by the subreaper, not waited for."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.monotonic()
    pidfile = tmp_path / "daemon.pid"
    res = subprocess.run([sys.executable, "-m", "sct.supervise", "--", "sh", "-c", f"(sleep 120 & echo $! > {pidfile}) ; exit 0"], env=env, check=False)
    took = time.monotonic() - start
    os.kill(int(pidfile.read_text()), signal.SIGKILL)  # the daemon this test left behind
    assert res.returncode == 0 and took < 60
