"""A real SLURM cluster on this machine for tests: munged + slurmctld + two slurmd ("two emulated nodes"),
everything (config, key, sockets, state, logs) under one temp dir; SLURM_CONF points there and /etc/slurm
is never written. Needs root and Debian's `slurm-wlm` + `munge` (`.ci/run` installs them).

    with SlurmCluster(tmp_path) as cluster:        # exports SLURM_CONF for the test process
        job = cluster.sbatch(script)               # job id
        cluster.wait(job, timeout=180)             # polls squeue (never `sbatch --wait`)

Nodes n1 and n2 both live on 127.0.0.1 (NodeAddr) with distinct slurmd ports; a job step's processes
run on this machine under the slurmd that owns the node. Used by tests/integration/test_slurm.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

NODES = ("n1", "n2")


def available() -> str | None:
    """None if a cluster can be brought up here, else the reason it cannot."""
    missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol") if shutil.which(t) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the emulated SLURM cluster runs its daemons as root"
    return None


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2):
        self.root = Path(root) / "slurm"
        self.cpus = cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self._saved_conf = os.environ.get("SLURM_CONF")

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "log", "munge", *(f"spool/{n}" for n in NODES)):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        ctld, *nodes = _ports(1 + len(NODES))
        socket_path = r / "munge" / "munge.socket"
        lines = [
            "ClusterName=sct-test", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", f"AuthInfo=socket={socket_path},cred_expire=10",  # a requeued job waits cred_expire before it restarts
            "CredType=cred/munge", f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd'}-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU", "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1",
            "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MinJobAge=600", "InactiveLimit=0",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "MessageTimeout=30",
            *(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} State=UNKNOWN" for n, p in zip(NODES, nodes)),
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]
        (r / "slurm.conf").write_text("\n".join(lines) + "\n")
        self.munge_socket = socket_path

    def _start(self, cmd: list[str], name: str) -> None:
        with open(self.root / "log" / f"{name}.out", "w") as log:  # the daemon keeps its own copy of the descriptor
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self) -> Self:
        self._write_config()
        m = self.root / "munge"
        self._start(["munged", "-F", "-f", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                     f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"], "munged")
        self._until(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")
        self._start(["slurmctld", "-D", "-i"], "slurmctld")
        for n in NODES:
            self._start(["slurmd", "-D", "-N", n], f"slurmd-{n}")
        os.environ["SLURM_CONF"] = self.env["SLURM_CONF"]
        self._until(self._nodes_idle, 60, "the nodes did not come up idle")
        return self

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True, check=False).stdout.split()
        return out.count("idle") == len(NODES)

    def _until(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{what} (exited: {dead if dead else 'none'}); logs in {self.root / 'log'}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"== {f.name}\n{f.read_text()[-3000:]}" for f in sorted((self.root / "log").glob("*")) if f.is_file())

    def __exit__(self, *exc) -> None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self._saved_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._saved_conf

    def run(self, *cmd: str, check: bool = True) -> str:
        res = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=False)
        if check and res.returncode:
            raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}: {res.stderr}")
        return res.stdout

    def sbatch(self, script: Path, cwd: Path | None = None, env: dict | None = None) -> int:
        res = subprocess.run(["sbatch", "--parsable", str(script)], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise RuntimeError(f"sbatch {script} -> {res.returncode}: {res.stderr}")
        return int(res.stdout.strip().split(";")[0])

    def state(self, job: int) -> str:
        """The job's state from squeue ('' once it has left the queue)."""
        return self.run("squeue", "-h", "-j", str(job), "-o", "%T", check=False).strip()

    def wait(self, job: int, timeout: float, poll: float = 1.0) -> None:
        """Poll squeue until the job has left the queue."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.state(job) == "":
                return
            time.sleep(poll)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout} s\n{self.logs()}")

    def accounting(self, job: int) -> str:
        """`scontrol show job` while the controller still remembers the job (MinJobAge=600)."""
        return self.run("scontrol", "show", "job", str(job), check=False)
