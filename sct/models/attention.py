"""Attention with a forward-mode (JVP) path, shared by every backbone, and the dispatch between its kernels.

Owns: `attention(q, k, v, jvp_impl)`, the `forward_ad_mode()` flag, and `math_attention` (the reference).

    outside forward_ad_mode()     F.scaled_dot_product_attention (the fastest fused kernel; gradients)
    inside, gradients needed      math_attention (plain ops: both forward- and reverse-mode AD work)
    inside, jvp_impl "math"       math_attention (materializes the L x L scores and their tangent)
    inside, jvp_impl "chunked"    sct.models.chunked_attention: online softmax with tangent, O(L) memory
    inside, jvp_impl "triton"     sct.models.triton_attention: the same algorithm as one Triton kernel (CUDA)
    inside, jvp_impl "auto"       "triton" on CUDA when Triton imports and the dtype is 16/32-bit, else "chunked"

The fused CPU, flash and efficient SDPA kernels have no forward-AD formula (NotImplementedError under
`torch.func.jvp` / `torch.autograd.forward_ad`), so the objectives wrap their tangent computation in
`with forward_ad_mode(): ...`; the chunked and Triton paths are `autograd.Function`s with a `jvp`
staticmethod, so they work under both `torch.func.jvp` and dual tensors, and have no backward.
The flag is thread-local and nests. Tests: `pytest tests/unit/test_attention.py`.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

JVPAttention = Literal["auto", "math", "chunked", "triton"]
JVP_IMPLS: tuple[str, ...] = ("auto", "math", "chunked", "triton")

_state = threading.local()


def in_forward_ad_mode() -> bool:
    """True inside a `forward_ad_mode()` block on this thread."""
    return getattr(_state, "depth", 0) > 0


@contextmanager
def forward_ad_mode() -> Iterator[None]:
    """Route `attention()` through a forward-mode-differentiable path on this thread."""
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


def resolve_jvp_impl(q: Tensor, jvp_impl: str = "auto") -> str:
    """The JVP kernel `attention()` uses for `q` inside `forward_ad_mode()` ("math", "chunked" or "triton")."""
    if jvp_impl not in JVP_IMPLS:
        raise ValueError(f"jvp_impl must be one of {JVP_IMPLS}, got {jvp_impl!r}")
    if jvp_impl != "auto":
        return jvp_impl
    from sct.models import triton_attention

    if q.is_cuda and q.dtype in triton_attention.DTYPES and triton_attention.available():
        return "triton"
    return "chunked"


def _needs_grad(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def attention(q: Tensor, k: Tensor, v: Tensor, jvp_impl: JVPAttention = "auto") -> Tensor:
    """Scaled dot-product attention [B, heads, L, d]; JVP-capable under `forward_ad_mode()`."""
    if not in_forward_ad_mode():
        return F.scaled_dot_product_attention(q, k, v)
    impl = resolve_jvp_impl(q, jvp_impl)
    if impl == "math" or _needs_grad(q, k, v):  # the chunked/Triton Functions have no backward
        return math_attention(q, k, v)
    if impl == "triton":
        from sct.models.triton_attention import triton_jvp_attention

        return triton_jvp_attention(q, k, v)
    from sct.models.chunked_attention import chunked_jvp_attention

    return chunked_jvp_attention(q, k, v)
