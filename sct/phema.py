"""EDM2 post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", §3 and Appendix C): training keeps a few power-function EMA profiles and stores them at a
cadence; any other EMA length sigma_rel is reconstructed afterwards as a least-squares combination.

Owns:
- the profiles that `ema.posthoc: {sigma_rels: [0.05, 0.10], every: N}` (`sct.ema.PostHocConfig`) asks for;
  EDM2 keeps 0.05 and 0.10 and stores them every 8Mi images.
- the math: a power-function profile of exponent gamma ending at time T weighs the weights of time
  tau in [0, T] by p(tau) = (gamma + 1) tau^gamma / T^(gamma + 1) (EDM2 Eq. 121); the discrete update
  beta_t = (1 - 1/t)^(gamma + 1) of `sct.ema` gives step t exactly the integral of p over (t-1, t].
  `profile_inner` is the closed-form L2 inner product of two profiles; `solve_coefficients` the
  least-squares coefficients (normal equations, EDM2 Algorithm 3) normalized to sum 1.
- `PostHocEMA`: wraps the run's EMA (plain `sct.ema.EMA`, or `ShardedEMA` under ZeRO-3, whose
  profiles are sharded the same way), updates the profiles with it, and at every `every`-th step
  (and the last) writes `<run.dir>/phema/phema_<step>_<sigma_rel>.safetensors`, each an ordinary sct
  snapshot (metadata `step`, `sigma_rel`). Its state_dict holds the EMA and the profiles, so resume is exact.
Reconstruction: `python -m sct.posthoc_ema --run DIR --sigma-rel 0.02 --out snap.safetensors`.
Tests: `pytest tests/unit/test_phema.py`.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sct.checkpoint import save_snapshot
from sct.dist.ema_sharded import ShardedEMA
from sct.ema import EMA, EMAConfig, PostHocConfig, power_gamma_from_std

PROFILE_FILE = re.compile(r"^phema_(\d{9})_(\d+\.\d+)\.safetensors$")


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """<p_a, p_b> = ∫ p_a p_b dtau = (ga+1)(gb+1) m^(ga+gb+1) / ((ga+gb+1) ta^(ga+1) tb^(gb+1)), m = min(ta, tb)
    (EDM2 Eq. 151, with p from Eq. 121), written in ratios so that it never overflows."""
    lo, hi_ = (t_a, t_b) if t_a <= t_b else (t_b, t_a)
    g_hi = gamma_b if t_a <= t_b else gamma_a
    return (gamma_a + 1) * (gamma_b + 1) / ((gamma_a + gamma_b + 1) * hi_) * (lo / hi_) ** g_hi


def solve_coefficients(times: Sequence[float], sigma_rels: Sequence[float], t_out: float, sigma_out: float) -> np.ndarray:
    """x minimizing ‖Σ_i x_i p_i − p_out‖² over the stored profiles (t_i, sigma_i), normalized to Σ x = 1."""
    gammas = [power_gamma_from_std(s) for s in sigma_rels]
    g_out = power_gamma_from_std(sigma_out)
    n = len(times)
    A = np.array([[profile_inner(times[i], gammas[i], times[j], gammas[j]) for j in range(n)] for i in range(n)])
    b = np.array([profile_inner(times[i], gammas[i], t_out, g_out) for i in range(n)])
    x = np.linalg.lstsq(A, b, rcond=None)[0]  # normal equations A x = b (Gram matrix may be near-singular)
    return x / x.sum()


def profile_path(folder: Path, step: int, sigma_rel: float) -> Path:
    return Path(folder) / f"phema_{step:09d}_{sigma_rel:.4f}.safetensors"


class PostHocEMA:
    """The run's EMA plus the power-function profiles of `cfg.sigma_rels`; same interface as the EMA it wraps."""

    def __init__(self, ema, profiles: list, cfg: PostHocConfig, folder: Path, snapshot_config: dict, rank: int, total_steps: int):
        self.ema, self.profiles, self.cfg = ema, profiles, cfg
        self.folder, self.snapshot_config, self.rank, self.total_steps = Path(folder), snapshot_config, rank, total_steps

    @property
    def model(self) -> nn.Module:  # the plain EMA's module (sct.loop samples from it)
        return self.ema.model

    def __getattr__(self, name: str):  # full_model / swapped_into of a ShardedEMA
        if name in ("ema", "profiles"):
            raise AttributeError(name)
        return getattr(self.ema, name)

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        self.ema.update(net, step)
        for profile in self.profiles:
            profile.update(net, step)
        self.maybe_store(step + 1)

    def maybe_store(self, done: int) -> list[Path]:
        """Write every profile after `done` steps if the cadence says so (a collective under ZeRO-3)."""
        if done % self.cfg.every and done != self.total_steps:
            return []
        paths = []
        for sigma_rel, profile in zip(self.cfg.sigma_rels, self.profiles):
            state = profile.state_dict()  # consolidated on every rank (ShardedEMA gathers)
            path = profile_path(self.folder, done, sigma_rel)
            if self.rank == 0:
                save_snapshot(path, state, self.snapshot_config, extra={"step": done, "sigma_rel": sigma_rel})
            paths.append(path)
        return paths

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "phema": {str(s): p.state_dict() for s, p in zip(self.cfg.sigma_rels, self.profiles)}}

    def load_state_dict(self, sd: dict) -> None:
        if "phema" not in sd:
            raise KeyError("the checkpoint has no post-hoc EMA profiles (ema.posthoc was off when it was written)")
        missing = [str(s) for s in self.cfg.sigma_rels if str(s) not in sd["phema"]]
        if missing:
            raise KeyError(f"the checkpoint has no post-hoc EMA profile for sigma_rel {missing}")
        self.ema.load_state_dict(sd["ema"])
        for s, profile in zip(self.cfg.sigma_rels, self.profiles):
            profile.load_state_dict(sd["phema"][str(s)])


def attach(ema, net: nn.Module, cfg: PostHocConfig, folder: Path, snapshot_config: dict, rank: int, total_steps: int):
    """`ema` itself when post-hoc EMA is off, else a `PostHocEMA` around it whose profiles are of the same
    kind: copies of a plain EMA's (still initial) model, or ZeRO-3 sharded like a `ShardedEMA`."""
    if not cfg.sigma_rels:
        return ema
    if isinstance(ema, ShardedEMA):
        profiles = [ShardedEMA(net, EMAConfig(kind="power", std=s), ema.make_model) for s in cfg.sigma_rels]
    else:
        profiles = [EMA(ema.model, EMAConfig(kind="power", std=s)) for s in cfg.sigma_rels]
    return PostHocEMA(ema, profiles, cfg, folder, snapshot_config, rank, total_steps)
