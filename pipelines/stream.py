"""The streaming reader sct.train uses for shard datasets: WebDataset tars on local disk or S3, split by rank
and DataLoader worker, shuffled through a buffer, infinite epochs, and a small exactly resumable state.

    cfg = ShardDataConfig(url="s3://bucket/latents", shape=(4, 64, 64), num_classes=1000, num_workers=2)
    stream = ShardStream(cfg, verified_manifest(cfg), batch_size=32, rank=r, world_size=w)
    batch = next(stream)            # {"x": float [B, ...], "labels": one-hot [B, classes]} (labels if conditional)
    state = stream.state_dict()     # {"batches": n, "workers": [[epoch, position], ...], "fingerprint": {...}, "resume": ...}
    stream.load_state_dict(state)   # the next batches are exactly those an uninterrupted stream would give
    stream.load_state_dict({**state, "ranks": [every rank's state]})  # on another world size / num_workers

Order (all pure functions of seed, epoch, slot, so the state is a few integers): the W ranks x K workers are
W*K reader slots; in each epoch the shards are permuted (seed, epoch) and slot s reads shards s, s+W*K, ...
so every sample is read once per epoch. Within a slot, samples pass a shuffle buffer whose pick sequence is
simulated on indices first (`buffer_order`); a slot at (epoch, position) therefore knows which samples it has
emitted and resumes by fetching only the shards that still hold unemitted samples. On another layout (world
size, num_workers, batch size) pipelines.resume_map deals the unread rest of the interrupted epoch(s) to the
new slots: nothing is read twice or skipped. Worker k's batches reach
the main process in round-robin order (DataLoader's in-order delivery), and the main process records each
worker's position with every batch it hands out, so prefetched-but-unused batches never count.

The config declares what the dataset is (`shape`, `num_classes`), so loading or --dry-running a config
never touches storage; `verified_manifest` (called by pipelines.data.build_stream, before step 0) reads the
manifest and checks the declaration, the kind, the credentials and the endpoint, raising ConfigError("data.*").

Faults: shards are read whole (keep them to a few hundred MB: each worker holds one plus the shuffle buffer)
in-process (local files, or fsspec for s3:// and the other `s3.SCHEMES`) with retries and backoff on
transient errors (counted); a missing, truncated or corrupt shard (size/sha256 differ from the manifest), or
one holding a sample whose array is not `data.shape` or whose label is outside [0, num_classes), is
skipped, logged and counted, and the stream raises once more than `max_bad_shards` distinct shards failed.
The manifest itself is validated (`pipelines.shards.check_manifest`: keys, types, plain relative shard names).
Tests: tests/integration/test_stream.py (real moto S3 server on loopback).
"""
from __future__ import annotations

import hashlib
import io
import os
import signal
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import webdataset as wds
from loguru import logger
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipelines import s3, workers
from pipelines.resume_map import ResumeMap, buffer_order, fresh_plan  # noqa: F401 - buffer_order: re-exported
from pipelines.resume_map import rng as _rng
from pipelines.shards import npy_load, read_manifest, sample_problem
from sct.config import ConfigError

_MANIFESTS: dict[str, dict] = {}
SIGMA_DATA = 0.5  # EDM2's latent normalization target
ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "FSSPEC_")


