"""EDM2-layout U-Net backbone F(x, noise_labels, class_labels) with the sCM stability changes, and its presets.

Owns: `UNetConfig` (its own sub-config, checked by `check()`), `UNET_PRESETS`, `build_unet`, the layers.
Layout of EDM2's UNet (Karras et al. 2024, NVlabs/edm2 networks_edm2.py): per level `num_blocks` encoder
blocks, a down-sampling residual block between levels, two blocks at the lowest resolution (the first
with attention), `num_blocks + 1` decoder blocks per level on concatenated skips, an up-sampling residual
block between levels; attention inside the blocks at `attn_resolutions`, 64 channels a head.
Kept from ADM/EDM instead of EDM2's magnitude-preserving layers, as the sCM models do: GroupNorm, biases,
conditioning by modulation. sCM changes (MATH.md §2, Lu & Song 2024 §4.1): positional time embedding,
adaptive double normalization (scale and shift: 2·C·E modulation weights a block, hence ~4% more
parameters than EDM2's published sizes), embedding and modulation in fp32 under autocast; attention has
JVP paths (`sct.models.attention`). No BatchNorm: a sample never depends on the rest of its batch.
Zero-initialised output conv, residual-branch convs and attention projections: a fresh net outputs 0.
Activation checkpointing (`checkpointing: true`) recomputes each block (or, with `checkpoint_min_resolution`,
each block at that resolution or above: the 64x64 level holds most of EDM2's activations) in the backward
pass; it applies to the gradient-carrying forward only, never inside `forward_ad_mode()` or under no_grad.
Tests: `pytest tests/unit/test_unet.py tests/unit/test_presets.py`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from sct.config import ConfigError
from sct.models.attention import JVP_IMPLS, JVPAttention, attention, in_forward_ad_mode
from sct.models.embedding import ConditioningEmbedding, WideLinear, wide_dtype


def _edm2_latent(model_channels: int, dropout: float) -> dict[str, Any]:
    """EDM2 img512 (64x64x4 SD-VAE latents, 1000 classes): channel_mult 1-2-3-4, 3 blocks, attention at 16 and 8."""
    return dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=model_channels,
                channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8], dropout=dropout,
                time_embedding="positional", adaptive_double_norm=True)


def _ict_pixels(**kw: Any) -> dict[str, Any]:
    """iCT pixel models (Song & Dhariwal 2023): Fourier noise embedding of scale 0.02, dropout 0.3, AdaGN."""
    return dict(dropout=0.3, time_embedding="fourier", fourier_scale=0.02, adaptive_double_norm=False, **kw)


# Selected by `model.backbone: {name: unet, preset: NAME}`; explicit keys override the preset's (sct.config).
# Parameter counts (tests/unit/test_presets.py): EDM2's published S 280M, M 498M, L 778M, XL 1.1B, XXL 1.5B + ~4%.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "edm2-s": _edm2_latent(192, 0.0),  # EDM2 dropout per size: s 0.00, m..xxl 0.10
    "edm2-m": _edm2_latent(256, 0.1),
    "edm2-l": _edm2_latent(320, 0.1),
    "edm2-xl": _edm2_latent(384, 0.1),
    "edm2-xxl": _edm2_latent(448, 0.1),
    # CIFAR-10 32x32x3, unconditional: EDM's DDPM++ widths (128, mult 2-2-2, 4 blocks, attention at 16)
    "ict-cifar10": _ict_pixels(img_resolution=32, img_channels=3, label_dim=0, model_channels=128,
                               channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16]),
    # ImageNet-64 64x64x3, 1000 classes: EDM's ADM widths (192, mult 1-2-3-4, 3 blocks, attention at 32, 16, 8)
    "ict-imagenet64": _ict_pixels(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
                                  channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8]),
}


@dataclass
class UNetConfig:
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = UNET_PRESETS
    name: Literal["unet"] = "unet"
    preset: str | None = None  # a UNET_PRESETS name; keys given beside it override the preset's values
    img_resolution: int = 32
    img_channels: int = 3
    label_dim: int = 0  # 0 = unconditional; labels are one-hot float [B, label_dim], a zero row = no label
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2  # residual blocks per level in the encoder; the decoder has num_blocks + 1
    attn_resolutions: tuple[int, ...] = (16,)  # the lowest resolution always has attention (middle block)
    dropout: float = 0.0
    dropout_max_resolution: int = 0  # dropout only in blocks whose output is at most this resolution (sCM Table 4: 16); 0 = every block
    time_embedding: Literal["positional", "fourier"] = "positional"  # sCM: positional; iCT: fourier
    fourier_scale: float = 16.0  # iCT uses 0.02 (MATH.md §1)
    adaptive_double_norm: bool = True  # sCM §4.1; False = plain AdaGN scale/shift
    guidance_embedding: bool = False  # the guidance scale w is an input (guidance-conditioned sCD student, sCM Table 4)
    head_channels: int = 64  # channels per attention head (EDM2); one head if it does not divide the width
    jvp_attention: JVPAttention = "auto"  # attention kernel under forward_ad_mode() (sct.models.attention)
    checkpointing: bool = False  # activation checkpointing of every block in the gradient-carrying forward
    checkpoint_min_resolution: int = 0  # with checkpointing: only blocks at resolutions >= this (0: all; 64: EDM2's 64x64 level)

    @property
    def num_groups(self) -> int:
        """GroupNorm group count for every norm of the net (EDM: at most 32, at least 4 channels a group)."""
        return max(1, min(32, self.model_channels // 4))

    @property
    def resolutions(self) -> list[int]:
        return [self.img_resolution >> level for level in range(len(self.channel_mult))]

    def dropout_at(self, resolution: int) -> float:
        """Dropout of a block whose output has this resolution (sCM Table 4: only at resolutions <= 16)."""
        return self.dropout if not self.dropout_max_resolution or resolution <= self.dropout_max_resolution else 0.0

    def check(self) -> None:
        if self.name != "unet":
            raise ConfigError("name", f"must be 'unet', got {self.name!r}")
        if self.preset is not None and self.preset not in UNET_PRESETS:
            raise ConfigError("preset", f"unknown preset {self.preset!r} (valid presets: {', '.join(UNET_PRESETS)})")
        if self.img_channels < 1:
            raise ConfigError("img_channels", f"must be >= 1, got {self.img_channels}")
        if self.label_dim < 0:
            raise ConfigError("label_dim", f"must be >= 0 (0 = unconditional), got {self.label_dim}")
        if not self.channel_mult or any(int(m) != m or m < 1 for m in self.channel_mult):
            raise ConfigError("channel_mult", f"must be a non-empty list of positive integers, got {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.img_resolution < 1 or self.img_resolution % factor:
            raise ConfigError("img_resolution", f"must be a positive multiple of 2**(len(channel_mult)-1) = {factor}, "
                              f"got {self.img_resolution}")
        if self.model_channels < 4 or self.model_channels % self.num_groups:
            raise ConfigError("model_channels", f"must be >= 4 and divisible by its GroupNorm group count "
                              f"min(32, model_channels // 4) = {self.num_groups}, got {self.model_channels}")
        if self.num_blocks < 1:
            raise ConfigError("num_blocks", f"must be >= 1, got {self.num_blocks}")
        bad = [r for r in self.attn_resolutions if r not in self.resolutions]
        if bad:
            raise ConfigError("attn_resolutions", f"{bad} not among the U-Net's resolutions {self.resolutions}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.dropout_max_resolution < 0:
            raise ConfigError("dropout_max_resolution", f"must be >= 0 (0 = every resolution), got {self.dropout_max_resolution}")
        if self.time_embedding not in ("positional", "fourier"):
            raise ConfigError("time_embedding", f"must be 'positional' or 'fourier', got {self.time_embedding!r}")
        if self.time_embedding == "fourier" and not self.fourier_scale > 0:
            raise ConfigError("fourier_scale", f"must be > 0, got {self.fourier_scale}")
        if self.head_channels < 1:
            raise ConfigError("head_channels", f"must be >= 1, got {self.head_channels}")
        if self.checkpoint_min_resolution < 0:
            raise ConfigError("checkpoint_min_resolution", f"must be >= 0, got {self.checkpoint_min_resolution}")
        if self.jvp_attention not in JVP_IMPLS:
            raise ConfigError("jvp_attention", f"must be one of {JVP_IMPLS}, got {self.jvp_attention!r}")


def pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """x / sqrt(mean(x², channels) + eps) over dim 1."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


