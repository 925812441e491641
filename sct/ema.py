"""EMA of the student weights used for sampling and snapshots.

Owns `EMAConfig`, the decay schedule `ema_beta` (a pure function of the step, DESIGN rule 4, so a
resumed run continues exactly from the EMA weights alone), and the `EMA` holder:
- "constant": beta = decay (iCT uses 0.99993).
- "power": EDM2 power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training
  Dynamics of Diffusion Models"): beta_t = (1 - 1/t)**(gamma + 1), t = step + 1, with gamma
  chosen from the relative standard deviation `std` of the averaging profile.

Tests: `pytest tests/unit/test_ema.py`.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from sct.config import ConfigError


def power_std_from_gamma(gamma: float) -> float:
    # EDM2 Eq. 123: relative std of the profile t^gamma = sqrt((g+1) / ((g+2)^2 (g+3)))
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


@functools.lru_cache(maxsize=16)
def power_gamma_from_std(std: float) -> float:
    """Invert Eq. 123: (g+2)^2 (g+3) = std^-2 (g+1), a cubic in g; take its largest real root.

    Only gamma > 0 (weights that grow with time, std < sqrt(1/12)) is accepted.
    """
    if not 0 < std < math.sqrt(1 / 12):
        raise ValueError(f"power EMA std must be in (0, {math.sqrt(1 / 12):.4f}), got {std}")
    s = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])  # g^3 + 7g^2 + (16-s)g + (12-s) = 0
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


@dataclass
class PostHocConfig:
    sigma_rels: tuple[float, ...] = ()  # EMA lengths kept during training (EDM2: 0.05, 0.10); empty = off
    every: int = 0  # steps between stored profiles (EDM2: 8Mi images = 4096 steps of 2048)

    def check(self) -> None:
        for s in self.sigma_rels:
            try:
                power_gamma_from_std(s)
            except ValueError as e:
                raise ConfigError("sigma_rels", str(e)) from None
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ConfigError("sigma_rels", f"must be distinct, got {list(self.sigma_rels)}")
        if self.sigma_rels and self.every < 1:
            raise ConfigError("every", f"must be >= 1 when sigma_rels are given, got {self.every}")


@dataclass
class EMAConfig:
    name: Literal["ema"] = "ema"
    kind: Literal["constant", "power"] = "constant"
    decay: float = 0.9999  # constant: beta = decay (iCT: 0.99993)
    std: float = 0.05  # power: relative std of the averaging profile (EDM2 sigma_rel)
    start_step: int = 0  # before this step the EMA copies the weights (beta = 0)
    posthoc: PostHocConfig = field(default_factory=PostHocConfig)  # EDM2 post-hoc EMA profiles (sct.phema)

    def check(self) -> None:
        if self.kind not in ("constant", "power"):
            raise ConfigError("kind", f"must be 'constant' or 'power', got {self.kind!r}")
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError("decay", f"must be in [0, 1), got {self.decay}")
        if self.kind == "power":
            try:
                power_gamma_from_std(self.std)
            except ValueError as e:
                raise ConfigError("std", str(e)) from e
        if self.start_step < 0:
            raise ConfigError("start_step", f"must be >= 0, got {self.start_step}")


def ema_beta(cfg: EMAConfig, step: int) -> float:
    """Decay applied by the update at `step` (0-based optimizer step just taken)."""
    if step < cfg.start_step:
        return 0.0
    if cfg.kind == "constant":
        return cfg.decay
    t = step + 1
    return (1.0 - 1.0 / t) ** (power_gamma_from_std(cfg.std) + 1.0)


class EMA:
    """A frozen deepcopy of the model, moved towards the live weights by `update`."""

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        cfg.check()
        self.cfg = cfg
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        beta = ema_beta(self.cfg, step)
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            if p_ema.is_floating_point():
                p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - beta)  # ema = beta*ema + (1-beta)*p
            else:
                p_ema.copy_(p)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd)
