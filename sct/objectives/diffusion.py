"""TrigFlow diffusion objective: the teacher for sCD (MATH.md §2).

    L = e^{−u(t)} · (1/D) ‖σd F_θ(x_t/σd, t) − v_t‖² + u(t),  v_t = cos t z − sin t x0
(without adaptive weighting: u ≡ 0). `net` is a `TrigFlow` wrapper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sct.config import ConfigError
from sct.models.precond import bcast, hi
from sct.objectives.common import LogVarianceHead, drop_labels, per_sample_mean
from sct.objectives.schedules import sample_trigflow_t


@dataclass
class DiffusionConfig:
    name: Literal["diffusion"] = "diffusion"
    p_mean: float = -0.4  # EDM2's training proposal
    p_std: float = 1.0
    adaptive_weighting: bool = True
    adaptive_hidden: int = 128
    label_dropout: float = 0.0  # > 0 trains the null label for classifier-free guidance

    def check(self) -> None:
        if self.p_std <= 0:
            raise ConfigError("p_std", f"must be > 0, got {self.p_std}")
        if not 0 <= self.label_dropout < 1:
            raise ConfigError("label_dropout", f"must be in [0, 1), got {self.label_dropout}")


class TrigFlowDiffusion(nn.Module):
    def __init__(self, cfg: DiffusionConfig, sigma_data: float):
        super().__init__()
        self.cfg, self.sigma_data = cfg, sigma_data
        self.logvar = LogVarianceHead(cfg.adaptive_hidden) if cfg.adaptive_weighting else None

    def forward(self, net: nn.Module, batch: dict, step: int) -> Tensor:
        x0 = hi(batch["x"])
        labels = drop_labels(batch.get("labels"), self.cfg.label_dropout)
        sd = self.sigma_data
        t = sample_trigflow_t(x0.shape[0], self.cfg.p_mean, self.cfg.p_std, sd, x0.device).to(x0.dtype)
        z = sd * torch.randn_like(x0)  # z ~ N(0, σd² I)
        cos, sin = bcast(t.cos(), x0), bcast(t.sin(), x0)
        x_t = cos * x0 + sin * z  # MATH §2
        v_t = cos * z - sin * x0  # MATH §2 flow-matching target
        loss = per_sample_mean((sd * net(x_t, t, labels) - v_t).square())
        if self.logvar is None:
            return loss
        u = self.logvar(t)
        return torch.exp(-u) * loss + u  # adaptive weighting, MATH §3
