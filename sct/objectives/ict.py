"""Improved consistency training (iCT, Song & Dhariwal 2023; MATH.md §1).

`loss_per_sample = ICT(cfg, ...)(net, batch, step)` where `net` is an `EDMConsistency` wrapper.
Teacher = the student under stopgrad (no EMA teacher); both branches share x0, z and the dropout mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sct.config import ConfigError
from sct.models.precond import bcast, hi
from sct.objectives.common import replay_randomness
from sct.objectives.schedules import ict_curriculum_n, karras_sigmas, lognormal_interval_probs


@dataclass
class ICTConfig:
    name: Literal["ict"] = "ict"
    rho: float = 7.0
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    huber_c_scale: float = 0.00054  # c = 0.00054 sqrt(D)
    curriculum_steps: int | None = None  # K of N(k); None = the run's total steps

    def check(self) -> None:
        if not 1 <= self.s0 <= self.s1:
            raise ConfigError("s0", f"need 1 <= s0 <= s1, got s0={self.s0}, s1={self.s1}")
        if self.p_std <= 0:
            raise ConfigError("p_std", f"must be > 0, got {self.p_std}")
        if self.huber_c_scale < 0:
            raise ConfigError("huber_c_scale", f"must be >= 0, got {self.huber_c_scale}")


def pseudo_huber(diff: Tensor, c: float) -> Tensor:
    """d(a, b) = sqrt(‖a − b‖² + c²) − c on each sample's whole L2 norm (MATH §1)."""
    return (diff.flatten(1).square().sum(1) + c**2).sqrt() - c


class ICT(nn.Module):
    def __init__(self, cfg: ICTConfig, total_steps: int, sigma_min: float, sigma_max: float):
        super().__init__()
        self.cfg = cfg
        self.total_steps = cfg.curriculum_steps or total_steps
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def grid(self, step: int) -> tuple[Tensor, Tensor]:
        """The step's Karras grid and the lognormal probabilities of its intervals (float64)."""
        n = ict_curriculum_n(step, self.total_steps, self.cfg.s0, self.cfg.s1)
        sigmas = karras_sigmas(n, self.sigma_min, self.sigma_max, self.cfg.rho)
        return sigmas, lognormal_interval_probs(sigmas, self.cfg.p_mean, self.cfg.p_std)

    def forward(self, net: nn.Module, batch: dict, step: int) -> Tensor:
        x0 = hi(batch["x"])
        labels = batch.get("labels")
        sigmas, probs = self.grid(step)
        i = torch.multinomial(probs, x0.shape[0], replacement=True)
        sigma_i, sigma_next = sigmas[i].to(x0.device), sigmas[i + 1].to(x0.device)  # float64
        z = torch.randn_like(x0)
        with torch.no_grad(), replay_randomness(x0.device):  # same dropout mask in both branches
            target = net(x0 + bcast(sigma_i, x0).to(x0.dtype) * z, sigma_i.to(x0.dtype), labels)
        pred = net(x0 + bcast(sigma_next, x0).to(x0.dtype) * z, sigma_next.to(x0.dtype), labels)
        c = self.cfg.huber_c_scale * math.sqrt(x0[0].numel())
        weight = 1 / (sigma_next - sigma_i)  # λ(σ_i) = 1/(σ_{i+1} − σ_i), float64
        return (weight * pseudo_huber(pred - target, c).double()).to(x0.dtype)
