"""Switchable speed options of a built model (the `model:` keys `channels_last` and `compile`).

- `channels_last(net)` (by `build_model` when `model.channels_last: true`): the backbone's 4-D inputs are made
  channels_last by a forward pre-hook, so every convolution runs NHWC kernels (cuDNN's fastest on tensor
  cores; a conv's output keeps its input's format). Values are unchanged.
- `finish(modules, cfg, engine)` (after the EMA copy and the engine are built):
  - channels_last weights too, with the torch engine only: DeepSpeed broadcasts and flattens parameters as
    contiguous buffers (its `_broadcast_model` rejects channels_last tensors), so under ZeRO 0-3 the
    convolutions convert their weights per call;
  - `model.compile: backbone`: torch.compile (backend `model.compile_backend`) of the backbone for the
    gradient-carrying forward and its backward only. The JVP (inside `forward_ad_mode()`) and no-grad calls
    (teacher, EMA, sampling) stay eager: on torch 2.14 dynamo refuses inputs that carry a forward-mode
    tangent (graph break "Attempted to wrap a dual tensor input") and runs those frames eagerly anyway.
    Made after the EMA copy: a deep copy would share the compiled closure of the live model.

Tests: `pytest tests/unit/test_speed.py`.
"""
from __future__ import annotations

import torch
from torch import nn

from sct.models.attention import in_forward_ad_mode


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


def channels_last(net: nn.Module) -> nn.Module:
    """Make the backbone's 4-D inputs channels_last (a forward pre-hook)."""
    net.backbone.register_forward_pre_hook(_to_channels_last)
    return net


def finish(modules: list[nn.Module], cfg, engine: str) -> None:
    """channels_last weights of `modules` (torch engine) and the compiled gradient path of modules[0].backbone."""
    if cfg.channels_last and engine == "torch":
        for module in modules:
            for p in module.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
    if cfg.compile == "backbone":
        compile_gradient_path(modules[0].backbone, cfg.compile_backend)


def compile_gradient_path(backbone: nn.Module, backend: str) -> None:
    """Calls of `backbone` with gradients on and outside forward_ad_mode() go through torch.compile; every
    other call runs the eager module."""
    eager = backbone._call_impl
    compiled = torch.compile(eager, backend=backend)

    def call(*args, **kwargs):
        if torch.is_grad_enabled() and not in_forward_ad_mode():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    backbone._compiled_call_impl = call  # nn.Module.__call__ dispatches here (what Module.compile sets)
