"""Samplers: pure functions of (net, seeds, labels). A sample depends on its seed only, not on the batch.

    consistency_sample   1/2/N-step consistency sampling for EDMConsistency (σ) and TrigFlow (t) alike:
                         x ← f(prior(z0), s_max); for s in mids: x ← f(renoise(x, s, z_k), s)   (MATH §1, §3)
    ode_sample           TrigFlow PF-ODE dx/dt = σd F (MATH §2), Euler or Heun, with classifier-free guidance
    seeded_noise         per-sample N(0, I) draws, one torch.Generator per seed
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from sct.config import ConfigError
from sct.objectives.schedules import karras_sigmas


@dataclass
class SamplingConfig:
    method: Literal["consistency", "ode"] = "consistency"  # ode: a TrigFlow diffusion model (teacher)
    steps: tuple[int, ...] = (1, 2)  # consistency: one grid per step count; ode: intervals of the solver
    mids: tuple[float, ...] | None = None  # intermediate σ/t of the largest consistency step count
    solver: Literal["euler", "heun"] = "heun"
    guidance: float = 1.0  # classifier-free guidance scale (ode), or the input of a guidance-conditioned student (consistency)
    num: int = 100  # samples per grid; class-conditional grids put one class per row
    seed: int = 0
    vae: str = ""  # latent data: AutoencoderKL (hub name or folder; NAME#SUBFOLDER for one inside a pipeline repo) that decodes samples; "" = the manifest's "vae"

    def check(self) -> None:
        if not self.steps or min(self.steps) < 1:
            raise ConfigError("steps", f"need step counts >= 1, got {list(self.steps)}")
        if self.mids is not None and len(self.mids) != max(self.steps) - 1:
            raise ConfigError("mids", f"{max(self.steps)}-step sampling needs {max(self.steps) - 1} intermediate times, got {list(self.mids)}")
        if self.num < 1:
            raise ConfigError("num", f"must be >= 1, got {self.num}")


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], draws: int, device=None, dtype=torch.float32) -> list[Tensor]:
    """`draws` tensors [len(seeds), *shape]; sample i's draws come in order from Generator(seed_i)."""
    per_sample = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        per_sample.append([torch.randn(tuple(shape), generator=gen, dtype=torch.float64) for _ in range(draws)])
    return [torch.stack([s[k] for s in per_sample]).to(device=device, dtype=dtype) for k in range(draws)]


@torch.no_grad()
def consistency_sample(
    net: nn.Module, seeds: Sequence[int], shape: Sequence[int], labels: Tensor | None = None, mids: Sequence[float] = (), device=None,
    guidance: float | None = None,
) -> Tensor:
    """Consistency sampling with len(mids) + 1 network evaluations; `mids` are σ (EDM) or t (TrigFlow), decreasing.
    `guidance`: the scale a guidance-conditioned TrigFlow student takes as input (None: the net has no such input, or w = 1)."""
    noise = seeded_noise(seeds, shape, 1 + len(mids), device)
    s_max = torch.full((len(seeds),), net.s_max, device=device)
    extra = {} if guidance is None else {"guidance": torch.full_like(s_max, guidance)}
    x = net.consistency(net.prior(noise[0]), s_max, labels, **extra)
    for s, z in zip(mids, noise[1:]):
        x = net.consistency(net.renoise(x, s, z), torch.full_like(s_max, s), labels, **extra)
    return x


def trigflow_ode_times(steps: int, sigma_data: float, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """steps + 1 decreasing times: a Karras σ grid mapped by t = arctan(σ/σd), then t = 0."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0)
    return torch.cat([torch.atan(sigmas / sigma_data), torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def ode_sample(
    net: nn.Module,
    seeds: Sequence[int],
    shape: Sequence[int],
    labels: Tensor | None = None,
    steps: int = 32,
    solver: str = "heun",
    guidance: float = 1.0,
    device=None,
) -> Tensor:
    """Integrate the TrigFlow PF-ODE from t_max to 0 (`steps` intervals; Heun costs 2 evaluations per interval but the last)."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be 'euler' or 'heun', got {solver!r}")
    times = trigflow_ode_times(steps, net.sigma_data)
    x = net.prior(seeded_noise(seeds, shape, 1, device)[0])
    ones = torch.ones(len(seeds), device=device)
    for t_cur, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        h = t_next - t_cur
        d = net.velocity(x, t_cur * ones, labels, guidance)
        x_next = x + h * d
        if solver == "heun" and t_next > 0:
            d_next = net.velocity(x_next, t_next * ones, labels, guidance)
            x_next = x + h * 0.5 * (d + d_next)
        x = x_next
    return x


def mids_for_steps(net: nn.Module, steps: int, mids: Sequence[float] | None = None) -> list[float]:
    """Intermediate σ/t for an N-step sampler: given ones, or geometric between s_max and the wrapper's published 2-step mid."""
    if mids is not None:
        if len(mids) != steps - 1:
            raise ValueError(f"{steps}-step sampling needs {steps - 1} intermediate times, got {list(mids)}")
        return list(mids)
    if steps == 1:
        return []
    last = net.two_step_mid
    return [net.s_max * (last / net.s_max) ** (k / (steps - 1)) for k in range(1, steps)] if steps > 2 else [last]



def grid_labels(num: int, classes: int, per_row: int = 10) -> Tensor | None:
    """One-hot labels putting class (row mod classes) on each row of a grid `per_row` wide."""
    if classes == 0:
        return None
    return torch.nn.functional.one_hot((torch.arange(num) // per_row) % classes, classes).float()


def generate(net: nn.Module, cfg: SamplingConfig, steps: int, shape: Sequence[int], seeds: Sequence[int], labels: Tensor | None, device=None) -> Tensor:
    """Samples of `net` by the configured method: `steps` consistency steps or ODE intervals."""
    if cfg.method == "ode":
        return ode_sample(net, seeds, shape, labels, steps=steps, solver=cfg.solver, guidance=cfg.guidance, device=device)
    guidance = cfg.guidance if cfg.guidance != 1.0 else None  # a guidance-conditioned student's input
    return consistency_sample(net, seeds, shape, labels, configured_mids(net, cfg, steps), device=device, guidance=guidance)


def configured_mids(net: nn.Module, cfg: SamplingConfig, steps: int) -> list[float]:
    """The intermediate σ/t `generate` uses for `steps`: the configured ones for the largest step count, else the default."""
    return mids_for_steps(net, steps, cfg.mids if cfg.mids is not None and steps == max(cfg.steps) else None)
