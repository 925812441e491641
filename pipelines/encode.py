"""Image shards -> VAE latent shards, EDM2-style: center-crop/resize, optional flipped copy, and per-channel
latent statistics saved in the manifest so training sees mean 0 / std sigma_data = 0.5 and decoding inverts it.

    python -m pipelines.encode --images s3://bucket/in1k-images --out s3://bucket/in1k-latents \
        --vae stabilityai/sd-vae-ft-mse --resolution 512 --flip       # --vae: hub name or local folder

Stored per sample: `latent.npy` (float16 [C, H/f, W/f], the raw posterior MEAN of AutoencoderKL), optionally
`latent_flip.npy` (the same for the horizontally flipped image), and `cls`. We store the mean, not EDM2's
8-channel moments sampled at load time: the SD VAE's posterior std is tiny next to the data spread, and
storing it doubles the bytes every epoch streams. Normalization (EDM2 `StabilityVAEEncoder`, with dataset
statistics instead of constants) happens in the reader: x = (z - mean_c) * sigma_data / std_c; `decode`
applies the inverse before the VAE decoder. Tests: tests/integration/test_shards_encode.py (tiny random VAE).
"""
from __future__ import annotations

import argparse
import io
import sys

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from pipelines import shards
from pipelines.stream import SIGMA_DATA, fetch_shard, normalization

IMAGE_KEYS = ("jpg", "png", "webp", "bmp", "jpeg")


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM/EDM2 'center-crop-dhariwal': box-halve while >= 2x, bicubic to short side = size, center crop. HWC uint8."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def to_pixels(arrays: list[np.ndarray]) -> Tensor:
    """HWC uint8 images -> [B, 3, H, W] float in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def load_vae(name: str, subfolder: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(name, subfolder=subfolder, torch_dtype=dtype).to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_mean(vae, pixels: Tensor) -> Tensor:
    """Raw posterior mean of the VAE for [-1, 1] pixels (no scaling_factor: the dataset statistics replace it)."""
    param = next(vae.parameters())
    return vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mean.float().cpu()


@torch.no_grad()
def decode(vae, x: Tensor, stats: dict) -> Tensor:
    """Normalized latents [B, C, h, w] (what the model generates) -> images in [-1, 1] with the dataset's numbers."""
    mean, scale = (torch.from_numpy(a) for a in normalization(stats))
    param = next(vae.parameters())
    z = x.float().cpu() / scale + mean  # inverse of x = (z - mean) * scale
    return vae.decode(z.to(param.device, param.dtype)).sample.float().cpu().clamp(-1, 1)


class RunningStats:
    """Per-channel mean/std over every latent value written, accumulated in float64."""

    def __init__(self):
        self.n, self.s, self.ss = 0, 0.0, 0.0

    def add(self, z: np.ndarray) -> None:  # z [B, C, h, w]
        z = z.astype(np.float64)
        self.n += z.shape[0] * z.shape[2] * z.shape[3]
        self.s = self.s + z.sum(axis=(0, 2, 3))
        self.ss = self.ss + (z * z).sum(axis=(0, 2, 3))

    def result(self) -> dict:
        mean = self.s / self.n
        return {"mean": mean.tolist(), "std": np.sqrt(self.ss / self.n - mean * mean).tolist(), "sigma_data": SIGMA_DATA}


def encode_dataset(images_url: str, out_url: str, vae, resolution: int = 512, flip: bool = False,
                   batch_size: int = 16, shard_size: int = 1000, vae_name: str = "") -> dict:
    """Every image of an image-shard dataset, in order, -> latent shards + manifest with the latent statistics."""
    source = shards.read_manifest(images_url)
    if source.get("kind") != "images":
        raise ValueError(f"{images_url}: expected image shards (python -m pipelines.shards images), got kind {source.get('kind')!r}")
    writer = shards.ShardWriter(out_url, shard_size, {"kind": "latents", "num_classes": source.get("num_classes", 0),
                                                      "classes": source.get("classes", []), "vae": vae_name,
                                                      "resolution": resolution, "flip": flip, "latent": "posterior mean, float16, unnormalized"})
    running, shape = RunningStats(), None
    pending: list[tuple[np.ndarray, bytes | None]] = []

    def flush():
        nonlocal shape
        pixels = to_pixels([a for a, _ in pending])
        z = encode_mean(vae, pixels).numpy().astype(np.float16)
        zf = encode_mean(vae, pixels.flip(3)).numpy().astype(np.float16) if flip else None
        shape = list(z.shape[1:])
        for i, (_, label) in enumerate(pending):
            fields = {"latent.npy": shards.npy_bytes(z[i])}
            if zf is not None:
                fields["latent_flip.npy"] = shards.npy_bytes(zf[i])
            if label is not None:
                fields["cls"] = label
            writer.write(fields)
        running.add(z)  # statistics of the stored (float16) values, flips included
        if zf is not None:
            running.add(zf)
        pending.clear()

    bar = tqdm(total=source["total_samples"], desc=f"encode -> {out_url}", unit="image", mininterval=2, disable=None)
    for entry in source["shards"]:
        for sample in fetch_shard(shards.s3.join(images_url, entry["name"]), entry, 300.0, {}):
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None:
                raise ValueError(f"{images_url}/{entry['name']}: sample {sample['__key__']} has no image ({sorted(sample)})")
            pending.append((center_crop(Image.open(io.BytesIO(sample[key])), resolution), sample.get("cls")))
            if len(pending) == batch_size:
                flush()
            bar.update()
    if pending:
        flush()
    bar.close()
    return writer.close(shape=shape, stats=running.result())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.encode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="image shard dataset (folder or fsspec URL)")
    parser.add_argument("--out", required=True, help="where the latent shards go (folder or fsspec URL)")
    parser.add_argument("--vae", required=True, help="AutoencoderKL: hub name or local folder")
    parser.add_argument("--vae-subfolder", default=None, help="e.g. 'vae' inside a full pipeline repo")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--flip", action="store_true", help="also store the latent of the horizontally flipped image")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    vae = load_vae(args.vae, args.vae_subfolder, args.device, getattr(torch, args.dtype))
    manifest = encode_dataset(args.images, args.out, vae, args.resolution, args.flip, args.batch_size, args.shard_size, args.vae)
    print(f"{manifest['total_samples']} latents of shape {manifest['shape']} in {len(manifest['shards'])} shards at {args.out}; "
          f"channel mean {np.round(manifest['stats']['mean'], 3).tolist()} std {np.round(manifest['stats']['std'], 3).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
