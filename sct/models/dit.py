"""DiT-style transformer backbone F(x, noise_labels, class_labels) with adaLN-Zero conditioning, and its presets.

Owns: `DiTConfig`, `DIT_PRESETS`, `build_dit`, the layers. Same contract as the U-Net: `forward(x [B,C,H,W],
noise_labels [B], class_labels [B,label_dim] one-hot | None) -> [B,C,H,W]`, so the EDM and TrigFlow
wrappers of `sct.models.precond` wrap it unchanged; it sees a conditioning scalar, never σ or t semantics.

Layout of DiT (Peebles & Xie 2023): p x p patches -> linear embedding + fixed 2-D sin-cos positions ->
`depth` blocks of [LayerNorm, adaLN modulate, multi-head self-attention, gate] + [LayerNorm, modulate,
MLP (GELU tanh), gate] -> final LayerNorm, modulate, linear to p·p·C, un-patchify. adaLN-Zero: every
modulation and the output layer start at zero, so a fresh net outputs 0 (as the U-Net does).
sCM conditioning (MATH.md §2): positional time embedding of c_noise (Fourier for iCT), the time and
label embeddings, the adaLN modulation, the LayerNorms and the residual stream in fp32 under autocast;
the linear layers of attention and MLP follow autocast. Attention has JVP paths (`sct.models.attention`).
Activation checkpointing (`checkpointing: true`) recomputes each block in the gradient-carrying forward only.
Tests: `pytest tests/unit/test_dit.py tests/unit/test_presets.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sct.config import ConfigError
from sct.models.attention import JVP_IMPLS, JVPAttention, attention
from sct.models.embedding import ConditioningEmbedding, WideLinear
from sct.models.unet import block_runner

_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}  # depth, width, heads (DiT Table 1)

# `model.backbone: {name: dit, preset: dit-xl/2}`: ImageNet-512 latents (64x64x4, 1000 classes); keys given
# beside the preset override it (sct.config). Published DiT sizes (/2): S 33M, B 130M, L 458M, XL 675M.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    f"dit-{size}/{patch}": dict(img_resolution=64, img_channels=4, label_dim=1000, patch_size=patch,
                                depth=depth, hidden_size=width, num_heads=heads)
    for size, (depth, width, heads) in _SIZES.items() for patch in (1, 2, 4)
}


@dataclass
class DiTConfig:
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = DIT_PRESETS
    name: Literal["dit"] = "dit"
    preset: str | None = None  # a DIT_PRESETS name; keys given beside it override the preset's values
    img_resolution: int = 32
    img_channels: int = 4
    label_dim: int = 0  # 0 = unconditional; labels are one-hot float [B, label_dim], a zero row = no label
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # in the MLP, after the activation
    time_embedding: Literal["positional", "fourier"] = "positional"  # sCM: positional; iCT: fourier
    fourier_scale: float = 16.0
    frequency_dim: int = 256  # channels of the sinusoidal noise embedding (DiT)
    guidance_embedding: bool = False  # the guidance scale w is an input (guidance-conditioned sCD student, sCM Table 4)
    jvp_attention: JVPAttention = "auto"
    checkpointing: bool = False

    @property
    def tokens(self) -> int:
        return (self.img_resolution // self.patch_size) ** 2

    def check(self) -> None:
        if self.name != "dit":
            raise ConfigError("name", f"must be 'dit', got {self.name!r}")
        if self.preset is not None and self.preset not in DIT_PRESETS:
            raise ConfigError("preset", f"unknown preset {self.preset!r} (valid presets: {', '.join(DIT_PRESETS)})")
        for key in ("img_channels", "patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.label_dim < 0:
            raise ConfigError("label_dim", f"must be >= 0 (0 = unconditional), got {self.label_dim}")
        if self.img_resolution < 1 or self.img_resolution % self.patch_size:
            raise ConfigError("img_resolution", f"must be a positive multiple of patch_size={self.patch_size}, got {self.img_resolution}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size", f"must be divisible by num_heads={self.num_heads}, got {self.hidden_size}")
        if (self.hidden_size // 2) % 2:
            raise ConfigError("hidden_size", f"must be a multiple of 4 (2-D sin-cos positions), got {self.hidden_size}")
        if self.mlp_ratio <= 0:
            raise ConfigError("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.frequency_dim < 2 or self.frequency_dim % 2:
            raise ConfigError("frequency_dim", f"must be an even number >= 2, got {self.frequency_dim}")
        if self.time_embedding == "fourier" and not self.fourier_scale > 0:
            raise ConfigError("fourier_scale", f"must be > 0, got {self.fourier_scale}")
        if self.jvp_attention not in JVP_IMPLS:
            raise ConfigError("jvp_attention", f"must be one of {JVP_IMPLS}, got {self.jvp_attention!r}")


def sincos_2d(dim: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positions [grid², dim] (MAE/DiT): half the channels encode rows, half columns."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([args.sin(), args.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


def _modulate(x_BLD: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    """LayerNorm(x) ⊙ (1 + scale) + shift in the modulation's (fp32) dtype, autocast off (adaLN, DiT eq.)."""
    with torch.autocast(device_type=x_BLD.device.type, enabled=False):
        h = F.layer_norm(x_BLD.to(shift_BD.dtype), (x_BLD.shape[-1],), eps=1e-6)
        return h * (1 + scale_BD[:, None]) + shift_BD[:, None]


