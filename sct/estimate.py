"""What `python -m sct.train --dry-run` adds beyond the config: the model's name and size, and the activation
memory of one training step per GPU, measured on a reduced copy and scaled.

Method (`activation_bytes_per_sample`): build a reduced copy of the backbone (`shrink`): k times narrower (U-Net:
model_channels / k with k = model_channels / head_channels, so every level keeps its 64-channel heads and has
k times fewer; DiT: hidden_size / num_heads, one head) and with r times fewer pixels a side (the same levels and
attention placement at 1/r the resolution); run the run's objective once (forward, JVP tangent, the sCD teacher's
forward on a second net of the reduced size, loss) and the backward to the input, on the CPU (one thread) under
the run's precision, at batch 2 and at batch 1; take the peak bytes of the tensors each allocates
(sct.bench.memory.peak_bytes; parameters and their gradients are model states, counted by
`zero_model_state_bytes`). The difference is one sample's activations (what does not grow with the batch, such
as autocast's bf16 weight copies, cancels); the estimate is that x k x r² x the per-GPU micro-batch.
Assumptions: every activation tensor has a channel (or head) axis and a token axis, so activation bytes grow
linearly with width, with tokens and with batch (true with the chunked or Triton JVP attention and flash
attention, not with the math path's T x T scores); tests/unit/test_estimate.py checks the scaling against
direct measurements. The allocator's caching and fragmentation, NCCL buffers and ZeRO-3's gathered parameters
are not included.

Tests: `pytest tests/unit/test_estimate.py`.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from pipelines.data import data_shape, num_classes
from sct.bench.memory import peak_bytes
from sct.models.dit import DiTConfig
from sct.models.unet import UNetConfig
from sct.objectives.scm import SCM, SCDConfig, TeacherVelocity

# published names of the presets the 512 configs use (Lu & Song 2024, Table 4): ours have ~4% more parameters
# (adaptive double normalization)
PUBLISHED = {
    "edm2-xl": "the sCM paper's XL (1.1B): configs/sCM_xl_512.yaml, configs/sCT_xl_512.yaml, teacher configs/diffusion_xl_512.yaml",
    "edm2-xxl": "XXL, the sCM paper's '1.5B' model: configs/sCM_xxl_512.yaml, teacher configs/diffusion_xxl_512.yaml",
}


def model_line(backbone, n_params: int) -> str:
    """'# backbone parameters: 1,59... (unet preset edm2-xxl, 1.59B = the sCM paper's XXL, ...)'."""
    preset = getattr(backbone, "preset", None)
    name = backbone.name + (f" preset {preset}" if preset else "")
    known = f" = {PUBLISHED[preset]}" if preset in PUBLISHED else ""
    return f"# backbone parameters: {n_params:,} ({name}, {n_params / 1e9:.2f}B{known})"


def shrink(backbone) -> tuple[object, int, int]:
    """(a backbone config k times narrower with r times fewer pixels a side, same layout and head size; k; r).

    U-Net: model_channels / k with k = model_channels / head_channels (every level keeps its 64-channel heads,
    k times fewer of them), img_resolution and attn_resolutions / r while the input stays >= 16 px and the lowest
    level >= 2 px. DiT: hidden_size and num_heads / num_heads, img_resolution / r while >= 4 patches a side."""
    r = 1
    if isinstance(backbone, UNetConfig):
        k = backbone.model_channels // backbone.head_channels if backbone.model_channels % backbone.head_channels == 0 else 1
        down = 2 ** (len(backbone.channel_mult) - 1)
        while r < 4 and backbone.img_resolution // (2 * r) >= max(16, 2 * down) and all(a % (2 * r) == 0 for a in backbone.attn_resolutions):
            r *= 2
        return dataclasses.replace(backbone, preset=None, model_channels=backbone.model_channels // k, img_resolution=backbone.img_resolution // r,
                                   attn_resolutions=tuple(a // r for a in backbone.attn_resolutions)), k, r
    if isinstance(backbone, DiTConfig):
        k = backbone.num_heads
        while r < 4 and backbone.img_resolution // (2 * r) >= 4 * backbone.patch_size and (backbone.img_resolution // (2 * r)) % backbone.patch_size == 0:
            r *= 2
        return dataclasses.replace(backbone, preset=None, hidden_size=backbone.hidden_size // k, num_heads=1, img_resolution=backbone.img_resolution // r), k, r
    return backbone, 1, 1


def _objective(cfg, model_cfg):
    from sct.experiment import build_model, build_objective

    small = dataclasses.replace(cfg, model=model_cfg)
    if isinstance(cfg.objective, SCDConfig):  # the teacher: a second net of the student's (narrow) size, never read from disk
        return SCM(cfg.objective, cfg.model.precond.sigma_data, TeacherVelocity(build_model(model_cfg)))  # SCM sets the guidance
    return build_objective(small)


def activation_bytes(cfg, batch: int = 1, reduce: bool = True) -> tuple[float, int, int]:
    """(peak bytes allocated by one training step at `batch` on the reduced copy (or the model itself), k, r)."""
    from sct.experiment import build_model

    backbone, k, r = shrink(cfg.model.backbone) if reduce else (cfg.model.backbone, 1, 1)
    model_cfg = dataclasses.replace(cfg.model, backbone=backbone, init_from="")
    torch.manual_seed(0)
    net, objective = build_model(model_cfg), _objective(cfg, model_cfg)
    shape = list(data_shape(cfg.data))
    if r > 1:
        shape[-2:] = [shape[-2] // r, shape[-1] // r]
    x = torch.randn(batch, *shape, requires_grad=True)
    inputs = {"x": x}
    if num_classes(cfg.data):
        inputs["labels"] = torch.nn.functional.one_hot(torch.arange(batch) % num_classes(cfg.data), num_classes(cfg.data)).float()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16"):
            loss = objective(net, inputs, 10**9)  # a step after every warm-up
        return torch.autograd.grad(loss.mean(), x)  # the whole backward, without parameter gradients

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: threads only add contention
    try:
        _, peak = peak_bytes(step, "cpu")
    finally:
        torch.set_num_threads(threads)
    return float(peak), k, r


def activation_bytes_per_sample(cfg, reduce: bool = True) -> tuple[float, int, int]:
    """(bytes a sample on the reduced copy, k, r): peak at batch 2 minus batch 1, so that what does not grow with
    the batch (bf16 weight copies under autocast, the teacher's, embeddings of the time) cancels."""
    one, k, r = activation_bytes(cfg, 1, reduce)
    two, _, _ = activation_bytes(cfg, 2, reduce)
    return two - one, k, r


def activation_line(cfg, micro_batch: int) -> str:
    """'# activations per GPU ...': the estimate, with its method and assumptions in one line."""
    start = time.perf_counter()
    slope, k, r = activation_bytes_per_sample(cfg)
    per_sample = slope * k * r * r
    parts = "forward + JVP" if hasattr(cfg.objective, "tangent") else "forward"
    parts += " + teacher" if isinstance(cfg.objective, SCDConfig) else ""
    return (f"# activations per GPU, estimated: {_size(per_sample * micro_batch)} at micro-batch {micro_batch} ({_size(per_sample)} a sample: "
            f"peak of {parts} + backward at batch 2 minus batch 1 on a copy with 1/{k} the width and 1/{r}x{r} the pixels, "
            f"{cfg.run.precision}, measured on the CPU in {time.perf_counter() - start:.1f} s, then x{k} x{r * r} x{micro_batch}; assumes "
            "linear growth in width, tokens (true for the chunked/Triton/flash attention kernels) and batch; allocator overhead not included)")


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
