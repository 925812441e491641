"""sCT and sCD train with each image backbone (U-Net, DiT) for a few CPU steps through `sct.train`:
the loss (adaptive weighting on, as in the recipes) is finite and goes down: mean of the last 5 logged
steps below the first 5, fixed seeds.
sCD distils a TrigFlow diffusion teacher that the same test first trains for a few steps."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sct import train

BACKBONES = {
    "unet": ["model.backbone={name: unet, img_resolution: 16, img_channels: 1, label_dim: 10, model_channels: 8,"
             " channel_mult: [1, 2], num_blocks: 1, attn_resolutions: [8]}"],
    "dit": ["model.backbone={name: dit, img_resolution: 16, img_channels: 1, label_dim: 10, patch_size: 2,"
            " hidden_size: 32, depth: 2, num_heads: 2}"],
}
COMMON = ["--config", "configs/demo_cpu.yaml", "data.dataset=digits", "run.batch_size=16", "run.log_every=1",
          "run.checkpoint_every=1000", "run.sample_every=1000", "sampling.num=16", "optimizer.warmup_steps=0"]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def assert_decreasing(values: list[float]) -> None:
    assert all(math.isfinite(v) for v in values), values
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5, values


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_sct_and_scd_train_with_the_backbone(tmp_path, backbone):
    arch = BACKBONES[backbone]
    sct_dir = tmp_path / "sct"
    assert train.main(COMMON + arch + [f"run.dir={sct_dir}", "run.total_steps=25", "run.snapshot_every=1000",
                                       "objective={name: sct, tangent_warmup_steps: 10}"]) == 0
    assert_decreasing(losses(sct_dir))

    teacher_dir = tmp_path / "teacher"
    assert train.main(COMMON + arch + [f"run.dir={teacher_dir}", "run.total_steps=10", "run.snapshot_every=10",
                                       "objective={name: diffusion}", "sampling.method=ode", "sampling.steps=[4]"]) == 0
    teacher = teacher_dir / "snapshots" / "snapshot_000000010.safetensors"
    scd_dir = tmp_path / "scd"
    assert train.main(COMMON + arch + [f"run.dir={scd_dir}", "run.total_steps=25", "run.snapshot_every=1000",
                                       f"objective={{name: scd, teacher: {teacher}, tangent_warmup_steps: 10}}"]) == 0
    assert_decreasing(losses(scd_dir))