class DiTBlock(nn.Module):
    """x + gate1 ⊙ Attn(modulate(LN x)); x + gate2 ⊙ MLP(modulate(LN x)); shift/scale/gate = adaLN(emb), zero-init."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.heads, self.jvp_impl = cfg.num_heads, cfg.jvp_attention
        self.ada = WideLinear(D, 6 * D)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        hidden = int(D * cfg.mlp_ratio)
        self.fc1, self.fc2 = nn.Linear(D, hidden), nn.Linear(hidden, D)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD: Tensor, emb_BD: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(emb_BD)).chunk(6, dim=1)
        B, L, D = x_BLD.shape
        h = _modulate(x_BLD, shift1, scale1)
        q, k, v = self.qkv(h).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = attention(q, k, v, self.jvp_impl).transpose(1, 2).reshape(B, L, D)
        x_BLD = x_BLD + gate1[:, None] * self.proj(a)
        h = _modulate(x_BLD, shift2, scale2)
        h = self.fc2(self.dropout(F.gelu(self.fc1(h), approximate="tanh")))
        return x_BLD + gate2[:, None] * h


class DiT(nn.Module):
    """F(x [B,C,H,W], noise_labels [B], class_labels [B,label_dim] | None, guidance [B] | None) -> [B,C,H,W]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        self.time_embedding_dim = D
        self.map = ConditioningEmbedding(cfg.time_embedding, cfg.frequency_dim, D, cfg.label_dim, cfg.fourier_scale, cfg.guidance_embedding)
        self.patch = nn.Conv2d(cfg.img_channels, D, p, stride=p)
        self.register_buffer("pos", sincos_2d(D, cfg.img_resolution // p), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_ada = WideLinear(D, 2 * D)
        self.out = nn.Linear(D, p * p * cfg.img_channels)
        for layer in (self.final_ada, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        """Conditioning vector [B, hidden_size], always computed in fp32 (fp64 for an fp64 net)."""
        return self.map(noise_labels, class_labels, guidance)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        p, g = self.cfg.patch_size, H // self.cfg.patch_size
        emb = self.embed(noise_labels, class_labels, guidance)
        h = self.patch(x).flatten(2).transpose(1, 2)  # [B, L, D] patch tokens, row-major
        h = h.to(emb.dtype) + self.pos.to(emb.dtype)  # fp32 residual stream
        run = block_runner(self.cfg.checkpointing)
        for block in self.blocks:
            h = run(block, h, emb)
        shift, scale = self.final_ada(F.silu(emb)).chunk(2, dim=1)
        out = self.out(_modulate(h, shift, scale))  # [B, L, p·p·C]
        out = out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)  # un-patchify
        return out.to(x.dtype)


def build_dit(cfg: DiTConfig) -> DiT:
    return DiT(cfg)
