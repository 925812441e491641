"""Launcher variables: which rank this process is, read from whatever started it.

    torchrun, the deepspeed launcher   RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR, MASTER_PORT) as set
    srun alone, one task per rank      SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID (only inside a job
                                       step: the batch shell has SLURM_PROCID too, but no step);
                                       MASTER_ADDR: as exported (infra/slurm exports the head node's
                                       NodeAddr), else the first host of SLURM_STEP_NODELIST (SLURM_JOB_NODELIST);
                                       MASTER_PORT: as exported, else 20000 + SLURM_JOB_ID % 20000
    anything else                      one process

`from_env(env)` reads them into a `Launch`; `export(launch)` writes the torch env:// variables that
`deepspeed.init_distributed` reads. `expand_hostlist` parses SLURM's compressed host lists
("gpu[01-03,07],login1") as `scontrol show hostnames` does, without calling the controller.

Signal delivery to the ranks is `sct.supervise` (the top process) and `sct.dist.preempt` (the ranks).
Tests: `pytest tests/unit/test_launcher.py`; under a real srun: `pytest -m slurm tests/integration/test_slurm.py`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

PORT_BASE, PORT_SPAN = 20000, 20000  # srun alone: MASTER_PORT = PORT_BASE + SLURM_JOB_ID % PORT_SPAN


@dataclass(frozen=True)
class Launch:
    kind: str  # "torch" (torchrun / deepspeed: RANK ...), "srun", "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def from_env(env: Mapping[str, str] | None = None) -> Launch:
    """Who started this process and which rank it is (see the module docstring for the precedence)."""
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        port = env.get("MASTER_PORT")
        return Launch("torch", _int(env, "RANK") if "RANK" in env else 0, _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1,
                      _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0, env.get("MASTER_ADDR"), int(port) if port else None)
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        addr = env.get("MASTER_ADDR") or (expand_hostlist(nodes) or [None])[0]
        if addr is None:
            raise ValueError("srun: neither MASTER_ADDR nor SLURM_STEP_NODELIST / SLURM_JOB_NODELIST is set")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else PORT_BASE + _int(env, "SLURM_JOB_ID") % PORT_SPAN
        return Launch("srun", _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS"), _int(env, "SLURM_LOCALID"), addr, port)
    return Launch("single")


def world_size(env: Mapping[str, str] | None = None) -> int:
    return from_env(env).world_size


def export(launch: Launch, env: dict | None = None) -> None:
    """Write RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for torch's env:// rendezvous
    (values a launcher already set are kept)."""
    env = os.environ if env is None else env
    values = {"RANK": launch.rank, "WORLD_SIZE": launch.world_size, "LOCAL_RANK": launch.local_rank,
              "MASTER_ADDR": launch.master_addr, "MASTER_PORT": launch.master_port}
    for key, value in values.items():
        if value is not None:
            env.setdefault(key, str(value))


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list to host names, in order: "n[1-3,05],gpu[01-02]-ib,login" ->
    n1 n2 n3 n05 gpu01-ib gpu02-ib login (zero padding kept, as `scontrol show hostnames` does)."""
    hosts: list[str] = []
    for item in _split_top(hostlist):
        hosts.extend(_expand(item))
    return hosts


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    items.append(text[start:])
    return [s.strip() for s in items if s.strip()]


def _expand(item: str) -> list[str]:
    """One host-list item with any number of bracket groups (the cross product, leftmost slowest)."""
    open_ = item.find("[")
    if open_ < 0:
        return [item]
    close = item.index("]", open_)
    prefix, body, rest = item[:open_], item[open_ + 1:close], item[close + 1:]
    out = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise ValueError(f"bad range {part!r} in host list item {item!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in host list item {item!r}")
        width = len(lo)
        for n in range(int(lo), int(hi) + 1):
            out.extend(f"{prefix}{n:0{width}d}{tail}" for tail in _expand(rest))
    return out
