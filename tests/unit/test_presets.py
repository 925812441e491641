"""Backbone presets: parameter counts on the meta device against the published sizes, selection by name
in the strict config (explicit keys override the preset), and `--dry-run` printing the count."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sct.config import ConfigError, from_dict, load, to_dict
from sct.experiment import TrainConfig
from sct.models.dit import DiTConfig, build_dit
from sct.models.unet import UNetConfig, build_unet

# EDM2 (Karras et al. 2024, Table 2) img512 sizes in millions: the sCM paper's S, M, L, XL (1.1B), XXL (1.5B).
EDM2_MPARAMS = {"edm2-s": 280.2, "edm2-m": 497.8, "edm2-l": 777.5, "edm2-xl": 1119.3, "edm2-xxl": 1523.2}
DIT_MPARAMS = {"dit-s/2": 33, "dit-b/2": 130, "dit-l/2": 458, "dit-xl/2": 675}  # DiT Table 1 (/2)


def meta_count(build, cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build(cfg).parameters())


@pytest.mark.parametrize("preset", list(EDM2_MPARAMS))
def test_unet_latent_presets_are_within_5_percent_of_published_sizes(preset):
    cfg = from_dict(UNetConfig, {"preset": preset})
    assert (cfg.img_channels, cfg.img_resolution, cfg.label_dim) == (4, 64, 1000)
    n = meta_count(build_unet, cfg)
    assert abs(n / 1e6 / EDM2_MPARAMS[preset] - 1) <= 0.05, n
    if preset == "edm2-xxl":
        assert n >= 1.4e9


@pytest.mark.parametrize("preset", list(DIT_MPARAMS))
def test_dit_presets_are_within_5_percent_of_published_sizes(preset):
    n = meta_count(build_dit, from_dict(DiTConfig, {"preset": preset}))
    assert abs(n / 1e6 / DIT_MPARAMS[preset] - 1) <= 0.05, n


def test_pixel_presets_follow_ict():
    for name, shape in (("ict-cifar10", (3, 32, 0)), ("ict-imagenet64", (3, 64, 1000))):
        cfg = from_dict(UNetConfig, {"preset": name})
        assert (cfg.img_channels, cfg.img_resolution, cfg.label_dim) == shape
        assert cfg.time_embedding == "fourier" and cfg.fourier_scale == 0.02 and cfg.dropout == 0.3
        assert meta_count(build_unet, cfg) > 1e7
    assert {from_dict(DiTConfig, {"preset": f"dit-b/{p}"}).tokens for p in (1, 2, 4)} == {4096, 1024, 256}


def test_explicit_keys_override_the_preset_and_the_dump_reloads_identically():
    cfg = from_dict(UNetConfig, {"preset": "edm2-xl", "dropout": 0.0, "checkpointing": True})
    assert cfg.model_channels == 384 and cfg.dropout == 0.0 and cfg.checkpointing and cfg.preset == "edm2-xl"
    assert from_dict(UNetConfig, to_dict(cfg)) == cfg
    assert from_dict(UNetConfig, {}).model_channels == UNetConfig().model_channels  # no preset: the defaults


def test_unknown_preset_names_the_key_and_suggests():
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, {"model": {"backbone": {"name": "unet", "preset": "edm2-xxxl"}}}, source="x.yaml")
    assert "model.backbone.preset" in str(err.value) and "did you mean" in str(err.value) and "x.yaml" in str(err.value)


def test_dry_run_prints_the_parameter_count_of_a_preset_config(tmp_path):
    """The demo's data (16x16x1, 10 classes) with the edm2-s architecture: the shape keys override the preset."""
    config = tmp_path / "preset.yaml"
    config.write_text("model:\n  backbone: {name: unet, preset: edm2-s, img_resolution: 16, img_channels: 1, label_dim: 10}\n"
                      "  precond: {name: trigflow}\ndata: {dataset: digits, class_conditional: true}\n")
    out = subprocess.run([sys.executable, "-m", "sct.train", "--config", str(config), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    cfg = load(TrainConfig, config)
    expected = meta_count(build_unet, cfg.model.backbone)
    assert f"# backbone parameters: {expected:,}" in out and expected > 2.5e8 and "preset: edm2-s" in out
