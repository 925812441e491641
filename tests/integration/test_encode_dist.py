"""Encoding at scale against the loopback S3 server (conftest.py): real photos (scikit-image's bundled images)
-> image shards -> `pipelines.encode` as 2 real processes under torchrun (tiny random AutoencoderKL) -> one
manifest whose counts, keys, latents and statistics equal a 1-process encode's; progress lines in a log that
is not a terminal; a missing bucket, rejected credentials or an unreachable endpoint: exit 2 and one line;
--create-bucket; `read_manifest` in a fresh interpreter. Run: pytest tests/integration/test_encode_dist.py
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import encode, shards
from pipelines.stream import fetch_shard

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "moon", "colorwheel", "page"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _stored(url: str) -> dict[str, dict]:
    manifest = shards.read_manifest(url)
    return {s["__key__"]: s for e in manifest["shards"] for s in fetch_shard(f"{url}/{e['name']}", e, 5, {})}


@pytest.fixture
def image_shards(s3_server, tmp_path) -> str:
    from skimage import data

    for i, name in enumerate(PHOTOS):
        folder = tmp_path / "photos" / ("gray" if getattr(data, name)().ndim == 2 else "color")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(getattr(data, name)()).resize((64, 48)).save(folder / f"{i}-{name}.png")
    url = s3_server.bucket_url() + "/images"
    assert shards.main(["images", "--folder", str(tmp_path / "photos"), "--out", url, "--shard-size", "2"]) == 0  # 5 shards
    return url


def test_two_ranks_under_torchrun_write_the_dataset_one_process_writes(image_shards, s3_server, vae_dir, tmp_path):
    bucket = image_shards.rsplit("/", 1)[0]
    args = ["--images", image_shards, "--vae", str(vae_dir), "--resolution", "16", "--flip", "--batch-size", "2", "--shard-size", "3"]
    log = tmp_path / "torchrun.log"
    with open(log, "w") as f:  # not a terminal: progress comes as log lines
        rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipelines.encode",
                             *args, "--out", f"{bucket}/two"], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=300, check=False).returncode
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert encode.main([*args, "--out", f"{bucket}/one"]) == 0

    one, two = shards.read_manifest(f"{bucket}/one"), shards.read_manifest(f"{bucket}/two")
    assert two["total_samples"] == one["total_samples"] == len(PHOTOS)
    assert [e["samples"] for e in two["shards"]] == [3, 1, 3, 2] and [e["samples"] for e in one["shards"]] == [3, 3, 3]  # rank 0: 4 images, rank 1: 5
    assert [e["name"] for e in two["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    a, b = _stored(f"{bucket}/one"), _stored(f"{bucket}/two")
    assert sorted(b) == sorted(a) == [f"{i:09d}" for i in range(len(PHOTOS))]  # every input encoded once, same keys
    for key in a:
        assert a[key]["cls"] == b[key]["cls"]
        for field in ("latent.npy", "latent_flip.npy"):
            np.testing.assert_allclose(shards.npy_load(b[key][field]), shards.npy_load(a[key][field]), atol=2e-3)
    np.testing.assert_allclose(two["stats"]["mean"], one["stats"]["mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(two["stats"]["std"], one["stats"]["std"], rtol=1e-6)
    assert {k: v for k, v in two.items() if k not in ("shards", "stats")} == {k: v for k, v in one.items() if k not in ("shards", "stats")}
    fs, path = encode.s3.filesystem(f"{bucket}/two")
    fs.invalidate_cache()
    assert not fs.exists(f"{path}/_parts")  # part manifests removed after the merge
    for rank, n in ((0, 4), (1, 5)):
        assert f"encode rank {rank}/2 -> {bucket}/two: {n}/{n} (100.0%) images" in text
    assert "accelerate" not in text and "Traceback" not in text


def test_rank_sources_and_blocks():
    assert [list(b) for b in encode.rank_blocks([2, 2, 2, 2, 1], 2)] == [[0, 1], [2, 3, 4]]
    assert [list(b) for b in encode.rank_blocks([5], 3)] == [[], [0], []]  # a rank may get nothing
    assert [list(b) for b in encode.rank_blocks([1] * 6, 3)] == [[0, 1], [2, 3], [4, 5]]
    os.environ.update(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1")
    try:
        assert encode.world() == (3, 8, 1)
    finally:
        for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
            del os.environ[key]


def test_progress_without_a_terminal_logs_count_rate_and_eta():
    from loguru import logger

    from pipelines.progress import Progress

    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    try:
        with Progress(4, "encode rank 0/1 -> x", "image", every_s=0) as bar:  # pytest's stderr is not a terminal
            for _ in range(4):
                bar.update()
    finally:
        logger.remove(sink)
    assert len(lines) == 5 and lines[1].startswith("encode rank 0/1 -> x: 2/4 (50.0%) images, ") and ", ETA 0:00:0" in lines[1]
    assert "image/s, elapsed 0:00:00" in lines[-1]


def test_writers_fail_in_one_line_before_work_or_create_the_bucket(image_shards, s3_server, vae_dir, capsys, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.encode", "--images", image_shards, "--out", "s3://no-such-bucket/latents",
                           "--vae", str(vae_dir)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"storage error: bucket 'no-such-bucket' does not exist at {s3_server.endpoint} (create it, or pass --create-bucket)"]

    folder = tmp_path / "one" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "0.png")
    cli = ["images", "--folder", str(tmp_path / "one")]
    assert shards.main([*cli, "--out", "s3://no-such-bucket/x"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"storage error: bucket 'no-such-bucket' does not exist at {s3_server.endpoint} (create it, or pass --create-bucket)"]
    assert shards.main([*cli, "--out", "s3://made-by-the-writer/x", "--create-bucket"]) == 0
    assert shards.read_manifest("s3://made-by-the-writer/x")["total_samples"] == 1
    capsys.readouterr()  # the created bucket's log line
    s3_server.require_auth(True)
    try:
        assert shards.main([*cli, "--out", image_shards + "-again"]) == 2
        assert capsys.readouterr().err.startswith("storage error: credentials rejected for bucket")
    finally:
        s3_server.require_auth(False)
    s3_server.stop()
    assert shards.main([*cli, "--out", image_shards + "-again"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"storage error: cannot reach {s3_server.endpoint}")


def test_read_manifest_works_in_a_fresh_interpreter(image_shards):
    code = f"from pipelines.shards import read_manifest; print(read_manifest({image_shards!r})['total_samples'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == str(len(PHOTOS)), proc.stderr[-3000:]