@dataclass
class ShardDataConfig:
    name: Literal["shards"] = "shards"
    url: str = ""  # folder or fsspec URL (s3://bucket/prefix) holding manifest.json and the shards
    shape: tuple[int, ...] = ()  # one sample as stored, e.g. [4, 64, 64] (manifest "shape"; checked when the stream is built)
    num_classes: int = 0  # label classes (manifest "num_classes"; checked when the stream is built if class_conditional)
    class_conditional: bool = True
    seed: int = 0
    num_workers: int = 2  # DataLoader worker processes per rank (0: read in the training process)
    prefetch_factor: int = 4  # batches each worker keeps ready
    shuffle_buffer: int = 1000  # samples; 1 keeps shard order
    shuffle_shards: bool = True  # permute shards across readers every epoch
    flip: bool = True  # latent datasets with stored flips: use the flipped latent for half the samples
    retry_seconds: float = 300.0  # how long transient storage errors are retried before the run stops
    max_bad_shards: int = 0  # distinct unreadable shards tolerated before the stream raises
    # forkserver: workers start from a clean process, not a copy of the trainer (its sockets, threads, CUDA state)
    worker_start: Literal["forkserver", "spawn", "fork"] = "forkserver"

    def check(self) -> None:
        if not self.url:
            raise ConfigError("url", "set the folder or URL of a shard dataset (with manifest.json)")
        if (problem := s3.url_problem(self.url)) is not None:
            raise ConfigError("url", f"{self.url!r}: {problem}")
        for key in ("num_workers", "max_bad_shards"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        for key in ("prefetch_factor", "shuffle_buffer"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not self.shape or any(d < 1 for d in self.shape):
            raise ConfigError("shape", f"declare the shape of one sample as stored, e.g. [4, 64, 64] (the manifest's \"shape\"), got {list(self.shape)}")
        if self.num_classes < 0:
            raise ConfigError("num_classes", f"must be >= 0, got {self.num_classes}")
        if self.class_conditional and self.num_classes == 0:
            raise ConfigError("num_classes", "class_conditional data needs num_classes > 0 (the manifest's \"num_classes\"), or set class_conditional: false")


def manifest_of(cfg: ShardDataConfig) -> dict:
    """The dataset's manifest, read once per process; unreadable -> ConfigError naming the cause."""
    if cfg.url not in _MANIFESTS:
        try:
            _MANIFESTS[cfg.url] = read_manifest(cfg.url)
        except (s3.StorageError, ValueError) as e:
            raise ConfigError("data.url", str(e)) from None
    return _MANIFESTS[cfg.url]


def verified_manifest(cfg: ShardDataConfig) -> dict:
    """The manifest, after checking that it is what the config declares (kind, shape, classes)."""
    manifest = manifest_of(cfg)
    where = s3.join(cfg.url, "manifest.json")
    if manifest["kind"] not in ("arrays", "latents"):
        raise ConfigError("data.url", f"{cfg.url} holds {manifest['kind']} shards: encode images to latents first (python -m pipelines.encode)")
    if tuple(manifest["shape"]) != tuple(cfg.shape):
        raise ConfigError("data.shape", f"{where} says samples are {list(manifest['shape'])}, the config declares {list(cfg.shape)}")
    stored = int(manifest.get("num_classes", 0))
    if cfg.class_conditional and stored != cfg.num_classes:
        raise ConfigError("data.num_classes", f"{where} says {stored} classes, the config declares {cfg.num_classes}")
    return manifest


def shard_data_shape(cfg: ShardDataConfig) -> tuple[int, ...]:
    return tuple(cfg.shape)


def shard_num_classes(cfg: ShardDataConfig) -> int:
    return cfg.num_classes if cfg.class_conditional else 0


def normalization(stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) per channel, shaped [C, 1, 1]: x = (z - mean) * scale with scale = sigma_data / std (EDM2)."""
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    return mean[:, None, None], (stats.get("sigma_data", SIGMA_DATA) / std)[:, None, None]


class BadShard(Exception):
    pass


class DataError(RuntimeError):
    """The stream cannot go on (sct.train exits with status 4)."""


class TooManyBadShards(DataError):
    pass


def fetch_shard(url: str, entry: dict, budget_s: float, counters: dict, check=None) -> list[dict]:
    """The samples of one shard, verified against the manifest's size and sha256 (and each by `check`, which
    returns what is wrong with a sample or None); BadShard if it cannot be used."""
    try:
        data = s3.read_bytes(url, budget_s, counters)
    except FileNotFoundError:
        raise BadShard("missing") from None
    if len(data) != entry["bytes"]:
        raise BadShard(f"{len(data)} bytes, manifest says {entry['bytes']} (truncated?)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BadShard("sha256 differs from the manifest (corrupt)")
    files = (dict(f, __url__=url) for f in wds.tariterators.tar_file_iterator(io.BytesIO(data)))
    samples = list(wds.tariterators.group_by_keys(files))
    if len(samples) != entry["samples"]:
        raise BadShard(f"{len(samples)} samples, manifest says {entry['samples']}")
    for sample in samples if check else ():
        if (problem := check(sample)) is not None:
            raise BadShard(problem)
    return samples


class SlotReader:
    """One reader slot's infinite sample sequence, from any (epoch, position) on. Runs inside a worker."""

    def __init__(self, cfg: ShardDataConfig, manifest: dict, slot: int, slots: int, remap: ResumeMap | None = None):
        self.cfg, self.manifest, self.slot, self.slots, self.remap = cfg, manifest, slot, slots, remap
        self.shards = manifest["shards"]
        self.first_id = np.concatenate([[0], np.cumsum([s["samples"] for s in self.shards])]).tolist()
        self.counters = {"retries": 0, "bad_shards": 0, "skipped_samples": 0}
        self.bad: dict[str, str] = {}  # shard name -> reason
        if manifest["kind"] == "latents":
            self.bias, self.scale = normalization(manifest["stats"])
        # the manifest's shape and classes: verified_manifest has checked them against data.shape/num_classes
        shape, classes = tuple(manifest["shape"]), int(manifest.get("num_classes", 0)) if cfg.class_conditional else 0
        self.check = lambda fields: sample_problem(fields, shape, classes)

    def plan(self, epoch: int) -> tuple[list[int], list[list[int]], list[int]]:
        """(shard ids, kept sample indices per shard, output order over the kept samples) of an epoch."""
        if self.remap is not None and self.remap.covers(epoch):  # resumed on another layout (pipelines.resume_map)
            return self.remap.plan(self.slot, epoch)
        return fresh_plan([s["samples"] for s in self.shards], self.slots, self.slot, epoch, self.cfg.seed,
                          self.cfg.shuffle_buffer, self.cfg.shuffle_shards)

    def _read(self, ids: list[int], kept: list[list[int]], need: set[int]):
        """(local index, sample) for shards holding a needed index; (start, count, None) for a bad shard."""
        start = 0
        for sid, keep in zip(ids, kept):
            entry = self.shards[sid]
            local = {j: start + n for n, j in enumerate(keep)}  # sample index in the shard -> local index
            if any(i in need for i in local.values()):
                try:
                    samples = fetch_shard(s3.join(self.cfg.url, entry["name"]), entry, self.cfg.retry_seconds, self.counters,
                                          check=self.check)
                except BadShard as e:
                    self._bad_shard(entry["name"], str(e), len(keep))
                    yield start, len(keep), None
                else:
                    for j, sample in enumerate(samples):
                        if j in local:
                            yield local[j], sample, self.first_id[sid] + j
            start += len(keep)

    def _bad_shard(self, name: str, reason: str, count: int) -> None:
        self.counters["skipped_samples"] += count
        if name not in self.bad:
            self.bad[name] = reason
            self.counters["bad_shards"] = len(self.bad)
            logger.warning(f"data: skipping shard {s3.join(self.cfg.url, name)}: {reason} ({len(self.bad)} bad so far)")
        if len(self.bad) > self.cfg.max_bad_shards:
            raise TooManyBadShards(f"{len(self.bad)} unreadable shards in {self.cfg.url}, more than data.max_bad_shards={self.cfg.max_bad_shards}: {self.bad}")

    def samples(self, epoch: int, position: int):
        """Yields (epoch, position after this sample, global id, fields) forever."""
        while True:
            ids, kept, order = self.plan(epoch)
            need = set(order[position:])
            held, missing, emitted = {}, set(), 0
            reader = self._read(ids, kept, need)
            for k in range(position, len(order)):
                target = order[k]
                while target not in held and target not in missing:
                    start, sample, gid = next(reader)
                    if gid is None:  # a bad shard: `sample` is its sample count
                        missing.update(range(start, start + sample))
                    elif start in need:
                        held[start] = (gid, sample)
                if target in held:
                    gid, sample = held.pop(target)
                    emitted += 1
                    yield epoch, k + 1, gid, sample
            if emitted == 0 and position == 0 and order:  # a resumed slot may have nothing left of an epoch
                raise TooManyBadShards(f"reader slot {self.slot}: no readable shard in epoch {epoch}: {self.bad}")
            epoch, position = epoch + 1, 0

    def decode(self, fields: dict, epoch: int, gid: int) -> tuple[np.ndarray, int]:
        if "x.npy" in fields:
            x = npy_load(fields["x.npy"]).astype(np.float32)
        else:  # latents: the stored flip for half the samples, a pure function of (seed, epoch, id)
            flip = self.cfg.flip and "latent_flip.npy" in fields and _rng(self.cfg.seed, epoch, gid, "flip").random() < 0.5
            raw = npy_load(fields["latent_flip.npy" if flip else "latent.npy"]).astype(np.float32)
            x = (raw - self.bias) * self.scale  # EDM2: per-channel (z - mean) * sigma_data / std
        return x, int(fields["cls"]) if "cls" in fields else -1


class _Slots(IterableDataset):
    """The DataLoader's dataset: physical worker i plays logical worker (i + rotation) % K from its position."""

    def __init__(self, cfg, manifest, batch_size, rank, world_size, workers, positions, rotation, classes, return_ids, remap=None):
        self.cfg, self.manifest, self.batch_size, self.rank, self.workers, self.remap = cfg, manifest, batch_size, rank, workers, remap
        self.slots = world_size * workers
        # a forkserver keeps the environment of its own start: carry this process's storage settings over
        self.env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}
        self.positions, self.rotation, self.classes, self.return_ids = positions, rotation, classes, return_ids

    def __iter__(self):
        for k in [k for k in os.environ if k.startswith(ENV_PREFIXES)]:
            del os.environ[k]
        os.environ.update(self.env)
        info = get_worker_info()
        messages: list[str] = []  # a worker's warnings (retries, skipped shards) travel with its next batch to the trainer's log
        if info is not None:
            for sig in (signal.SIGTERM, signal.SIGUSR1):  # a scheduler signals every process: preemption is the trainer's
                signal.signal(sig, signal.SIG_IGN)      # (it checkpoints, then shuts its workers down)
            logger.remove()
            logger.add(lambda m: messages.append(str(m).rstrip()), level="WARNING", format="{message}")
        logical = ((info.id if info else 0) + self.rotation) % self.workers
        reader = SlotReader(self.cfg, self.manifest, self.rank * self.workers + logical, self.slots, self.remap)
        samples = reader.samples(*self.positions[logical])
        while True:
            xs, labels, ids, epochs = [], [], [], []
            for epoch, position, gid, fields in samples:
                x, label = reader.decode(fields, epoch, gid)
                xs.append(x), labels.append(label), ids.append(gid), epochs.append(epoch)
                if len(xs) == self.batch_size:
                    break
            batch = {"x": torch.from_numpy(np.stack(xs))}
            if self.classes:
                batch["labels"] = torch.nn.functional.one_hot(torch.tensor(labels), self.classes).float()
            if self.return_ids:
                batch["ids"], batch["epochs"] = torch.tensor(ids), torch.tensor(epochs)
            batch["_state"] = {"worker": logical, "position": [epoch, position], **reader.counters, "bad": dict(reader.bad),
                               "messages": list(messages)}
            messages.clear()
            yield batch


