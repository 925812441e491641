"""Continuous-time consistency: sCT (from data) and sCD (distilled from a TrigFlow teacher), MATH.md §3.

`loss_per_sample = SCM(...)(net, batch, step)` with `net` a `TrigFlow` wrapper. The tangent dF of the
detached network is a JVP (forward-mode dual tensors under no_grad) or, chosen by config, a central finite
difference; the gradient-carrying forward is separate. Time, tangent and loss arithmetic stay fp32
(fp64 when the data is fp64) even when the backbone runs in bf16.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from sct import stats
from sct.config import ConfigError
from sct.models.attention import forward_ad_mode
from sct.models.precond import bcast, hi
from sct.objectives.common import LogVarianceHead, per_sample_mean, replay_randomness
from sct.objectives.schedules import sample_trigflow_t, tangent_warmup


@dataclass
class SCTConfig:
    name: Literal["sct"] = "sct"
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_warmup_steps: int = 10_000
    tangent_norm_c: float = 0.1  # g ← g / (‖g‖ + c); 0 disables normalization
    tangent_norm_per_dim: bool = False  # ‖g‖/sqrt(D), so c means the same at every resolution
    prior_weighting: bool = True  # w(t) = 1/(σd tan t)
    # the log-variance head u(t), MATH §3: paper e^{-u}·w·m + u; decoupled w·sg(e^{-u})·m + e^{-u}·sg(m) + u
    # (keeps the prior: the head learns ln E[m|t], not ln w + ln E[m|t]); off w·m. true/false: paper/off (older configs)
    adaptive_weighting: Literal["paper", "decoupled", "off"] | bool = "paper"
    adaptive_input: Literal["t", "log_sigma"] = "t"  # what the head sees: t, or ln(σd tan t) (flat features near π/2 otherwise)
    adaptive_hidden: int = 128
    tangent: Literal["jvp", "finite_difference"] = "jvp"
    fd_step: float = 1e-3  # h of the central difference in the tangent direction

    def check(self) -> None:
        if self.p_std <= 0:
            raise ConfigError("p_std", f"must be > 0, got {self.p_std}")
        if self.tangent_warmup_steps < 0:
            raise ConfigError("tangent_warmup_steps", f"must be >= 0, got {self.tangent_warmup_steps}")
        if self.tangent_norm_c < 0:
            raise ConfigError("tangent_norm_c", f"must be >= 0, got {self.tangent_norm_c}")
        if self.fd_step <= 0:
            raise ConfigError("fd_step", f"must be > 0, got {self.fd_step}")
        if isinstance(self.adaptive_weighting, bool):  # the older boolean switch
            self.adaptive_weighting = "paper" if self.adaptive_weighting else "off"
        if self.adaptive_weighting not in ("paper", "decoupled", "off"):
            raise ConfigError("adaptive_weighting", f"must be paper, decoupled or off, got {self.adaptive_weighting!r}")
        if self.adaptive_input not in ("t", "log_sigma"):
            raise ConfigError("adaptive_input", f"must be t or log_sigma, got {self.adaptive_input!r}")


@dataclass
class SCDConfig(SCTConfig):
    name: Literal["scd"] = "scd"
    p_mean: float = -0.8
    p_std: float = 1.6
    teacher: str = ""  # inference snapshot of a TrigFlow diffusion model (objective: diffusion)
    guidance_scale: float = 1.0  # CFG of the teacher: F_u + w (F_c − F_u); 1 = conditional only
    # > 1: guidance-conditioned student (sCM Table 4, "maximum of CFG scale" 2.0): each sample draws its own
    # w ~ Uniform[1, guidance_max], the teacher is guided with it and the student takes it as an input
    guidance_max: float = 1.0

    def check(self) -> None:
        super().check()
        if not self.teacher:
            raise ConfigError("teacher", "sCD needs a teacher: the path of a diffusion snapshot (.safetensors)")
        if self.guidance_max < 1:
            raise ConfigError("guidance_max", f"must be >= 1 (1 = one fixed guidance_scale), got {self.guidance_max}")
        if self.guidance_max > 1 and self.guidance_scale != 1:
            raise ConfigError("guidance_scale", f"must stay 1 when guidance_max > 1 (each sample draws its scale in "
                                                f"[1, {self.guidance_max}]), got {self.guidance_scale}")


def jvp_tangent(fn: Callable, primals: tuple, tangents: tuple) -> tuple[Tensor, Tensor]:
    """(F⁻, dF) by forward-mode AD on the detached network.

    Dual tensors (torch.autograd.forward_ad) rather than torch.func.jvp: they pass through modules
    whose parameters DeepSpeed ZeRO-3 gathers in hooks, where functorch's transform cannot run."""
    hook = torch.nn.modules.module.register_module_forward_hook(_tangent_dtype_like_primal)
    try:
        with torch.no_grad(), forward_ad_mode(), stats.timed("jvp"), fwAD.dual_level():
            out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
            primal, tangent = fwAD.unpack_dual(out)
            return primal, torch.zeros_like(primal) if tangent is None else tangent
    finally:
        hook.remove()


