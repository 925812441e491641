"""`python -m sct.bench step` on the toy config (CPU, perf_counter timing): one row per (objective, engine), the
time split adds up to the step time, JVP only for sCT/sCD, teacher only for sCD, no MFU without a known GPU."""
import pytest
import torch

from sct import stats
from sct.bench.__main__ import main as bench_main

SECTIONS = ["data", "teacher", "jvp", "forward", "backward", "optimizer", "ema"]


def _rows(out: str) -> list[dict]:
    lines = [line.strip("|").split("|") for line in out.splitlines() if line.startswith("| ")]
    head = [c.strip() for c in lines[0]]
    return [dict(zip(head, (c.strip() for c in cells))) for cells in lines[1:]]


def test_step_benchmark_table_on_cpu(capsys):
    argv = ["step", "--config", "configs/toy_sct.yaml", "--objectives", "diffusion", "sct", "scd", "--engines", "torch", "zero2",
            "--warmup", "1", "--steps", "3", "model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64"]
    assert bench_main(argv) == 0
    rows = _rows(capsys.readouterr().out)
    assert [(r["objective"], r["engine"]) for r in rows] == [(o, e) for o in ("diffusion", "sct", "scd") for e in ("torch", "zero2")]
    for r in rows:
        step = float(r["s/step"])
        assert step > 0 and float(r["img/s"]) == pytest.approx(64 / step, rel=1e-3)  # 4 significant digits
        parts = {k: float(r[k]) for k in SECTIONS if r[k] != "-"}
        assert ("jvp" in parts) == (r["objective"] != "diffusion") and ("teacher" in parts) == (r["objective"] == "scd")
        assert all(v >= 0 for v in parts.values())
        assert 0.6 * step <= sum(parts.values()) <= step * 1.002  # the sections cover the step body (4-digit rounding)
        assert r["MFU"] == "-" and float(r["peak GiB"]) > 0


def test_unknown_backbone_is_a_config_error(capsys):
    assert bench_main(["step", "--config", "configs/toy_sct.yaml", "--backbones", "edm2-q"]) == 2
    assert "unknown backbone 'edm2-q'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_event_sections_agree_with_synchronized_wall_time():
    a = torch.randn(4096, 4096, device="cuda")

    def section() -> float:
        with stats.timed("mm"):
            for _ in range(20):
                a @ a
        return stats.collect_times()["mm"]

    section()  # warm-up (cuBLAS handles, allocator)
    stats.set_cuda_events(True)
    try:
        events = section()
    finally:
        stats.set_cuda_events(False)
    stats.set_sync(torch.cuda.synchronize)
    try:
        wall = section()
    finally:
        stats.set_sync(None)
    assert events > 0 and 0.7 < events / wall < 1.3
