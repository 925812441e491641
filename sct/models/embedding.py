"""Embeddings of the per-sample conditioning scalar, shared by every backbone.

Positional (sCM, c_noise = t ∈ [0, π/2]) and Fourier (EDM/iCT, c_noise = 250 ln σ) features.
Inputs are embedded in fp32 (fp64 if given fp64) by the caller; buffers are float64 and cast on use.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionalEmbedding(nn.Module):
    """ADM sinusoids of scale·x: [cos(scale·x·f_i), sin(scale·x·f_i)], f_i = 10000^(−i/half).

    scale = 1 on TrigFlow's t ∈ [0, π/2] keeps every frequency <= 1, so ∂F/∂t (in the sCM tangent) stays
    small: high-frequency time embeddings make continuous-time training unstable (Lu & Song 2024, §4.1).
    """

    def __init__(self, num_channels: int, scale: float = 1.0, max_positions: int = 10000):
        super().__init__()
        half = num_channels // 2
        self.scale = scale
        self.register_buffer("freqs", (1.0 / max_positions) ** (torch.arange(half, dtype=torch.float64) / half))

    def forward(self, x_B: Tensor) -> Tensor:
        args_BF = (self.scale * x_B)[:, None] * self.freqs.to(x_B.dtype)[None]
        return torch.cat([args_BF.cos(), args_BF.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """EDM Fourier features: [cos(2π f x), sin(2π f x)], f ~ N(0, scale²) fixed (a persistent buffer)."""

    def __init__(self, num_channels: int, scale: float):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2, dtype=torch.float64) * scale)

    def forward(self, x_B: Tensor) -> Tensor:
        args_BF = x_B[:, None] * (2 * math.pi * self.freqs.to(x_B.dtype))[None]
        return torch.cat([args_BF.cos(), args_BF.sin()], dim=1)
