"""The ImageNet-512 latent workflow, rehearsed small through the real commands and the real configs
(issue 12): only sizes and counts are overridden (`SHRINK`), everything else is what a user runs.

    real photos (scikit-image's bundled images, 4 crops each, 3 classes)
      -> python -m pipelines.shards images           (image shards on a loopback S3 bucket)
      -> torchrun -m pipelines.encode, 2 ranks        (tiny random AutoencoderKL -> latent shards + manifest)
      -> deepspeed sct/train.py configs/diffusion_xl_512.yaml, 2 ranks, ZeRO-3 (the TrigFlow teacher, EMA profiles)
      -> python -m sct.posthoc_ema --sigma-rel 0.02   (the teacher snapshot the student configs name)
      -> configs/sCM_xl_512.yaml (sCD) on 2 ranks: SIGTERM mid-run, exit 75, the same command resumes;
         its losses equal an uninterrupted run's
      -> configs/sCT_xl_512.yaml on 2 ranks: SIGTERM mid-run, resumed on 1 rank (another world size)
      -> python -m sct.sample --steps 2              (latents decoded through the VAE to RGB PNGs)

The deepspeed launches run under `python -m sct.supervise`, the top process of a pod or SLURM task, and
SIGTERM goes to that top process only, as Kubernetes delivers it. Marked `e2e`:
the default test command skips it and `.ci/run` runs it after the suite (`scripts/test.sh -m e2e`);
about 6 minutes on the 2-core machine.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.shards import read_manifest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "camera", "moon", "colorwheel", "cat", "coins",
          "hubble_deep_field", "retina"]
CLASSES = 3
# Sizes and counts only: a 2-level U-Net of width 16 on 4x8x8 latents, small batches, short runs, frequent cadences.
SHRINK = ["model.backbone.img_resolution=8", "model.backbone.model_channels=16", "model.backbone.channel_mult=[1,2]", "model.backbone.num_blocks=1",
          "model.backbone.attn_resolutions=[4]", "data.shape=[4,8,8]", f"data.num_classes={CLASSES}", f"model.backbone.label_dim={CLASSES}", "data.num_workers=1",
          "data.shuffle_buffer=16", "run.batch_size=8", "run.log_every=1", "run.checkpoint_every=2", "run.snapshot_every=4",
          "run.sample_every=4", "sampling.num=4", "dist.zero3_persistence_threshold=0", "optimizer.warmup_steps=0"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed(*args: str) -> list[str]:
    """The deepspeed launcher under sct.supervise, as a pod's first process runs it (docs/launch.md)."""
    return [sys.executable, "-m", "sct.supervise", "--", sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(_port()), "sct/train.py", *args]


def run(cmd: list[str], log: Path, timeout: float = 600) -> int:
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False).returncode


