"""Switchable speed options of a built model (the `model:` keys `channels_last` and `compile`).

- `channels_last(net)`: the backbone's 4-D weights and its 4-D inputs in channels_last memory format, so
  convolutions run NHWC kernels (cuDNN's fastest on tensor cores). Values are unchanged; `build_model`
  applies it when `model.channels_last: true`.
- `compile_gradient_path(net, cfg)`: `model.compile: backbone` compiles the backbone (torch.compile,
  backend `model.compile_backend`) for the gradient-carrying forward and its backward only. The JVP
  (inside `forward_ad_mode()`) and no-grad calls (teacher, EMA, sampling) stay eager: forward-mode AD
  dual tensors under torch.compile fail on torch 2.14 (tests/unit/test_speed.py checks both). Call it
  after the EMA copy is made (a deep copy would share the compiled closure of the live model).

Tests: `pytest tests/unit/test_speed.py`.
"""
from __future__ import annotations

import torch
from torch import nn

from sct.models.attention import in_forward_ad_mode


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a for a in args)


def channels_last(net: nn.Module) -> nn.Module:
    """Convert the backbone's 4-D parameters and (by a forward pre-hook) its 4-D inputs to channels_last."""
    backbone = net.backbone
    backbone.to(memory_format=torch.channels_last)
    backbone.register_forward_pre_hook(_to_channels_last)
    return net


def compile_gradient_path(net: nn.Module, cfg) -> None:
    """`cfg.compile == "backbone"`: calls of net.backbone with gradients on and outside forward_ad_mode()
    go through torch.compile; every other call runs the eager module."""
    if cfg.compile == "none":
        return
    backbone = net.backbone
    eager = backbone._call_impl
    compiled = torch.compile(eager, backend=cfg.compile_backend)

    def call(*args, **kwargs):
        if torch.is_grad_enabled() and not in_forward_ad_mode():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    backbone._compiled_call_impl = call  # nn.Module.__call__ dispatches here (what Module.compile sets)
