"""Metrics and human-readable logging (DESIGN rule 8).

Owns:
- `report(name, value)`: the one way to record a metric. Tensors stay on their device (no host
  sync) until `collect()`, which returns means since the last collect plus "<name>/std" and, when
  any were seen, "<name>/nonfinite" (the count of NaN/inf observations, which are left out of the
  mean). The collector is per process; ranks are not reduced here.
- `JSONLWriter`: rank-0 metrics sink, one JSON object per line.
- `setup_logging`: loguru sinks (console on rank 0, WARNING+ elsewhere; run_dir/log.txt on rank 0).
- `Progress`: step, recent it/s and ETA for the status line.

Tests: `pytest tests/unit/test_stats.py`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch
from loguru import logger

# name -> [count, sum, sumsq, nonfinite]; entries are floats or 0-d tensors on the value's device
_collector: dict[str, list] = {}


def report(name: str, value: float | int | torch.Tensor) -> None:
    """Record one observation (scalar) or many (each element of a 1-d tensor) under `name`."""
    if isinstance(value, torch.Tensor):
        v = value.detach().flatten().to(torch.float64)
        finite = torch.isfinite(v)
        v = torch.where(finite, v, 0.0)
        count = finite.sum()
        obs = (count, v.sum(), v.square().sum(), v.numel() - count)
    else:
        v = float(value)
        obs = (1.0, v, v * v, 0.0) if math.isfinite(v) else (0.0, 0.0, 0.0, 1.0)
    acc = _collector.get(name)
    if acc is None:
        _collector[name] = list(obs)
    else:
        for i, x in enumerate(obs):
            acc[i] = acc[i] + x


def collect() -> dict[str, float]:
    """Means (and population std) of everything reported since the last call; resets."""
    out: dict[str, float] = {}
    for name, acc in _collector.items():
        count, total, sumsq, nonfinite = (float(x) for x in acc)
        if count > 0:
            mean = total / count
            out[name] = mean
            out[f"{name}/std"] = math.sqrt(max(sumsq / count - mean * mean, 0.0))
        if nonfinite > 0:
            out[f"{name}/nonfinite"] = nonfinite
    _collector.clear()
    return out


class JSONLWriter:
    """Append one JSON line per record (flushed); a no-op on ranks other than 0."""

    def __init__(self, path: Path, rank: int = 0):
        self.path = Path(path)
        self.rank = rank
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def setup_logging(run_dir: Path | None, rank: int = 0, level: str = "INFO") -> None:
    """Replace loguru's sinks: console (rank 0 at `level`, others WARNING+), run_dir/log.txt on rank 0."""
    logger.remove()
    fmt = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | " + f"rank {rank} | " + "{message}"
    logger.add(sys.stderr, level=level if rank == 0 else "WARNING", format=fmt)
    if run_dir is not None and rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        logger.add(Path(run_dir) / "log.txt", level=level, format=fmt)


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Speed over the last `window` updates and the ETA it implies."""

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        window: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = total_steps
        self.clock = clock
        self.step = start_step
        self._marks: deque[tuple[float, int]] = deque([(clock(), start_step)], maxlen=window + 1)

    def update(self, step: int) -> None:
        self.step = step
        self._marks.append((self.clock(), step))

    @property
    def its_per_second(self) -> float:
        (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def eta_seconds(self) -> float:
        rate = self.its_per_second
        return max(self.total_steps - self.step, 0) / rate if rate > 0 else math.inf

    def line(self) -> str:
        pct = 100.0 * self.step / self.total_steps if self.total_steps else 100.0
        return (
            f"step {self.step}/{self.total_steps} ({pct:.1f}%)  "
            f"{self.its_per_second:.2f} it/s  ETA {_format_duration(self.eta_seconds)}"
        )
