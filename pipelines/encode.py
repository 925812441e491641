"""Image shards -> VAE latent shards, EDM2-style: center-crop/resize, optional flipped copy, and per-channel
latent statistics saved in the manifest so training sees mean 0 / std sigma_data = 0.5 and decoding inverts it.

    python -m pipelines.encode --images s3://bucket/in1k-images --out s3://bucket/in1k-latents \
        --vae stabilityai/sd-vae-ft-mse --resolution 512 --flip       # --vae: hub name or local folder

Stored per sample: `latent.npy` (float16 [C, H/f, W/f], the raw posterior MEAN of AutoencoderKL), optionally
`latent_flip.npy` (the same for the horizontally flipped image), and `cls`. We store the mean, not EDM2's
8-channel moments sampled at load time: the SD VAE's posterior std is tiny next to the data spread, and
storing it doubles the bytes every epoch streams. Normalization (EDM2 `StabilityVAEEncoder`, with dataset
statistics instead of constants) happens in the reader: x = (z - mean_c) * sigma_data / std_c; `decode`
applies the inverse before the VAE decoder.

At scale: the same command under torchrun, the deepspeed launcher or srun (one process per GPU)

    torchrun --nproc_per_node 8 -m pipelines.encode --images ... --out ...
    deepspeed --num_gpus 8 --module pipelines.encode ...    # or: srun --ntasks-per-node 8 python -m pipelines.encode ...

Each rank (RANK/WORLD_SIZE/LOCAL_RANK, else SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) encodes a contiguous
block of the source shards (balanced by sample count) into its own output shards, numbered and keyed so that
the dataset is the one a single process would write (same samples, order and keys; only shard boundaries at
the rank borders differ). No process group is needed: each rank writes a part manifest
(`_parts/part-RRRRR-of-WWWWW.json`: its shards and its latent sums); rank 0, after its own part, waits for
all parts, checks they come from the same settings, merges them (per-channel mean/std from the summed counts,
sums and sums of squares) and writes manifest.json last, then removes the parts. This holds the same way under
every launcher, and a rank that is rerun writes the same part again. Without a terminal, progress is logged
every 30 s (count, rate, ETA). The output is probed before any work: a missing bucket (unless
--create-bucket), rejected credentials or an unreachable endpoint end with one line and exit status 2.
Tests: tests/integration/test_shards_encode.py (tiny random VAE), tests/integration/test_encode_dist.py.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time

import numpy as np
import torch
from loguru import logger
from PIL import Image
from torch import Tensor

from pipelines import s3, shards
from pipelines.progress import Progress
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


def vae_reference(name: str, subfolder: str | None) -> str:
    """The one string manifests, snapshots and sampling.vae use for a VAE: "NAME" or "NAME#SUBFOLDER" (hub ids hold no '#')."""
    return f"{name}#{subfolder}" if subfolder else name


def load_vae(name: str, subfolder: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """AutoencoderKL from a hub id or folder; "NAME#SUBFOLDER" (`vae_reference`) names a subfolder, e.g. a pipeline repo's "vae"."""
    from diffusers import AutoencoderKL

    name, _, inner = name.partition("#")
    return AutoencoderKL.from_pretrained(name, subfolder=subfolder or inner or None, torch_dtype=dtype).to(device).eval().requires_grad_(False)


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


def world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun/deepspeed (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0) for a plain process."""
    for rank, size, local in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if rank in os.environ and size in os.environ:
            return int(os.environ[rank]), int(os.environ[size]), int(os.environ.get(local, "0"))
    return 0, 1, 0


def rank_blocks(counts: list[int], world_size: int) -> list[range]:
    """Contiguous source-shard blocks, one per rank, each cut at the shard border nearest to k/W of the samples."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    cuts = [0, *(int(np.abs(starts - starts[-1] * k / world_size).argmin()) for k in range(1, world_size)), len(counts)]
    return [range(cuts[k], cuts[k + 1]) for k in range(world_size)]


class RunningStats:
    """Per-channel mean/std over every latent value written, accumulated in float64; parts combine by summing."""

    def __init__(self, n: int = 0, s=0.0, ss=0.0):
        self.n, self.s, self.ss = n, np.asarray(s, np.float64), np.asarray(ss, np.float64)

    def add(self, z: np.ndarray) -> None:  # z [B, C, h, w]
        z = z.astype(np.float64)
        self.n += z.shape[0] * z.shape[2] * z.shape[3]
        self.s = self.s + z.sum(axis=(0, 2, 3))
        self.ss = self.ss + (z * z).sum(axis=(0, 2, 3))

    def sums(self) -> dict:
        return {"n": self.n, "s": self.s.tolist(), "ss": self.ss.tolist()}

    def __add__(self, other: RunningStats) -> RunningStats:
        return RunningStats(self.n + other.n, self.s + other.s, self.ss + other.ss)

    def result(self) -> dict:
        mean = self.s / self.n  # var = E[z^2] - E[z]^2 over all ranks' values
        return {"mean": mean.tolist(), "std": np.sqrt(self.ss / self.n - mean * mean).tolist(), "sigma_data": SIGMA_DATA}