def run_and_terminate(cmd: list[str], log: Path, metrics: Path, after_steps: int, timeout: float = 600) -> int:
    """Start `cmd`, SIGTERM its top process (as Kubernetes does) once `metrics` holds `after_steps` records; its exit status."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < end:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= after_steps:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.05)
        return proc.wait(timeout=max(1.0, end - time.monotonic()))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps_and_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    recs = records(run_dir)
    return [r["step"] for r in recs], [r["loss"] for r in recs]


def write_photos(folder: Path) -> int:
    """4 crops of each bundled photo, 32x32 RGB, into class folders c0..c2; the number of images."""
    from skimage import data

    n = 0
    for i, name in enumerate(PHOTOS):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = image.size
        for j, box in enumerate([(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h)]):
            out = folder / f"c{(i + j) % CLASSES}"
            out.mkdir(parents=True, exist_ok=True)
            image.crop(box).resize((32, 32), Image.BICUBIC).save(out / f"{name}-{j}.png")
            n += 1
    return n


def test_latent_workflow_end_to_end(s3_server, vae_dir, tmp_path):
    bucket = s3_server.bucket_url()
    images, lat = f"{bucket}/images", f"{bucket}/latents"

    # 1. photos -> image shards -> latents, encoded by 2 ranks under torchrun
    n = write_photos(tmp_path / "photos")
    assert run([sys.executable, "-m", "pipelines.shards", "images", "--folder", str(tmp_path / "photos"), "--out", images,
                "--shard-size", "8"], tmp_path / "shards.log") == 0, (tmp_path / "shards.log").read_text()[-3000:]
    encode = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pipelines.encode",
              "--images", images, "--out", lat, "--vae", str(vae_dir), "--resolution", "16", "--flip", "--batch-size", "8",
              "--shard-size", "8"]
    assert run(encode, tmp_path / "encode.log") == 0, (tmp_path / "encode.log").read_text()[-3000:]
    manifest = read_manifest(lat)
    assert manifest["kind"] == "latents" and manifest["total_samples"] == n == 48 and manifest["shape"] == [4, 8, 8]
    data = [f"data.url={lat}"]

    # 2. the teacher: configs/diffusion_xl_512.yaml on 2 ranks, ZeRO-3, with its post-hoc EMA profiles
    teacher_dir = tmp_path / "teacher"
    teacher_args = ["--config", "configs/diffusion_xl_512.yaml", *SHRINK, *data, f"run.dir={teacher_dir}", "run.total_steps=8",
                    "ema.posthoc.every=4"]
    assert run(deepspeed(*teacher_args), tmp_path / "teacher.log") == 0, (tmp_path / "teacher.log").read_text()[-4000:]
    steps, losses = steps_and_losses(teacher_dir)
    assert steps == list(range(1, 9)) and all(math.isfinite(v) for v in losses)
    assert "ZeRO-3" in (teacher_dir / "log.txt").read_text()
    assert len(list((teacher_dir / "phema").glob("phema_*.safetensors"))) == 4  # 2 profiles x steps 4, 8

    # 3. post-hoc EMA: the teacher at EMA length 0.02, where the student configs look for it
    teacher = tmp_path / "teachers" / "trigflow_xl_ema0.020.safetensors"
    assert run([sys.executable, "-m", "sct.posthoc_ema", "--run", str(teacher_dir), "--sigma-rel", "0.02", "--out", str(teacher)],
               tmp_path / "phema.log") == 0, (tmp_path / "phema.log").read_text()[-3000:]
    assert teacher.is_file()
    student = [*SHRINK, *data, f"model.init_from={teacher}", "run.total_steps=8", "objective.tangent_warmup_steps=4", "ema.posthoc.every=4"]

    # 4. sCD (configs/sCM_xl_512.yaml) on 2 ranks: SIGTERM after step 3, exit 75, the same command resumes
    scd_dir, ref_dir = tmp_path / "scd", tmp_path / "scd_uninterrupted"
    scd_args = ["--config", "configs/sCM_xl_512.yaml", *student, f"objective.teacher={teacher}"]
    scd = deepspeed(*scd_args, f"run.dir={scd_dir}")
    assert run_and_terminate(scd, tmp_path / "scd1.log", scd_dir / "metrics.jsonl", 3) == 75, (tmp_path / "scd1.log").read_text()[-4000:]
    first = steps_and_losses(scd_dir)[0]
    assert 3 <= first[-1] < 8
    assert run(scd, tmp_path / "scd2.log") == 0, (tmp_path / "scd2.log").read_text()[-4000:]
    assert "resumed from" in (scd_dir / "log.txt").read_text()
    assert run(deepspeed(*scd_args, f"run.dir={ref_dir}"), tmp_path / "ref.log") == 0
    steps, losses = steps_and_losses(scd_dir)
    ref_steps, ref_losses = steps_and_losses(ref_dir)
    assert steps == ref_steps == list(range(1, 9))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)  # identical across the resume

    # 5. sCT (configs/sCT_xl_512.yaml) on 2 ranks, SIGTERM, resumed on 1 rank from the universal checkpoint
    sct_dir = tmp_path / "sct"
    sct_args = ["--config", "configs/sCT_xl_512.yaml", *student, f"run.dir={sct_dir}"]
    assert run_and_terminate(deepspeed(*sct_args), tmp_path / "sct1.log", sct_dir / "metrics.jsonl", 3) == 75, \
        (tmp_path / "sct1.log").read_text()[-4000:]
    assert run([sys.executable, "sct/train.py", *sct_args], tmp_path / "sct2.log") == 0, (tmp_path / "sct2.log").read_text()[-4000:]
    text = (sct_dir / "log.txt").read_text()
    assert "universal checkpoint" in text and "none read twice, none skipped" in text
    steps, losses = steps_and_losses(sct_dir)
    assert steps == list(range(1, 9)) and all(math.isfinite(v) for v in losses)

    # 6. the students sample in 2 steps: latents decoded through the VAE to RGB PNGs
    for run_dir in (scd_dir, sct_dir):
        snapshot = sorted((run_dir / "snapshots").glob("snapshot_*.safetensors"))[-1]
        out = tmp_path / "samples" / run_dir.name
        assert run([sys.executable, "-m", "sct.sample", "--snapshot", str(snapshot), "--steps", "2", "--num", "6", "--out", str(out)],
                   tmp_path / f"sample_{run_dir.name}.log") == 0, (tmp_path / f"sample_{run_dir.name}.log").read_text()[-3000:]
        pngs = sorted(out.glob("*.png"))
        assert pngs, f"no PNG in {out}"
        grid = np.asarray(Image.open(pngs[0]))
        assert grid.ndim == 3 and grid.shape[2] == 3 and grid.std() > 0  # RGB, decoded (not a latent preview)
        assert torch.isfinite(torch.load(out / "samples.pt", weights_only=True)["samples"]).all()
        assert sorted((run_dir / "samples").glob("*.png")), f"no training-time grid in {run_dir}"
