"""Reference images for evaluation, and the provenance of their cached feature statistics.

A reference is named by a string:
    array:fashion_mnist[:train|test]   a dataset of `pipelines.arrays` as the demo sees it (16x16, [-1, 1])
    array:digits[:train|test]          scikit-learn's digits, the same way
    s3://bucket/prefix or a folder     a shard dataset of `pipelines.shards` (kind "arrays": x.npy in [-1, 1];
                                       kind "images": decoded and center-cropped to the generated resolution)
The first `num` samples in dataset/manifest order are used, so a reference is a pure function of (name, num).
torch-fidelity computes the features once and caches them under the cache folder (`input2_cache_name`);
beside them `<name>.json` records where they came from (reference, count, extractor, weights sha256) and
the sha256 of every cached file, which the evaluation protocol cites as the reference statistics' hash.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sct.cli_errors import UsageError


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, 3, H, W] (grey repeated: Inception takes RGB)."""
    u = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u


class ImageTensors(Dataset):
    """uint8 images [N, 3, H, W] as the Dataset torch-fidelity reads."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class LazyReference(Dataset):
    """The reference, loaded on first access only: when torch-fidelity's cache hits, nothing is read."""

    def __init__(self, source: str, num: int, resolution: int):
        self.source, self.num, self.resolution = source, num, resolution
        self._images: Tensor | None = None

    @property
    def images(self) -> Tensor:
        if self._images is None:
            self._images = load_reference(self.source, self.num, self.resolution)
        return self._images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def load_reference(source: str, num: int, resolution: int) -> Tensor:
    """The first `num` reference images as uint8 [N, 3, H, W]; UsageError naming the source if it cannot be read."""
    if source.startswith("array:"):
        from pipelines.arrays import ArrayDataConfig, load_arrays

        name, _, split = source[len("array:"):].partition(":")
        if name not in ("fashion_mnist", "digits") or split not in ("", "train", "test"):
            raise UsageError(f"--reference {source}: expected array:fashion_mnist|digits[:train|test]")
        cfg = ArrayDataConfig(dataset=name)
        if name == "fashion_mnist" and not (Path(cfg.root) / "train-images-idx3-ubyte.gz").exists():
            raise UsageError(f"--reference {source}: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
        x, _ = load_arrays(cfg, split or "train")
        images = to_uint8(x[:num])
    else:
        images = _shard_images(source, num, resolution)
    if len(images) < num:
        raise UsageError(f"--reference {source} holds {len(images)} samples, {num} requested")
    return images


def _shard_images(url: str, num: int, resolution: int) -> Tensor:
    from PIL import Image

    from pipelines import s3
    from pipelines.encode import IMAGE_KEYS, center_crop
    from pipelines.shards import npy_load, read_manifest
    from pipelines.stream import BadShard, fetch_shard

    try:
        manifest = read_manifest(url)
    except (s3.StorageError, ValueError) as e:
        raise UsageError(f"--reference {url}: {e}") from None
    if manifest["kind"] not in ("arrays", "images"):
        raise UsageError(f"--reference {url} holds {manifest['kind']} shards; give the image (or array) shards the latents were encoded from")
    out = []
    for entry in manifest["shards"]:
        try:
            samples = fetch_shard(s3.join(url, entry["name"]), entry, 60.0, {})
        except BadShard as e:
            raise UsageError(f"--reference {url}: shard {entry['name']}: {e}") from None
        for fields in samples:
            if "x.npy" in fields:
                out.append(to_uint8(torch.from_numpy(npy_load(fields["x.npy"]).astype(np.float32))[None])[0])
            else:
                key = next(k for k in IMAGE_KEYS if k in fields)
                arr = center_crop(Image.open(io.BytesIO(fields[key])), resolution)
                out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            if len(out) == num:
                return torch.stack(out)
    return torch.stack(out) if out else torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_name(source: str, num: int, resolution: int, extractor: str, weights_sha256: str) -> str:
    """torch-fidelity's input2_cache_name: one per (reference, count, resolution, extractor, weights)."""
    key = json.dumps([source, num, resolution, extractor, weights_sha256])
    return "sct-ref-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def record_provenance(cache_dir: Path, name: str, source: str, num: int, extractor: str, weights: str, weights_sha256: str) -> dict:
    """Write (or refresh) `<name>.json` beside torch-fidelity's cached files; return it with the statistics' hash."""
    files = {p.name: sha256_file(p) for p in sorted(cache_dir.glob(f"{name}-*"))}
    path = cache_dir / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    record = {"reference": source, "num": num, "feature_extractor": extractor, "weights": Path(weights).name,
              "weights_sha256": weights_sha256, "files": files,
              "stats_sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
              "created": old.get("created") if old.get("files") == files else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record
