"""`python -m sct.bench jvp`: what the sCM tangent costs, per backbone preset and per attention kernel.

    python -m sct.bench jvp                       # CPU: presets at tiny widths, attention at 1k/4k/16k tokens
    python -m sct.bench jvp --full-size --device cuda --dtype bf16   # GPU: the real preset sizes

Table 1, per preset (U-Net edm2-s..xxl, DiT s..xl/2; ImageNet-512 latents 64x64x4): milliseconds and peak
memory of a no-grad forward, the JVP as sCM takes it (no_grad, forward_ad_mode, torch.func.jvp), and a
forward+backward. Tiny widths (default): U-Net model_channels / 16, DiT 4 channels a head and patch 4
(256 tokens; /2 at full size); real depth and layout. Table 2: attention JVP (output and tangent) by kernel — math (the reference),
chunked (online softmax, sct.models.chunked_attention), triton (CUDA only) — at each token count:
milliseconds, peak memory, and the tangent's max. abs. error vs math. The math path is skipped when its
L x L matrices would not fit `--math-limit-gb`. Times: median of `--repeats` after one warm-up.
Peak memory: CUDA allocator statistics on GPU, exact storage accounting on CPU (sct.bench.memory).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sct.bench.memory import peak_bytes
from sct.config import from_dict
from sct.models.attention import forward_ad_mode, math_attention
from sct.models.chunked_attention import chunked_jvp_attention
from sct.models.dit import DIT_PRESETS, DiTConfig, build_dit
from sct.models.unet import UNET_PRESETS, UNetConfig, build_unet

UNETS = [name for name in UNET_PRESETS if name.startswith("edm2-")]
DITS = {True: [n for n in DIT_PRESETS if n.endswith("/2")], False: [n for n in DIT_PRESETS if n.endswith("/4")]}  # by --full-size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def tiny(cfg: UNetConfig | DiTConfig) -> UNetConfig | DiTConfig:
    """The preset at a CPU-sized width: same depth, layout and token counts."""
    if isinstance(cfg, UNetConfig):
        return dataclasses.replace(cfg, model_channels=cfg.model_channels // 16)
    return dataclasses.replace(cfg, hidden_size=4 * cfg.num_heads)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def bench_backbones(args, device: torch.device) -> list[str]:
    rows = ["| preset | parameters | forward ms | JVP ms | fwd+bwd ms | forward MiB | JVP MiB | fwd+bwd MiB |",
            "|---|---|---|---|---|---|---|---|"]
    presets = [(UNetConfig, build_unet, n) for n in UNETS] + [(DiTConfig, build_dit, n) for n in DITS[args.full_size]]
    for cls, build, name in tqdm(presets, desc="backbones", leave=False):
        cfg = from_dict(cls, {"preset": name})
        cfg = cfg if args.full_size else tiny(cfg)
        torch.manual_seed(0)
        net = build(cfg).to(device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, cfg.img_channels, cfg.img_resolution, cfg.img_resolution, generator=g).to(device)
        t = (torch.rand(args.batch, generator=g) * 1.5).to(device)
        y = F.one_hot(torch.randint(0, cfg.label_dim, (args.batch,), generator=g), cfg.label_dim).float().to(device)
        tx, tt = torch.randn_like(x), torch.ones_like(t)
        autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

        def forward():
            with torch.no_grad(), autocast:
                return net(x, t, y)

        def jvp():
            with torch.no_grad(), forward_ad_mode(), autocast:
                return torch.func.jvp(lambda a, b: net(a, b, y), (x, t), (tx, tt))

        def train_step():
            with autocast:
                loss = net(x, t, y).float().square().mean()
            loss.backward()
            net.zero_grad(set_to_none=True)

        cells = [timed(f, args.repeats, device) for f in (forward, jvp, train_step)]
        mems = [peak_bytes(f, device)[1] for f in (forward, jvp, train_step)]
        params = sum(p.numel() for p in net.parameters())
        label = name if args.full_size else f"{name} (tiny)"
        rows.append(f"| {label} | {params / 1e6:,.2f}M | " + " | ".join(f"{c:,.1f}" for c in cells) + " | "
                    + " | ".join(_mb(m) for m in mems) + " |")
        del net
    return rows


def bench_attention(args, device: torch.device) -> list[str]:
    from sct.models import triton_attention

    kernels: dict[str, Callable] = {"math": math_attention, "chunked": chunked_jvp_attention}
    if device.type == "cuda" and triton_attention.available():
        kernels["triton"] = triton_attention.triton_jvp_attention
    dtype = DTYPES[args.dtype]
    rows = ["| tokens | kernel | JVP ms | peak MiB | tangent max err vs math |", "|---|---|---|---|---|"]
    for L in tqdm(args.tokens, desc="attention", leave=False):
        g = torch.Generator().manual_seed(L)
        shape = (args.batch, args.heads, L, args.head_dim)
        q, k, v, tq, tk, tv = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(6))
        math_bytes = 5 * args.batch * args.heads * L * L * 4  # scores, weights, their tangents, softmax temporaries
        reference = None
        for name, kernel in kernels.items():
            if name == "math" and math_bytes > args.math_limit_gb * 2**30:
                rows.append(f"| {L:,} | math | skipped | ~{_mb(math_bytes)} (estimate) | |")
                continue

            def run(kernel=kernel):
                with torch.no_grad(), forward_ad_mode():
                    return torch.func.jvp(kernel, (q, k, v), (tq, tk, tv))

            ms = timed(run, args.repeats, device)
            (_, tangent), peak = peak_bytes(run, device)
            if name == "math":
                reference = tangent.float()
            err = "" if reference is None or name == "math" else f"{(tangent.float() - reference).abs().max().item():.1e}"
            rows.append(f"| {L:,} | {name} | {ms:,.1f} | {_mb(peak)} | {err} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sct.bench jvp", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--full-size", action="store_true", help="real preset widths (GPU) instead of tiny ones")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--math-limit-gb", type=float, default=1.0, help="skip the math path above this estimate")
    parser.add_argument("--skip-backbones", action="store_true")
    parser.add_argument("--skip-attention", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# sct.bench jvp: {name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}")
    if not args.skip_backbones:
        print("\n".join(bench_backbones(args, device)) + "\n")
    if not args.skip_attention:
        print(f"attention: batch {args.batch}, {args.heads} head(s) of {args.head_dim} channels")
        print("\n".join(bench_attention(args, device)))
    return 0
