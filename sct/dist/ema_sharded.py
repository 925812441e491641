"""EMA of a ZeRO-3-partitioned student, kept sharded the same way as the weights.

Each rank holds the fp32 EMA of its own partition of every parameter (`p.ds_tensor`), so the EMA
costs 4 bytes/param/world_size. The decay schedule is `sct.ema.ema_beta`, as for the plain `EMA`.
- `full_model()` (collective): a plain module with the consolidated EMA weights (snapshots, samples).
- `swapped_into(net)` (context): the partitioned live net temporarily carries the EMA partitions, so
  every rank can sample through the ZeRO-3 engine module itself (no full copy anywhere).
- `state_dict()` (collective) is the consolidated full state (world-size independent);
  `load_state_dict(full)` takes this rank's slices, so resume may change the number of ranks.

Tests: `pytest tests/integration/test_distributed.py` (ZeRO-3 snapshot vs in-engine EMA sampling).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from sct.dist import gather_full, partition_of, slice_full
from sct.ema import EMAConfig, ema_beta


class ShardedEMA:
    def __init__(self, net: nn.Module, cfg: EMAConfig, make_model: Callable[[], nn.Module]):
        cfg.check()
        self.cfg, self.make_model = cfg, make_model
        self.names = [n for n, _ in net.named_parameters()]
        self.params = list(net.parameters())
        self.buffers = dict(net.named_buffers())
        self.shards = [partition_of(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        beta = ema_beta(self.cfg, step)
        for shard, p in zip(self.shards, net.parameters(), strict=True):
            shard.lerp_(partition_of(p).detach().float(), 1.0 - beta)  # ema = beta*ema + (1-beta)*p

    def state_dict(self) -> dict[str, torch.Tensor]:
        full = {n: gather_full(p, s).clone() for n, p, s in zip(self.names, self.params, self.shards, strict=True)}
        return full | {n: b.detach().clone() for n, b in self.buffers.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in sd]
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}")
        for shard, n, p in zip(self.shards, self.names, self.params, strict=True):
            shard.copy_(slice_full(p, sd[n].to(shard.device, shard.dtype)))

    def full_model(self) -> nn.Module:
        model = self.make_model()
        model.load_state_dict(self.state_dict())
        return model.eval().requires_grad_(False)

    @contextlib.contextmanager
    def swapped_into(self, net: nn.Module) -> Iterator[nn.Module]:
        """`net` (partitioned) with the EMA partitions in place of its weights, restored on exit."""
        saved = [partition_of(p).detach().clone() for p in self.params]
        try:
            self._put(self.shards)
            yield net
        finally:
            self._put(saved)

    @torch.no_grad()
    def _put(self, shards: list[torch.Tensor]) -> None:
        for p, s in zip(self.params, shards, strict=True):
            partition_of(p).copy_(s)
            if getattr(p, "ds_persist", False):  # ZeRO-3 keeps small params whole too: refresh that copy
                p.data.copy_(gather_full(p, partition_of(p)))
