"""FLOP count of one training step per sample, model-state memory per GPU, and MFU.

- `step_flops_per_sample(objective, net, batch, step)`: FlopCounterMode over one objective call +
  backward on a plain (unsharded) module: the forward, the JVP's tangent ops (forward-mode AD
  dispatches them as aten ops, so they are counted, not estimated), the teacher and the backward.
- `PEAK_FLOPS`: dense peak FLOP/s per device by name and precision; MFU is None on CPU or unknown GPUs.
- `lowest_zero_stage(n, world, gpu_bytes, n_frozen)`: the lowest stage whose model states fit a GPU (`--dry-run --gpu-memory-gib`).
- `zero_model_state_bytes(n, stage, world, ...)`: DeepSpeed's ZeRO formula (Rajbhandari et al. 2020):
  "bf16" (DeepSpeed mixed precision) keeps 2 (params) + 2 (grads) + 12 (fp32 master, Adam m and v)
  bytes per parameter, "fp32" (ours: bf16 compute is autocast) 4 + 4 + 8; stage 1 partitions the
  optimizer part, stage 2 also the gradients, stage 3 also the parameters.

Tests: `pytest tests/unit/test_flops.py`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

PEAK_FLOPS = {  # dense, no sparsity: (name substring, {precision: FLOP/s})
    "H200": {"bf16": 989e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():
        if key in name:
            return table[precision]
    return None


def step_flops_per_sample(objective: nn.Module, net: nn.Module, batch: dict, step: int) -> float:
    """FLOPs of forward + JVP + teacher + backward for one step, divided by the batch size."""
    with FlopCounterMode(display=False) as counter:
        loss = objective(net, batch, step)
        loss.mean().backward()
    net.zero_grad(set_to_none=True)
    objective.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["x"].shape[0]


def zero_model_state_bytes(n_params: int, stage: int, world: int, precision: str = "bf16",
                           n_frozen: int = 0, ema: bool = True, ema_sharded: bool = False) -> dict[str, float]:
    """Bytes per GPU of parameters, gradients and Adam states (+ a frozen teacher and the fp32 EMA)."""
    p_bytes, g_bytes, o_bytes = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    parts = {
        "params": n_params * p_bytes / (world if stage >= 3 else 1),
        "grads": n_params * g_bytes / (world if stage >= 2 else 1),
        "optimizer": n_params * o_bytes / (world if stage >= 1 else 1),
        "teacher": n_frozen * p_bytes / (world if stage >= 3 else 1),
        "ema": n_params * 4 / (world if ema_sharded else 1) if ema else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


def lowest_zero_stage(n_params: int, world: int, gpu_bytes: float, n_frozen: int = 0) -> tuple[int | None, dict[str, float]]:
    """The lowest ZeRO stage whose model states (our fp32 weights/grads/Adam + EMA + frozen teacher) fit in
    `gpu_bytes` per GPU, with its `zero_model_state_bytes` parts; (None, ZeRO-3's parts) when none fits.
    Lower stages communicate less: ZeRO-1/2 move what data parallelism moves, ZeRO-3 gathers every weight
    in every pass (forward, JVP, backward)."""
    for stage in range(4):
        mem = zero_model_state_bytes(n_params, stage, world, "fp32", n_frozen=n_frozen, ema_sharded=stage == 3)
        if mem["total"] <= gpu_bytes:
            return stage, mem
    return None, mem
