"""Memory-efficient attention JVP in plain PyTorch: online softmax over key chunks, carrying the tangent.

Owns: `online_attention(q, k, v, tq, tk, tv)` -> (O, dO) and `chunked_jvp_attention(q, k, v)`, an
`autograd.Function` whose `jvp` staticmethod returns dO, so `torch.func.jvp` and `forward_ad` dual
tensors both use it. It never holds more than one [q_chunk, k_chunk] block of scores, probabilities
and score tangents at a time (per batch and head), so memory is O(L·d + q_chunk·k_chunk), not O(L²).

Math (S = q kᵀ/√d, P = softmax_rows(S), O = P v):
    dS = (dq kᵀ + q dkᵀ)/√d
    dP = P ⊙ (dS − rowsum(P ⊙ dS))
    dO = dP v + P dv = Σ_j P_j (dS_j v_j + dv_j) − μ O,   μ = rowsum(P ⊙ dS)
Streaming over key blocks j with the running max m and sum l, every accumulator (l, O, μ, Σ P(dS v + dv))
is rescaled by exp(m_old − m_new), exactly as flash attention rescales O. Accumulation is fp32 for
16-bit inputs (fp64 stays fp64). The Triton kernel in `sct.models.triton_attention` is the same algorithm.
There is no backward: `sct.models.attention.attention` uses it only when no gradient is needed.
Tests: `pytest tests/unit/test_attention.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Q_CHUNK = 256
K_CHUNK = 256


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def online_attention(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                     tv: Tensor | None = None, q_chunk: int = Q_CHUNK, k_chunk: int = K_CHUNK) -> tuple[Tensor, Tensor | None]:
    """(O, dO) of softmax(q kᵀ/√d) v along tangents (tq, tk, tv) (None = zero); dO is None without tangents.

    q [..., Lq, d], k [..., Lk, d], v [..., Lk, dv]; outputs in q's dtype.
    """
    with_tangent = any(t is not None for t in (tq, tk, tv))
    dt, scale = _acc_dtype(q), 1.0 / math.sqrt(q.shape[-1])
    Lq, Lk = q.shape[-2], k.shape[-2]
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    tout = torch.empty_like(out) if with_tangent else None
    for i0 in range(0, Lq, q_chunk):
        qi = q[..., i0:i0 + q_chunk, :].to(dt) * scale
        tqi = None if tq is None else tq[..., i0:i0 + q_chunk, :].to(dt) * scale
        m = qi.new_full(qi.shape[:-1], -math.inf)  # running row max of S
        l = qi.new_zeros(qi.shape[:-1])  # running Σ exp(S − m)
        acc = qi.new_zeros(*qi.shape[:-1], v.shape[-1])  # Σ exp(S − m) v
        mu = torch.zeros_like(l) if with_tangent else None  # Σ exp(S − m) dS
        acc_t = torch.zeros_like(acc) if with_tangent else None  # Σ exp(S − m) (dS v + dv)
        for j0 in range(0, Lk, k_chunk):
            kj, vj = k[..., j0:j0 + k_chunk, :].to(dt), v[..., j0:j0 + k_chunk, :].to(dt)
            s = qi @ kj.transpose(-2, -1)
            m_new = torch.maximum(m, s.amax(-1))
            alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
            p = torch.exp(s - m_new[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vj
            if with_tangent:
                acc_t = acc_t * alpha[..., None]
                ds = None
                if tqi is not None:
                    ds = tqi @ kj.transpose(-2, -1)
                if tk is not None:
                    dk_part = qi @ tk[..., j0:j0 + k_chunk, :].to(dt).transpose(-2, -1)
                    ds = dk_part if ds is None else ds + dk_part
                if ds is not None:
                    pds = p * ds
                    mu = mu * alpha + pds.sum(-1)
                    acc_t = acc_t + pds @ vj
                else:
                    mu = mu * alpha
                if tv is not None:
                    acc_t = acc_t + p @ tv[..., j0:j0 + k_chunk, :].to(dt)
            m = m_new
        o = acc / l[..., None]
        out[..., i0:i0 + q_chunk, :] = o
        if with_tangent:
            tout[..., i0:i0 + q_chunk, :] = acc_t / l[..., None] - (mu / l)[..., None] * o  # dO = Σ P(dS v + dv) − μ O
    return out, tout


def forward_mode_attention(with_tangent: Callable[..., tuple[Tensor, Tensor | None]], name: str) -> type[torch.autograd.Function]:
    """An autograd.Function computing O = attention(q, k, v) with `with_tangent(q, k, v)`; its jvp reruns
    `with_tangent(q, k, v, tq, tk, tv)` for the tangent (O recomputed). Forward mode only: backward raises."""

    class _JVPAttention(torch.autograd.Function):
        @staticmethod
        def forward(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return with_tangent(q, k, v)[0]

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:
            ctx.save_for_forward(*inputs)

        @staticmethod
        def jvp(ctx, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None) -> Tensor:
            q, k, v = ctx.saved_tensors
            tout = with_tangent(q, k, v, tq, tk, tv)[1]
            return q.new_zeros(*q.shape[:-1], v.shape[-1]) if tout is None else tout

        @staticmethod
        def backward(ctx, grad: Tensor):
            raise RuntimeError(f"the {name} JVP attention has no backward; sct.models.attention.attention() uses "
                               "math_attention or SDPA when gradients are needed")

    _JVPAttention.__name__ = f"_{name.capitalize()}JVPAttention"
    return _JVPAttention


_ChunkedJVPAttention = forward_mode_attention(lambda *args: online_attention(*args), "chunked")  # looked up per call


def chunked_jvp_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention whose forward-mode derivative is computed chunk by chunk (see the module docstring)."""
    return _ChunkedJVPAttention.apply(q, k, v)
