"""report/collect against numpy, JSONL sink, logging setup, Progress arithmetic."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from loguru import logger

from sct import stats


@pytest.fixture(autouse=True)
def _empty_collector():
    stats.collect()
    yield
    stats.collect()


def test_report_collect_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=37)
    obs = []
    stats.report("loss", torch.tensor(a[:20]))  # 1-d tensor: each element is an observation
    obs += list(a[:20])
    for v in a[20:30]:
        stats.report("loss", float(v))
    obs += list(a[20:30])
    for v in a[30:]:
        stats.report("loss", torch.tensor(v, dtype=torch.float32))  # 0-d tensor
    obs += [float(np.float32(v)) for v in a[30:]]
    stats.report("count", 3)
    stats.report("count", 5)
    out = stats.collect()
    assert out["loss"] == pytest.approx(np.mean(obs), rel=1e-9, abs=1e-12)
    assert out["loss/std"] == pytest.approx(np.std(obs), rel=1e-6)
    assert out["count"] == 4.0 and out["count/std"] == 1.0
    assert "loss/nonfinite" not in out
    assert stats.collect() == {}  # reset


def test_nonfinite_counted_separately():
    stats.report("g", torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    stats.report("g", float("-inf"))
    stats.report("g", 5.0)
    stats.report("bad", float("nan"))
    out = stats.collect()
    assert out["g"] == 3.0 and out["g/nonfinite"] == 3.0
    assert out["g/std"] == pytest.approx(np.std([1.0, 3.0, 5.0]))
    assert out == {"g": 3.0, "g/std": out["g/std"], "g/nonfinite": 3.0, "bad/nonfinite": 1.0}


def test_jsonl_writer_rank0_only(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    w0, w1 = stats.JSONLWriter(path, rank=0), stats.JSONLWriter(path, rank=1)
    w0.write({"step": 1, "loss": 0.5})
    w1.write({"step": 1, "loss": 99.0})
    w0.write({"step": 2, "loss": 0.25})
    lines = path.read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
    other = tmp_path / "rank1.jsonl"
    stats.JSONLWriter(other, rank=1).write({"a": 1})
    assert not other.exists()


def test_setup_logging_file_on_rank0(tmp_path):
    try:
        stats.setup_logging(tmp_path / "run0", rank=0)
        logger.info("hello from rank zero")
        stats.setup_logging(tmp_path / "run1", rank=1)
        logger.warning("warning from rank one")
        assert "hello from rank zero" in (tmp_path / "run0" / "log.txt").read_text()
        assert not (tmp_path / "run1" / "log.txt").exists()
    finally:
        logger.remove()
        logger.add(sys.stderr)


class _Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_eta_arithmetic():
    clock = _Clock()
    p = stats.Progress(total_steps=2000, start_step=100, window=4, clock=clock)
    assert p.its_per_second == 0.0 and math.isinf(p.eta_seconds)
    assert p.line() == "step 100/2000 (5.0%)  0.00 it/s  ETA ?"
    for step in range(110, 130, 10):  # 10 steps every 5 s -> 2 it/s
        clock.t += 5.0
        p.update(step)
    assert p.its_per_second == pytest.approx(2.0)
    assert p.eta_seconds == pytest.approx((2000 - 120) / 2.0)
    assert p.line() == "step 120/2000 (6.0%)  2.00 it/s  ETA 15m40s"
    for step in range(130, 170, 10):  # now 10 steps every 1 s; the 4-update window forgets the slow part
        clock.t += 1.0
        p.update(step)
    assert p.its_per_second == pytest.approx(10.0)
    assert p.eta_seconds == pytest.approx((2000 - 160) / 10.0)
    assert p.line().endswith("ETA 3m04s")


def test_progress_long_eta_format():
    clock = _Clock()
    p = stats.Progress(total_steps=100_000, clock=clock)
    clock.t += 10.0
    p.update(10)
    assert p.line() == "step 10/100000 (0.0%)  1.00 it/s  ETA 27h46m30s"