# ---------------------------------------------------------------------------------------------------

class Modulation(nn.Module):
    """GroupNorm (no affine) modulated by emb, computed in fp32 whatever the autocast.

    adaptive double norm (sCM §4.1): y = norm(h) ⊙ pnorm(s(emb)) + pnorm(b(emb)); AdaGN: y = norm(h) ⊙ (1 + s) + b.
    """

    def __init__(self, channels: int, emb_dim: int, groups: int, double_norm: bool):
        super().__init__()
        self.groups, self.double_norm = groups, double_norm
        self.affine = WideLinear(emb_dim, 2 * channels)

    def forward(self, h_BCHW: Tensor, emb_BE: Tensor) -> Tensor:
        scale_BC, shift_BC = self.affine(F.silu(emb_BE)).chunk(2, dim=1)
        with torch.autocast(device_type=h_BCHW.device.type, enabled=False):
            h = F.group_norm(h_BCHW.to(scale_BC.dtype), self.groups)
            if self.double_norm:
                scale_BC, shift_BC = pixel_norm(scale_BC), pixel_norm(shift_BC)  # sCM §4.1 adaptive double norm
            else:
                scale_BC = 1 + scale_BC  # AdaGN (ADM)
            return h * scale_BC[:, :, None, None] + shift_BC[:, :, None, None]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in fp32 (fp64 for fp64 inputs) with autocast off, cast back to the input dtype (ADM's GroupNorm32).

    Also works around autocast + forward AD: autocast's group_norm on a bf16 input returns a bf16 primal
    with an fp32 tangent, and the next conv then fails on the dtype mismatch (torch 2.14, CPU).
    """

    def forward(self, x: Tensor) -> Tensor:
        dt = wide_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.group_norm(x.to(dt), self.num_groups, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W tokens: x + proj(attn(qkv(GroupNorm(x)))), proj zero-init."""

    def __init__(self, channels: int, groups: int, head_dim: int = 64, jvp_impl: JVPAttention = "auto"):
        super().__init__()
        self.heads = channels // head_dim if channels % head_dim == 0 else 1
        self.jvp_impl = jvp_impl
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (t.transpose(-2, -1) for t in qkv.unbind(1))  # each [B, heads, L, d]
        a_BHLD = attention(q, k, v, self.jvp_impl)
        return x + self.proj(a_BHLD.transpose(-2, -1).reshape(B, C, H, W))


def _resample(x: Tensor, mode: str) -> Tensor:
    """EDM2's [1, 1] filter: 2x2 average pooling down, nearest-neighbour up."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class ResBlock(nn.Module):
    """resample -> [GroupNorm-SiLU-conv3x3 -> Modulation(emb) -> SiLU-dropout-conv3x3 (zero-init)] + skip, /√2
    (EDM) -> optional self-attention. `takes_skip`: a decoder block whose input is [h, encoder skip]."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, resolution: int, resample: str = "keep",
                 attn: bool = False, takes_skip: bool = False):
        super().__init__()
        self.resample, self.takes_skip, self.res = resample, takes_skip, resolution  # resolution: the block's output
        self.norm1 = GroupNorm32(cfg.num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.mod = Modulation(out_ch, emb_dim, cfg.num_groups, cfg.adaptive_double_norm)
        self.dropout = nn.Dropout(cfg.dropout_at(resolution))  # resolution: the block's output
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttentionBlock(out_ch, cfg.num_groups, cfg.head_channels, cfg.jvp_attention) if attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = _resample(x, self.resample)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.mod(h, emb).to(h.dtype)
        h = self.conv2(self.dropout(F.silu(h)))
        x = (self.skip(x) + h) * math.sqrt(0.5)  # EDM skip scale
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    """F(x [B,C,H,W], noise_labels [B], class_labels [B,label_dim] | None, guidance [B] | None) -> [B,C,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        mc = cfg.model_channels
        widths = [mc * m for m in cfg.channel_mult]
        self.time_embedding_dim = E = 4 * mc  # ADM/EDM; equals EDM2's max(widths) for mult 1-2-3-4
        self.map = ConditioningEmbedding(cfg.time_embedding, mc, E, cfg.label_dim, cfg.fourier_scale, cfg.guidance_embedding)

        # Encoder: a skip is kept after conv_in and after every block (down-sampling ones included).
        self.conv_in = nn.Conv2d(cfg.img_channels, widths[0], 3, padding=1)
        self.enc = nn.ModuleList()
        skip_ch, ch = [widths[0]], widths[0]
        for level, width in enumerate(widths):
            res = cfg.img_resolution >> level
            if level > 0:
                self.enc.append(ResBlock(ch, ch, E, cfg, res, resample="down"))
                skip_ch.append(ch)
            for _ in range(cfg.num_blocks):
                self.enc.append(ResBlock(ch, width, E, cfg, res, attn=res in cfg.attn_resolutions))
                ch = width
                skip_ch.append(ch)

        # Lowest resolution (EDM2's dec in0/in1): a block with attention, then a plain one.
        low = cfg.resolutions[-1]
        self.mid = nn.ModuleList([ResBlock(ch, ch, E, cfg, low, attn=True), ResBlock(ch, ch, E, cfg, low)])

        # Decoder: num_blocks + 1 blocks a level, each consuming one skip; an up-sampling block between levels.
        self.dec = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            res = cfg.img_resolution >> level
            if level < len(widths) - 1:
                self.dec.append(ResBlock(ch, ch, E, cfg, res, resample="up"))
            for _ in range(cfg.num_blocks + 1):
                self.dec.append(ResBlock(ch + skip_ch.pop(), width, E, cfg, res, attn=res in cfg.attn_resolutions,
                                         takes_skip=True))
                ch = width
        assert not skip_ch

        for block in [*self.enc, *self.mid, *self.dec]:
            block.checkpointed = cfg.checkpointing and block.res >= cfg.checkpoint_min_resolution
        self.out_norm = GroupNorm32(cfg.num_groups, ch)
        self.out_conv = _zero(nn.Conv2d(ch, cfg.img_channels, 3, padding=1))

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        """Conditioning vector emb [B, time_embedding_dim], always computed in fp32 (fp64 for an fp64 net)."""
        return self.map(noise_labels, class_labels, guidance)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        emb = self.embed(noise_labels, class_labels, guidance)
        checkpointed = block_runner(self.cfg.checkpointing)

        def run(block, *args):
            return checkpointed(block, *args) if block.checkpointed else block(*args)

        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = run(block, h, emb)
            skips.append(h)
        for block in self.mid:
            h = run(block, h, emb)
        for block in self.dec:
            h = run(block, torch.cat([h, skips.pop()], dim=1) if block.takes_skip else h, emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out.to(x.dtype)


def block_runner(checkpointing: bool) -> Callable[..., Tensor]:
    """`run(block, *args)`: checkpointed (recomputed in backward, RNG and dropout replayed) when enabled and
    the forward carries gradients; plain under no_grad and always inside forward_ad_mode() (the JVP)."""
    if checkpointing and torch.is_grad_enabled() and not in_forward_ad_mode():
        return functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    return lambda block, *args: block(*args)


def build_unet(cfg: UNetConfig) -> UNet:
    return UNet(cfg)
