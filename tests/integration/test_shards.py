"""Shard writers and the CLI, and the CPU demo config training from shards on local disk and on a real
S3 server on loopback (moto): a few steps, and an interrupted run that resumes to the same losses."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import s3, shards
from pipelines.stream import fetch_shard
from sct import train

DEMO = ["--config", "configs/demo_cpu.yaml", "run.batch_size=8", "run.log_every=1", "sampling.num=4", "sampling.steps=[1]"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_images(root: Path) -> list[tuple[Path, int]]:
    items = []
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(3 + c):
            path = root / name / f"{i}.png"
            Image.fromarray(np.full((6 + i, 5, 3), 40 * i + c, np.uint8)).save(path)
            items.append((path, c))
    return items


def test_image_folder_and_list_writers_record_every_shard_in_the_manifest(tmp_path):
    items = make_images(tmp_path / "folder")
    found, classes = shards.image_folder_list(tmp_path / "folder")
    assert classes == ["cat", "dog"] and found == items
    out = tmp_path / "out"
    assert shards.main(["images", "--folder", str(tmp_path / "folder"), "--out", str(out), "--shard-size", "2"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "images" and manifest["total_samples"] == 7 and manifest["classes"] == ["cat", "dog"]
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 2, 1]
    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    samples = [s for e in manifest["shards"] for s in fetch_shard(str(out / e["name"]), e, 5, {})]
    assert [int(s["cls"]) for s in samples] == [c for _, c in items]
    assert [s["png"] for s in samples] == [p.read_bytes() for p, _ in items]  # original bytes, in order

    listing = tmp_path / "labels.csv"
    listing.write_text("".join(f"{p.relative_to(tmp_path)},{c}\n" for p, c in items))
    manifest = shards.write_images(*shards.image_list_file(listing), str(tmp_path / "from_list"), shard_size=4)
    assert manifest["total_samples"] == 7 and manifest["num_classes"] == 2
    listing.write_text("folder/cat/0.png,1\nfolder/cat/missing.png,0\n")
    with pytest.raises(FileNotFoundError):
        shards.write_images(*shards.image_list_file(listing), str(tmp_path / "broken"), shard_size=1)
    assert (tmp_path / "broken" / "shard-000000.tar").exists() and not (tmp_path / "broken" / "manifest.json").exists()
    listing.write_text("folder/cat/0.png;1\n")
    with pytest.raises(ValueError, match="labels.csv:1: expected 'path,integer_label'"):
        shards.image_list_file(listing)


def test_demo_trains_from_local_shards_and_resumes_exactly(tmp_path):
    url = str(tmp_path / "digits")
    assert shards.main(["arrays", "--dataset", "digits", "--out", url, "--shard-size", "200"]) == 0
    data = f"data={{name: shards, url: '{url}', shape: [1, 16, 16], num_classes: 10, num_workers: 2, shuffle_buffer: 64}}"
    args = DEMO + [data, "run.total_steps=4", "run.checkpoint_every=2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(args + [f"run.dir={whole}"]) == 0
    assert train.main(args + [f"run.dir={parts}", "run.max_steps_per_job=2"]) == 0
    assert train.main(args + [f"run.dir={parts}"]) == 0  # resumes from step 2, data position included
    assert len(losses(whole)) == 4 and losses(parts) == losses(whole)


def test_demo_trains_from_shards_on_loopback_s3(s3_server, tmp_path):
    url = s3_server.bucket_url() + "/digits"
    assert shards.main(["arrays", "--dataset", "digits", "--out", url, "--shard-size", "300"]) == 0
    manifest = shards.read_manifest(url)
    assert manifest["shape"] == [1, 16, 16] and manifest["num_classes"] == 10 and manifest["total_samples"] == 1797
    assert s3.filesystem(url)[0].exists(url + "/shard-000005.tar")
    import webdataset as wds  # plain WebDataset reads s3:// through the registered fsspec opener too

    assert len(list(wds.WebDataset([url + "/shard-000005.tar"], shardshuffle=False, nodesplitter=wds.split_by_node))) == 297
    data = f"data={{name: shards, url: '{url}', shape: [1, 16, 16], num_classes: 10, num_workers: 2}}"
    assert train.main(DEMO + [data, "run.total_steps=3", f"run.dir={tmp_path / 'run'}"]) == 0
    assert len(losses(tmp_path / "run")) == 3
    # a missing bucket: the config loads (it never reads storage), the stream's start-up check stops the run before step 0
    bad = DEMO + ["data={name: shards, url: 's3://no-such-bucket/x', shape: [1, 16, 16], num_classes: 10}", f"run.dir={tmp_path / 'bad'}"]
    done = subprocess.run([sys.executable, "-m", "sct.train", *bad], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2 and "data.url: bucket 'no-such-bucket' does not exist" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists() and not (tmp_path / "bad" / "checkpoints").exists()
