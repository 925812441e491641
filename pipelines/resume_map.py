"""Which samples each reader slot of a shard stream reads in an epoch, and the map that resumes a saved stream
on a different set of readers (another world size, `data.num_workers` or batch size).

    plan = fresh_plan(counts, slots, slot, epoch, seed, buffer, shuffle)  # (shard ids, kept, output order)
    remap = ResumeMap(record, counts, seed, buffer, shuffle, new_slots)    # record: old slots and positions
    remap.plan(new_slot, epoch)                                           # for remap.first <= epoch <= remap.last

A plan is pure data: the shard ids a slot reads in order, for each shard the sample indices it keeps (a fresh
epoch keeps all), and the order in which the slot's shuffle buffer emits its kept samples (indices into their
concatenation). A slot at (epoch, position) has emitted exactly `order[:position]` of its plan.

Resume on another layout: the saved state names every old slot's (epoch, position). For each epoch the old
slots were in, the emitted samples are recomputed from their plans; the rest of that epoch (whole shards and
the unread samples of partially read ones, in the epoch's shard order) is dealt to the new slots, each shard to
the one holding the fewest samples so far. A new slot reads a partially read shard whole and keeps only its
unread samples, so no sample of the interrupted epochs is read twice and none is skipped; from epoch
`last + 1` on, the new slots follow the ordinary plan. A map made while an earlier map is still in effect
chains to it (`record["parent"]`), so resizing twice within an epoch also holds.
Tests: tests/unit/test_resume_map.py (the mapping), tests/integration/test_stream.py (real workers, S3).
"""
from __future__ import annotations

import hashlib
import random

import numpy as np

Plan = tuple[list[int], list[list[int]], list[int]]  # shard ids, kept sample indices per shard, output order


def rng(*parts) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little"))


def slot_shards(num_shards: int, slots: int, slot: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Shard ids slot `slot` reads in `epoch`: every slots-th of the epoch's shard permutation."""
    return epoch_shards(num_shards, epoch, seed, shuffle)[slot::slots]


def epoch_shards(num_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        rng(seed, epoch, "shards").shuffle(order)
    return order


def buffer_order(n: int, size: int, generator: random.Random) -> list[int]:
    """Output order of a shuffle buffer of `size` fed inputs 0..n-1: full buffer -> emit a uniform pick."""
    buffer, out = [], []
    for i in range(n):
        buffer.append(i)
        if len(buffer) >= size:
            j = generator.randrange(len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out.append(buffer.pop())
    while buffer:
        j = generator.randrange(len(buffer))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        out.append(buffer.pop())
    return out


def fresh_plan(counts: list[int], slots: int, slot: int, epoch: int, seed: int, buffer: int, shuffle: bool) -> Plan:
    ids = slot_shards(len(counts), slots, slot, epoch, seed, shuffle)
    kept = [list(range(counts[i])) for i in ids]
    return ids, kept, buffer_order(sum(map(len, kept)), buffer, rng(seed, epoch, slot, "buffer"))


def plan_ids(plan: Plan, first_id: np.ndarray) -> np.ndarray:
    """Global sample ids of a plan's kept samples, in local-index order."""
    ids, kept, _ = plan
    parts = [first_id[sid] + np.asarray(k, dtype=np.int64) for sid, k in zip(ids, kept)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


class ResumeMap:
    """The plans of `new_slots` readers for epochs first..last, after the readers of `record` stopped at
    record["positions"] (one [epoch, position] per old slot; record["parent"]: the map those readers followed)."""

    def __init__(self, record: dict, counts: list[int], seed: int, buffer: int, shuffle: bool, new_slots: int):
        self.record, self.counts, self.seed, self.buffer, self.shuffle = record, list(counts), seed, buffer, shuffle
        self.new_slots = new_slots
        positions = [(int(e), int(p)) for e, p in record["positions"]]
        old_slots = len(positions)
        parent = ResumeMap(record["parent"], counts, seed, buffer, shuffle, old_slots) if record.get("parent") else None
        self.first, self.last = min(e for e, _ in positions), max(e for e, _ in positions)
        first_id = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.remaining: dict[int, np.ndarray] = {}  # epoch -> bool [total samples]: not yet emitted
        self.assigned: dict[int, list[list[tuple[int, list[int]]]]] = {}  # epoch -> per new slot [(shard, kept)]
        for epoch in range(self.first, self.last + 1):
            inherited = parent is not None and parent.first <= epoch <= parent.last
            left = parent.remaining[epoch].copy() if inherited else np.ones(int(first_id[-1]), bool)
            for slot, (e, p) in enumerate(positions):
                if e < epoch:
                    continue  # this reader never reached the epoch
                plan = parent.plan(slot, epoch) if inherited else fresh_plan(counts, old_slots, slot, epoch, seed, buffer, shuffle)
                done = len(plan[2]) if e > epoch else p
                left[plan_ids(plan, first_id)[np.asarray(plan[2][:done], dtype=np.int64)]] = False
            self.remaining[epoch] = left
            self.assigned[epoch] = self._deal(left, first_id, epoch)

    def _deal(self, left: np.ndarray, first_id: np.ndarray, epoch: int) -> list[list[tuple[int, list[int]]]]:
        """Shards with unread samples, in the epoch's shard order, each to the new slot holding fewest samples."""
        slots: list[list[tuple[int, list[int]]]] = [[] for _ in range(self.new_slots)]
        load = [0] * self.new_slots
        for sid in epoch_shards(len(self.counts), epoch, self.seed, self.shuffle):
            kept = np.flatnonzero(left[first_id[sid] : first_id[sid + 1]]).tolist()
            if kept:
                target = load.index(min(load))
                slots[target].append((sid, kept))
                load[target] += len(kept)
        return slots

    def covers(self, epoch: int) -> bool:
        return self.first <= epoch <= self.last

    def plan(self, slot: int, epoch: int) -> Plan:
        ids = [sid for sid, _ in self.assigned[epoch][slot]]
        kept = [k for _, k in self.assigned[epoch][slot]]
        return ids, kept, buffer_order(sum(map(len, kept)), self.buffer, rng(self.seed, epoch, slot, "buffer", "resume"))

    def summary(self) -> str:
        left = {e: int(r.sum()) for e, r in self.remaining.items()}
        return ", ".join(f"epoch {e}: {n} of {len(self.remaining[e])} samples unread" for e, n in left.items())
