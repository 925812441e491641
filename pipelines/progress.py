"""Progress of long pipeline jobs (shard writing, encoding) that reaches logs without a terminal.

    with Progress(total, "encode -> s3://b/latents", "image") as bar:
        bar.update(n)

On a terminal: a tqdm bar. Otherwise (batch jobs, `srun`, `kubectl logs`, redirected output): one loguru line
every `every_s` seconds and one at the end, with the count, the rate and the ETA. Tests:
tests/integration/test_encode_dist.py (the lines in a non-tty subprocess's log).
"""
from __future__ import annotations

import sys
import time
from typing import Self

from loguru import logger
from tqdm import tqdm


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str, every_s: float = 30.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.start, self.last = 0, time.monotonic(), time.monotonic()
        self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=2) if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self._log()

    def _log(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.n / elapsed
        of = f"/{self.total} ({100 * self.n / self.total:.1f}%)" if self.total else ""
        eta = f", ETA {_duration((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
        logger.info(f"{self.desc}: {self.n}{of} {self.unit}s, {rate:.1f} {self.unit}/s, elapsed {_duration(elapsed)}{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self._log()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
