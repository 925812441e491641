"""Tiny sct snapshots with random (not zero-initialised) weights, for the export/evaluate/bench tests."""
from __future__ import annotations

from pathlib import Path

import torch

from sct.checkpoint import save_snapshot
from sct.config import from_dict
from sct.experiment import TrainConfig, build_model, snapshot_config

UNET = {"name": "unet", "img_resolution": 16, "img_channels": 1, "label_dim": 10, "model_channels": 16,
        "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8]}
DIT = {"name": "dit", "img_resolution": 16, "img_channels": 1, "label_dim": 10, "patch_size": 4, "hidden_size": 32,
       "depth": 2, "num_heads": 2}
MLP = {"name": "mlp", "dim": 2, "hidden": 32, "depth": 2}


def make_snapshot(path: Path, backbone: dict = UNET, objective: str = "sct", seed: int = 0, **sampling) -> Path:
    """Write a snapshot of a randomly initialised model (every tensor perturbed, so outputs are not trivial)."""
    image = backbone["name"] != "mlp"
    precond = "edm_consistency" if objective == "ict" else "trigflow"
    method = "ode" if objective == "diffusion" else "consistency"
    raw = {
        "data": {"dataset": "fashion_mnist" if image else "gaussian_mixture", "class_conditional": image},
        "model": {"backbone": backbone, "precond": {"name": precond}},
        "objective": {"name": objective, **({"teacher": "unused.safetensors"} if objective == "scd" else {})},
        "sampling": {"method": method, **sampling},
    }
    cfg = from_dict(TrainConfig, raw)
    torch.manual_seed(seed)
    net = build_model(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_snapshot(path, net.state_dict(), snapshot_config(cfg))
    return path
