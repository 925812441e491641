"""Package a consistency snapshot as a standalone few-step sampler folder.

    python -m sct.export --snapshot runs/x/snapshots/snapshot_000010000.safetensors --out export/ [--dtype fp32|bf16] [--steps 2] [--torch-export]
    python -m sct.sample --export export/ --num 100 --out out/           # or: python export/sampler.py --out grid.png

The folder holds:
    weights.safetensors   the snapshot's EMA weights (fp32, or bf16 to halve the size; the loader computes in fp32)
    sampler.json          steps, the intermediate times of every step count up to --steps, sigma_data, guidance,
                          latent statistics and VAE (when the snapshot has them), class count, shape, the
                          model (backbone + parameterization) config and the sha256 of the weights
    sampler.py            the loader: a copy of `sct/export_template/sampler.py`. It needs only torch (diffusers
                          to decode latents), imports nothing from sct and unpickles nothing: it carries an
                          inference copy of the backbones and reads safetensors by hand.
    sampler.pt2           (--torch-export) the `torch.export` program of the --steps sampler, inputs
                          (noise [steps, B, *shape], labels [B, classes]): for runtimes that take a program.
                          Loading it with `torch.export.load` unpickles parts of the archive (weights_only):
                          the no-pickle path is sampler.py.
Why a source copy rather than only a program: a .pt2 is tied to the torch version that wrote it and is
loaded through pickle; the copy is plain code, and the test holds it to sct's models bitwise
(tests/unit/test_export.py: same seeds -> identical samples on CPU in fp32, and sct not importable).
Exit status 2 with `error: ...` for a missing snapshot, a diffusion (ODE) snapshot, or bad --steps.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from sct.cli_errors import UsageError, check_steps, guarded, open_snapshot
from sct.config import from_dict
from sct.samplers import SamplingConfig, configured_mids

TEMPLATE = Path(__file__).parent / "export_template" / "sampler.py"
MAX_STEPS = 8


def sampler_spec(net: nn.Module, stored: dict, steps: int) -> dict:
    """Everything besides weights that the standalone sampler needs (written as sampler.json)."""
    sampling = from_dict(SamplingConfig, stored["sampling"], source="snapshot sampling config")
    model = stored["model"]
    return {
        "format": "sct-export/1",
        "steps": steps,
        "mids": {str(n): [float(m) for m in configured_mids(net, sampling, n)] for n in range(1, steps + 1)},
        "s_max": float(net.s_max),
        "sigma_data": float(net.sigma_data),
        "guidance": sampling.guidance,
        "num_classes": model["backbone"]["label_dim"],
        "shape": list(stored["shape"]),
        "latent": stored.get("latent"),
        "model": {"backbone": model["backbone"], "precond": model["precond"]},
    }


class FewStepProgram(nn.Module):
    """The fixed-step sampler as one graph: x ← f(prior(z_0), s_max); x ← f(renoise(x, s_k, z_k), s_k)."""

    def __init__(self, net: nn.Module, mids: list[float]):
        super().__init__()
        self.net, self.mids = net, mids

    def forward(self, noise: Tensor, labels: Tensor | None = None) -> Tensor:
        s_max = torch.full((noise.shape[1],), self.net.s_max, device=noise.device)
        x = self.net.consistency(self.net.prior(noise[0]), s_max, labels)
        for k, s in enumerate(self.mids):
            x = self.net.consistency(self.net.renoise(x, s, noise[k + 1]), torch.full_like(s_max, s), labels)
        return x


def torch_export_program(net: nn.Module, spec: dict, path: Path) -> None:
    """torch.export the spec's --steps sampler with a dynamic batch and save it as a .pt2 archive."""
    steps, shape, classes = spec["steps"], tuple(spec["shape"]), spec["num_classes"]
    program = FewStepProgram(net, spec["mids"][str(steps)])
    batch = torch.export.Dim("batch", min=1, max=65536)
    noise = torch.zeros(steps, 2, *shape)
    args = (noise, torch.zeros(2, classes)) if classes else (noise,)
    dynamic = ({1: batch}, {0: batch}) if classes else ({1: batch},)
    torch.export.save(torch.export.export(program, args, dynamic_shapes=dynamic), path)


