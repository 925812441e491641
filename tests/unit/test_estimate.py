"""The dry-run's activation estimate: measured on a narrower, lower-resolution copy and scaled, it matches a
direct measurement of the model itself (the linear-growth assumption, checked). The dry-run's line naming
the 1.5B config is checked in tests/unit/test_configs.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from sct.config import load
from sct.estimate import activation_bytes_per_sample, shrink
from sct.experiment import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.shape=[4, 32, 32]", "model.backbone.model_channels=128", "model.backbone.img_resolution=32", "model.backbone.channel_mult=[1, 2]",
         "model.backbone.attn_resolutions=[16]", "model.backbone.num_blocks=1"]


def test_shrink_keeps_heads_levels_and_attention_placement():
    cfg = load(TrainConfig, ROOT / "configs/sCM_xl_512.yaml")
    small, k, r = shrink(cfg.model.backbone)
    assert (k, r) == (6, 4) and small.model_channels == 64 and small.head_channels == 64
    assert small.img_resolution == 16 and tuple(small.attn_resolutions) == (4, 2) and small.channel_mult == cfg.model.backbone.channel_mult


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_scaled_estimate_matches_a_direct_measurement(precision):
    """sCD (student, JVP, teacher) of the XL config at 1/3 the width and 1/2 the resolution, against the same shrunk again."""
    cfg = load(TrainConfig, ROOT / "configs/sCM_xl_512.yaml", [*SMALL, f"run.precision={precision}"])
    scaled, k, r = activation_bytes_per_sample(cfg)
    direct, _, _ = activation_bytes_per_sample(cfg, reduce=False)
    assert (k, r) == (2, 2)
    assert scaled * k * r * r == pytest.approx(direct, rel=0.15)
