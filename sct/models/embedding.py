"""The conditioning path shared by every backbone: embeddings of the per-sample scalar and fp32 linears.

Positional (sCM, c_noise = t ∈ [0, π/2]) and Fourier (EDM/iCT, c_noise = 250 ln σ) features.
Inputs are embedded in fp32 (fp64 if given fp64) by the caller; buffers are float64 and cast on use.
`WideLinear` keeps the time embedding and the modulation out of bf16/fp16, whatever the autocast.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def wide_dtype(*ts: Tensor) -> torch.dtype:
    """float64 if any input is float64 (tests), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


class WideLinear(nn.Linear):
    """nn.Linear computed in fp32 (fp64 if the weights are fp64), with autocast disabled."""

    def forward(self, x: Tensor) -> Tensor:
        dt = wide_dtype(self.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            b = None if self.bias is None else self.bias.to(dt)
            return F.linear(x.to(dt), self.weight.to(dt), b)


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
