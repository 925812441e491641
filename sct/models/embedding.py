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


class ConditioningEmbedding(nn.Module):
    """Noise level, class label and (optionally) guidance scale -> conditioning vector [B, out_dim], always in
    fp32 (fp64 for an fp64 net).

    embed(noise) -> Linear-SiLU-Linear, plus a linear map of the one-hot label (scaled by sqrt(label_dim), EDM2);
    a zero label row (the CFG null label) adds nothing. With `guidance=True` (the guidance-conditioned sCD
    student, sCM Table 4) the scale w gets its own positional embedding -> Linear-SiLU-Linear, added; the last
    layer starts at zero, so a student initialized from its teacher starts as the teacher. No w means w = 1.
    Shared by the U-Net and the DiT.
    """

    def __init__(self, kind: str, frequency_dim: int, out_dim: int, label_dim: int, fourier_scale: float, guidance: bool = False):
        super().__init__()
        self.label_dim = label_dim
        self.map_noise = PositionalEmbedding(frequency_dim) if kind == "positional" else FourierEmbedding(frequency_dim, fourier_scale)
        self.map_layer0, self.map_layer1 = WideLinear(frequency_dim, out_dim), WideLinear(out_dim, out_dim)
        self.map_label = WideLinear(label_dim, out_dim, bias=False) if label_dim else None
        self.map_guidance = None
        if guidance:
            self.map_guidance = nn.Sequential(PositionalEmbedding(frequency_dim), WideLinear(frequency_dim, out_dim), nn.SiLU(),
                                              WideLinear(out_dim, out_dim))
            nn.init.zeros_(self.map_guidance[-1].weight)
            nn.init.zeros_(self.map_guidance[-1].bias)

    def forward(self, noise_labels: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        dt = wide_dtype(self.map_layer0.weight)
        with torch.autocast(device_type=noise_labels.device.type, enabled=False):
            emb = self.map_noise(noise_labels.to(dt).reshape(-1))
            emb = self.map_layer1(F.silu(self.map_layer0(emb)))  # Linear-SiLU-Linear
            if self.map_label is not None and class_labels is not None:
                emb = emb + self.map_label(class_labels.to(dt) * math.sqrt(self.label_dim))  # zero row adds 0
            elif self.map_label is None and class_labels is not None and class_labels.numel():
                raise ValueError("class_labels given to an unconditional backbone (label_dim=0)")
            if self.map_guidance is not None:
                w = torch.ones_like(emb[:, 0]) if guidance is None else guidance.to(dt).reshape(-1).expand(emb.shape[0])
                emb = emb + self.map_guidance(w)
            elif guidance is not None:
                raise ValueError("a guidance scale given to a backbone without guidance_embedding")
        return emb
