"""WebDataset shard writing: arrays (Fashion-MNIST, digits, any x/labels) and images (folder per class or a
flat list with labels) -> `shard-000000.tar ...` plus `manifest.json`, written last, at a local path or any
fsspec URL (s3://, gs://, file://).

    python -m pipelines.shards arrays --dataset fashion_mnist --out s3://bucket/fmnist --shard-size 5000
    python -m pipelines.shards images --folder /data/imagenet/train --out s3://bucket/in1k-images
    python -m pipelines.shards images --list labels.csv --out /data/shards   # lines: path,label
    ... --create-bucket        # create a missing bucket instead of failing

Before any work, the writer probes the destination (pipelines.s3.check_writable): a missing bucket, rejected
credentials or an unreachable endpoint end the CLI with one line on stderr and exit status 2.

A sample is `<key>.x.npy` (arrays, float16/32 as given), `<key>.jpg|png|...` (images, original bytes) or
`<key>.latent.npy` [+ `<key>.latent_flip.npy`] (pipelines.encode), and `<key>.cls` (the label as text).
Keys are the global sample index (9 digits), so a reader can name every sample. The manifest lists shard
names, sample counts, byte sizes and sha256 checksums, the sample shape, the classes and the kind; a
reader treats a dataset without a manifest as unfinished. Tests: tests/integration/test_shards.py.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import re
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines import s3
from pipelines.progress import Progress

MANIFEST = "manifest.json"
FORMAT = "sct-shards/1"
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# a shard name is a plain relative path: no scheme, no leading '/', no '..' or hidden part
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """A deterministic tar (fixed mtime/owner, fields in sorted order): the same samples give the same sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(fields[ext]), 0o444, 0
                tar.addfile(info, io.BytesIO(fields[ext]))
    return buf.getvalue()