def export(snapshot: Path, out: Path, dtype: str = "fp32", steps: int = 2, with_program: bool = False) -> Path:
    net, stored = open_snapshot(snapshot)
    if stored["sampling"].get("method") == "ode":
        raise UsageError(f"{snapshot} is a diffusion (ODE) snapshot; export packages a consistency model's few-step sampler")
    check_steps(steps, MAX_STEPS)
    spec = sampler_spec(net, stored, steps)
    out.mkdir(parents=True, exist_ok=True)
    cast = torch.bfloat16 if dtype == "bf16" else torch.float32
    tensors = {k: (v.to(cast) if v.dtype == torch.float32 else v).contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, out / "weights.safetensors", metadata={"format": "sct-export/1", "dtype": dtype})
    spec["weights_sha256"] = hashlib.sha256((out / "weights.safetensors").read_bytes()).hexdigest()
    spec["weights_dtype"] = dtype
    spec["source_snapshot"] = Path(snapshot).name
    (out / "sampler.json").write_text(json.dumps(spec, indent=2) + "\n")
    shutil.copyfile(TEMPLATE, out / "sampler.py")
    if with_program:
        torch_export_program(net, spec, out / "sampler.pt2")
    return out


def load_export(folder: Path, device: str = "cpu"):
    """The folder's own sampler.py, imported by path (it imports nothing from sct), loaded on `device`."""
    folder = Path(folder)
    for name in ("sampler.py", "sampler.json", "weights.safetensors"):
        if not (folder / name).is_file():
            raise UsageError(f"{folder} is not an sct export folder: {name} is missing")
    spec = importlib.util.spec_from_file_location(f"sct_export_{hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:8]}", folder / "sampler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(folder, device)


@guarded
def sample_export_cli(args: argparse.Namespace) -> int:
    """`python -m sct.sample --export DIR`: the snapshot path's seeds, labels and outputs, through the export."""
    from sct.images import save_image_grid, save_scatter
    from sct.samplers import grid_labels

    sampler = load_export(args.export, "cuda" if torch.cuda.is_available() else "cpu")
    steps = check_steps(args.steps, sampler.spec["steps"])
    conditioned = sampler.spec["model"]["backbone"].get("guidance_embedding", False)
    if args.guidance is not None and args.guidance != sampler.spec["guidance"] and not conditioned:
        raise UsageError(f"--guidance {args.guidance}: this export has no guidance input (it samples at {sampler.spec['guidance']})")
    labels = grid_labels(args.num, sampler.classes)
    classes = labels.argmax(1) if labels is not None else None
    if args.label is not None and sampler.classes:
        if not 0 <= args.label < sampler.classes:
            raise UsageError(f"--label must be in [0, {sampler.classes}), got {args.label}")
        classes = torch.full((args.num,), args.label)
        labels = torch.nn.functional.one_hot(classes, sampler.classes).float()
    chunks = []
    for lo in range(0, args.num, args.batch):
        seeds = range(args.seed + lo, args.seed + min(lo + args.batch, args.num))
        chunk = sampler.sample(seeds, None if classes is None else classes[lo : lo + len(seeds)].tolist(), steps, args.guidance)
        chunks.append(chunk.cpu())
    x = torch.cat(chunks)  # model space: latents stay latents in samples.pt
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"samples": x, "seeds": list(range(args.seed, args.seed + args.num)), "labels": labels}, args.out / "samples.pt")
    picture = args.out / f"samples_{steps}step.png"
    if x.ndim == 4:
        save_image_grid(sampler.decode(x), picture, nrow=10)
    else:
        save_scatter({f"{steps}-step": x}, picture)
    print(f"wrote {args.num} samples to {args.out / 'samples.pt'} and {picture}")
    return 0


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshot", type=Path, required=True, help="a consistency snapshot (sCT, sCD or iCT) written by sct.train")
    p.add_argument("--out", type=Path, required=True, help="the export folder (created)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="storage dtype of weights.safetensors")
    p.add_argument("--steps", type=int, default=2, help=f"largest step count (1..{MAX_STEPS}); every smaller count is exported too")
    p.add_argument("--torch-export", action="store_true", help="also write sampler.pt2 (torch.export program of the --steps sampler)")
    args = p.parse_args(argv)
    out = export(args.snapshot, args.out, args.dtype, args.steps, args.torch_export)
    print(f"exported {args.snapshot} to {out} (sampler.py, sampler.json, weights.safetensors{', sampler.pt2' if args.torch_export else ''})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
