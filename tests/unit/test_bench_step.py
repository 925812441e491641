"""`python -m sct.bench step` on tiny shapes (CPU): the table's rows and columns, finite numbers, the time split
that each objective implies, the profile's trace and breakdown, and config errors.

The real configs/sCT_xl_512.yaml is shrunk by overrides (a 4x8x8 shape, 16 channels, 10 or no classes) so that each
case trains a few real steps through TorchEngine or a one-rank DeepSpeed ZeRO engine (gloo, CPU).
"""
import math
import re

import pytest

from sct.bench import profile, step

CONFIG = "configs/sCT_xl_512.yaml"
SHAPE = ["data.shape=[4,8,8]", "model.backbone.img_resolution=8"]
UNET = [*SHAPE, "data.num_classes=10", "model.backbone.label_dim=10", "model.backbone.model_channels=16", "model.backbone.channel_mult=[1,2]", "model.backbone.num_blocks=1",
        "model.backbone.attn_resolutions=[4]"]
DIT = [*SHAPE, "data.class_conditional=false", "model.backbone.label_dim=0", "model.backbone.hidden_size=32", "model.backbone.depth=2", "model.backbone.num_heads=2"]
QUICK = ["--batch", "2", "--steps", "2", "--warmup", "1", "--precision", "fp32"]


def _table(text: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], [r for r in split[1:] if r[0] != "---"]


def test_grid_of_objectives_gives_one_finite_row_each(capsys, tmp_path):
    out = tmp_path / "table.md"
    rc = step.main(["--configs", CONFIG, *QUICK, "--out", str(out), "--engines", "torch", "--objectives", "diffusion", "sct", "scd",
                    "--backbones", "edm2-s", *UNET])  # overrides after a list option
    assert rc == 0
    header, rows = _table(capsys.readouterr().out)
    assert header == ["case", "params", *step.COLUMNS]
    assert [r[0] for r in rows] == [f"sCT_xl_512 {o} edm2-s torch" for o in ("diffusion", "sct", "scd")]
    for row in rows:
        cells = dict(zip(header, row))
        assert cells["MFU"] == "-"  # no peak FLOP/s on CPU
        for col in step.COLUMNS:
            if col != "MFU":
                assert math.isfinite(float(cells[col])), (row[0], col)
        assert float(cells["loss"]) != 0  # zero-initialised layers were given random values
        assert float(cells["s/step"]) > 0 and float(cells["act GiB"]) > 0 and float(cells["peak GiB"]) > float(cells["act GiB"])
    split = {r[0].split()[1]: dict(zip(header, r)) for r in rows}
    assert float(split["diffusion"]["jvp"]) == 0 and float(split["sct"]["jvp"]) > 0 and float(split["scd"]["jvp"]) > 0
    assert float(split["sct"]["teacher"]) == 0 and float(split["scd"]["teacher"]) > 0
    assert out.read_text().count("\n| sCT_xl_512") == 3 and len((tmp_path / "table.md.jsonl").read_text().splitlines()) == 3


def test_dit_under_zero3_with_profile(capsys, tmp_path):
    rc = step.main(["--configs", CONFIG, "--objectives", "sct", "--backbones", "dit-s/2", "--engines", "zero3", *QUICK,
                    "--profile", str(tmp_path), "--profile-steps", "1", *DIT])
    assert rc == 0
    text = capsys.readouterr().out
    header, rows = _table(text.split("device: ")[-1])
    assert [r[0] for r in rows] == ["sCT_xl_512 sct dit-s/2 zero3"]
    assert (tmp_path / "sCT_xl_512_sct_dit-s_2_zero3.json").stat().st_size > 0
    shares = [float(s) for s in re.findall(r"^\| (?:matmul/conv|elementwise/norm|communication|other) \| [\d.]+ \| ([\d.]+)%", text, re.M)]
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


@pytest.mark.parametrize("argv, message", [(["--backbones", "edm2-q"], "unknown preset 'edm2-q'"),
                                           (["model.backbone.nope=1"], "nope")])
def test_config_errors_exit_2(capsys, argv, message):
    assert step.main(["--configs", CONFIG, *QUICK, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and message in err
