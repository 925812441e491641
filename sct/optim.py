"""Optimizer construction and the learning-rate schedule, a pure function of the step (DESIGN rule 4)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from sct.config import ConfigError


@dataclass
class OptimizerConfig:
    name: Literal["adam", "radam", "adamw"] = "adam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (explicit, never a hidden default)
    warmup_steps: int = 0  # linear ramp from 0
    decay: Literal["constant", "inverse_sqrt", "cosine"] = "constant"
    decay_start: int = 0  # inverse_sqrt: lr · sqrt(decay_start / step) after decay_start (EDM2's t_ref)

    def check(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"each must be in [0, 1), got {list(self.betas)}")
        for key in ("grad_clip", "weight_decay", "warmup_steps", "decay_start"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.decay == "inverse_sqrt" and self.decay_start <= 0:
            raise ConfigError("decay_start", "inverse_sqrt decay needs decay_start > 0 (the step where decay begins)")


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate of `step` (0-based): warmup ramp × decay."""
    ramp = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.decay == "inverse_sqrt":
        decay = 1 / math.sqrt(max(step / cfg.decay_start, 1.0))  # EDM2 learning_rate_schedule
    elif cfg.decay == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    else:
        decay = 1.0
    return cfg.lr * ramp * decay


def build_optimizer(cfg: OptimizerConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    kinds = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    return kinds[cfg.name]([p for p in params if p.requires_grad], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
