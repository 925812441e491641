"""Latent encoding with a tiny randomly initialized diffusers AutoencoderKL (`vae_dir`, conftest.py; no weights offline):
the stored latents are the VAE's posterior means of the center-cropped (and flipped) images, the manifest's
per-channel statistics are those of the stored values, the stream normalizes with them and `decode` inverts."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipelines import encode, shards
from pipelines.stream import ShardDataConfig, ShardStream, fetch_shard


def test_center_crop_matches_the_dhariwal_recipe():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (70, 50, 3), np.uint8))  # 50 wide, 70 high
    out = encode.center_crop(image, 20)  # 50 >= 40: box-halve to 25x35, bicubic to 20x28, crop rows 4..24
    ref = np.asarray(image.resize((25, 35), Image.BOX).resize((20, 28), Image.BICUBIC))[4:24]
    assert out.shape == (20, 20, 3) and np.array_equal(out, ref)


def test_encode_stores_posterior_means_and_statistics_that_the_stream_and_decode_use(tmp_path, vae_dir):
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20 + 3 * i, 17 + i, 3), np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    images, latents = str(tmp_path / "images"), str(tmp_path / "latents")
    assert shards.main(["images", "--folder", str(tmp_path / "img"), "--out", images, "--shard-size", "4"]) == 0
    assert encode.main(["--images", images, "--out", latents, "--vae", str(vae_dir), "--resolution", "16",
                        "--flip", "--batch-size", "3", "--shard-size", "2"]) == 0
    manifest = shards.read_manifest(latents)
    assert manifest["kind"] == "latents" and manifest["shape"] == [4, 8, 8] and manifest["total_samples"] == 10
    stored = [s for e in manifest["shards"] for s in fetch_shard(f"{latents}/{e['name']}", e, 5, {})]
    z = np.stack([shards.npy_load(s["latent.npy"]) for s in stored])
    zf = np.stack([shards.npy_load(s["latent_flip.npy"]) for s in stored])
    assert z.dtype == np.float16 and [int(s["cls"]) for s in stored] == [0] * 5 + [1] * 5

    vae = encode.load_vae(str(vae_dir))
    files = sorted((tmp_path / "img").rglob("*.png"))
    pixels = encode.to_pixels([encode.center_crop(Image.open(f), 16) for f in files])
    assert np.allclose(z, vae.encode(pixels).latent_dist.mean.numpy(), atol=2e-3)
    assert np.allclose(zf, vae.encode(pixels.flip(3)).latent_dist.mean.numpy(), atol=2e-3)
    both = np.concatenate([z, zf]).astype(np.float64)
    assert np.allclose(manifest["stats"]["mean"], both.mean(axis=(0, 2, 3)), atol=1e-9)
    assert np.allclose(manifest["stats"]["std"], both.std(axis=(0, 2, 3)), atol=1e-9)

    cfg = ShardDataConfig(url=latents, num_workers=0, shuffle_buffer=1, shuffle_shards=False)
    batch = next(ShardStream(cfg, manifest, 10, return_ids=True))
    mean, scale = encode.normalization(manifest["stats"])
    plain, flipped = (z.astype(np.float32) - mean) * scale, (zf.astype(np.float32) - mean) * scale
    x = batch["x"].numpy()
    used_flip = np.array([np.array_equal(x[i], flipped[i]) for i in range(10)])
    assert all(used_flip[i] or np.array_equal(x[i], plain[i]) for i in range(10)) and 0 < used_flip.sum() < 10
    all_x = np.concatenate([plain, flipped])
    assert np.allclose(all_x.mean(axis=(0, 2, 3)), 0, atol=1e-5) and np.allclose(all_x.std(axis=(0, 2, 3)), 0.5, atol=1e-4)
    images_out = encode.decode(vae, torch.from_numpy(plain), manifest["stats"])
    assert torch.allclose(images_out, vae.decode(torch.from_numpy(z.astype(np.float32))).sample.clamp(-1, 1), atol=1e-4)


def test_a_vae_in_a_subfolder_is_recorded_so_that_decoding_finds_it(tmp_path, vae_dir):
    """--vae REPO --vae-subfolder vae (a full pipeline repo's layout) -> the manifest names "REPO#vae", which the grids'
    loader (sct.decode.Pictures) and the export's standalone sampler both load."""
    import shutil

    from sct.decode import Pictures

    repo = tmp_path / "pipeline"
    shutil.copytree(vae_dir, repo / "vae")
    rng = np.random.default_rng(2)
    (tmp_path / "img" / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "img" / "a" / f"{i}.png")
    images, latents = str(tmp_path / "images"), str(tmp_path / "latents")
    assert shards.main(["images", "--folder", str(tmp_path / "img"), "--out", images]) == 0
    assert encode.main(["--images", images, "--out", latents, "--vae", str(repo), "--vae-subfolder", "vae", "--resolution", "16"]) == 0
    manifest = shards.read_manifest(latents)
    assert manifest["vae"] == f"{repo}#vae"
    pictures = Pictures({"vae": manifest["vae"], "stats": manifest["stats"]}, torch.device("cpu"))
    assert pictures.vae() is not None
    z = torch.zeros(1, 4, 8, 8)
    assert torch.equal(pictures.vae().decode(z).sample, encode.load_vae(str(vae_dir)).decode(z).sample)

    from sct.export_template.sampler import Sampler  # the standalone loader parses the same reference

    sampler = Sampler.__new__(Sampler)
    sampler.spec = {"latent": {"vae": manifest["vae"], "stats": manifest["stats"]}}
    assert sampler.decode(z).shape == (1, 3, 16, 16)