def _tangent_dtype_like_primal(module: nn.Module, args, output):
    """Under CPU autocast, layer_norm's forward-AD formula returns an fp32 tangent on a bf16 primal
    (torch 2.14), which the next autocast matmul rejects; cast each module's output tangent back."""
    if isinstance(output, Tensor):
        primal, tangent = fwAD.unpack_dual(output)
        if tangent is not None and tangent.dtype != primal.dtype:
            return fwAD.make_dual(primal, tangent.to(primal.dtype))
    return None


def finite_difference_tangent(fn: Callable, primals: tuple, tangents: tuple, fd_step: float) -> tuple[Tensor, Tensor]:
    """(F⁻, dF) with dF = (F(p + h v) − F(p − h v)) / 2h; F⁻ from its own forward (3 forwards)."""
    device = primals[0].device
    with torch.no_grad():
        with replay_randomness(device):  # every forward sees the same dropout mask
            plus = fn(*(p + fd_step * v for p, v in zip(primals, tangents)))
        with replay_randomness(device):
            minus = fn(*(p - fd_step * v for p, v in zip(primals, tangents)))
        return fn(*primals), (plus - minus) / (2 * fd_step)


class DataVelocity(nn.Module):
    """sCT: dx_t/dt = cos t z − sin t x0 (MATH §3)."""

    def forward(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None, guidance: Tensor | None = None) -> Tensor:
        return bcast(t.cos(), x0) * z - bcast(t.sin(), x0) * x0


