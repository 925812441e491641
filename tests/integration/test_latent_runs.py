"""Training on real latent shards, in miniature: random photos-sized images -> `pipelines.shards images` ->
`pipelines.encode` with a tiny randomly initialized diffusers AutoencoderKL (no weights exist offline) ->
sCT on a tiny U-Net. Sample grids and `python -m sct.sample` decode the latents through that VAE to RGB; a
missing VAE gives per-channel previews and a warning; a VAE that cannot decode these latents makes the grid
fail with one logged line while training goes on; SIGUSR1 with 2 DataLoader workers exits 75 without a
traceback from any process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from pipelines import encode, shards
from sct import posthoc_ema, sample, train
from sct.checkpoint import CONFIG_KEY
from sct.dist.preempt import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
SHAPE = [4, 8, 8]  # 16x16 images through a VAE that halves the resolution


def tiny_vae(path: Path, latent_channels: int = 4) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=latent_channels, norm_num_groups=8)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> tuple[str, Path]:
    """(latent shard folder, the VAE folder its manifest names): 12 images of 2 classes, 4 shards."""
    root = tmp_path_factory.mktemp("latents")
    vae = tiny_vae(root / "vae")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / "img" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (24, 20, 3), np.uint8)).save(root / "img" / c / f"{i}.png")
    assert shards.main(["images", "--folder", str(root / "img"), "--out", str(root / "images"), "--shard-size", "6"]) == 0
    assert encode.main(["--images", str(root / "images"), "--out", str(root / "z"), "--vae", str(vae), "--resolution", "16",
                        "--flip", "--shard-size", "3"]) == 0
    return str(root / "z"), vae


def args_for(url: str, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", "configs/demo_cpu.yaml", f"run.dir={run_dir}", "run.total_steps=2", "run.batch_size=4",
            "run.log_every=1", "run.checkpoint_every=2", "run.sample_every=2", "run.snapshot_every=2",
            f"data={{name: shards, url: {url}, shape: {SHAPE}, num_classes: 2, num_workers: 0, shuffle_buffer: 4}}",
            "model.backbone.img_resolution=8", "model.backbone.img_channels=4", "model.backbone.label_dim=2",
            "model.backbone.model_channels=8", "model.backbone.channel_mult=[1]", "sampling.num=4", *extra]


def test_grids_and_sct_sample_decode_latents_to_rgb(latents, tmp_path, monkeypatch):
    url, vae = latents
    run_dir = tmp_path / "run"
    checkpointed_first = []
    real = train.write_grids
    monkeypatch.setattr(train, "write_grids", lambda net, stem, **kw: (
        checkpointed_first.append((run_dir / "checkpoints" / "step_000000002" / "COMPLETE").is_file()), real(net, stem, **kw))[1])
    assert train.main(args_for(url, run_dir, "ema.posthoc={sigma_rels: [0.05, 0.1], every: 1}")) == 0
    assert checkpointed_first == [True]  # the step's checkpoint is written before its grid
    for steps in (1, 2):
        grid = Image.open(run_dir / "samples" / f"step_000000002_{steps}step.png")
        assert grid.mode == "RGB" and grid.size == (4 * 64 + 5, 64 + 2)  # 4 decoded 16x16 tiles, upscaled 4x, 1 px separators
    snap = run_dir / "snapshots" / "snapshot_000000002.safetensors"
    with safe_open(snap, framework="pt") as f:
        stored = json.loads(f.metadata()[CONFIG_KEY])
    manifest = shards.read_manifest(url)
    assert stored["latent"] == {"stats": manifest["stats"], "vae": str(vae)} and stored["shape"] == SHAPE
    phema_snap = tmp_path / "phema.safetensors"  # a post-hoc EMA snapshot decodes alike
    assert posthoc_ema.main(["--run", str(run_dir), "--sigma-rel", "0.07", "--out", str(phema_snap)]) == 0
    with safe_open(phema_snap, framework="pt") as f:
        assert json.loads(f.metadata()[CONFIG_KEY])["latent"] == stored["latent"]

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "sct.sample", "--snapshot", str(snap), "--steps", "1", "--num", "3", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = torch.load(out / "samples.pt")["samples"]
    assert samples.shape == (3, *SHAPE) and torch.isfinite(samples).all()
    picture = np.asarray(Image.open(out / "samples_1step.png"))
    assert picture.shape == (16 * 6 + 2, 3 * 16 * 6 + 4, 3)  # 3 decoded 16x16 RGB tiles, upscaled 6x
    vae_model = encode.load_vae(str(vae))
    expected = encode.decode(vae_model, samples, manifest["stats"])
    tile = picture[1 : 1 + 96 : 6, 1 : 1 + 96 : 6].astype(np.float64)  # the first sample, one pixel per 6x6 block
    ref = ((expected[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert np.abs(tile - ref).max() <= 1


def test_evaluation_during_a_latent_run_decodes_through_the_vae_as_sct_evaluate_does(latents, tmp_path, domain_classifier, capsys):
    """The `eval:` section of a latent run measures decoded RGB images: its FD at step 2 equals `python -m sct.evaluate`
    of the step-2 snapshot (same EMA weights, seeds and labels), whose protocol says the samples went through the VAE."""
    url, _ = latents
    run_dir = tmp_path / "run"
    spec = (f"eval={{every: 2, metrics: [fid], feature_extractor: fmnist, domain_classifier: {domain_classifier}, "
            f"reference: 'array:fashion_mnist:test', num: 8, batch: 8, steps: [1], cache: {tmp_path / 'cache'}}}")
    assert train.main(args_for(url, run_dir, spec)) == 0
    during = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/fmnist_fid_1step" in line]
    assert [r["step"] for r in during] == [2] and (run_dir / "eval.png").is_file()
    from sct import evaluate

    out = tmp_path / "eval.json"
    assert evaluate.main(["--snapshot", str(run_dir / "snapshots" / "snapshot_000000002.safetensors"), "--steps", "1", "--num-samples", "8",
                          "--batch", "8", "--metrics", "fid", "--feature-extractor", "fmnist", "--domain-classifier", str(domain_classifier),
                          "--reference", "array:fashion_mnist:test", "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    offline = json.loads(out.read_text())
    assert offline["protocol"]["decoded_through_vae"] is True
    assert offline["metrics"]["frechet_inception_distance"] == pytest.approx(during[0]["eval/fmnist_fid_1step"], rel=1e-6)
    missing = tmp_path / "no_such_vae"  # a VAE evaluation cannot load is a config error at start-up, naming the setting
    capsys.readouterr()
    assert train.main(args_for(url, tmp_path / "run2", spec, f"sampling.vae={missing}")) == 2
    assert "sampling.vae" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


def test_missing_vae_writes_channel_previews_with_a_warning(latents, tmp_path):
    url, vae = latents
    run_dir = tmp_path / "run"
    assert train.main(args_for(url, run_dir, f"sampling.vae={tmp_path / 'no_such_vae'}")) == 0
    log = (run_dir / "log.txt").read_text()
    warnings = [line for line in log.splitlines() if "per-channel latent previews" in line]
    assert len(warnings) == 1 and "no_such_vae" in warnings[0]
    grid = Image.open(run_dir / "samples" / "step_000000002_2step.png")
    assert grid.mode == "L" and grid.size == (16 * 17 + 1, 16 + 2)  # 4 samples x 4 channels of 8x8 in one row, upscaled 2x
    assert (run_dir / "checkpoints" / "step_000000002" / "COMPLETE").is_file()
    snap = str(run_dir / "snapshots" / "snapshot_000000002.safetensors")
    sample.main(["--snapshot", snap, "--steps", "1", "--num", "2", "--out", str(tmp_path / "out"), "--vae", str(vae)])  # found elsewhere
    assert Image.open(tmp_path / "out" / "samples_1step.png").mode == "RGB"


def test_a_failing_grid_is_logged_and_training_goes_on(latents, tmp_path):
    """A VAE that loads but cannot decode 4-channel latents (it has 3): the grid of step 2 fails, step 4 runs."""
    url, _ = latents
    wrong = tiny_vae(tmp_path / "vae3", latent_channels=3)
    run_dir = tmp_path / "run"
    assert train.main(args_for(url, run_dir, f"sampling.vae={wrong}", "run.total_steps=4")) == 0
    failures = [line for line in (run_dir / "log.txt").read_text().splitlines() if "sample grid failed" in line]
    assert len(failures) == 2 and "step 2:" in failures[0] and "RuntimeError" in failures[0]
    assert (run_dir / "checkpoints" / "step_000000002" / "COMPLETE").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    assert not (run_dir / "samples").exists() or not list((run_dir / "samples").glob("*.png"))


def test_sigusr1_to_the_group_with_two_workers_exits_75_without_tracebacks(latents, tmp_path):
    """Before pipelines.workers, SIGUSR1 killed the workers and the resource tracker (KeyError tracebacks). SIGTERM
    to the group exited 75 cleanly here even then (the tracker ignores it; dead workers go unnoticed at grad_accum 1)."""
    url, _ = latents
    run_dir = tmp_path / "run"
    args = args_for(url, run_dir, "run.total_steps=100000", "run.checkpoint_every=100000", "run.sample_every=100000",
                    "run.snapshot_every=100000")
    args = [a.replace("num_workers: 0", "num_workers: 2") for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "sct.train", *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGUSR1)  # the whole process group, as a terminal or `scancel --signal` does: workers too
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "KeyError" not in err, err[-3000:]
