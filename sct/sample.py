"""Generate from an inference snapshot: `python -m sct.sample --snapshot PATH --steps 2 --num N --out DIR` (or `sct-sample`).

Reads only the snapshot (EMA weights + model and sampling config). Writes a PNG grid (images; latents
decoded through the VAE the snapshot names, or `--vae`, else a per-channel preview: sct.decode) or a
scatter plot (2-D points) and `samples.pt` (tensor + seeds + labels; latents stay latents there). Sample i
uses seed `--seed + i`, so any subset can be regenerated exactly, whatever the batch size. `--export DIR` samples through an export
folder's standalone sampler instead (`python -m sct.export`), with the same seeds, labels and outputs. `--guidance W` sets the CFG scale of a
diffusion snapshot's ODE, or the scale input of a guidance-conditioned consistency student (objective.guidance_max).
A bad option or snapshot (missing, not an sct snapshot, --num/--steps/--batch < 1, --label outside the
snapshot's classes) exits 2 naming it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from sct.config import ConfigError, from_dict
from sct.decode import Pictures
from sct.samplers import SamplingConfig, generate, grid_labels


def write_grids(net: nn.Module, stem: Path, cfg: SamplingConfig, shape: tuple, classes: int, pictures: Pictures, device=None) -> list[Path]:
    """One picture per configured step count, 10 samples a row: `{stem}_{n}step.png` (the loop's sample cadence)."""
    seeds = range(cfg.seed, cfg.seed + cfg.num)
    labels = grid_labels(cfg.num, classes)
    labels = labels.to(device) if labels is not None else None
    paths = []
    for steps in cfg.steps:
        x = generate(net, cfg, steps, shape, seeds, labels, device).cpu()
        path = Path(f"{stem}_{steps}step.png")
        pictures.save(x, path, f"{steps}-step", nrow=10)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    from sct.experiment import load_snapshot_model

    p = argparse.ArgumentParser(prog="python -m sct.sample", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", type=Path, help="snapshot_*.safetensors written by sct.train")
    src.add_argument("--export", type=Path, help="a folder written by `python -m sct.export` (its standalone sampler.py)")
    p.add_argument("--steps", type=int, default=2, help="consistency steps (or ODE intervals for a diffusion snapshot)")
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--label", type=int, default=None, help="class of every sample (default: one class per row of 10)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale: of the ODE, or the input of a guidance-conditioned consistency student")
    p.add_argument("--vae", default=None, help="AutoencoderKL (hub name or folder) for latent snapshots (default: the one the snapshot records)")
    args = p.parse_args(argv)
    for name in ("steps", "num", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, got {args.guidance}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} exists and is not a folder")
    if args.export is not None:
        from sct.export import sample_export_cli

        return sample_export_cli(args)
    try:
        net, stored = load_snapshot_model(args.snapshot, "--snapshot")
        sampling = from_dict(SamplingConfig, stored.get("sampling", {}), source=str(args.snapshot))
        if not isinstance(stored.get("shape"), list):
            raise ConfigError("--snapshot", f"{args.snapshot}: its stored config has no sample 'shape'")
    except ConfigError as e:
        p.error(str(e))
    if args.label is not None and not 0 <= args.label < stored["model"]["backbone"]["label_dim"]:
        p.error(f"--label {args.label} is not a class of {args.snapshot} (label_dim {stored['model']['backbone']['label_dim']})")
    if args.guidance is not None:
        sampling.guidance = args.guidance
        conditioned = stored["model"]["backbone"].get("guidance_embedding", False)
        if sampling.method == "consistency" and args.guidance != 1.0 and not conditioned:
            p.error(f"--guidance: {args.snapshot} is a consistency model without a guidance input (train it with objective.guidance_max > 1)")
    sampling.steps, sampling.mids = (args.steps,), None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = net.to(device)
    shape, classes = tuple(stored["shape"]), stored["model"]["backbone"]["label_dim"]
    labels = grid_labels(args.num, classes)
    if args.label is not None and classes:
        labels = torch.nn.functional.one_hot(torch.full((args.num,), args.label), classes).float()
    chunks = []
    for lo in tqdm(range(0, args.num, args.batch), desc="sampling", unit="batch"):
        seeds = range(args.seed + lo, args.seed + min(lo + args.batch, args.num))
        lab = labels[lo : lo + len(seeds)].to(device) if labels is not None else None
        chunks.append(generate(net, sampling, args.steps, shape, seeds, lab, device).cpu())
    x = torch.cat(chunks)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({"samples": x, "seeds": list(range(args.seed, args.seed + args.num)), "labels": labels}, args.out / "samples.pt")
    picture = args.out / f"samples_{args.steps}step.png"
    latent = stored.get("latent")
    if latent is not None and args.vae is not None:
        latent = {**latent, "vae": args.vae}
    Pictures(latent, device).save(x, picture, f"{args.steps}-step", nrow=10)
    print(f"wrote {args.num} samples to {args.out / 'samples.pt'} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
