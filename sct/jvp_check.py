"""JVP correctness harness for any backbone F(x, noise_labels, labels): forward-mode JVP vs float64 central differences.

Owns: `check_jvp(backbone, x, noise_labels, labels)` -> `JVPReport` and the CLI

    python -m sct.jvp_check --config configs/demo_cpu.yaml [key=value ...] [--batch 2] [--jvp-attention chunked]

The reference is the float64 central difference (F(p + h v) − F(p − h v)) / 2h, h = 1e-6, of a float64
copy in eval mode (no dropout). Reported relative errors ‖J − ref‖ / ‖ref‖ of: the float64 JVP by
`torch.func.jvp` and by `forward_ad` dual tensors (the acceptance bound is 1e-6), the fp32 JVP, and the JVP
under bf16 autocast (what a bf16 run's tangent carries). Every JVP runs the way sCM runs it: no_grad,
inside `forward_ad_mode()`. A fresh backbone outputs 0 (zero-init output layers), so the CLI gives every
parameter random values first (`randomize_`). Tests: `pytest tests/unit/test_jvp_check.py`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sct.models.attention import forward_ad_mode


@dataclasses.dataclass
class JVPReport:
    fp64: float  # torch.func.jvp in float64 vs the float64 central difference
    fp64_dual: float  # forward_ad dual tensors in float64 vs the same reference
    fp32: float  # torch.func.jvp of the fp32 net vs the reference
    bf16: float  # under bf16 autocast vs the reference
    reference_norm: float

    def table(self) -> str:
        rows = [("JVP float64 (torch.func.jvp)", self.fp64), ("JVP float64 (forward_ad duals)", self.fp64_dual),
                ("JVP float32", self.fp32), ("JVP bf16 autocast", self.bf16)]
        lines = ["| JVP computed in | rel. error vs float64 central difference |", "|---|---|"]
        lines += [f"| {name} | {err:.2e} |" for name, err in rows]
        return "\n".join(lines) + f"\n(‖reference‖ = {self.reference_norm:.3e})"


def randomize_(net: nn.Module, seed: int = 1) -> nn.Module:
    """Every parameter random, zero-init ones included: N(0, 1/fan_in) for matrices, N(0, 0.3²) for vectors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            scale = fan_in ** -0.5 if p.ndim > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return net


def _jvp(f: Callable, primals: tuple, tangents: tuple) -> Tensor:
    with torch.no_grad(), forward_ad_mode():
        return torch.func.jvp(f, primals, tangents)[1]


def _dual_jvp(f: Callable, primals: tuple, tangents: tuple) -> Tensor:
    fwad = torch.autograd.forward_ad
    with torch.no_grad(), forward_ad_mode(), fwad.dual_level():
        out = f(*(fwad.make_dual(p, t) for p, t in zip(primals, tangents)))
        return fwad.unpack_dual(out).tangent


def _rel(a: Tensor, ref: Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def check_jvp(backbone: nn.Module, x: Tensor, noise_labels: Tensor, labels: Tensor | None = None,
              tx: Tensor | None = None, tn: Tensor | None = None, h: float = 1e-6, seed: int = 0) -> JVPReport:
    """JVP errors of `backbone` at (x, noise_labels) along (tx, tn) (random N(0, 1) if None); the module is not changed."""
    g = torch.Generator().manual_seed(seed)
    x64, n64 = x.double(), noise_labels.double()
    tx = torch.randn(x.shape, generator=g, dtype=torch.float64) if tx is None else tx.double()
    tn = torch.randn(noise_labels.shape, generator=g, dtype=torch.float64) if tn is None else tn.double()
    y64 = None if labels is None else labels.double()
    net64 = copy.deepcopy(backbone).double().eval()

    def f64(a: Tensor, b: Tensor) -> Tensor:
        return net64(a, b, y64)

    with torch.no_grad():
        ref = (f64(x64 + h * tx, n64 + h * tn) - f64(x64 - h * tx, n64 - h * tn)) / (2 * h)  # central difference
    if not ref.norm() > 0:
        raise ValueError("the central difference is 0: a fresh backbone is constant (zero-init output); randomize_ it first")
    net32 = copy.deepcopy(backbone).float().eval()
    y32 = None if labels is None else labels.float()
    p32, t32 = (x64.float(), n64.float()), (tx.float(), tn.float())

    def f32(a: Tensor, b: Tensor) -> Tensor:
        return net32(a, b, y32)

    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        bf16 = _jvp(f32, p32, t32)
    return JVPReport(
        fp64=_rel(_jvp(f64, (x64, n64), (tx, tn)), ref),
        fp64_dual=_rel(_dual_jvp(f64, (x64, n64), (tx, tn)), ref),
        fp32=_rel(_jvp(f32, p32, t32), ref),
        bf16=_rel(bf16, ref),
        reference_norm=ref.norm().item(),
    )


def main(argv: list[str] | None = None) -> int:
    from sct.config import ConfigError, parse_cli
    from sct.experiment import BACKBONES, TrainConfig

    parser = argparse.ArgumentParser(prog="python -m sct.jvp_check", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--jvp-attention", choices=["auto", "math", "chunked", "triton"], default=None,
                        help="override the backbone's jvp_attention")
    try:
        cfg, args = parse_cli(sys.argv[1:] if argv is None else argv, TrainConfig, parser)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    backbone_cfg = cfg.model.backbone
    if args.jvp_attention and hasattr(backbone_cfg, "jvp_attention"):
        backbone_cfg = dataclasses.replace(backbone_cfg, jvp_attention=args.jvp_attention)
    torch.manual_seed(cfg.run.seed)
    net = randomize_(BACKBONES[backbone_cfg.name](backbone_cfg))
    g = torch.Generator().manual_seed(cfg.run.seed)
    from pipelines.arrays import data_shape

    x = torch.randn(args.batch, *data_shape(cfg.data), generator=g)
    t = torch.rand(args.batch, generator=g) * 1.4 + 0.1
    labels = None
    if backbone_cfg.label_dim:
        labels = F.one_hot(torch.randint(0, backbone_cfg.label_dim, (args.batch,), generator=g), backbone_cfg.label_dim).float()
    print(f"backbone {backbone_cfg.name}, batch {args.batch}, inputs {tuple(x.shape)}")
    print(check_jvp(net, x, t, labels).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
