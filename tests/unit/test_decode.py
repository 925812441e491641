"""sct.decode: the per-channel preview's values and layout, and the fallbacks of `Pictures` when no VAE loads
(missing folder, corrupt weights, none recorded): one warning, a greyscale preview PNG, no exception."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from loguru import logger
from PIL import Image

from sct.decode import Pictures, channel_preview, latent_entry

STATS = {"mean": [0.0] * 4, "std": [1.0] * 4, "sigma_data": 0.5}


@pytest.fixture
def warnings():
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(m.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def test_channel_preview_standardizes_each_channel_over_the_batch():
    x = torch.stack([torch.full((2, 3, 3), v) for v in (0.0, 2.0)])  # [2, 2, 3, 3]: per channel mean 1, std 1
    x[:, 1] *= 100  # another scale in channel 1: standardized away
    out = channel_preview(x)
    assert out.shape == (4, 1, 3, 3)
    expected = (torch.tensor([0.0, 0.0, 2.0, 2.0]) - 1) / 3  # order: sample 0 ch 0, ch 1, sample 1 ch 0, ch 1
    torch.testing.assert_close(out[:, 0, 0, 0], expected)


def test_latent_entry_only_for_latent_manifests():
    assert latent_entry(None) is None and latent_entry({"kind": "arrays"}) is None
    assert latent_entry({"kind": "latents", "stats": STATS, "vae": "org/vae"}) == {"stats": STATS, "vae": "org/vae"}
    assert latent_entry({"kind": "latents", "stats": STATS, "vae": "org/vae"}, "local/vae")["vae"] == "local/vae"


@pytest.mark.parametrize("how", ["missing", "corrupt", "unrecorded"])
def test_no_loadable_vae_gives_a_preview_and_one_warning(tmp_path, warnings, how):
    vae = tmp_path / "vae"
    if how == "corrupt":  # a diffusers-looking folder whose weights are garbage
        vae.mkdir()
        (vae / "config.json").write_text('{"_class_name": "AutoencoderKL", "latent_channels": 4}')
        (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    pictures = Pictures({"stats": STATS, "vae": "" if how == "unrecorded" else str(vae)})
    x = torch.randn(3, 4, 8, 8)
    for i in range(2):
        pictures.save(x, tmp_path / f"grid{i}.png", "1-step", nrow=10)
    assert len(warnings) == 1 and "per-channel latent previews" in warnings[0]
    assert (str(vae) in warnings[0]) == (how != "unrecorded")
    grid = Image.open(tmp_path / "grid0.png")
    assert grid.mode == "L" and grid.size == (12 * 25 + 1, 24 + 2)  # 3 samples x 4 channels in one row, 8 px upscaled 3x


def test_images_pass_through_and_other_channel_counts_preview(tmp_path, warnings):
    Pictures().save(torch.zeros(2, 3, 8, 8), tmp_path / "rgb.png", "x")
    assert Image.open(tmp_path / "rgb.png").mode == "RGB" and not warnings
    Pictures().save(torch.randn(2, 2, 8, 8), tmp_path / "two.png", "x")
    assert Image.open(tmp_path / "two.png").mode == "L" and "2 channels" in warnings[0]
    a = np.asarray(Image.open(tmp_path / "rgb.png"))
    assert a.shape[2] == 3


def test_sampling_vae_needs_shard_data():
    from sct.config import ConfigError, load
    from sct.experiment import TrainConfig

    with pytest.raises(ConfigError, match="sampling.vae: only latent shard data"):
        load(TrainConfig, "configs/demo_cpu.yaml", ["sampling.vae=org/vae"])
