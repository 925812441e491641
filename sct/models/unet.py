"""EDM/EDM2-flavoured U-Net backbone F(x, noise_labels, class_labels) with the sCM stability changes.

Owns: `UNetConfig` (its own sub-config, checked by `check()`), `build_unet`, and the layers of the net.
The backbone sees one conditioning scalar per sample (the wrapper's c_noise) and knows nothing of σ or
TrigFlow. sCM changes (MATH.md §2, Lu & Song 2024 §4.1): positional time embedding, adaptive double
normalization, embedding and modulation in fp32 under autocast; attention has a JVP path
(`sct.models.attention`). No BatchNorm: a sample never depends on the rest of its batch.
Zero-initialised output conv, residual-branch convs and attention projections: a fresh net outputs 0.
Tests: `pytest tests/unit/test_unet.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sct.config import ConfigError
from sct.models.attention import attention
from sct.models.embedding import FourierEmbedding, PositionalEmbedding


@dataclass
class UNetConfig:
    name: Literal["unet"] = "unet"
    img_resolution: int = 32
    img_channels: int = 3
    label_dim: int = 0  # 0 = unconditional; labels are one-hot float [B, label_dim], a zero row = no label
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2  # residual blocks per level in the encoder; the decoder has num_blocks + 1
    attn_resolutions: tuple[int, ...] = (16,)  # the lowest resolution always has attention (middle block)
    dropout: float = 0.0
    time_embedding: Literal["positional", "fourier"] = "positional"  # sCM: positional; iCT: fourier
    fourier_scale: float = 16.0  # iCT uses 0.02 (MATH.md §1)
    adaptive_double_norm: bool = True  # sCM §4.1; False = plain AdaGN scale/shift

    @property
    def num_groups(self) -> int:
        """GroupNorm group count for every norm of the net (EDM: at most 32, at least 4 channels a group)."""
        return max(1, min(32, self.model_channels // 4))

    @property
    def resolutions(self) -> list[int]:
        return [self.img_resolution >> level for level in range(len(self.channel_mult))]

    def check(self) -> None:
        if self.name != "unet":
            raise ConfigError("name", f"must be 'unet', got {self.name!r}")
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
        if self.time_embedding not in ("positional", "fourier"):
            raise ConfigError("time_embedding", f"must be 'positional' or 'fourier', got {self.time_embedding!r}")
        if self.time_embedding == "fourier" and not self.fourier_scale > 0:
            raise ConfigError("fourier_scale", f"must be > 0, got {self.fourier_scale}")


# ---------------------------------------------------------------------------------------------------
# fp32 islands: the conditioning path never runs in bf16/fp16, whatever the autocast or parameter dtype.

def _wide_dtype(*ts: Tensor) -> torch.dtype:
    """float64 if any input is float64 (tests), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