class ShardStream:
    """Batches for one rank; `state_dict()` is the position of each of its K workers plus batches handed out."""

    def __init__(self, cfg: ShardDataConfig, manifest: dict, batch_size: int, rank: int = 0, world_size: int = 1, return_ids: bool = False):
        self.cfg, self.manifest, self.batch_size, self.rank, self.world_size = cfg, manifest, batch_size, rank, world_size
        self.workers = max(cfg.num_workers, 1)
        self.classes = int(manifest.get("num_classes", 0)) if cfg.class_conditional else 0
        self.return_ids = return_ids
        slots = world_size * self.workers
        if len(manifest["shards"]) < slots:
            raise ConfigError("data.num_workers", f"{cfg.url} has {len(manifest['shards'])} shards, fewer than the {world_size} ranks x {self.workers} workers reading them: write smaller shards or use fewer workers")
        self.batches, self.positions = 0, [[0, 0] for _ in range(self.workers)]
        self.counters: dict[str, int] = {}
        self.bad: dict[str, str] = {}
        self._per_worker: dict[int, dict] = {}
        self._it = None
        self.resume: dict | None = None  # the record of a resume on another layout, carried in the state
        self._remap: ResumeMap | None = None

    def fingerprint(self) -> dict:
        """The layout (ranks, workers, batch size: may change across a resume) and what fixes every epoch's order."""
        return {"world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size, **self._order_fingerprint()}

    def _order_fingerprint(self) -> dict:
        shards = hashlib.sha256("".join(s["sha256"] for s in self.manifest["shards"]).encode()).hexdigest()[:16]
        return {"seed": self.cfg.seed, "shuffle_buffer": self.cfg.shuffle_buffer, "shuffle_shards": self.cfg.shuffle_shards, "shards": shards}

    def _start(self):
        ds = _Slots(self.cfg, self.manifest, self.batch_size, self.rank, self.world_size, self.workers, [list(p) for p in self.positions],
                    self.batches % self.workers, self.classes, self.return_ids, self._remap)
        if self.cfg.num_workers == 0:
            return iter(ds)
        context = torch.multiprocessing.get_context(self.cfg.worker_start)
        if self.cfg.worker_start == "forkserver":
            context.set_forkserver_preload(["pipelines.stream"])  # imported once in the server, not per worker
        workers.start_helpers(self.cfg.worker_start)  # preemption signals are the trainer's alone
        loader = DataLoader(ds, batch_size=None, num_workers=self.workers, prefetch_factor=self.cfg.prefetch_factor,
                            pin_memory=torch.cuda.is_available(), multiprocessing_context=context,
                            generator=torch.Generator().manual_seed(self.cfg.seed))  # not the global RNG: the loop seeds it per step
        return iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch = next(self._it)
        info = batch.pop("_state")
        worker = int(info["worker"])
        assert worker == self.batches % self.workers, "DataLoader delivered batches out of order"
        self.positions[worker] = [int(v) for v in info["position"]]
        self.batches += 1
        self._account(worker, info)
        return batch

    def _account(self, worker: int, info: dict) -> None:
        """Sum the workers' counters; log changes; raise past max_bad_shards (distinct shards over all workers)."""
        for message in info.get("messages", ()):
            logger.bind(every_rank=True).warning(f"data worker {worker} (rank {self.rank}): {message}")
        before = dict(self.counters)
        self._per_worker[worker] = {k: int(info[k]) for k in ("retries", "bad_shards", "skipped_samples")}
        self.counters = {k: sum(w[k] for w in self._per_worker.values()) for k in ("retries", "skipped_samples")}
        self.bad.update(info["bad"])
        self.counters["bad_shards"] = len(self.bad)
        if self.counters != before:
            logger.info(f"data (rank {self.rank}): {self.counters}")
        if len(self.bad) > self.cfg.max_bad_shards:
            raise TooManyBadShards(f"{len(self.bad)} unreadable shards in {self.cfg.url}, more than data.max_bad_shards={self.cfg.max_bad_shards}: {self.bad}")

    def state_dict(self) -> dict:
        return {"batches": self.batches, "workers": [list(p) for p in self.positions], "fingerprint": self.fingerprint(), "resume": self.resume}

    def load_state_dict(self, state: dict) -> None:
        """This rank's saved state; on another layout (ranks, workers, batch size) `state["ranks"]` must hold every
        rank's saved state (sct.loop passes them): the positions are then mapped onto this layout's readers."""
        saved = state.get("fingerprint") or {}
        if {k: saved.get(k) for k in self._order_fingerprint()} != self._order_fingerprint():
            raise ValueError(f"the data state was saved by a different stream ({saved}); this one is {self.fingerprint()}: "
                             "resuming needs the same dataset, seed, data.shuffle_buffer and data.shuffle_shards")
        self.close()
        if saved == self.fingerprint():
            self.batches, self.positions = int(state["batches"]), [list(map(int, p)) for p in state["workers"]]
            self._set_resume(state.get("resume"))
            return
        ranks = state.get("ranks") or ([state] if saved.get("world_size") == 1 else None)
        if ranks is None or len(ranks) != saved.get("world_size"):
            raise ValueError(f"the data state was saved by {saved.get('world_size')} ranks x {saved.get('workers')} workers; "
                             f"resuming on {self.world_size} x {self.workers} needs every rank's saved state (state['ranks'])")
        positions = [list(map(int, p)) for r in ranks for p in r["workers"]]
        self.batches, self.positions = 0, [[min(e for e, _ in positions), 0] for _ in range(self.workers)]
        parent = ranks[0].get("resume")
        if parent and min(e for e, _ in positions) > max(e for e, _ in parent["positions"]):
            parent = None  # every reader is past the epochs the earlier map covered
        self._set_resume({"positions": positions, "parent": parent})
        logger.info(f"data: resumed {saved['world_size']} ranks x {saved['workers']} workers' positions on {self.world_size} x {self.workers} "
                    f"readers: {self._remap.summary()}, dealt to the new readers; none read twice, none skipped")

    def _set_resume(self, record: dict | None) -> None:
        self.resume = record
        self._remap = None if record is None else ResumeMap(
            record, [s["samples"] for s in self.manifest["shards"]], self.cfg.seed, self.cfg.shuffle_buffer,
            self.cfg.shuffle_shards, self.world_size * self.workers)

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator: sentinel to each worker, then join
        if shutdown is not None:  # now, not at collection: an exception's traceback keeps the iterator alive, and at
            shutdown()            # interpreter exit multiprocessing would join workers that ignore SIGTERM, forever
