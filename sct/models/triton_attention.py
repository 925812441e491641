"""Attention and its forward-mode tangent in one Triton kernel (GPU), the algorithm of `chunked_attention`.

Owns: `attention_with_tangent(q, k, v, tq, tk, tv)` -> (O, dO, logsumexp) in ONE pass over the keys
(flash-attention-2 style online softmax that also carries μ = rowsum(P ⊙ dS) and Σ P (dS v + dv)),
and `triton_jvp_attention(q, k, v)`, an `autograd.Function` whose forward runs the kernel without the
tangent and whose `jvp` runs it with the tangent (torch.func.jvp and forward_ad both call it).
`sct.models.attention` selects it automatically on CUDA when Triton imports (`available()`).

Math per query block (S = q kᵀ/√d): m, l the running max / sum of exp(S − m); for each key block
    α = exp(m_old − m_new), P = exp(S − m_new), dS = (dq kᵀ + q dkᵀ)/√d
    l ← α l + ΣP,  A ← α A + P v,  μ ← α μ + Σ P⊙dS,  T ← α T + (P⊙dS) v + P dv
    O = A / l,  dO = T / l − (μ / l) O,  lse = m + log l
fp32 accumulators; fp32 inputs use IEEE (not TF32) dots so that fp32 JVPs stay fp32-accurate.
Verified here only under Triton's CPU interpreter (TRITON_INTERPRET=1, tests/unit/test_attention.py);
GPU speed and compiled-kernel correctness are unverified until a GPU run (see docs/benchmarks.md).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sct.models.chunked_attention import forward_mode_attention

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: available() is False and the dispatch never selects this module
    triton = None

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> bool:
    """True when CUDA and Triton are both usable (the automatic choice of `sct.models.attention`)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _attention_tangent_kernel(
        Q, K, V, TQ, TK, TV, O, TO, LSE, scale, L_Q, L_K,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_TANGENT: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One program = BLOCK_M queries of one (batch, head); q, k, v, ... are contiguous [BH, L, HEAD_DIM]."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok, d_ok = offs_m < L_Q, offs_d < HEAD_DIM
        q_off = bh * L_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        if HAS_TANGENT:
            tq = tl.load(TQ + q_off, mask=q_mask, other=0.0)
            mu_i = tl.zeros([BLOCK_M], tl.float32)
            acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, L_K, BLOCK_N):
            n = start_n + offs_n
            n_ok = n < L_K
            kv_off = bh * L_K * HEAD_DIM + n[:, None] * HEAD_DIM + offs_d[None, :]
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])  # masked keys: exp(-inf) = 0
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            if HAS_TANGENT:
                tk = tl.load(TK + kv_off, mask=kv_mask, other=0.0)
                tv = tl.load(TV + kv_off, mask=kv_mask, other=0.0)
                ds = tl.dot(tq, tl.trans(k), input_precision=PRECISION)
                ds = (ds + tl.dot(q, tl.trans(tk), input_precision=PRECISION)) * scale
                pds = p * ds  # masked keys: p = 0 and ds finite (zero-loaded k, tk)
                mu_i = mu_i * alpha + tl.sum(pds, 1)
                acc_t = acc_t * alpha[:, None] + tl.dot(pds.to(v.dtype), v, input_precision=PRECISION)
                acc_t = acc_t + tl.dot(p.to(v.dtype), tv, input_precision=PRECISION)
            m_i = m_new
        o = acc / l_i[:, None]
        tl.store(O + q_off, o.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + bh * L_Q + offs_m, m_i + tl.log(l_i), mask=m_ok)
        if HAS_TANGENT:
            to = acc_t / l_i[:, None] - (mu_i / l_i)[:, None] * o  # dO = Σ P(dS v + dv)/l − μ/l · O
            tl.store(TO + q_off, to.to(TO.dtype.element_ty), mask=q_mask)


def _blocks(head_dim: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if block_d <= 64 else 32  # six [BLOCK, BLOCK_D] operand tiles live at once with the tangent
    return 64, block_n, block_d


def attention_with_tangent(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                           tv: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor]:
    """(O, dO or None, logsumexp fp32) for q, k, v [..., L, d] (same d for v), tangents None = zero; one kernel."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use jvp_impl 'chunked' or 'math'")
    if q.dtype not in DTYPES or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"Triton attention takes one of {DTYPES} for q, k, v alike, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not [..., L, d] alike")
    with_tangent = any(t is not None for t in (tq, tk, tv))
    o, to, lse = _attention_op(q, k, v, tq, tk, tv, with_tangent)
    return o, (to if with_tangent else None), lse


# A custom op, so that the kernel always receives plain tensors: inside torch.func.jvp the autograd.Function's
# jvp staticmethod sees functorch wrappers, whose storage a kernel launch cannot read.
@torch.library.custom_op("sct::attention_with_tangent", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None,
                  with_tangent: bool) -> tuple[Tensor, Tensor, Tensor]:
    lead, Lq, Lk, d = q.shape[:-2], q.shape[-2], k.shape[-2], q.shape[-1]
    bh = math.prod(lead)
    flat = [t.reshape(bh, t.shape[-2], d).contiguous() for t in (q, k, v)]
    tangents = [torch.zeros_like(flat[i]) if t is None else t.reshape(flat[i].shape).to(q.dtype).contiguous()
                for i, t in enumerate((tq, tk, tv))] if with_tangent else flat  # unused pointers without tangent
    o = torch.empty_like(flat[0])
    to = torch.empty_like(o) if with_tangent else o.new_empty(0)
    lse = torch.empty(bh, Lq, device=q.device, dtype=torch.float32)
    block_m, block_n, block_d = _blocks(d)
    grid = (triton.cdiv(Lq, block_m), bh)
    _attention_tangent_kernel[grid](
        *flat, *tangents, o, to if with_tangent else o, lse, 1.0 / math.sqrt(d), Lq, Lk,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, HAS_TANGENT=with_tangent,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    shape = (*lead, Lq, d)
    return o.reshape(shape), (to.reshape(shape) if with_tangent else to), lse.reshape(*lead, Lq)


@_attention_op.register_fake
def _(q, k, v, tq, tk, tv, with_tangent):
    o = q.new_empty(q.shape)
    return o, (q.new_empty(q.shape) if with_tangent else q.new_empty(0)), q.new_empty(q.shape[:-1], dtype=torch.float32)


_TritonJVPAttention = forward_mode_attention(lambda *args: attention_with_tangent(*args)[:2], "Triton")


def triton_jvp_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention whose forward-mode derivative comes from the Triton kernel (CUDA tensors)."""
    return _TritonJVPAttention.apply(q, k, v)
