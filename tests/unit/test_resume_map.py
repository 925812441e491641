"""The resume map of pipelines.resume_map, on plans alone (no storage): readers of one layout stop at some
positions, the map deals the rest to another layout's readers, and over the interrupted epochs every sample is
emitted exactly once. Run: pytest tests/unit/test_resume_map.py
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipelines.resume_map import ResumeMap, fresh_plan, plan_ids

COUNTS = [7, 5, 9, 6, 8, 3, 7, 7, 4, 6]  # 10 shards of uneven size: 62 samples
FIRST = np.concatenate([[0], np.cumsum(COUNTS)])
SEED, BUFFER = 3, 4


def emitted(plan, upto: int) -> list[int]:
    return plan_ids(plan, FIRST)[np.asarray(plan[2][:upto], dtype=np.int64)].tolist()


def read(slots: int, steps: list[int], remap: ResumeMap | None = None, start: list[list[int]] | None = None):
    """Each slot advances `steps[s]` samples from its start; returns (per-epoch Counter of ids, final positions)."""
    seen: dict[int, Counter] = {}
    positions = [list(p) for p in (start or [[0, 0]] * slots)]
    for slot in range(slots):
        for _ in range(steps[slot]):
            epoch, pos = positions[slot]
            plan = remap.plan(slot, epoch) if remap and remap.covers(epoch) else fresh_plan(COUNTS, slots, slot, epoch, SEED, BUFFER, True)
            if pos >= len(plan[2]):
                positions[slot] = [epoch + 1, 0]
                continue
            seen.setdefault(epoch, Counter())[emitted(plan, pos + 1)[-1]] += 1
            positions[slot] = [epoch, pos + 1]
    return seen, positions


def merge(*counters: dict[int, Counter]) -> dict[int, Counter]:
    out: dict[int, Counter] = {}
    for c in counters:
        for e, n in c.items():
            out.setdefault(e, Counter()).update(n)
    return out


def assert_each_once(seen: dict[int, Counter], epochs) -> None:
    for e in epochs:
        assert sorted(seen[e]) == list(range(sum(COUNTS))), f"epoch {e}: missing {set(range(sum(COUNTS))) - set(seen[e])}"
        assert max(seen[e].values()) == 1, f"epoch {e}: read twice {[i for i, n in seen[e].items() if n > 1]}"


def test_fresh_plans_cover_each_epoch_once():
    seen, _ = read(3, [200] * 3)
    assert_each_once(seen, [0, 1])


@pytest.mark.parametrize("old, new, steps", [
    (2, 1, [20, 45]),       # num_workers 2 -> 1; slot 1 already in epoch 1 (epochs 0 and 1 both remapped)
    (1, 3, [40]),           # 1 -> 3 readers mid-epoch
    (4, 2, [0, 3, 16, 9]),  # 2 ranks x 2 workers -> 1 rank x 2, one slot never started
    (2, 2, [0, 0]),         # a fresh state on another batch size
])
def test_remap_emits_every_sample_of_the_interrupted_epochs_once(old, new, steps):
    before, positions = read(old, steps)
    remap = ResumeMap({"positions": positions, "parent": None}, COUNTS, SEED, BUFFER, True, new)
    start = [[remap.first, 0]] * new
    after, _ = read(new, [300] * new, remap, start)
    assert_each_once(merge(before, after), range(remap.first, remap.last + 2))  # + the first ordinary epoch
    assert remap.summary().startswith(f"epoch {remap.first}: ")


def test_a_second_remap_within_the_epoch_chains_to_the_first():
    """2 readers -> 3 (stopped again mid-epoch) -> 1: still each sample once."""
    before, positions = read(2, [11, 30])
    first = ResumeMap({"positions": positions, "parent": None}, COUNTS, SEED, BUFFER, True, 3)
    middle, positions2 = read(3, [5, 0, 9], first, [[first.first, 0]] * 3)
    second = ResumeMap({"positions": positions2, "parent": first.record}, COUNTS, SEED, BUFFER, True, 1)
    after, _ = read(1, [400], second, [[second.first, 0]])
    assert_each_once(merge(before, middle, after), [0, 1, 2])


def test_partially_read_shards_go_whole_to_one_reader_with_only_their_unread_samples():
    before, positions = read(2, [10, 10])
    remap = ResumeMap({"positions": positions, "parent": None}, COUNTS, SEED, BUFFER, True, 3)
    shards = [sid for slot in remap.assigned[0] for sid, _ in slot]
    assert len(shards) == len(set(shards))  # no shard split over readers
    for slot in remap.assigned[0]:
        for sid, kept in slot:
            assert kept == [j for j in range(COUNTS[sid]) if FIRST[sid] + j not in before[0]]
    assert any(len(kept) < COUNTS[sid] for slot in remap.assigned[0] for sid, kept in slot)  # some were partial
    loads = [sum(len(k) for _, k in slot) for slot in remap.assigned[0]]
    assert sum(loads) == sum(COUNTS) - 20 and max(loads) - min(loads) <= max(COUNTS)  # balanced to within a shard
