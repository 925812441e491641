"""Attention JVP paths: chunked (online softmax with tangent) and the Triton kernel against the math path
and float64 central differences, under torch.func.jvp and forward_ad duals; the dispatch; the chunked
path's peak memory grows linearly in the sequence length (exact storage accounting, no timing).
The Triton kernel runs here under Triton's CPU interpreter (TRITON_INTERPRET=1, in a subprocess): no GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sct.bench.memory import peak_bytes
from sct.models.attention import attention, forward_ad_mode, math_attention, resolve_jvp_impl
from sct.models.chunked_attention import chunked_jvp_attention, online_attention

fwad = torch.autograd.forward_ad


def qkv(L=37, d=8, B=2, H=3, dtype=torch.float64, seed=0, Lk=None):
    g = torch.Generator().manual_seed(seed)
    Lk = L if Lk is None else Lk
    shapes = [(B, H, L, d), (B, H, Lk, d), (B, H, Lk, d)] * 2
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("chunks", [(10, 7), (256, 256), (1, 64)])
def test_online_attention_matches_math_path_values_and_tangents(chunks):
    q, k, v, tq, tk, tv = qkv(Lk=29)
    ref_o, ref_t = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    o, t = online_attention(q, k, v, tq, tk, tv, *chunks)
    torch.testing.assert_close(o, ref_o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, ref_t, rtol=1e-12, atol=1e-12)
    _, t_v = online_attention(q, k, v, None, None, tv, *chunks)  # missing tangents are zero
    torch.testing.assert_close(t_v, torch.func.jvp(lambda c: math_attention(q, k, c), (v,), (tv,))[1], rtol=1e-12, atol=1e-12)


def test_chunked_jvp_matches_central_difference_under_func_jvp_and_duals():
    q, k, v, tq, tk, tv = qkv()
    h = 1e-6
    ref = (math_attention(q + h * tq, k + h * tk, v + h * tv) - math_attention(q - h * tq, k - h * tk, v - h * tv)) / (2 * h)
    with torch.no_grad(), forward_ad_mode():
        out, jvp = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))  # auto on CPU = chunked
        with fwad.dual_level():
            dual = fwad.unpack_dual(chunked_jvp_attention(fwad.make_dual(q, tq), k, fwad.make_dual(v, tv))).tangent
    assert ((jvp - ref).norm() / ref.norm()).item() <= 1e-6
    torch.testing.assert_close(out, math_attention(q, k, v), rtol=1e-12, atol=1e-12)
    _, ref_qv = torch.func.jvp(lambda a, c: math_attention(a, k, c), (q, v), (tq, tv))
    torch.testing.assert_close(dual, ref_qv, rtol=1e-12, atol=1e-12)


def test_float32_and_bfloat16_chunked_tangents_are_close_to_float64():
    q, k, v, tq, tk, tv = qkv(L=64, d=16)
    _, ref = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        _, t = online_attention(*(x.to(dtype) for x in (q, k, v, tq, tk, tv)))
        assert t.dtype == dtype and ((t.double() - ref).norm() / ref.norm()).item() < tol


def test_dispatch():
    q, k, v, *_ = qkv(dtype=torch.float32)
    assert resolve_jvp_impl(q) == "chunked" and resolve_jvp_impl(q, "math") == "math"  # no CUDA here
    with pytest.raises(ValueError, match="jvp_impl"):
        resolve_jvp_impl(q, "flash")
    q.requires_grad_(True)
    with forward_ad_mode():  # gradients needed: the math path, which has a backward
        attention(q, k, v).sum().backward()
    assert q.grad is not None
    with pytest.raises(RuntimeError, match="no backward"):
        chunked_jvp_attention(q, k, v).sum().backward()


def test_chunked_peak_memory_grows_linearly_in_sequence_length():
    """Peak bytes at L = 256..2048 (exact storage accounting): increments double for chunked (linear),
    quadruple for math; chunked never holds even one L x L fp32 matrix per (batch, head)."""
    lengths, peaks = (256, 512, 1024, 2048), {"math": [], "chunked": []}
    for L in lengths:
        q, k, v, tq, tk, tv = qkv(L=L, d=16, B=1, H=2, dtype=torch.float32)
        peaks["math"].append(peak_bytes(lambda: torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv)))[1])
        peaks["chunked"].append(peak_bytes(lambda: online_attention(q, k, v, tq, tk, tv, 128, 128))[1])
    growth = {name: [b / a for a, b in zip([p[1] - p[0] for p in zip(ps, ps[1:])], [p[1] - p[0] for p in zip(ps, ps[1:])][1:])]
              for name, ps in peaks.items()}
    assert all(r < 3.0 for r in growth["chunked"]), (peaks, growth)
    assert all(r > 3.5 for r in growth["math"]), (peaks, growth)
    assert peaks["chunked"][-1] < 2 * 2048 * 2048 * 4 / 4  # a quarter of one L x L matrix for the 2 heads


TRITON_CHECK = r"""
import torch
from sct.models.attention import math_attention
from sct.models.triton_attention import attention_with_tangent, triton_jvp_attention
from sct.models.attention import forward_ad_mode
fwad = torch.autograd.forward_ad
g = torch.Generator().manual_seed(0)
for L, Lk, d, dtype, tol in [(37, 37, 8, torch.float32, 2e-6), (70, 45, 20, torch.float32, 2e-6), (64, 64, 16, torch.float16, 5e-3)]:
    q, tq = (torch.randn(2, 3, L, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v, tk, tv = (torch.randn(2, 3, Lk, d, generator=g, dtype=torch.float64) for _ in range(4))
    ref_o, ref_t = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    h = 1e-6
    fd = (math_attention(q + h * tq, k + h * tk, v + h * tv) - math_attention(q - h * tq, k - h * tk, v - h * tv)) / (2 * h)
    o, t, lse = attention_with_tangent(*(x.to(dtype) for x in (q, k, v, tq, tk, tv)))
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    assert rel(o, ref_o) < tol and rel(t, ref_t) < tol and rel(t, fd) < tol, (L, dtype, rel(o, ref_o), rel(t, ref_t))
    assert torch.allclose(lse.double(), torch.logsumexp(q @ k.transpose(-1, -2) / d ** 0.5, -1), atol=1e3 * tol)
    _, ref_q = torch.func.jvp(lambda x: math_attention(x, k, v), (q,), (tq,))
    with torch.no_grad(), forward_ad_mode(), fwad.dual_level():
        out = triton_jvp_attention(fwad.make_dual(q.to(dtype), tq.to(dtype)), k.to(dtype), v.to(dtype))
        assert rel(fwad.unpack_dual(out).tangent, ref_q) < tol
    with torch.no_grad(), forward_ad_mode():
        _, t2 = torch.func.jvp(triton_jvp_attention, (q.to(dtype), k.to(dtype), v.to(dtype)), (tq.to(dtype), tk.to(dtype), tv.to(dtype)))
        assert rel(t2, ref_t) < tol
print("triton kernel ok")
"""


def test_triton_kernel_under_the_cpu_interpreter():
    """The kernel's logic vs math and central differences (fp32, fp16; masked tails; Lq != Lk) through
    TRITON_INTERPRET=1. bf16 is left out: the interpreter's bf16 tl.dot is wrong (checked separately)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "triton kernel ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_on_gpu_matches_math_path():
    from sct.models.triton_attention import attention_with_tangent

    q, k, v, tq, tk, tv = (x.cuda() for x in qkv(L=1000, d=64, B=2, H=4))
    ref_o, ref_t = torch.func.jvp(math_attention, (q, k, v), (tq, tk, tv))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        o, t, _ = attention_with_tangent(*(x.to(dtype) for x in (q, k, v, tq, tk, tv)))
        assert ((o.double() - ref_o).norm() / ref_o.norm()).item() < tol
        assert ((t.double() - ref_t).norm() / ref_t.norm()).item() < tol
