"""Samples -> pictures: what a snapshot records for decoding, the VAE that decodes latents, the fallback preview.

- `latent_entry(manifest, vae)`: the snapshot's "latent" entry for a run on latent shards: the manifest's
  per-channel statistics (mean, std, sigma_data) that normalized the latents and the AutoencoderKL that made
  them (`sampling.vae` when set, else the manifest's "vae"); None for any other data.
- `Pictures(latent, device)`: turns generated samples into PNGs. Latents go through the VAE
  (`pipelines.encode.decode`, which inverts the normalization); the VAE, a hub name or a local folder, is
  loaded once on first use. When it cannot be loaded (or a snapshot records none), or when samples have a
  channel count that is not an image's, each channel becomes a greyscale tile instead (standardized per
  channel over the batch, +-3 std -> black..white; one strip of C tiles per sample), with a one-line warning.

Tests: `pytest tests/unit/test_decode.py tests/integration/test_latent_samples.py`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor

from sct.images import save_image_grid, save_scatter

DECODE_BATCH = 16  # latents per VAE decoder call (bounds its activation memory at 512x512)


def latent_entry(manifest: dict | None, vae: str = "") -> dict | None:
    """{"stats": manifest stats, "vae": name or folder} for latent shards, else None."""
    if manifest is None or manifest.get("kind") != "latents":
        return None
    return {"stats": manifest["stats"], "vae": vae or manifest.get("vae", "")}


def channel_preview(x: Tensor) -> Tensor:
    """[N, C, H, W] -> [N * C, 1, H, W] greyscale in [-1, 1]: each channel standardized over the batch, +-3 std."""
    x = x.detach().float().cpu()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True, correction=0).nan_to_num(1.0).clamp_min(1e-8)
    return ((x - mean) / (3 * std)).clamp(-1, 1).reshape(-1, 1, *x.shape[2:])


class Pictures:
    """Writes samples as PNGs: decoded latents, images as they are, a per-channel preview otherwise."""

    def __init__(self, latent: dict | None = None, device: torch.device | str = "cpu"):
        self.latent, self.device = latent, torch.device(device)
        self._vae, self._tried, self._warned = None, False, False

    def vae(self):
        """The AutoencoderKL (loaded on first call), or None with a one-line warning when it cannot be loaded."""
        if not self._tried:
            self._tried = True
            name = (self.latent or {}).get("vae", "")
            if not name:
                self._warn("the snapshot records no VAE (set sampling.vae or pass --vae)")
                return None
            from pipelines.encode import load_vae

            try:
                if _looks_local(name) and not Path(name.partition("#")[0]).expanduser().is_dir():  # not a hub name: no network round trip
                    raise FileNotFoundError("no such folder")
                self._vae = load_vae(str(Path(name).expanduser()) if _looks_local(name) else name, device=str(self.device))
            except Exception as e:  # noqa: BLE001 - any reason (missing, corrupt, offline hub): previews instead of a crash
                self._warn(f"cannot load the VAE {name!r}: {type(e).__name__}: {_first_line(e)}")
        return self._vae

    def _warn(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(f"samples: {reason}; writing per-channel latent previews instead of decoded images")

    def images(self, x: Tensor) -> tuple[Tensor, int | None]:
        """(pictures [M, C in {1, 3}, H, W] in [-1, 1], channels per sample when it is a preview else None)."""
        if x.ndim == 4 and self.latent is not None and self.vae() is not None:
            from pipelines.encode import decode

            return torch.cat([decode(self._vae, chunk, self.latent["stats"]) for chunk in x.split(DECODE_BATCH)]), None
        if x.ndim == 4 and (x.shape[1] not in (1, 3) or self.latent is not None):
            if self.latent is None:
                self._warn(f"samples have {x.shape[1]} channels and the snapshot records no latent statistics")
            return channel_preview(x), x.shape[1]
        return x, None

    def save(self, x: Tensor, path: Path, label: str, nrow: int | None = None) -> None:
        """Images [N, C, H, W] as a grid `nrow` samples wide (default ~sqrt N), 2-D points as a scatter plot."""
        if x.ndim != 4:
            save_scatter({label: x}, path)
            return
        pictures, channels = self.images(x)
        per_row = min(nrow or math.ceil(math.sqrt(x.shape[0])), x.shape[0])
        save_image_grid(pictures, path, nrow=per_row * (channels or 1))


def _looks_local(name: str) -> bool:
    """A folder, not a hub repo id ('org/name'): absolute, relative with ./ or ~, or more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
