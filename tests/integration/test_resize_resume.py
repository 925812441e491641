"""Resuming a training run on another world size with shard data on S3 (loopback moto, conftest.py): sCT on
2 ranks (torchrun, gloo, DeepSpeed ZeRO-3) for 4 steps -> the same command on 1 process to step 8 (universal
checkpoint) -> torchrun on 2 ranks again to step 12. Each phase's saved data positions are replayed by streams
in this process (same shards, same layout): the replay must end where the trainer's state says it ended, so
the replayed ids are the samples the trainer read; over the three phases every sample of epoch 0 is read
exactly once. Run: pytest -m slow tests/integration/test_resize_resume.py (about 2.5 min on 2 cores).
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from test_distributed import CONFIGS, EXTRA, TINY, launcher, losses, run_logged

from pipelines.shards import read_manifest, write_arrays
from pipelines.stream import ShardDataConfig, ShardStream
from sct.checkpoint import load_training_state

N, SHARD, BATCH = 160, 20, 16  # 8 shards; 12 steps x 16 = 192 samples: into epoch 1


def _replay(cfg: ShardDataConfig, saved: list[dict] | None, world: int, steps: int, want: list[dict]) -> list[tuple[int, int]]:
    """(id, epoch) read by `world` ranks for `steps` steps after loading `saved`; their end states must be `want`."""
    seen = []
    for rank in range(world):
        stream = ShardStream(cfg, read_manifest(cfg.url), BATCH // world, rank, world, return_ids=True)
        if saved is not None:
            stream.load_state_dict({**saved[rank if len(saved) == world else 0], "ranks": saved})
        for _ in range(steps):
            batch = next(stream)
            torch.testing.assert_close(batch["x"][:, 0].long(), batch["ids"])  # content is the sample named
            seen += list(zip(batch["ids"].tolist(), batch["epochs"].tolist()))
        state = stream.state_dict()
        assert state["workers"] == want[rank]["workers"] and state["resume"] == want[rank]["resume"], f"rank {rank}: the trainer read other samples"
        stream.close()
    return seen


@pytest.mark.slow
def test_shard_data_resumes_two_ranks_on_one_and_one_on_two(s3_server, tmp_path):
    url = s3_server.bucket_url() + "/points"
    x = np.stack([np.arange(N), -np.arange(N)], 1).astype(np.float32)  # sample i is (i, -i)
    write_arrays(x, None, url, SHARD)
    data = f"data={{name: shards, url: {url}, shape: [2], num_classes: 0, class_conditional: false, num_workers: 0, shuffle_buffer: 8}}"
    run_dir = tmp_path / "run"
    args = ["--config", CONFIGS["sct"], *TINY, *EXTRA["sct"], data, "dist.zero_stage=3", f"run.dir={run_dir}"]
    phases, saved = [("torchrun", 4), ("one", 8), ("torchrun", 12)], []
    for i, (how, steps) in enumerate(phases):
        cmd = launcher("torchrun", "sct/train.py", *args, f"run.total_steps={steps}") if how == "torchrun" else \
            [sys.executable, "sct/train.py", *args, f"run.total_steps={steps}"]
        log = tmp_path / f"log{i}.txt"
        assert run_logged(cmd, log) == 0, log.read_text()[-4000:]
        if i:
            text = log.read_text()
            assert "universal checkpoint" in text and "none read twice, none skipped" in text, text[-4000:]
        saved.append(load_training_state(run_dir / "checkpoints" / f"step_{steps:09d}")["data"])  # all ranks' data states
    assert len(losses(run_dir)) == 12 and all(math.isfinite(v) for v in losses(run_dir))

    assert [len(s) for s in saved] == [2, 1, 2]
    cfg = ShardDataConfig(url=url, shape=(2,), class_conditional=False, num_workers=0, shuffle_buffer=8)
    seen = _replay(cfg, None, 2, 4, saved[0]) + _replay(cfg, saved[0], 1, 4, saved[1]) + _replay(cfg, saved[1], 2, 4, saved[2])
    epoch0 = sorted(i for i, e in seen if e == 0)
    assert epoch0 == list(range(N)), f"missing {sorted(set(range(N)) - set(epoch0))}, twice {sorted(i for i in set(epoch0) if epoch0.count(i) > 1)}"
    assert len(seen) == 12 * BATCH and sum(e == 1 for _, e in seen) == 12 * BATCH - N