class TeacherVelocity(nn.Module):
    """sCD: dx_t/dt = σd F_teacher(x_t/σd, t), classifier-free guided (MATH §3) with the fixed scale, or with each
    sample's own scale `guidance` [B] (guidance-conditioned student). The teacher is frozen. The fixed scale is
    set by `SCM` from `SCDConfig.guidance_scale`, the one place it is configured."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.guidance_scale = 1.0

    @torch.no_grad()
    def forward(self, x0: Tensor, z: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None, guidance: Tensor | None = None) -> Tensor:
        scale = self.guidance_scale if guidance is None else guidance
        return self.teacher.velocity(x_t, t, labels, scale).to(x_t.dtype)

    def train(self, mode: bool = True):  # the teacher stays in eval mode (no dropout)
        return super().train(False)


class SCM(nn.Module):
    def __init__(self, cfg: SCTConfig, sigma_data: float, velocity: nn.Module):
        super().__init__()
        self.cfg, self.sigma_data, self.velocity = cfg, sigma_data, velocity
        self.weighting = {True: "paper", False: "off"}.get(cfg.adaptive_weighting, cfg.adaptive_weighting)  # a bool: older configs
        if isinstance(velocity, TeacherVelocity):
            velocity.guidance_scale = getattr(cfg, "guidance_scale", 1.0)
        self.tangent = jvp_tangent if cfg.tangent == "jvp" else functools.partial(finite_difference_tangent, fd_step=cfg.fd_step)
        if self.weighting not in ("paper", "decoupled", "off"):
            raise ValueError(f"adaptive_weighting must be paper, decoupled or off, got {cfg.adaptive_weighting!r}")
        self.logvar = LogVarianceHead(cfg.adaptive_hidden) if self.weighting != "off" else None

    def forward(self, net: nn.Module, batch: dict, step: int) -> Tensor:
        x0 = hi(batch["x"])
        t = sample_trigflow_t(x0.shape[0], self.cfg.p_mean, self.cfg.p_std, self.sigma_data, x0.device)
        z = self.sigma_data * torch.randn_like(x0)  # z ~ N(0, σd² I)
        w = None
        if getattr(self.cfg, "guidance_max", 1.0) > 1:  # guidance-conditioned student: w ~ Uniform[1, guidance_max] per sample
            w = 1 + (self.cfg.guidance_max - 1) * torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype)
        return self.loss(net, x0, batch.get("labels"), t.to(x0.dtype), z, step, w)

    def loss(self, net: nn.Module, x0: Tensor, labels: Tensor | None, t: Tensor, z: Tensor, step: int,
             guidance: Tensor | None = None) -> Tensor:
        """Per-sample sCM loss for given x0, t, z and guidance scales (all randomness explicit; used by tests).
        `guidance` [B]: each sample's CFG scale, for the teacher and as the student's input (a JVP constant)."""
        sd = self.sigma_data
        cos, sin = bcast(t.cos(), x0), bcast(t.sin(), x0)
        x_t = cos * x0 + sin * z  # MATH §2
        dxdt = self.velocity(x0, z, x_t, t, labels, guidance)
        with replay_randomness(x0.device):  # the JVP and the gradient forward share the dropout mask
            F_minus, dF = self.tangent(
                lambda xs, tt: net.raw(xs, tt, labels, guidance),  # w enters as a constant: zero tangent
                (x_t / sd, t),
                (cos * sin * dxdt / sd, t.cos() * t.sin()),  # rearranged tangents, MATH §3
            )
        F_minus, dF = F_minus.to(x0.dtype), dF.to(x0.dtype)
        r = tangent_warmup(step, self.cfg.tangent_warmup_steps)
        g = -cos.square() * (sd * F_minus - dxdt) - r * (cos * sin * x_t + sd * dF)  # MATH §3 target direction
        norm = g.flatten(1).norm(dim=1)
        stats.report("tangent_norm", norm.detach())  # ‖g‖ per sample, before normalization
        if self.cfg.tangent_norm_c > 0:
            if self.cfg.tangent_norm_per_dim:
                norm = norm / math.sqrt(x0[0].numel())
            g = g / (bcast(norm, g) + self.cfg.tangent_norm_c)  # tangent normalization, MATH §3
        F = net(x_t, t, labels, guidance)
        m = per_sample_mean((F - F_minus - g).square())  # (1/D)‖F_θ − F⁻ − g‖²
        return self.weighted(m, t)

    def weighted(self, m: Tensor, t: Tensor) -> Tensor:
        """Per-sample loss from the residual m by objective.adaptive_weighting (MATH §3), w(t) = 1/(σd tan t) or 1."""
        w = 1 / (self.sigma_data * t.tan()) if self.cfg.prior_weighting else torch.ones_like(t)
        if self.logvar is None:
            return w * m
        u = self.logvar(t if self.cfg.adaptive_input == "t" else torch.log(self.sigma_data * t.tan())).to(m.dtype)
        if self.weighting == "paper":
            return torch.exp(-u) * (w * m) + u  # e^{-u}·w·m + u
        return w * torch.exp(-u).detach() * m + torch.exp(-u) * m.detach() + u  # decoupled: w·sg(e^{-u})·m + e^{-u}·sg(m) + u
