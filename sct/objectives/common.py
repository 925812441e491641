"""Pieces the objectives share: replayed randomness (shared dropout masks), the adaptive-weight head,
per-sample reductions and label dropout for classifier-free guidance."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from sct.models.embedding import PositionalEmbedding


@contextlib.contextmanager
def replay_randomness(device: torch.device):
    """Run the body, then restore the RNG state it started from, so the next forward draws the same dropout mask."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def per_sample_mean(x: Tensor) -> Tensor:
    """(1/D) Σ over all but the batch dimension."""
    return x.flatten(1).mean(1)


def drop_labels(labels: Tensor | None, p: float) -> Tensor | None:
    """Zero each one-hot row with probability p (the null label of classifier-free guidance)."""
    if labels is None or p <= 0:
        return labels
    keep = (torch.rand(labels.shape[0], device=labels.device) >= p).to(labels.dtype)
    return labels * keep[:, None]


class LogVarianceHead(nn.Module):
    """Adaptive weight u_φ(t) (MATH §3): the backbones' positional embedding of t -> MLP -> scalar, zero at init, fp32."""

    def __init__(self, hidden: int = 128, channels: int = 128):
        super().__init__()
        self.embed = PositionalEmbedding(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype
        with torch.autocast(device_type=t.device.type, enabled=False):
            return self.mlp(self.embed(t.to(dtype))).squeeze(1)
