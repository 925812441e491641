"""Attention with a forward-mode (JVP) path, shared by every backbone.

Owns: `attention(q, k, v)`, which uses the fused `F.scaled_dot_product_attention` normally and the
plain-ops `math_attention` while `forward_ad_mode()` is active. The fused CPU, flash and efficient
kernels have no forward-AD formula (NotImplementedError under `torch.func.jvp` / `forward_ad`), so the
objectives wrap their tangent computation in `with forward_ad_mode(): torch.func.jvp(...)`.
The flag is thread-local and nests. Tests: `pytest tests/unit/test_unet.py -k attention`.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

_state = threading.local()


def in_forward_ad_mode() -> bool:
    """True inside a `forward_ad_mode()` block on this thread."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def forward_ad_mode() -> Iterator[None]:
    """Route `attention()` through `math_attention` (differentiable in forward mode) on this thread."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v with plain ops; q, k, v [B, heads, L, d] -> [B, heads, L, d]."""
    scores_BHLL = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if scores_BHLL.dtype in (torch.float16, torch.bfloat16):
        scores_BHLL = scores_BHLL.float()  # softmax in >= fp32, like the fused kernels
    weights_BHLL = torch.softmax(scores_BHLL, dim=-1).to(v.dtype)
    return torch.matmul(weights_BHLL, v)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Scaled dot-product attention [B, heads, L, d]; JVP-capable under `forward_ad_mode()`."""
    if in_forward_ad_mode():
        return math_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