@dataclass
class ShardWriter:
    """Buffers samples, uploads each full shard, and writes the manifest on `close()` (so a crash leaves none).
    Checks that `url` is writable when made (StorageError). `first_shard`/`first_key`: where this writer's
    shard numbers and sample keys start (one rank's part of a multi-rank job, pipelines.encode)."""

    url: str
    shard_size: int = 1000
    meta: dict = field(default_factory=dict)
    create_bucket: bool = False
    first_shard: int = 0
    first_key: int = 0
    shards: list[dict] = field(default_factory=list)
    _pending: list = field(default_factory=list)
    count: int = 0

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {self.shard_size}")
        s3.check_writable(self.url, self.create_bucket)

    def write(self, fields: dict[str, bytes]) -> None:
        self._pending.append((f"{self.first_key + self.count:09d}", fields))
        self.count += 1
        if len(self._pending) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = tar_bytes(self._pending)
        name = f"shard-{self.first_shard + len(self.shards):06d}.tar"
        s3.write_bytes(s3.join(self.url, name), data)
        self.shards.append({"name": name, "samples": len(self._pending), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        self._pending = []

    def finish(self) -> list[dict]:
        """Upload the last shard; this writer's shard entries (no manifest: a part of a multi-rank job)."""
        self._flush()
        return self.shards

    def close(self, **extra) -> dict:
        return write_manifest(self.url, self.meta, self.finish(), **extra)


def write_manifest(url: str, meta: dict, shard_entries: list[dict], **extra) -> dict:
    """The dataset's manifest.json, written last: a reader treats a folder without one as unfinished."""
    if not shard_entries:
        raise ValueError(f"no samples written to {url}")
    manifest = {"format": FORMAT, **meta, **extra, "total_samples": sum(e["samples"] for e in shard_entries), "shards": shard_entries}
    s3.write_bytes(s3.join(url, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(url: str, budget_s: float = 3.0) -> dict:
    """The manifest at `url`; StorageError (credentials, bucket, endpoint) or ValueError (not a manifest) if not."""
    data = s3.preflight(s3.join(url, MANIFEST), budget_s)
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{s3.join(url, MANIFEST)}: not valid JSON ({e})") from None
    where = s3.join(url, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{where}: format {got!r}, expected {FORMAT!r}")
    check_manifest(manifest, where)
    return manifest


def _is_int(v, low: int = 0) -> bool:
    return type(v) is int and v >= low


def check_manifest(manifest: dict, where: str) -> None:
    """ValueError naming the key (and shard) unless `manifest` has every key a reader needs, well-typed, and
    its shard names are plain relative paths (a name like '../x' or 'pipe:...' would leave the dataset)."""
    kind = manifest.get("kind")
    if kind not in ("arrays", "images", "latents"):
        raise ValueError(f"{where}: 'kind' must be 'arrays', 'images' or 'latents', got {kind!r}")
    if not _is_int(manifest.get("num_classes", 0)):
        raise ValueError(f"{where}: 'num_classes' must be an integer >= 0, got {manifest.get('num_classes')!r}")
    shape = manifest.get("shape")
    if kind != "images" and not (isinstance(shape, list) and shape and all(_is_int(d, 1) for d in shape)):
        raise ValueError(f"{where}: 'shape' must be a list of positive integers for {kind} shards, got {shape!r}")
    stats = manifest.get("stats")
    if kind == "latents" and not (isinstance(stats, dict) and all(isinstance(stats.get(k), list) and len(stats[k]) == shape[0] for k in ("mean", "std"))):
        raise ValueError(f"{where}: latent shards need 'stats' with 'mean' and 'std' lists of {shape[0]} channels, got {stats!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{where}: 'shards' must be a non-empty list, got {shards!r}")
    for i, entry in enumerate(shards):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not _SHARD_NAME.match(name):
            raise ValueError(f"{where}: shards[{i}].name must be a plain relative file name (letters, digits, '._-', '/'; "
                             f"no scheme, no leading '/', no '..'), got {name!r}")
        for key, low in (("samples", 1), ("bytes", 0)):
            if not _is_int(entry.get(key), low):
                raise ValueError(f"{where}: shard {name}: '{key}' must be an integer >= {low}, got {entry.get(key)!r}")
        if not (isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise ValueError(f"{where}: shard {name}: 'sha256' must be 64 hex digits, got {entry.get('sha256')!r}")
    total = manifest.get("total_samples")
    if total != sum(e["samples"] for e in shards):
        raise ValueError(f"{where}: 'total_samples' is {total!r}, the shards hold {sum(e['samples'] for e in shards)}")


def _npy_shape(data: bytes) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from a .npy header, without reading the array."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def sample_problem(fields: dict, shape: tuple[int, ...], classes: int) -> str | None:
    """What is wrong with a decoded sample (naming it), or None: its arrays must have `shape` (float) and,
    when `classes`, its label must be in [0, classes)."""
    key = fields.get("__key__", "?")
    arrays = [k for k in ("x.npy", "latent.npy", "latent_flip.npy") if k in fields]
    if not arrays or ("latent_flip.npy" in arrays and "latent.npy" not in arrays):
        return f"sample {key}: no x.npy or latent.npy (fields {sorted(k for k in fields if not k.startswith('__'))})"
    for name in arrays:
        try:
            got, dtype = _npy_shape(fields[name])
        except (ValueError, OSError) as e:
            return f"sample {key}: {name} is not a .npy array ({e})"
        if tuple(got) != tuple(shape) or dtype.kind != "f":
            return f"sample {key}: {name} is {dtype} {list(got)}, data.shape (and the manifest) say {list(shape)} (float)"
    if classes:
        text = fields.get("cls", b"").decode("ascii", "replace").strip()
        if not (text.isdigit() and int(text) < classes):
            return f"sample {key}: label {text or 'missing'!r} is not a class id in [0, {classes}) (data.num_classes)"
    return None


def write_arrays(x: np.ndarray, labels: np.ndarray | None, url: str, shard_size: int = 1000, num_classes: int = 0,
                 create_bucket: bool = False, **meta) -> dict:
    """x [N, ...] (float), labels [N] integer class ids or None -> shards of `x.npy` (+ `cls`)."""
    writer = ShardWriter(url, shard_size, {"kind": "arrays", "shape": list(x.shape[1:]), "dtype": str(x.dtype), "num_classes": num_classes, **meta},
                         create_bucket)
    with Progress(len(x), f"shards -> {url}", "sample") as bar:
        for i in range(len(x)):
            fields = {"x.npy": npy_bytes(x[i])}
            if labels is not None:
                fields["cls"] = str(int(labels[i])).encode()
            writer.write(fields)
            bar.update()
    return writer.close()


def image_folder_list(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """ImageFolder layout: one sub-folder per class, classes in sorted order -> ([(file, class id)], class names)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root}: no class sub-folders")
    items = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_EXTS]
    return items, classes


def image_list_file(path: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """CSV lines `path,label` (label an integer); relative paths are relative to the list file."""
    items = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2 or not row[1].strip().isdigit():
                raise ValueError(f"{path}:{lineno}: expected 'path,integer_label' (a class id >= 0), got {row}")
            file = Path(row[0].strip())
            items.append((file if file.is_absolute() else path.parent / file, int(row[1])))
    classes = [str(c) for c in range(max((c for _, c in items), default=-1) + 1)]
    return items, classes


def write_images(items: list[tuple[Path, int]], classes: list[str], url: str, shard_size: int = 1000, create_bucket: bool = False) -> dict:
    """Original image bytes (no re-encoding) with labels -> shards; `pipelines.encode` crops, resizes and encodes."""
    writer = ShardWriter(url, shard_size, {"kind": "images", "num_classes": len(classes), "classes": classes}, create_bucket)
    with Progress(len(items), f"shards -> {url}", "image") as bar:
        for file, label in items:
            ext = file.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            writer.write({ext: file.read_bytes(), "cls": str(label).encode()})
            bar.update()
    return writer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.shards", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="source", required=True)
    arrays = sub.add_parser("arrays", help="a dataset from pipelines.arrays (as the demo sees it: [-1, 1], padded)")
    arrays.add_argument("--dataset", default="auto", choices=["fashion_mnist", "digits", "gaussian_mixture", "auto"])
    arrays.add_argument("--split", default="train", choices=["train", "test"])
    arrays.add_argument("--unconditional", action="store_true", help="store no labels")
    images = sub.add_parser("images", help="image files with labels")
    group = images.add_mutually_exclusive_group(required=True)
    group.add_argument("--folder", type=Path, help="one sub-folder per class")
    group.add_argument("--list", type=Path, help="CSV of path,label")
    for p in (arrays, images):
        p.add_argument("--out", required=True, help="local folder or fsspec URL (s3://bucket/prefix)")
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        p.add_argument("--create-bucket", action="store_true", help="create the bucket of --out if it does not exist")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    if (problem := s3.url_problem(args.out)) is not None:
        parser.error(f"--out {args.out}: {problem}")
    try:
        manifest = _write(args)
    except s3.StorageError as e:
        print(f"storage error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # a bad --list row, a missing image or folder
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"{manifest['total_samples']} samples in {len(manifest['shards'])} shards at {args.out}")
    return 0


def _write(args: argparse.Namespace) -> dict:
    if args.source == "arrays":
        from pipelines.arrays import ArrayDataConfig, load_arrays, resolve_dataset

        cfg = ArrayDataConfig(dataset=args.dataset, class_conditional=not args.unconditional)
        x, onehot = load_arrays(cfg, args.split)
        labels = onehot.argmax(1).numpy() if onehot.shape[1] else None
        return write_arrays(x.numpy(), labels, args.out, args.shard_size, num_classes=onehot.shape[1],
                            create_bucket=args.create_bucket, source=resolve_dataset(cfg))
    source = args.folder or args.list
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such {'folder' if args.folder else 'file'}")
    items, classes = image_folder_list(args.folder) if args.folder else image_list_file(args.list)
    missing = [str(f) for f, _ in items if not f.is_file()]
    if missing:  # checked before anything is written
        raise FileNotFoundError(f"{source}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    return write_images(items, classes, args.out, args.shard_size, args.create_bucket)


if __name__ == "__main__":
    sys.exit(main())
