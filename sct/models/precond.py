"""Parameterization wrappers around any backbone `F(x, noise_labels, class_labels)` (MATH.md §1-2).

The backbone never sees σ or TrigFlow semantics, only a conditioning scalar per sample.
Both wrappers expose the same sampler protocol, so one few-step sampler serves both:
`s_max`, `prior(z)`, `renoise(x0, s, z)`, `consistency(x, s, labels)` (z ~ N(0, I)).

    EDMConsistency   iCT: f(x, σ) = c_skip x + c_out F(c_in x, c_noise), f(x, σmin) = x
    TrigFlow         sCM: F(x_t/σd, t); f(x_t, t) = cos t x_t − sin t σd F, f(x, 0) = x
    EDMDenoiserAsTrigFlow / TrigFlowAsEDMDenoiser   conversions between an EDM denoiser and TrigFlow
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sct.config import ConfigError


def hi(x: Tensor) -> Tensor:
    """At least fp32: time, σ and loss arithmetic never runs in bf16 (MATH §4); float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample scalars [B] -> [B, 1, ..., 1] broadcastable against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass
class EDMConsistencyConfig:
    name: Literal["edm_consistency"] = "edm_consistency"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def check(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError("sigma_min", f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.sigma_data <= 0:
            raise ConfigError("sigma_data", f"must be > 0, got {self.sigma_data}")


class EDMConsistency(nn.Module):
    """iCT consistency function in the EDM σ parameterization (MATH.md §1)."""

    two_step_mid = 0.821  # published σ of 2-step sampling (iCT, CIFAR-10; ImageNet-64 uses 1.526)

    def __init__(self, backbone: nn.Module, cfg: EDMConsistencyConfig):
        super().__init__()
        self.backbone = backbone
        self.sigma_data, self.sigma_min, self.sigma_max = cfg.sigma_data, cfg.sigma_min, cfg.sigma_max

    @property
    def s_max(self) -> float:
        return self.sigma_max

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        x = hi(x)
        sigma = hi(sigma).expand(x.shape[0])
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)  # MATH §1 c_skip
        c_out = sd * (sigma - smin) / (sd**2 + sigma**2).sqrt()  # MATH §1 c_out
        c_in = 1 / (sigma**2 + sd**2).sqrt()  # MATH §1 c_in
        c_noise = 1000 * 0.25 * torch.log(sigma + 1e-44)  # MATH §1 c_noise
        F = self.backbone(bcast(c_in, x) * x, c_noise, labels).to(x.dtype)
        return bcast(c_skip, x) * x + bcast(c_out, x) * F

    consistency = forward

    def prior(self, z: Tensor) -> Tensor:
        return self.sigma_max * z

    def renoise(self, x0: Tensor, sigma: float, z: Tensor) -> Tensor:
        return x0 + math.sqrt(sigma**2 - self.sigma_min**2) * z  # MATH §1 multistep sampling


@dataclass
class TrigFlowConfig:
    name: Literal["trigflow"] = "trigflow"
    sigma_data: float = 0.5
    t_max: float = math.atan(80.0 / 0.5)  # arctan(σmax/σd), MATH §3 sampling

    def check(self) -> None:
        if self.sigma_data <= 0:
            raise ConfigError("sigma_data", f"must be > 0, got {self.sigma_data}")
        if not 0 < self.t_max <= math.pi / 2:
            raise ConfigError("t_max", f"must be in (0, pi/2], got {self.t_max}")


class TrigFlow(nn.Module):
    """TrigFlow parameterization (MATH.md §2): the raw network F(x_t/σd, t) with c_noise(t) = t."""

    two_step_mid = 1.1  # published t of 2-step sampling (sCM)

    def __init__(self, backbone: nn.Module, cfg: TrigFlowConfig):
        super().__init__()
        self.backbone = backbone
        self.sigma_data, self.t_max = cfg.sigma_data, cfg.t_max

    @property
    def s_max(self) -> float:
        return self.t_max

    def raw(self, x_scaled: Tensor, t: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        """F_θ(x_t/σd, t): the function whose JVP sCM takes. `guidance` [B]: the scale input of a
        guidance-conditioned backbone (a constant of the JVP: its tangent is zero)."""
        extra = {} if guidance is None else {"guidance": guidance}
        return self.backbone(x_scaled, t.expand(x_scaled.shape[0]), labels, **extra).to(hi(x_scaled).dtype)

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        return self.raw(hi(x_t) / self.sigma_data, hi(t), labels, guidance)

    def velocity(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance: float | Tensor = 1.0) -> Tensor:
        """PF-ODE dx_t/dt = σd F (MATH §2), classifier-free guided: F_u + w (F_c − F_u) (MATH §3); w a number or one per sample [B]."""
        F = self(x_t, t, labels)
        per_sample = isinstance(guidance, Tensor)
        if per_sample or guidance != 1.0:
            if labels is None:
                raise ValueError("classifier-free guidance needs class labels")
            F_u = self(x_t, t, torch.zeros_like(labels))
            F = F_u + (bcast(guidance.to(F.dtype), F) if per_sample else guidance) * (F - F_u)
        return self.sigma_data * F

    def consistency(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        x_t, t = hi(x_t), hi(t).expand(x_t.shape[0])
        F = self(x_t, t, labels, guidance)
        return bcast(t.cos(), x_t) * x_t - bcast(t.sin(), x_t) * self.sigma_data * F  # MATH §2 f_θ

    def denoise(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None, guidance: float = 1.0) -> Tensor:
        """x0 estimate of a TrigFlow diffusion model: cos t x_t − sin t dx/dt."""
        x_t, t = hi(x_t), hi(t).expand(x_t.shape[0])
        v = self.velocity(x_t, t, labels, guidance)
        return bcast(t.cos(), x_t) * x_t - bcast(t.sin(), x_t) * v

    def prior(self, z: Tensor) -> Tensor:
        return self.sigma_data * z

    def renoise(self, x0: Tensor, t: float, z: Tensor) -> Tensor:
        return math.cos(t) * x0 + math.sin(t) * self.sigma_data * z  # MATH §3 two-step sampling


class EDMDenoiserAsTrigFlow(nn.Module):
    """An EDM denoiser D(x_σ; σ, labels) seen as a TrigFlow backbone: F = (cos t x_t − D(x_t/cos t; σd tan t)) / (σd sin t).

    Derivation: x_t = cos t x0 + sin t z with z = σd n, so x_t / cos t = x0 + σd tan t n = x_σ;
    v = cos t z − sin t x0 = (cos t x_t − x0) / sin t, and E[v | x_t] = σd F. Valid for t in (0, π/2).
    Wrap the result in `TrigFlow` to use it as an sCD teacher.
    """

    def __init__(self, denoiser: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.denoiser, self.sigma_data = denoiser, sigma_data

    def forward(self, x_scaled: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        sd = self.sigma_data
        x_t, t = hi(x_scaled) * sd, hi(t)
        cos, sin = bcast(t.cos(), x_t), bcast(t.sin(), x_t)
        D = self.denoiser(x_t / cos, sd * t.tan(), labels).to(x_t.dtype)
        return (cos * x_t - D) / (sd * sin)


class TrigFlowAsEDMDenoiser(nn.Module):
    """A TrigFlow model seen as an EDM denoiser: D(x_σ; σ) = cos t · x_t − σd sin t · F(x_t/σd, t), t = arctan(σ/σd), x_t = cos t · x_σ."""

    def __init__(self, trigflow: TrigFlow):
        super().__init__()
        self.trigflow = trigflow

    def forward(self, x_sigma: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sd = self.trigflow.sigma_data
        t = torch.atan(hi(sigma) / sd).expand(x_sigma.shape[0])
        x_t = bcast(t.cos(), x_sigma) * hi(x_sigma)
        return self.trigflow.consistency(x_t, t, labels)
