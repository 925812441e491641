"""A residual MLP backbone for low-dimensional data (2-D toy distributions, tests).

Same contract as every backbone: `forward(x [B, dim], noise_labels [B], class_labels [B, L] | None) -> [B, dim]`;
it sees only a conditioning scalar, never σ or t semantics. The conditioning path runs in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sct.config import ConfigError
from sct.models.embedding import FourierEmbedding, PositionalEmbedding


@dataclass
class MLPConfig:
    name: Literal["mlp"] = "mlp"
    dim: int = 2
    hidden: int = 256
    depth: int = 4
    label_dim: int = 0
    time_embedding: Literal["positional", "fourier"] = "positional"
    fourier_scale: float = 16.0
    dropout: float = 0.0

    def check(self) -> None:
        for key in ("dim", "hidden", "depth"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


class UniformDropout(nn.Module):
    """Inverted dropout whose mask is thresholded uniform noise: same distribution as nn.Dropout, but on CPU
    torch.rand costs half of the bernoulli_ that nn.Dropout draws (docs/benchmarks.md, 2-D toy timing)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, h: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return h
        return h * (torch.rand_like(h) >= self.p) * (1 / (1 - self.p))


class MLPBlock(nn.Module):
    """h + Linear(Dropout(SiLU(Linear(LN(h) ⊙ (1 + scale(emb)) + shift(emb)))))."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        self.drop = UniformDropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.mod(emb).to(h.dtype).chunk(2, dim=1)
        y = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(self.drop(torch.nn.functional.silu(self.fc1(y))))


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.embed_noise = (
            PositionalEmbedding(cfg.hidden) if cfg.time_embedding == "positional" else FourierEmbedding(cfg.hidden, cfg.fourier_scale)
        )
        self.embed_mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.SiLU())
        self.embed_label = nn.Linear(cfg.label_dim, cfg.hidden, bias=False) if cfg.label_dim else None
        self.inp = nn.Linear(cfg.dim, cfg.hidden)
        self.blocks = nn.ModuleList(MLPBlock(cfg.hidden, cfg.dropout) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.dim))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        dtype = torch.float64 if noise_labels.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=noise_labels.device.type, enabled=False):
            emb = self.embed_noise(noise_labels.to(dtype))
            if self.embed_label is not None and class_labels is not None:
                emb = emb + self.embed_label(class_labels.to(dtype))
            return self.embed_mlp(emb)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(noise_labels, class_labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


def build_mlp(cfg: MLPConfig) -> MLP:
    return MLP(cfg)
