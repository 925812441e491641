"""Standalone few-step sampler of an sct export folder: needs only torch (and diffusers for latent models).

Written by `python -m sct.export` next to `weights.safetensors` and `sampler.json`; imports nothing from
sct and unpickles nothing (weights are safetensors, read with torch.frombuffer; settings are JSON).
It carries its own inference copy of the backbones (U-Net, DiT, MLP) and of the two parameterizations,
op for op as sct trains them, so its samples equal sct's in-process sampling bitwise (CPU, fp32).

    python sampler.py --num 16 --steps 2 --out samples.png     # needs pillow for the PNG; or
    from sampler import load; s = load("export_dir"); x = s.sample(seeds=range(16), classes=[0] * 16, steps=2)

Sample i depends on its seed only: Generator(seed) draws N(0, I) in float64, one draw per step.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """The safetensors format by hand: 8-byte header length, JSON header, raw little-endian tensors."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    body = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi_ = info["data_offsets"]
        flat = torch.frombuffer(bytearray(body[lo:hi_]), dtype=DTYPES[info["dtype"]]) if hi_ > lo else torch.empty(0, dtype=DTYPES[info["dtype"]])
        out[name] = flat.reshape(info["shape"])
    return out


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class WideLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class PositionalEmbedding(nn.Module):
    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(num_channels // 2, dtype=torch.float64))

    def forward(self, x_B: Tensor) -> Tensor:
        args = (1.0 * x_B)[:, None] * self.freqs.to(x_B.dtype)[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class FourierEmbedding(nn.Module):
    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("freqs", torch.zeros(num_channels // 2, dtype=torch.float64))

    def forward(self, x_B: Tensor) -> Tensor:
        args = x_B[:, None] * (2 * math.pi * self.freqs.to(x_B.dtype))[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


def noise_embedding(kind: str, channels: int) -> nn.Module:
    return PositionalEmbedding(channels) if kind == "positional" else FourierEmbedding(channels)


class ConditioningEmbedding(nn.Module):
    """emb(noise) + label map + (guidance-conditioned students) an embedding of the guidance scale w (1 if not given)."""

    def __init__(self, kind: str, frequency_dim: int, out_dim: int, label_dim: int, guidance: bool = False):
        super().__init__()
        self.label_dim = label_dim
        self.map_noise = noise_embedding(kind, frequency_dim)
        self.map_layer0, self.map_layer1 = WideLinear(frequency_dim, out_dim), WideLinear(out_dim, out_dim)
        self.map_label = WideLinear(label_dim, out_dim, bias=False) if label_dim else None
        self.map_guidance = nn.Sequential(PositionalEmbedding(frequency_dim), WideLinear(frequency_dim, out_dim), nn.SiLU(),
                                          WideLinear(out_dim, out_dim)) if guidance else None

    def forward(self, noise: Tensor, labels: Tensor | None, guidance: Tensor | None = None) -> Tensor:
        emb = self.map_layer1(F.silu(self.map_layer0(self.map_noise(noise.float().reshape(-1)))))
        if self.map_label is not None and labels is not None:
            emb = emb + self.map_label(labels.float() * math.sqrt(self.label_dim))
        if self.map_guidance is not None:
            w = torch.ones_like(emb[:, 0]) if guidance is None else guidance.float().reshape(-1).expand(emb.shape[0])
            emb = emb + self.map_guidance(w)
        return emb


# --- U-Net (EDM2 layout, sCM adaptive double normalization) -----------------------------------------

def _pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


class Modulation(nn.Module):
    def __init__(self, channels: int, emb_dim: int, groups: int, double_norm: bool):
        super().__init__()
        self.groups, self.double_norm = groups, double_norm
        self.affine = WideLinear(emb_dim, 2 * channels)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.affine(F.silu(emb)).chunk(2, dim=1)
        h = F.group_norm(h.to(scale.dtype), self.groups)
        scale, shift = (_pixel_norm(scale), _pixel_norm(shift)) if self.double_norm else (1 + scale, shift)
        return h * scale[:, :, None, None] + shift[:, :, None, None]


class GroupNorm32(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, groups: int, head_dim: int):
        super().__init__()
        self.heads = channels // head_dim if channels % head_dim == 0 else 1
        self.norm = GroupNorm32(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = (t.transpose(-2, -1) for t in qkv.unbind(1))
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(a.transpose(-2, -1).reshape(B, C, H, W))


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: dict, resample: str = "keep", attn: bool = False,
                 takes_skip: bool = False):
        super().__init__()
        groups = max(1, min(32, cfg["model_channels"] // 4))
        self.resample, self.takes_skip = resample, takes_skip
        self.norm1 = GroupNorm32(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.mod = Modulation(out_ch, emb_dim, groups, cfg["adaptive_double_norm"])
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttentionBlock(out_ch, groups, cfg["head_channels"]) if attn else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample == "down":
            x = F.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.mod(h, emb).to(h.dtype)
        h = self.conv2(F.silu(h))
        x = (self.skip(x) + h) * math.sqrt(0.5)
        return x if self.attn is None else self.attn(x)


class UNet(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        mc, res0 = cfg["model_channels"], cfg["img_resolution"]
        widths = [mc * m for m in cfg["channel_mult"]]
        E, attn_at = 4 * mc, set(cfg["attn_resolutions"])
        self.map = ConditioningEmbedding(cfg["time_embedding"], mc, E, cfg["label_dim"], cfg.get("guidance_embedding", False))
        self.conv_in = nn.Conv2d(cfg["img_channels"], widths[0], 3, padding=1)
        self.enc, skip_ch, ch = nn.ModuleList(), [widths[0]], widths[0]
        for level, width in enumerate(widths):
            if level > 0:
                self.enc.append(ResBlock(ch, ch, E, cfg, resample="down"))
                skip_ch.append(ch)
            for _ in range(cfg["num_blocks"]):
                self.enc.append(ResBlock(ch, width, E, cfg, attn=(res0 >> level) in attn_at))
                ch = width
                skip_ch.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, E, cfg, attn=True), ResBlock(ch, ch, E, cfg)])
        self.dec = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            if level < len(widths) - 1:
                self.dec.append(ResBlock(ch, ch, E, cfg, resample="up"))
            for _ in range(cfg["num_blocks"] + 1):
                self.dec.append(ResBlock(ch + skip_ch.pop(), width, E, cfg, attn=(res0 >> level) in attn_at, takes_skip=True))
                ch = width
        self.out_norm = GroupNorm32(max(1, min(32, mc // 4)), ch)
        self.out_conv = nn.Conv2d(ch, cfg["img_channels"], 3, padding=1)

    def forward(self, x: Tensor, noise: Tensor, labels: Tensor | None, guidance: Tensor | None = None) -> Tensor:
        emb = self.map(noise, labels, guidance)
        h = self.conv_in(x)
        skips = [h]
        for block in self.enc:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.dec:
            h = block(torch.cat([h, skips.pop()], dim=1) if block.takes_skip else h, emb)
        return self.out_conv(F.silu(self.out_norm(h))).to(x.dtype)


# --- DiT (adaLN-Zero) ---------------------------------------------------------------------------------

def sincos_2d(dim: int, grid: int) -> Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def encode(p: Tensor) -> Tensor:
        args = p.reshape(-1, 1) * omega[None]
        return torch.cat([args.sin(), args.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    h = F.layer_norm(x.to(shift.dtype), (x.shape[-1],), eps=1e-6)
    return h * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D = cfg["hidden_size"]
        self.heads = cfg["num_heads"]
        self.ada = WideLinear(D, 6 * D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        hidden = int(D * cfg["mlp_ratio"])
        self.fc1, self.fc2 = nn.Linear(D, hidden), nn.Linear(hidden, D)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(emb)).chunk(6, dim=1)
        B, L, D = x.shape
        h = _modulate(x, shift1, scale1)
        q, k, v = self.qkv(h).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)
        x = x + gate1[:, None] * self.proj(a)
        h = self.fc2(F.gelu(self.fc1(_modulate(x, shift2, scale2)), approximate="tanh"))
        return x + gate2[:, None] * h


class DiT(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        D, p = cfg["hidden_size"], cfg["patch_size"]
        self.p = p
        self.map = ConditioningEmbedding(cfg["time_embedding"], cfg["frequency_dim"], D, cfg["label_dim"], cfg.get("guidance_embedding", False))
        self.patch = nn.Conv2d(cfg["img_channels"], D, p, stride=p)
        self.register_buffer("pos", sincos_2d(D, cfg["img_resolution"] // p), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg["depth"])])
        self.final_ada = WideLinear(D, 2 * D)
        self.out = nn.Linear(D, p * p * cfg["img_channels"])

    def forward(self, x: Tensor, noise: Tensor, labels: Tensor | None, guidance: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        p, g = self.p, H // self.p
        emb = self.map(noise, labels, guidance)
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = h.to(emb.dtype) + self.pos.to(emb.dtype)
        for block in self.blocks:
            h = block(h, emb)
        shift, scale = self.final_ada(F.silu(emb)).chunk(2, dim=1)
        out = self.out(_modulate(h, shift, scale))
        return out.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W).to(x.dtype)


# --- residual MLP (low-dimensional data) ------------------------------------------------------------------

class MLPBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.mod(emb).to(h.dtype).chunk(2, dim=1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, n = cfg["dim"], cfg["hidden"]
        self.embed_noise = noise_embedding(cfg["time_embedding"], n)
        self.embed_mlp = nn.Sequential(nn.Linear(n, n), nn.SiLU(), nn.Linear(n, n), nn.SiLU())
        self.embed_label = nn.Linear(cfg["label_dim"], n, bias=False) if cfg["label_dim"] else None
        self.inp = nn.Linear(d, n)
        self.blocks = nn.ModuleList(MLPBlock(n) for _ in range(cfg["depth"]))
        self.out = nn.Sequential(nn.LayerNorm(n), nn.Linear(n, d))

    def forward(self, x: Tensor, noise: Tensor, labels: Tensor | None) -> Tensor:
        emb = self.embed_noise(noise.float())
        if self.embed_label is not None and labels is not None:
            emb = emb + self.embed_label(labels.float())
        emb = self.embed_mlp(emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


BACKBONES = {"unet": UNet, "dit": DiT, "mlp": MLP}


# --- parameterizations: the consistency function f(x, s) and the sampler's noise ----------------------------

class TrigFlow(nn.Module):
    """f(x_t, t) = cos t x_t − sin t σd F(x_t/σd, t); prior σd z; renoise cos t x0 + sin t σd z (sCM)."""

    def __init__(self, backbone: nn.Module, p: dict):
        super().__init__()
        self.backbone, self.sigma_data, self.s_max = backbone, p["sigma_data"], p["t_max"]

    def consistency(self, x_t: Tensor, t: Tensor, labels: Tensor | None, guidance: Tensor | None = None) -> Tensor:
        x_t, t = x_t.float(), t.float().expand(x_t.shape[0])
        extra = {} if guidance is None else {"guidance": guidance}
        F_ = self.backbone(x_t / self.sigma_data, t.expand(x_t.shape[0]), labels, **extra).to(x_t.dtype)
        return _bcast(t.cos(), x_t) * x_t - _bcast(t.sin(), x_t) * self.sigma_data * F_

    def prior(self, z: Tensor) -> Tensor:
        return self.sigma_data * z

    def renoise(self, x0: Tensor, t: float, z: Tensor) -> Tensor:
        return math.cos(t) * x0 + math.sin(t) * self.sigma_data * z


class EDMConsistency(nn.Module):
    """iCT: f(x, σ) = c_skip x + c_out F(c_in x, 250 ln σ); prior σmax z; renoise x0 + sqrt(σ² − σmin²) z."""

    def __init__(self, backbone: nn.Module, p: dict):
        super().__init__()
        self.backbone = backbone
        self.sigma_data, self.sigma_min, self.s_max = p["sigma_data"], p["sigma_min"], p["sigma_max"]

    def consistency(self, x: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        x = x.float()
        sigma = sigma.float().expand(x.shape[0])
        sd, smin = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
        c_out = sd * (sigma - smin) / (sd**2 + sigma**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = 1000 * 0.25 * torch.log(sigma + 1e-44)
        F_ = self.backbone(_bcast(c_in, x) * x, c_noise, labels).to(x.dtype)
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * F_

    def prior(self, z: Tensor) -> Tensor:
        return self.s_max * z

    def renoise(self, x0: Tensor, sigma: float, z: Tensor) -> Tensor:
        return x0 + math.sqrt(sigma**2 - self.sigma_min**2) * z


PRECONDS = {"trigflow": TrigFlow, "edm_consistency": EDMConsistency}


class Sampler:
    """The exported consistency sampler: `sample(seeds, classes, steps)` -> samples [N, *shape] (model space)."""

    def __init__(self, folder: str | Path, device: str = "cpu"):
        folder = Path(folder)
        self.spec = json.loads((folder / "sampler.json").read_text())
        model = self.spec["model"]
        backbone = BACKBONES[model["backbone"]["name"]](model["backbone"])
        self.net = PRECONDS[model["precond"]["name"]](backbone, model["precond"])
        weights = {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in read_safetensors(folder / "weights.safetensors").items()}
        self.net.load_state_dict(weights)
        self.net = self.net.to(device).eval().requires_grad_(False)
        self.device, self.shape, self.classes = device, tuple(self.spec["shape"]), self.spec["num_classes"]

    def labels(self, classes) -> Tensor | None:
        if not self.classes:
            return None
        return F.one_hot(torch.as_tensor(list(classes), dtype=torch.long), self.classes).float().to(self.device)

    @torch.no_grad()
    def sample(self, seeds, classes=None, steps: int | None = None, guidance: float | None = None) -> Tensor:
        """`guidance`: the scale input of a guidance-conditioned student (default: sampler.json's)."""
        steps = self.spec["steps"] if steps is None else steps
        guidance = self.spec["guidance"] if guidance is None else guidance
        mids = self.spec["mids"].get(str(steps))
        if mids is None:
            raise ValueError(f"this export samples with {sorted(self.spec['mids'], key=int)} steps, not {steps}")
        seeds = list(seeds)
        labels = self.labels(classes if classes is not None else [0] * len(seeds))
        per_sample = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed))
            per_sample.append([torch.randn(self.shape, generator=gen, dtype=torch.float64) for _ in range(1 + len(mids))])
        noise = [torch.stack([s[k] for s in per_sample]).to(device=self.device, dtype=torch.float32) for k in range(1 + len(mids))]
        s_max = torch.full((len(seeds),), self.net.s_max, device=self.device)
        extra = {} if guidance == 1.0 else {"guidance": torch.full_like(s_max, guidance)}
        x = self.net.consistency(self.net.prior(noise[0]), s_max, labels, **extra)
        for s, z in zip(mids, noise[1:]):
            x = self.net.consistency(self.net.renoise(x, s, z), torch.full_like(s_max, s), labels, **extra)
        return x

    def decode(self, x: Tensor, vae=None) -> Tensor:
        """Model-space samples -> images in [-1, 1]: the VAE (diffusers AutoencoderKL) after un-normalizing latents."""
        latent = self.spec.get("latent")
        if not latent:
            return x.clamp(-1, 1)
        if vae is None:
            from diffusers import AutoencoderKL

            name, _, subfolder = latent["vae"].partition("#")  # "NAME#SUBFOLDER": a VAE inside a pipeline repo
            vae = AutoencoderKL.from_pretrained(name, subfolder=subfolder or None)
        stats = latent["stats"]
        mean = torch.tensor(stats["mean"], dtype=torch.float32)[:, None, None]
        scale = (stats.get("sigma_data", 0.5) / torch.tensor(stats["std"], dtype=torch.float32))[:, None, None]
        z = x.float().cpu() / scale + mean  # inverse of x = (z − mean) · σd / std
        param = next(vae.parameters())
        with torch.no_grad():
            return vae.decode(z.to(param.device, param.dtype)).sample.float().cpu().clamp(-1, 1)


def load(folder: str | Path, device: str = "cpu") -> Sampler:
    return Sampler(folder, device)


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description="sample from this export folder")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="a .png grid, 10 a row (needs pillow)")
    args = p.parse_args(argv)
    s = load(Path(__file__).parent)
    classes = [(i // 10) % max(s.classes, 1) for i in range(args.num)]
    if len(s.shape) != 3:
        raise SystemExit(f"this export makes {list(s.shape)}-shaped samples, not images: call load(folder).sample(...) from Python")
    x = s.decode(s.sample(range(args.seed, args.seed + args.num), classes, args.steps))
    from PIL import Image

    img = ((x + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = img.shape
    cols = min(n, 10)
    grid = torch.zeros(c, -(-n // cols) * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        grid[:, (i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = img[i]
    Image.fromarray(grid.permute(1, 2, 0).squeeze(-1).numpy()).save(args.out)
    print(f"wrote {args.num} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
