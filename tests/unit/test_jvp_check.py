"""The JVP harness on every backbone family at tiny width: JVP (torch.func.jvp and forward_ad duals) vs
float64 central differences <= 1e-6, fp32 and bf16 errors reported; it catches a wrong JVP; the CLI runs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sct import jvp_check
from sct.jvp_check import check_jvp, randomize_
from sct.models.dit import DiTConfig, build_dit
from sct.models.unet import UNetConfig, build_unet

BACKBONES = {
    "unet": lambda impl: build_unet(UNetConfig(img_resolution=8, img_channels=2, label_dim=3, model_channels=8,
                                               channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.2,
                                               jvp_attention=impl)),
    "dit": lambda impl: build_dit(DiTConfig(img_resolution=8, img_channels=2, label_dim=3, patch_size=2, hidden_size=16,
                                            depth=2, num_heads=2, dropout=0.2, jvp_attention=impl)),
}


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 2, 8, 8, generator=g), torch.rand(2, generator=g) * 1.5, F.one_hot(torch.tensor([0, 2]), 3).float()


@pytest.mark.parametrize("impl", ["math", "chunked"])
@pytest.mark.parametrize("family", list(BACKBONES))
def test_jvp_matches_float64_central_differences(family, impl):
    torch.manual_seed(0)
    net = randomize_(BACKBONES[family](impl))
    report = check_jvp(net, *inputs())
    assert report.fp64 <= 1e-6 and report.fp64_dual <= 1e-6, report
    assert report.fp32 <= 1e-5, report  # measured ~5e-7 here (docs/benchmarks.md)
    assert 1e-5 < report.bf16 < 0.1, report  # bf16 is visibly rounded, yet a usable tangent
    assert net.training  # the harness works on copies


def test_harness_catches_a_wrong_jvp(monkeypatch):
    """A chunked attention whose tangent is off by 1% must show up in the report."""
    from sct.models import chunked_attention

    real = chunked_attention.online_attention

    def skewed(*args, **kw):
        o, t = real(*args, **kw)
        return o, None if t is None else 1.01 * t

    monkeypatch.setattr(chunked_attention, "online_attention", skewed)
    torch.manual_seed(0)
    assert check_jvp(randomize_(BACKBONES["dit"]("chunked")), *inputs()).fp64 > 1e-4


def test_cli_prints_the_report(capsys):
    assert jvp_check.main(["--config", "configs/demo_cpu.yaml", "model.backbone.model_channels=8",
                           "model.backbone.attn_resolutions=[8]"]) == 0
    out = capsys.readouterr().out
    assert "JVP float64 (torch.func.jvp)" in out and "JVP bf16 autocast" in out
