"""The shard stream against a real S3 server on loopback (moto, tests/integration/conftest.py) and local
disk: every sample once per epoch over 2 ranks x 2 DataLoader workers, exact resume from a saved state, an
S3 outage mid-stream, truncated shards, config loading that never reads storage, and the start-up
checks build_stream does (declared shape/classes vs the manifest, credentials, endpoint) with clear messages.

Ranks are simulated: both ranks' streams run in this process (a stream's rank and world size are plain
arguments; it does no collective), each with its own 2 real worker processes reading over HTTP.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import s3
from pipelines.data import build_stream, data_shape, num_classes
from pipelines.shards import (
    image_folder_list,
    read_manifest,
    write_arrays,
    write_images,
)
from pipelines.stream import (
    ShardDataConfig,
    ShardStream,
    TooManyBadShards,
    buffer_order,
)
from sct.config import ConfigError

N, SHARD = 240, 20  # 12 shards


def write_dataset(url: str, n: int = N, shard: int = SHARD) -> dict:
    """Sample i is a 1x4x4 array filled with i, label i % 10: content and identity can be checked."""
    x = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 1, 4, 4)).copy()
    return write_arrays(x, np.arange(n) % 10, url, shard, num_classes=10)


def stream(url: str, rank: int = 0, world_size: int = 1, batch: int = 8, **cfg) -> ShardStream:
    cfg = ShardDataConfig(url=url, **{"num_workers": 2, "shuffle_buffer": 16, "prefetch_factor": 2, "retry_seconds": 60, **cfg})
    return ShardStream(cfg, read_manifest(url), batch, rank, world_size, return_ids=True)


def take(s: ShardStream, batches: int) -> list[dict]:
    out = []
    for _ in range(batches):
        b = next(s)
        assert torch.equal(b["x"][:, 0, 0, 0].long(), b["ids"])  # the content is the sample named
        assert torch.equal(b["labels"].argmax(1), b["ids"] % 10)
        out.append(b)
    return out


def ids_of(batches: list[dict]) -> tuple[list[int], list[int]]:
    return torch.cat([b["ids"] for b in batches]).tolist(), torch.cat([b["epochs"] for b in batches]).tolist()


def test_buffer_order_is_a_permutation_that_mixes():
    import random

    order = buffer_order(1000, 100, random.Random(0))
    assert sorted(order) == list(range(1000))
    assert order != list(range(1000)) and buffer_order(1000, 1, random.Random(0)) == list(range(1000))


def test_two_ranks_two_workers_read_each_sample_once_per_epoch_from_s3(s3_server):
    url = s3_server.bucket_url() + "/data"
    manifest = write_dataset(url)
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(12)]
    assert all(s["samples"] == SHARD and s["bytes"] > 0 and len(s["sha256"]) == 64 for s in manifest["shards"])
    seen = {0: [], 1: []}
    for rank in (0, 1):
        s = stream(url, rank, world_size=2)
        ids, epochs = ids_of(take(s, 20))  # 160 samples: past this rank's 120 of epoch 0 on each worker
        s.close()
        assert ids[:32] != sorted(ids[:32])  # shuffled
        seen[0] += [i for i, e in zip(ids, epochs) if e == 0]
        seen[1] += [i for i, e in zip(ids, epochs) if e == 1]
    assert sorted(seen[0]) == list(range(N))  # each sample exactly once in epoch 0 over both ranks
    assert len(set(seen[1])) == len(seen[1])  # no repeats within epoch 1 either


@pytest.mark.parametrize("workers", [2, 0])
def test_resume_from_saved_state_gives_the_uninterrupted_sequence(tmp_path, workers):
    url = str(tmp_path / "shards")
    write_dataset(url)
    whole = ids_of(take(stream(url, 1, 2, num_workers=workers), 24))[0]  # crosses into epoch 1
    first = stream(url, 1, 2, num_workers=workers)
    head = ids_of(take(first, 7))[0]  # odd: the next batch is due from worker 1
    state = first.state_dict()
    first.close()
    assert state["batches"] == 7 and len(state["workers"]) == max(workers, 1)
    resumed = stream(url, 1, 2, num_workers=workers)
    resumed.load_state_dict(state)
    assert head + ids_of(take(resumed, 17))[0] == whole
    with pytest.raises(ValueError, match="needs the same dataset, seed"):
        stream(url, 1, 2, seed=1, num_workers=workers).load_state_dict(state)
    with pytest.raises(ValueError, match="needs every rank's saved state"):
        stream(url, 1, 2, batch=4, num_workers=workers).load_state_dict(state)  # another layout: all ranks' positions


@pytest.mark.parametrize("old, new", [((2, 2), (1, 1)), ((1, 1), (1, 3))])
def test_resume_on_other_ranks_or_workers_reads_each_sample_of_the_epoch_once(s3_server, old, new):
    """(ranks, workers) -> (ranks, workers) on S3 through real worker processes: what the old layout handed out
    before the save plus what the new one hands out after covers epoch 0 exactly once (slots stop mid-shard)."""
    url = s3_server.bucket_url() + "/data"
    write_dataset(url)
    (ranks, workers), (ranks2, workers2) = old, new
    seen, states = [], []
    for rank in range(ranks):
        s = stream(url, rank, ranks, batch=6, num_workers=workers)
        seen += list(zip(*ids_of(take(s, 9))))  # 54 samples a rank: some shards read part-way
        states.append(s.state_dict())
        s.close()
    for rank in range(ranks2):
        s = stream(url, rank, ranks2, batch=5, num_workers=workers2)
        s.load_state_dict({**states[rank if ranks == ranks2 else 0], "ranks": states})
        assert s.state_dict()["resume"]["positions"] == [p for st in states for p in st["workers"]]
        seen += list(zip(*ids_of(take(s, (N - 54 * ranks) // (5 * ranks2) + 12))))
        s.close()
    epoch0 = sorted(i for i, e in seen if e == 0)
    assert epoch0 == list(range(N)), f"missing {sorted(set(range(N)) - set(epoch0))}, twice {[i for i in set(epoch0) if epoch0.count(i) > 1]}"


def test_s3_restart_mid_stream_loses_and_repeats_nothing(s3_server):
    url = s3_server.bucket_url() + "/data"
    write_dataset(url, n=240, shard=5)  # 48 small shards: workers keep fetching while the server is down
    reference = ids_of(take(stream(url), 36))
    s = stream(url)
    got = take(s, 4)
    s3_server.stop()
    restarter = threading.Timer(2.0, s3_server.start)
    restarter.start()
    t0 = time.monotonic()
    got += take(s, 32)  # blocks while the workers retry, then carries on
    restarter.join()
    assert time.monotonic() - t0 > 1.0
    assert s.counters["retries"] > 0 and s.counters["bad_shards"] == 0
    assert ids_of(got) == reference
    ids, epochs = ids_of(got)
    assert sorted(i for i, e in zip(ids, epochs) if e == 0) == list(range(240))


def test_truncated_shard_is_skipped_and_counted_then_the_threshold_stops_the_run(s3_server):
    url = s3_server.bucket_url() + "/data"
    manifest = write_dataset(url)
    bad = manifest["shards"][3]
    data = s3.read_bytes(s3.join(url, bad["name"]))
    s3.write_bytes(s3.join(url, bad["name"]), data[: len(data) // 2])
    s = stream(url, max_bad_shards=1)
    ids, epochs = ids_of(take(s, 40))
    assert sorted(i for i, e in zip(ids, epochs) if e == 0) == sorted(set(range(N)) - set(range(60, 80)))
    assert s.counters["bad_shards"] == 1 and s.counters["skipped_samples"] >= SHARD and bad["name"] in s.bad
    with pytest.raises(TooManyBadShards, match=f"more than data.max_bad_shards=0.*{bad['name']}"):
        take(stream(url, max_bad_shards=0), 40)


def test_loading_a_config_never_touches_storage(s3_server):
    """check() runs on every config load and --dry-run: with the server down it must still pass."""
    s3_server.stop()
    cfg = ShardDataConfig(url="s3://no-such-bucket/data", shape=(1, 4, 4), num_classes=10)
    cfg.check()
    assert (data_shape(cfg), num_classes(cfg)) == ((1, 4, 4), 10)
    with pytest.raises(ConfigError, match="shape: declare the shape of one sample"):
        ShardDataConfig(url="s3://b/d", num_classes=10).check()
    with pytest.raises(ConfigError, match="num_classes: class_conditional data needs num_classes > 0"):
        ShardDataConfig(url="s3://b/d", shape=(1, 4, 4)).check()


def test_build_stream_checks_the_declaration_against_the_manifest(tmp_path):
    url = str(tmp_path / "shards")
    write_dataset(url, n=40)
    declared = {"url": url, "shape": (1, 4, 4), "num_classes": 10, "num_workers": 0}
    assert next(build_stream(ShardDataConfig(**declared), 4))["x"].shape == (4, 1, 4, 4)
    with pytest.raises(ConfigError, match=r"data\.shape: .*manifest\.json says samples are \[1, 4, 4\], the config declares \[4, 64, 64\]"):
        build_stream(ShardDataConfig(**{**declared, "shape": (4, 64, 64)}), 4)
    with pytest.raises(ConfigError, match=r"data\.num_classes: .*manifest\.json says 10 classes, the config declares 1000"):
        build_stream(ShardDataConfig(**{**declared, "num_classes": 1000}), 4)
    build_stream(ShardDataConfig(**{**declared, "num_classes": 0, "class_conditional": False}), 4)  # labels unused
    images = tmp_path / "images"
    (images / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(images / "cat" / "0.png")
    write_images(*image_folder_list(images), str(tmp_path / "image_shards"))
    with pytest.raises(ConfigError, match=r"data\.url: .* holds images shards: encode images to latents first"):
        build_stream(ShardDataConfig(**{**declared, "url": str(tmp_path / "image_shards")}), 4)


def test_bad_credentials_and_unreachable_storage_fail_when_the_stream_is_built(s3_server, monkeypatch):
    url = s3_server.bucket_url() + "/data"
    write_dataset(url, n=40)
    declared = {"shape": (1, 4, 4), "num_classes": 10}
    s3_server.require_auth(True)  # moto now rejects the made-up key, like AWS with a wrong one
    try:
        cfg = ShardDataConfig(url=url, **declared)
        cfg.check()  # the config itself is fine: only reading the bucket fails
        with pytest.raises(ConfigError, match="data.url: credentials rejected for bucket 'b-[0-9a-f]+' at http://127.0.0.1:[0-9]+ \\((403|InvalidAccessKeyId)\\)"):
            build_stream(cfg, 8)
    finally:
        s3_server.require_auth(False)
    with pytest.raises(ConfigError, match="data.url: bucket 'no-such-bucket' does not exist"):
        build_stream(ShardDataConfig(url="s3://no-such-bucket/data", **declared), 8)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ConfigError, match="no credentials for s3://.*set AWS_ACCESS_KEY_ID"):
        build_stream(ShardDataConfig(url=url + "x", **declared), 8)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3_server.stop()
    with pytest.raises(ConfigError, match="cannot reach http://127.0.0.1:.*AWS_ENDPOINT_URL"):
        build_stream(ShardDataConfig(url=url + "y", **declared), 8)
