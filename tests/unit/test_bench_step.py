"""`python -m sct.bench step` on tiny shapes (CPU, perf_counter timing): the table's rows and columns, finite numbers,
the time split that each objective implies (JVP only for sCT/sCD, teacher only for sCD) and that covers the step,
the profile's trace and breakdown, config errors; and (GPU only) CUDA-event sections against synchronized wall time.

The real configs/sCT_xl_512.yaml is shrunk by overrides (a 4x8x8 shape, 16 channels, 10 or no classes), and the toy
sCT config keeps its own MLP, so that each case trains a few real steps through TorchEngine or a one-rank DeepSpeed
ZeRO engine (gloo, CPU).
"""
import math
import re

import pytest
import torch

from sct import stats
from sct.bench import profile, step
from sct.bench.__main__ import main as bench_main

CONFIG = "configs/sCT_xl_512.yaml"
SHAPE = ["data.shape=[4,8,8]", "model.backbone.img_resolution=8"]
UNET = [*SHAPE, "data.num_classes=10", "model.backbone.label_dim=10", "model.backbone.model_channels=16", "model.backbone.channel_mult=[1,2]", "model.backbone.num_blocks=1",
        "model.backbone.attn_resolutions=[4]"]
DIT = [*SHAPE, "data.class_conditional=false", "model.backbone.label_dim=0", "model.backbone.hidden_size=32", "model.backbone.depth=2", "model.backbone.num_heads=2"]
QUICK = ["--batch", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32"]


def _table(text: str) -> tuple[list[str], list[dict]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], [dict(zip(split[0], r)) for r in split[1:] if r[0] != "---"]


def test_grid_of_objectives_gives_one_finite_row_each(capsys, tmp_path):
    out = tmp_path / "table.md"
    rc = step.main(["--configs", CONFIG, *QUICK, "--out", str(out), "--engines", "torch", "--objectives", "diffusion", "sct", "scd",
                    "--backbones", "edm2-s", *UNET])  # overrides after a list option
    assert rc == 0
    header, rows = _table(capsys.readouterr().out)
    assert header == ["config", "objective", "backbone", "engine", "params", *step.COLUMNS]
    assert [(r["config"], r["objective"], r["backbone"], r["engine"]) for r in rows] == [
        ("sCT_xl_512", o, "edm2-s", "torch") for o in ("diffusion", "sct", "scd")]
    for r in rows:
        assert r["MFU"] == "-"  # no peak FLOP/s on CPU
        absent = {"diffusion": {"jvp", "teacher"}, "sct": {"teacher"}, "scd": set()}[r["objective"]]
        for col in step.COLUMNS:
            if col != "MFU" and col not in absent:
                assert math.isfinite(float(r[col])), (r["objective"], col)
        assert all(r[col] == "-" for col in absent)
        assert float(r["loss"]) != 0  # zero-initialised layers were given random values
        assert float(r["s/step"]) > 0 and float(r["act GiB"]) > 0 and float(r["peak GiB"]) > float(r["act GiB"])
    assert out.read_text().count("\n| sCT_xl_512 |") == 3 and len((tmp_path / "table.md.jsonl").read_text().splitlines()) == 3


def test_toy_config_own_backbone_under_torch_and_zero2(capsys):
    argv = ["step", "--config", "configs/toy_sct.yaml", "--objectives", "diffusion", "sct", "scd", "--engines", "torch", "zero2",
            "--warmup", "1", "--steps", "3", "model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64"]
    assert bench_main(argv) == 0
    _, rows = _table(capsys.readouterr().out)
    assert [(r["objective"], r["backbone"], r["engine"]) for r in rows] == [
        (o, "config", e) for o in ("diffusion", "sct", "scd") for e in ("torch", "zero2")]
    for r in rows:
        sec = float(r["s/step"])
        assert sec > 0 and float(r["img/s"]) == pytest.approx(64 / sec, rel=1e-3)  # 4 significant digits
        parts = {k: float(r[k]) for k in step.SECTIONS if r[k] != "-"}
        assert ("jvp" in parts) == (r["objective"] != "diffusion") and ("teacher" in parts) == (r["objective"] == "scd")
        assert all(v >= 0 for v in parts.values())
        assert 0 < sum(parts.values()) <= 1.2 * sec  # sections lie inside the step (medians of each: a little slack)


def test_dit_under_zero3_with_profile(capsys, tmp_path):
    rc = step.main(["--configs", CONFIG, "--objectives", "sct", "--backbones", "dit-s/2", "--engines", "zero3", *QUICK,
                    "--profile", str(tmp_path), "--profile-steps", "1", *DIT])
    assert rc == 0
    text = capsys.readouterr().out
    _, rows = _table(text.split("device: ")[-1])
    assert [(r["objective"], r["backbone"], r["engine"]) for r in rows] == [("sct", "dit-s/2", "zero3")]
    assert (tmp_path / "sCT_xl_512_sct_dit-s_2_zero3.json").stat().st_size > 0
    shares = [float(s) for s in re.findall(r"^\| (?:matmul/conv|elementwise/norm|communication|other) \| [\d.]+ \| ([\d.]+)%", text, re.MULTILINE)]
    assert len(shares) == 4 and abs(sum(shares) - 100) < 0.5 and shares[0] > 0


def test_categories():
    assert profile.categorize("aten::addmm") == "matmul/conv"
    assert profile.categorize("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul/conv"
    assert profile.categorize("ncclDevKernel_AllGather_RING_LL") == "communication"
    assert profile.categorize("aten::native_group_norm") == "elementwise/norm"
    assert profile.categorize("void at::native::vectorized_elementwise_kernel<4, SiLU>") == "elementwise/norm"
    assert profile.categorize("aten::empty_strided") == "other"


def test_case_config_switches_objective_backbone_engine():
    cfg = step.case_config(CONFIG, "scd", "dit-xl/2", "zero1", 32, "bf16", [])
    assert (cfg.objective.name, cfg.objective.p_mean, cfg.objective.guidance_scale) == ("scd", -0.8, step.DEFAULT_GUIDANCE)
    assert (cfg.model.backbone.name, cfg.model.backbone.hidden_size, cfg.model.init_from) == ("dit", 1152, "")
    assert (cfg.dist.engine, cfg.dist.zero_stage, cfg.run.batch_size, cfg.run.precision) == ("deepspeed", 1, 32, "bf16")
    diffusion = step.case_config(CONFIG, "diffusion", "edm2-xl", "torch", 8, "fp32", ["objective.label_dropout=0.1"])
    assert (diffusion.objective.p_mean, diffusion.objective.label_dropout, diffusion.sampling.method) == (-0.4, 0.1, "ode")
    assert diffusion.model.backbone.dropout == 0.35  # the config's own U-Net keys are kept for a U-Net preset


@pytest.mark.parametrize("argv, message", [(["--backbones", "edm2-q"], "unknown backbone 'edm2-q'"),
                                           (["model.backbone.nope=1"], "nope")])
def test_config_errors_exit_2(capsys, argv, message):
    assert step.main(["--configs", CONFIG, *QUICK, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err


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
