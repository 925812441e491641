"""Tiny sct snapshots with random (not zero-initialised) weights, for the export/evaluate/bench tests."""
from __future__ import annotations

from pathlib import Path

import torch

from sct.checkpoint import save_snapshot
from sct.config import from_dict, to_dict
from sct.experiment import ModelConfig, build_model
from sct.samplers import SamplingConfig

UNET = {"name": "unet", "img_resolution": 16, "img_channels": 1, "label_dim": 10, "model_channels": 16,
        "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8]}
DIT = {"name": "dit", "img_resolution": 16, "img_channels": 1, "label_dim": 10, "patch_size": 4, "hidden_size": 32,
       "depth": 2, "num_heads": 2}
MLP = {"name": "mlp", "dim": 2, "hidden": 32, "depth": 2}


def make_snapshot(path: Path, backbone: dict = UNET, objective: str = "sct", seed: int = 0, latent: dict | None = None, **sampling) -> Path:
    """Write a snapshot (as sct.train's snapshot_config lays it out) of a randomly initialised model; every
    tensor is perturbed, so outputs are not trivial. objective 'diffusion' makes an ODE-sampled teacher;
    `latent` is the snapshot's latent record ({"vae": folder, "stats": {mean, std, sigma_data}}, sct.decode)."""
    model = from_dict(ModelConfig, {"backbone": backbone, "precond": {"name": "edm_consistency" if objective == "ict" else "trigflow"}})
    sampling_cfg = from_dict(SamplingConfig, {"method": "ode" if objective == "diffusion" else "consistency", **sampling})
    b = model.backbone
    shape = [b.dim] if b.name == "mlp" else [b.img_channels, b.img_resolution, b.img_resolution]
    torch.manual_seed(seed)
    net = build_model(model)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    stored = {"model": to_dict(model), "sampling": to_dict(sampling_cfg), "shape": shape, **({"latent": latent} if latent else {})}
    save_snapshot(path, net.state_dict(), stored)
    return path