def encode_dataset(images_url: str, out_url: str, vae, resolution: int = 512, flip: bool = False,
                   batch_size: int = 16, shard_size: int = 1000, vae_name: str = "", rank: int = 0, world_size: int = 1,
                   create_bucket: bool = False, merge_timeout_s: float = 86400.0) -> dict | None:
    """This rank's block of an image-shard dataset, in order, -> latent shards and a part manifest; rank 0 then
    merges all parts into manifest.json (returned; None on other ranks)."""
    source = shards.read_manifest(images_url)
    if source.get("kind") != "images":
        raise ValueError(f"{images_url}: expected image shards (python -m pipelines.shards images), got kind {source.get('kind')!r}")
    counts = [e["samples"] for e in source["shards"]]
    blocks = rank_blocks(counts, world_size)
    sizes = [sum(counts[i] for i in b) for b in blocks]
    meta = {"kind": "latents", "num_classes": source.get("num_classes", 0), "classes": source.get("classes", []), "vae": vae_name,
            "resolution": resolution, "flip": flip, "latent": "posterior mean, float16, unnormalized"}
    writer = shards.ShardWriter(out_url, shard_size, meta, create_bucket, first_shard=sum(-(-n // shard_size) for n in sizes[:rank]),
                                first_key=sum(sizes[:rank]))
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

    with Progress(sizes[rank], f"encode rank {rank}/{world_size} -> {out_url}", "image") as bar:
        for entry in (source["shards"][i] for i in blocks[rank]):
            for sample in fetch_shard(s3.join(images_url, entry["name"]), entry, 300.0, {}):
                key = next((k for k in IMAGE_KEYS if k in sample), None)
                if key is None:
                    raise ValueError(f"{images_url}/{entry['name']}: sample {sample['__key__']} has no image ({sorted(sample)})")
                pending.append((center_crop(Image.open(io.BytesIO(sample[key])), resolution), sample.get("cls")))
                if len(pending) == batch_size:
                    flush()
                bar.update()
        if pending:
            flush()
    settings = {**meta, "source": hashlib.sha256("".join(e["sha256"] for e in source["shards"]).encode()).hexdigest()[:16], "source_samples": source["total_samples"], "shard_size": shard_size}
    part = {"rank": rank, "world_size": world_size, "settings": settings, "shards": writer.finish(), "shape": shape, "sums": running.sums()}
    s3.write_bytes(_part_url(out_url, rank, world_size), json.dumps(part).encode())
    if rank != 0:
        logger.info(f"encode rank {rank}: {writer.count} latents written; rank 0 writes the manifest")
        return None
    parts = _wait_for_parts(out_url, world_size, merge_timeout_s)
    for p in parts:
        if p["settings"] != settings:
            raise ValueError(f"{_part_url(out_url, p['rank'], world_size)} was written with other settings ({p['settings']}), rank 0 has {settings}")
    stats = sum((RunningStats(**p["sums"]) for p in parts), RunningStats())
    manifest = shards.write_manifest(out_url, meta, [e for p in parts for e in p["shards"]],
                                     shape=next(p["shape"] for p in parts if p["shape"]), stats=stats.result())
    fs, path = s3.filesystem(s3.join(out_url, "_parts"))
    fs.rm(path, recursive=True)
    return manifest


def _part_url(out_url: str, rank: int, world_size: int) -> str:
    return s3.join(out_url, f"_parts/part-{rank:05d}-of-{world_size:05d}.json")


def _wait_for_parts(out_url: str, world_size: int, timeout_s: float, poll_s: float = 1.0) -> list[dict]:
    """Every rank's part manifest, polling until all exist (logged every minute); TimeoutError naming the missing ranks."""
    parts: dict[int, dict] = {}
    start = last_log = time.monotonic()
    while True:
        for r in set(range(world_size)) - set(parts):
            fs, path = s3.filesystem(_part_url(out_url, r, world_size))
            fs.invalidate_cache()
            if fs.exists(path):
                parts[r] = json.loads(s3.read_bytes(_part_url(out_url, r, world_size)))
        missing = sorted(set(range(world_size)) - set(parts))
        if not missing:
            return [parts[r] for r in range(world_size)]
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"encode: ranks {missing} wrote no part manifest under {s3.join(out_url, '_parts')} within {timeout_s:g}s")
        if time.monotonic() - last_log > 60:
            last_log = time.monotonic()
            logger.info(f"encode rank 0: waiting for the parts of ranks {missing}")
        time.sleep(poll_s)


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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda: this rank's LOCAL_RANK device")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--create-bucket", action="store_true", help="create the bucket of --out if it does not exist")
    parser.add_argument("--merge-timeout", type=float, default=86400.0, help="seconds rank 0 waits for the other ranks' parts")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's; LOCAL_RANK is read
    args = parser.parse_args(argv)
    rank, world_size, local_rank = world()
    device = f"cuda:{local_rank}" if args.device == "cuda" else args.device
    try:
        s3.check_writable(args.out, args.create_bucket)  # before loading the VAE or reading any image
        vae = load_vae(args.vae, args.vae_subfolder, device, getattr(torch, args.dtype))
        manifest = encode_dataset(args.images, args.out, vae, args.resolution, args.flip, args.batch_size, args.shard_size,
                                  vae_reference(args.vae, args.vae_subfolder),
                                  rank, world_size, args.create_bucket, args.merge_timeout)
    except s3.StorageError as e:
        print(f"storage error: {e}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(f"{manifest['total_samples']} latents of shape {manifest['shape']} in {len(manifest['shards'])} shards at {args.out}; "
              f"channel mean {np.round(manifest['stats']['mean'], 3).tolist()} std {np.round(manifest['stats']['std'], 3).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
