"""Latent snapshots: the export's loader decodes through the VAE exactly as sct does (pipelines.encode.decode),
and sct.evaluate measures decoded images. The VAE is a tiny randomly initialised AutoencoderKL (no weights offline)."""
import json

import pytest
import torch
from snapshot_factory import UNET, make_snapshot

from pipelines.encode import decode, load_vae
from sct.config import from_dict
from sct.evaluate import main as evaluate_main
from sct.experiment import load_snapshot_model
from sct.export import export, load_export
from sct.samplers import SamplingConfig, generate

LATENT_UNET = {**UNET, "img_channels": 4, "img_resolution": 8, "attn_resolutions": [4]}
STATS = {"mean": [0.1, -0.2, 0.0, 0.3], "std": [0.9, 1.1, 0.8, 1.2], "sigma_data": 0.5}


@pytest.fixture(scope="module")
def latent_snapshot(tmp_path_factory):
    from diffusers import AutoencoderKL

    folder = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, latent_channels=4, norm_num_groups=8).save_pretrained(folder / "vae")
    return make_snapshot(folder / "s.safetensors", LATENT_UNET, latent={"vae": str(folder / "vae"), "stats": STATS})


def test_export_decodes_latents_like_sct(tmp_path, latent_snapshot):
    out = export(latent_snapshot, tmp_path / "export", steps=2)
    spec = json.loads((out / "sampler.json").read_text())
    assert spec["latent"]["stats"] == STATS
    sampler = load_export(out)
    seeds, classes = list(range(6)), [0, 1, 2, 3, 4, 5]
    x = sampler.sample(seeds, classes, 2)
    net, stored = load_snapshot_model(latent_snapshot)
    labels = torch.nn.functional.one_hot(torch.tensor(classes), 10).float()
    assert torch.equal(x, generate(net, from_dict(SamplingConfig, stored["sampling"]), 2, (4, 8, 8), seeds, labels))
    vae = load_vae(spec["latent"]["vae"])
    images = sampler.decode(x, vae)
    assert images.shape == (6, 3, 16, 16)
    torch.testing.assert_close(images, decode(vae, x, STATS), rtol=0, atol=1e-6)


def test_evaluate_measures_decoded_images(tmp_path, latent_snapshot, domain_classifier):
    argv = ["--snapshot", str(latent_snapshot), "--num-samples", "12", "--batch", "6", "--metrics", "fid", "--feature-extractor", "fmnist",
            "--domain-classifier", str(domain_classifier), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "e.json")]
    assert evaluate_main(argv) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["protocol"]["decoded_through_vae"] and result["metrics"]["frechet_inception_distance"] > 0
