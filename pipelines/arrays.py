"""In-memory datasets that ship with a dependency, and an exactly resumable batch stream over them.

    fashion_mnist      Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), 28x28 2x2-averaged to 14x14, padded to 16x16
    digits             scikit-learn's bundled 8x8 digits, upsampled 2x to 16x16 (the fallback when Fashion-MNIST is absent)
    gaussian_mixture   8 Gaussians on a circle, 2-D points (the toy distribution)

Images are scaled to [-1, 1]; labels are one-hot. `ArrayStream` yields each rank's batches in an order
that is a pure function of (seed, position), so its state is a single integer and resume is exact.
"""
from __future__ import annotations

import gzip
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from loguru import logger
from torch import Tensor

from sct.config import ConfigError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHAPES = {"fashion_mnist": (1, 16, 16), "digits": (1, 16, 16), "gaussian_mixture": (2,)}


@dataclass
class ArrayDataConfig:
    name: Literal["array"] = "array"
    dataset: Literal["fashion_mnist", "digits", "gaussian_mixture", "auto"] = "auto"  # auto: Fashion-MNIST if installed, else digits (announced)
    root: str = str(FASHION_MNIST_DIR)  # folder of the four Fashion-MNIST idx .gz files
    class_conditional: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.dataset == "fashion_mnist" and not (Path(self.root) / "train-images-idx3-ubyte.gz").exists():
            raise ConfigError("root", f"no Fashion-MNIST at {self.root}: `apt-get install dataset-fashion-mnist`, or set dataset: digits")


def resolve_dataset(cfg: ArrayDataConfig) -> str:
    if cfg.dataset != "auto":
        return cfg.dataset
    return "fashion_mnist" if (Path(cfg.root) / "train-images-idx3-ubyte.gz").exists() else "digits"


def data_shape(cfg: ArrayDataConfig) -> tuple[int, ...]:
    return SHAPES[resolve_dataset(cfg)]


def num_classes(cfg: ArrayDataConfig) -> int:
    return 0 if not cfg.class_conditional or resolve_dataset(cfg) == "gaussian_mixture" else 10


def _read_idx(path: Path) -> np.ndarray:
    """IDX format (MNIST family): big-endian magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_arrays(cfg: ArrayDataConfig, split: str = "train") -> tuple[Tensor, Tensor]:
    """(x, labels one-hot or empty) for the configured dataset."""
    name = resolve_dataset(cfg)
    if cfg.dataset == "auto" and name == "digits":  # one line on the console and in log.txt: the user asked for the default
        logger.warning(f"data: no Fashion-MNIST at {cfg.root} (Debian's dataset-fashion-mnist: `apt-get install dataset-fashion-mnist`, "
                       f"or set data.root); falling back to scikit-learn's 8x8 digits")
    if name == "fashion_mnist":
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(Path(cfg.root) / f"{prefix}-images-idx3-ubyte.gz")
        classes = _read_idx(Path(cfg.root) / f"{prefix}-labels-idx1-ubyte.gz")
        x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1)[:, None]
        x = torch.nn.functional.avg_pool2d(x, 2)  # 28 -> 14: a CPU-sized demo
        x = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)  # 14 -> 16 for a 3-level U-Net
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images.astype(np.float32) / 8 - 1)[:, None]
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        classes = digits.target
    else:
        gen = torch.Generator().manual_seed(cfg.seed + (0 if split == "train" else 1))
        x = gaussian_mixture(50_000 if split == "train" else 5_000, gen)
        classes = np.zeros(len(x), dtype=np.int64)
    labels = torch.nn.functional.one_hot(torch.tensor(np.asarray(classes), dtype=torch.long), 10).float()
    if num_classes(cfg) == 0:
        labels = labels[:, :0]
    logger.info(f"data: {name} {split}, {len(x)} samples of shape {tuple(x.shape[1:])}, {labels.shape[1]} classes")
    return x, labels


def gaussian_mixture(n: int, generator: torch.Generator, modes: int = 8, radius: float = 0.7, std: float = 0.05) -> Tensor:
    """n points from `modes` Gaussians evenly spaced on a circle (per-coordinate std ≈ 0.5)."""
    k = torch.randint(modes, (n,), generator=generator)
    angle = 2 * math.pi * k.double() / modes
    centers = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return (centers + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


class ArrayStream:
    """Infinite shuffled epochs; rank r takes every world-th sample of the global order. State: the position."""

    def __init__(self, x: Tensor, labels: Tensor, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.x, self.labels = x, labels
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.position = 0  # global samples consumed by all ranks
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = len(self.x)
        idx = torch.empty(self.batch_size, dtype=torch.long)
        for j in range(self.batch_size):
            g = self.position + j * self.world_size + self.rank
            idx[j] = self._order(g // n)[g % n]
        self.position += self.batch_size * self.world_size
        batch = {"x": self.x[idx]}
        if self.labels.shape[1]:
            batch["labels"] = self.labels[idx]
        return batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
