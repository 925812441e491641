"""Peak memory of a callable: CUDA's allocator statistics on GPU, exact tensor-storage accounting on CPU.

`peak_bytes(fn, device)` -> (fn's result, peak bytes allocated by fn above what was live before).
On CPU a `TorchDispatchMode` sees every tensor an ATen op returns (below autograd and functorch, so the
real allocations of a JVP too), counts each storage once while any tensor viewing it is alive, and
records the maximum; storages created outside `fn` are not counted.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class LiveStorageBytes(TorchDispatchMode):
    """Tracks the bytes of storages created by ops inside the mode; `peak` is the high-water mark."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, live tensors viewing it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except RuntimeError:  # a functorch wrapper: its plain inner tensor is what gets counted
            return
        if not key or not nbytes:
            return
        entry = self.refs.get(key)
        if entry is None:
            self.refs[key] = [nbytes, 1]
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[key]


def peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run fn() once and return (its result, the peak bytes it allocated)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    mode = LiveStorageBytes()
    with mode:
        out = fn()
    return out, mode.peak
