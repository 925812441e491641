"""Noise grids, curricula and time proposals: pure functions of the step (so resume is exact).

    karras_sigmas            MATH §1 Karras grid σ_1 < ... < σ_N
    ict_curriculum_n         MATH §1 N(k) doubling curriculum
    lognormal_interval_probs MATH §1 discrete lognormal p(i)
    sample_trigflow_t        MATH §3 t = arctan(e^τ/σd), τ ~ N(P_mean, P_std²)
    tangent_warmup           MATH §3 r = min(1, step / warmup)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """σ_i = (σmin^(1/ρ) + (i−1)/(N−1)(σmax^(1/ρ) − σmin^(1/ρ)))^ρ, i = 1..N, float64 ascending."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def ict_curriculum_n(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 · 2^floor(k/K'), s1) + 1 with K' = floor(K / (log2(floor(s1/s0)) + 1))."""
    k_prime = math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1))
    return min(s0 * 2 ** (step // max(k_prime, 1)), s1) + 1


def lognormal_interval_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """p(i) ∝ erf((ln σ_{i+1} − Pm)/(√2 Ps)) − erf((ln σ_i − Pm)/(√2 Ps)), i = 1..N−1 (float64)."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    mass = cdf[1:] - cdf[:-1]
    return mass / mass.sum()


def sample_trigflow_t(n: int, p_mean: float, p_std: float, sigma_data: float, device=None) -> Tensor:
    """τ ~ N(P_mean, P_std²), t = arctan(e^τ / σd), float32 [n]."""
    tau = p_mean + p_std * torch.randn(n, device=device, dtype=torch.float32)
    return torch.atan(tau.exp() / sigma_data)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, step / warmup_steps); warmup_steps = 0 means no warmup (r = 1)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)
