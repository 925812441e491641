"""Metrics and human-readable logging (DESIGN rule 8).

Owns:
- `report(name, value)`: the one way to record a metric. Tensors stay on their device (no host
  sync) until `collect()`, which returns means since the last collect plus "<name>/std" and, when
  any were seen, "<name>/nonfinite" (the count of NaN/inf observations, which are left out of the
  mean). `collect(reduce=True)` sums the accumulators over ranks first (all ranks contribute).
- `timed(name)` / `time_module(module, name)`: wall time of a section, summed into "time/<name>" until `collect_times()`; the
  device is synchronized around it (CUDA kernels are asynchronous) when `set_sync` gave a function, or, after
  `set_cuda_events(True)`, CUDA events time it on the stream without a host sync (summed at `collect_times()`).
- `JSONLWriter`: rank-0 metrics sink, one JSON object per line.
- `add_sinks` / `publish(record)` / `publish_images(paths, step)` / `close_sinks`: the optional tracking sinks
  (TensorBoard, W&B: `sct.tracking`) that get each tick's record and the sample grids beside metrics.jsonl.
- `setup_logging`: loguru sinks (console on rank 0, WARNING+ elsewhere; run_dir/log.txt on rank 0, and
  ERRORs / `every_rank` lines from the other ranks).
- `Progress`: step, recent it/s and ETA for the status line.

Tests: `pytest tests/unit/test_stats.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as tdist
from loguru import logger

# name -> [count, sum, sumsq, nonfinite]; entries are floats or 0-d tensors on the value's device
_collector: dict[str, list] = {}
_times: dict[str, float] = {}  # section name -> seconds since the last collect_times()
_sync: Callable[[], None] | None = None
_events: list | None = None  # set_cuda_events(True): [(name, start event, end event)] not yet summed


def set_sync(fn: Callable[[], None] | None) -> None:
    """Function that waits for the device (torch.cuda.synchronize) around timed sections; None on CPU."""
    global _sync
    _sync = fn


def set_cuda_events(on: bool) -> None:
    """Time sections with CUDA events on the current stream (no synchronization inside the step) instead of wall time."""
    global _events
    _events = [] if on else None


def _event() -> torch.cuda.Event:
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


@contextlib.contextmanager
def timed(name: str) -> Iterator[None]:
    if _events is not None:
        start = _event()
        try:
            yield
        finally:
            _events.append((name, start, _event()))
        return
    if _sync is not None:
        _sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        if _sync is not None:
            _sync()
        _times[name] = _times.get(name, 0.0) + time.perf_counter() - start


def time_module(module: torch.nn.Module, name: str) -> None:
    """Add every forward of `module` to section `name` (forward hooks; for modules called deep inside others)."""
    starts: list[float] = []

    def pre(*_):
        if _events is not None:
            starts.append(_event())
            return
        if _sync is not None:
            _sync()
        starts.append(time.perf_counter())

    def post(*_):
        if _events is not None:
            _events.append((name, starts.pop(), _event()))
            return
        if _sync is not None:
            _sync()
        _times[name] = _times.get(name, 0.0) + time.perf_counter() - starts.pop()

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def collect_times() -> dict[str, float]:
    """Seconds per section since the last call (this rank); resets."""
    if _events:
        torch.cuda.synchronize()
        for name, start, end in _events:
            _times[name] = _times.get(name, 0.0) + start.elapsed_time(end) / 1000  # ms -> s
        _events.clear()
    out = dict(_times)
    _times.clear()
    return out


def _world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def _reduce(acc: dict[str, list]) -> dict[str, list]:
    """Sum every accumulator over ranks; names seen on any rank are kept (others contribute zeros)."""
    names = sorted(set().union(*[set(n) for n in _all_gather(sorted(acc))]))
    device = next((v.device for a in acc.values() for v in a if isinstance(v, torch.Tensor)), None)
    if device is None or (tdist.get_backend() == "nccl" and device.type != "cuda"):
        device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.tensor([[float(x) for x in acc.get(n, [0.0] * 4)] for n in names], dtype=torch.float64, device=device).reshape(-1, 4)
    tdist.all_reduce(flat)
    return {n: flat[i].tolist() for i, n in enumerate(names)}


def _all_gather(obj) -> list:
    out = [None] * _world()
    tdist.all_gather_object(out, obj)
    return out


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


def collect(reduce: bool = False) -> dict[str, float]:
    """Means (and population std) of everything reported since the last call; resets.

    reduce=True (a collective: every rank must call it) pools the observations of all ranks."""
    out: dict[str, float] = {}
    pooled = _reduce(_collector) if reduce and _world() > 1 else _collector
    for name, acc in pooled.items():
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


_sinks: list = []  # tracking sinks of this process (rank 0): scalars(record, step), images(paths, step), close()


def add_sinks(sinks) -> None:
    _sinks.extend(sinks)


def publish(record: dict) -> None:
    """A tick's record (the metrics.jsonl line) to every tracking sink, at record["step"]."""
    for sink in _sinks:
        sink.scalars(record, record["step"])


def publish_images(paths, step: int) -> None:
    """Sample grids (PNG files; None or empty: nothing) to every tracking sink."""
    if paths:
        for sink in _sinks:
            sink.images(list(paths), step)


def close_sinks() -> None:
    while _sinks:
        _sinks.pop().close()


def _every_rank(record) -> bool:
    return record["level"].no >= logger.level("ERROR").no or record["extra"].get("every_rank", False)


_early: list[str] = []  # rank 0's lines logged before the run folder opened (start-up checks, data fallbacks)


def setup_logging(run_dir: Path | None, rank: int = 0, level: str = "INFO") -> None:
    """Replace loguru's sinks: console (rank 0 at `level`, others WARNING+), run_dir/log.txt on rank 0; other
    ranks add to log.txt only ERRORs (fatal reasons) and lines bound with `every_rank=True` (data-worker warnings).
    With no run_dir yet (start-up), rank 0's lines are also kept and written first into log.txt once it opens."""
    logger.remove()
    fmt = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | " + f"rank {rank} | " + "{message}"
    logger.add(sys.stderr, level=level if rank == 0 else "WARNING", format=fmt)
    if run_dir is None:
        _early.clear()
        if rank == 0:
            logger.add(_early.append, level=level, format=fmt)
    elif rank == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        if _early:
            with open(Path(run_dir) / "log.txt", "a") as f:
                f.writelines(_early)
            _early.clear()
        logger.add(Path(run_dir) / "log.txt", level=level, format=fmt)
    else:
        logger.add(Path(run_dir) / "log.txt", level="WARNING", format=fmt, filter=_every_rank, delay=True)


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