class WideLinear(nn.Linear):
    """nn.Linear computed in fp32 (fp64 if the weights are fp64), with autocast disabled."""

    def forward(self, x: Tensor) -> Tensor:
        dt = _wide_dtype(self.weight)
        with torch.autocast(device_type=x.device.type, enabled=False):
            b = None if self.bias is None else self.bias.to(dt)
            return F.linear(x.to(dt), self.weight.to(dt), b)


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


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 -> Modulation(emb) -> SiLU-dropout-conv3x3 (zero-init), + skip, /√2 (EDM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.num_groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.mod = Modulation(out_ch, emb_dim, cfg.num_groups, cfg.adaptive_double_norm)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.mod(h, emb).to(h.dtype)
        h = self.conv2(self.dropout(F.silu(h)))
        return (self.skip(x) + h) * math.sqrt(0.5)  # EDM skip scale


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W tokens: x + proj(attn(qkv(GroupNorm(x)))), proj zero-init."""

    def __init__(self, channels: int, groups: int, head_dim: int = 64):
        super().__init__()
        self.heads = channels // head_dim if channels % head_dim == 0 else 1
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (t.transpose(-2, -1) for t in qkv.unbind(1))  # each [B, heads, L, d]
        a_BHLD = attention(q, k, v)
        return x + self.proj(a_BHLD.transpose(-2, -1).reshape(B, C, H, W))


class Down(nn.Module):
    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return F.avg_pool2d(x, 2)


class Up(nn.Module):
    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class UNet(nn.Module):
    """F(x [B,C,H,W], noise_labels [B], class_labels [B,label_dim] | None) -> [B,C,H,W]."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        mc, G = cfg.model_channels, cfg.num_groups
        self.time_embedding_dim = E = 4 * mc
        if cfg.time_embedding == "positional":
            self.map_noise: nn.Module = PositionalEmbedding(mc)
        else:
            self.map_noise = FourierEmbedding(mc, cfg.fourier_scale)
        self.map_layer0, self.map_layer1 = WideLinear(mc, E), WideLinear(E, E)
        self.map_label = WideLinear(cfg.label_dim, E, bias=False) if cfg.label_dim else None

        # Encoder: skips are pushed after conv_in, after every block (+attn) and after every Down.
        self.conv_in = nn.Conv2d(cfg.img_channels, mc, 3, padding=1)
        self.enc = nn.ModuleList()
        skip_ch, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.img_resolution >> level
            if level > 0:
                self.enc.append(Down())
                skip_ch.append(ch)
            for _ in range(cfg.num_blocks):
                stage = nn.ModuleList([ResBlock(ch, mc * mult, E, cfg)])
                ch = mc * mult
                if res in cfg.attn_resolutions:
                    stage.append(AttentionBlock(ch, G))
                self.enc.append(stage)
                skip_ch.append(ch)

        # Middle (EDM/ADM): block, attention, block at the lowest resolution.
        self.mid = nn.ModuleList([ResBlock(ch, ch, E, cfg), AttentionBlock(ch, G), ResBlock(ch, ch, E, cfg)])

        # Decoder: num_blocks + 1 blocks a level, each consuming one skip (concatenated).
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.img_resolution >> level
            for _ in range(cfg.num_blocks + 1):
                stage = nn.ModuleList([ResBlock(ch + skip_ch.pop(), mc * mult, E, cfg)])
                ch = mc * mult
                if res in cfg.attn_resolutions:
                    stage.append(AttentionBlock(ch, G))
                self.dec.append(stage)
            if level > 0:
                self.dec.append(Up())
        assert not skip_ch

        self.out_norm = nn.GroupNorm(G, ch)
        self.out_conv = _zero(nn.Conv2d(ch, cfg.img_channels, 3, padding=1))

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """Conditioning vector emb [B, time_embedding_dim], always computed in fp32 (fp64 for an fp64 net)."""
        dt = _wide_dtype(self.map_layer0.weight)
        with torch.autocast(device_type=noise_labels.device.type, enabled=False):
            emb = self.map_noise(noise_labels.to(dt).reshape(-1))
            emb = self.map_layer1(F.silu(self.map_layer0(emb)))  # Linear-SiLU-Linear
            if self.map_label is not None and class_labels is not None:
                emb = emb + self.map_label(class_labels.to(dt) * math.sqrt(self.cfg.label_dim))  # zero row adds 0
            elif self.map_label is None and class_labels is not None and class_labels.numel():
                raise ValueError("class_labels given to an unconditional UNet (label_dim=0)")
        return emb

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(noise_labels, class_labels)
        h = self.conv_in(x)
        skips = [h]
        for stage in self.enc:
            h = _run(stage, h, emb)
            skips.append(h)
        h = _run(self.mid, h, emb)
        for stage in self.dec:
            h = _run(stage, h if isinstance(stage, Up) else torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return out.to(x.dtype)


def _run(stage: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
    for layer in stage if isinstance(stage, nn.ModuleList) else [stage]:
        h = layer(h, emb)
    return h


def build_unet(cfg: UNetConfig) -> UNet:
    return UNet(cfg)
