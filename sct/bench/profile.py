"""torch.profiler over a few training steps: a Chrome trace and where the time goes (`python -m sct.bench step --profile DIR`).

`profile_steps(step_fn, first, n, device, trace)` runs `step_fn(first) .. step_fn(first + n - 1)` under the
profiler, writes the trace (open it in chrome://tracing or https://ui.perfetto.dev) and returns markdown:
the top ops/kernels by self time per step and the share of time in each category of `categorize`:
matmul/conv (GEMMs, convolutions, attention kernels), elementwise/norm (pointwise, normalization,
reductions, casts, copies, optimizer foreach ops), communication (NCCL/gloo collectives: ZeRO gathers and
reduce-scatters) and other. On GPU the times are the CUDA kernels' self times and the `idle` line is the
step's wall time not covered by any kernel (launch gaps, host syncs, Python overhead); on CPU they are
the ATen ops' self CPU times.

Tests: `pytest tests/unit/test_bench_step.py`.
"""
from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

CATEGORIES = (  # first match wins: communication before matmul ("allgather" kernels contain no "mm")
    ("communication", re.compile(r"nccl|all_?gather|reduce_?scatter|all_?reduce|broadcast|c10d|gloo|send|recv", re.IGNORECASE)),
    ("matmul/conv", re.compile(r"\b(aten::)?(mm|addmm|bmm|baddbmm|matmul|linear|conv\w*|_convolution|mkldnn_convolution\w*)\b|gemm|cutlass|xmma|"
                               r"sm\d+_|cudnn|convolution|flash|attention|sdpa|_efficient_attention|winograd|implicit_gemm|nhwc", re.IGNORECASE)),
    ("elementwise/norm", re.compile(r"elementwise|vectorized|unrolled|norm|silu|gelu|tanh|softmax|reduce|sum|mean|add|mul|div|sub|"
                                    r"copy|cast|to_copy|fill|zero|exp|log|sqrt|rsqrt|pow|where|cat|stack|index|lerp|foreach|"
                                    r"clamp|neg|sin|cos|triton|fused|square|abs|max|min|cumsum|pool|upsample|interpolate", re.IGNORECASE)),
)


def categorize(name: str) -> str:
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return "other"


def _self_times(prof, cuda: bool) -> dict[str, float]:
    """name -> self time in seconds over the profiled steps (CUDA kernels on GPU, ATen ops on CPU)."""
    out: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if cuda:
            if evt.device_type != DeviceType.CUDA:
                continue
            us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        else:
            if evt.device_type != DeviceType.CPU or not evt.key.startswith("aten::"):
                continue
            us = evt.self_cpu_time_total
        out[evt.key] += us / 1e6
    return out


def summarize(times: dict[str, float], steps: int, wall: float | None, top: int = 15) -> str:
    """Markdown: category shares (of the summed self time; `idle` of the wall time on GPU) and the top ops."""
    total = sum(times.values()) or float("nan")
    by_cat: dict[str, float] = defaultdict(float)
    for name, sec in times.items():
        by_cat[categorize(name)] += sec
    lines = ["| category | ms/step | share |", "|---|---:|---:|"]
    for cat in ("matmul/conv", "elementwise/norm", "communication", "other"):
        lines.append(f"| {cat} | {1e3 * by_cat[cat] / steps:.2f} | {by_cat[cat] / total:.1%} |")
    if wall is not None:
        idle = max(wall - total, 0.0)
        lines.append(f"| idle (launch gaps, syncs; of wall time) | {1e3 * idle / steps:.2f} | {idle / wall:.1%} |")
    lines += ["", f"| top {top} by self time | category | ms/step | share |", "|---|---|---:|---:|"]
    for name, sec in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        short = name if len(name) <= 70 else name[:67] + "..."
        lines.append(f"| `{short}` | {categorize(name)} | {1e3 * sec / steps:.3f} | {sec / total:.1%} |")
    return "\n".join(lines)


def profile_steps(step_fn: Callable[[int], object], first: int, n: int, device: torch.device, trace: Path) -> str:
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for step in range(first, first + n):
            step_fn(step)
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    return f"trace: {trace}; {n} steps, {1e3 * wall / n:.1f} ms/step wall (profiled)\n\n" + summarize(_self_times(prof, cuda), n, wall if cuda else None)
