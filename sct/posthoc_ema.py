"""Reconstruct an EMA snapshot at any EMA length from the profiles a run stored (EDM2 post-hoc EMA, §3):

    python -m sct.posthoc_ema --run runs/diffusion_xl_512 --sigma-rel 0.02 --out teachers/xl_ema0.020.safetensors [--step N]

Reads `<run>/phema/phema_*.safetensors` (written during training when `ema.posthoc` is set, `sct.phema`),
solves the least-squares coefficients of the stored power-function profiles for the wanted profile
ending at step N (default: the latest stored step; N must be one of the stored steps), and writes
their weighted sum, accumulated in float64, as an ordinary snapshot: `sct.sample` reads it, and so do
`objective.teacher` and `model.init_from`. Works for teachers and students alike.
Exit status: 0 done, 2 bad arguments or no usable profiles (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sct.checkpoint import CONFIG_KEY, EXTRA_KEY, save_snapshot
from sct.ema import power_gamma_from_std
from sct.phema import PROFILE_FILE, solve_coefficients


def list_profiles(folder: Path) -> list[tuple[int, float, Path]]:
    """(step, sigma_rel, path) of every stored profile, from each file's metadata, sorted by step."""
    found = []
    for path in sorted(Path(folder).glob("phema_*.safetensors")):
        if not PROFILE_FILE.match(path.name):
            continue
        with safe_open(path, framework="pt", device="cpu") as f:
            extra = json.loads((f.metadata() or {}).get(EXTRA_KEY, "{}"))
        if "step" in extra and "sigma_rel" in extra:
            found.append((int(extra["step"]), float(extra["sigma_rel"]), path))
    return sorted(found)


def reconstruct(profiles: list[tuple[int, float, Path]], sigma_rel: float, step: int | None = None) -> tuple[dict, dict, dict]:
    """(state_dict, stored config, extra) of the EMA of length `sigma_rel` ending at `step` (default: latest)."""
    power_gamma_from_std(sigma_rel)  # raises ValueError outside (0, 0.2887)
    if not profiles:
        raise ValueError("no stored post-hoc EMA profiles")
    steps = sorted({s for s, _, _ in profiles})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"step {step} is not a stored step (stored: {steps[0]} .. {steps[-1]}, {len(steps)} steps)")
    used = [p for p in profiles if 0 < p[0] <= step]
    coefs = solve_coefficients([s for s, _, _ in used], [r for _, r, _ in used], step, sigma_rel)
    out: dict[str, torch.Tensor] = {}
    for c, (_, _, path) in zip(coefs, used):
        for k, v in load_file(path).items():
            if not v.is_floating_point():
                out[k] = v  # integer buffers: the latest wins
                continue
            acc = out.setdefault(k, torch.zeros(v.shape, dtype=torch.float64))
            acc.add_(v.double(), alpha=float(c))
    dtypes = {k: v.dtype for k, v in load_file(used[-1][2]).items()}
    state = {k: v.to(dtypes[k]) for k, v in out.items()}
    with safe_open(used[-1][2], framework="pt", device="cpu") as f:
        config = json.loads(f.metadata()[CONFIG_KEY])
    return state, config, {"step": step, "sigma_rel": sigma_rel, "posthoc_inputs": len(used)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="run folder (holds phema/)")
    p.add_argument("--sigma-rel", type=float, required=True, help="EMA length to reconstruct, in (0, 0.2887)")
    p.add_argument("--out", type=Path, required=True, help="snapshot to write (.safetensors)")
    p.add_argument("--step", type=int, default=None, help="training step the EMA ends at (default: the latest stored)")
    args = p.parse_args(argv)
    folder = args.run / "phema"
    try:
        profiles = list_profiles(folder) if folder.is_dir() else []
        if not profiles:
            raise ValueError(f"{folder}: no post-hoc EMA profiles (train with ema.posthoc.sigma_rels and ema.posthoc.every)")
        state, config, extra = reconstruct(profiles, args.sigma_rel, args.step)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_snapshot(args.out, state, config, extra=extra)
    print(f"wrote {args.out}: EMA length {args.sigma_rel} at step {extra['step']} from {extra['posthoc_inputs']} stored profiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
