"""PNG files people look at: sample grids, 2-D point clouds, loss curves (`plot_losses`: a run's loss.png).

Plots use matplotlib's Agg canvas directly (`Figure` + `FigureCanvasAgg`, no pyplot), so they work
headless and never touch the process-wide backend or pyplot's global figure state.

Tests: `pytest tests/unit/test_images.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor

MIN_GRID_WIDTH = 256  # px; smaller grids are upscaled (nearest neighbour) by an integer factor
PAD_VALUE = 128  # grey separators stay visible between black and white images


def save_image_grid(
    images: Tensor,
    path: Path,
    nrow: int | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> None:
    """Tile images [N, C, H, W] (C in {1, 3}, values in `value_range`) into one PNG.

    `nrow` is the number of images per row (default: ceil(sqrt(N))). Each image is upscaled by
    k = ceil(256 / (nrow * W)) (at least 1); separators are 1 px for images under 32 px, else 2 px.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"expected images [N, C in {{1, 3}}, H, W], got {tuple(images.shape)}")
    n, c, h, w = images.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0.0, 1.0)
    x = (x * 255.0).round().to(torch.uint8)
    k = max(1, math.ceil(MIN_GRID_WIDTH / (ncol * w)))
    x = x.repeat_interleave(k, dim=2).repeat_interleave(k, dim=3)
    pad = 1 if max(h, w) < 32 else 2
    hk, wk = h * k, w * k
    grid = np.full((nrows * (hk + pad) + pad, ncol * (wk + pad) + pad, c), PAD_VALUE, np.uint8)
    for i in range(n):
        top, left = pad + (i // ncol) * (hk + pad), pad + (i % ncol) * (wk + pad)
        grid[top : top + hk, left : left + wk] = x[i].permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path, format="PNG")


def _to_numpy(a: np.ndarray | Tensor) -> np.ndarray:
    return a.detach().float().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a, np.float64)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)


def save_scatter(points: dict[str, np.ndarray | Tensor], path: Path, title: str = "") -> None:
    """One panel per key, each a 2-D point cloud [N, 2]; all panels share the same axis limits."""
    clouds = {k: _to_numpy(v) for k, v in points.items()}
    for k, v in clouds.items():
        if v.ndim != 2 or v.shape[1] != 2:
            raise ValueError(f"points[{k!r}] must be [N, 2], got {v.shape}")
    if not clouds:
        raise ValueError("save_scatter needs at least one point cloud")
    allpts = np.concatenate(list(clouds.values()))
    allpts = allpts[np.isfinite(allpts).all(axis=1)]
    lo, hi = (allpts.min(0), allpts.max(0)) if len(allpts) else (np.zeros(2) - 1, np.ones(2))
    margin = 0.05 * np.maximum(hi - lo, 1e-6)
    fig = Figure(figsize=(4 * len(clouds), 4.3))
    for i, (key, v) in enumerate(clouds.items()):
        ax = fig.add_subplot(1, len(clouds), i + 1)
        ax.scatter(v[:, 0], v[:, 1], s=2, alpha=0.5, linewidths=0)
        ax.set_xlim(lo[0] - margin[0], hi[0] + margin[0])
        ax.set_ylim(lo[1] - margin[1], hi[1] + margin[1])
        ax.set_aspect("equal", adjustable="box")
        ax.set_title(key)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def save_curve(
    series: dict[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]], path: Path, title: str = "",
    logy: bool = False, xlabel: str = "",
) -> None:
    """Plot each series on one set of axes: `ys` against its index, or an `(xs, ys)` pair (e.g. loss against step)."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for key, ys in series.items():
        xs, ys = ys if isinstance(ys, tuple) else (np.arange(len(ys)), ys)
        ax.plot(np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64), label=key)
    if xlabel:
        ax.set_xlabel(xlabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if series:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_losses(run_dir: Path) -> None:
    """`run_dir/loss.png`: the loss of every tick in `metrics.jsonl` against its step (ticks of a resumed run included)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    ticks = [r for r in records if "loss" in r and "step" in r]
    save_curve({"loss": ([r["step"] for r in ticks], [r["loss"] for r in ticks])}, Path(run_dir) / "loss.png",
               title=f"{Path(run_dir).name}: loss per tick", xlabel="step")
