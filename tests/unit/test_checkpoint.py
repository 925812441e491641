"""Training-state checkpoints (atomic, verified, pruned) and inference snapshots."""

import json

import pytest
import torch
from loguru import logger

from sct.checkpoint import (
    atomic_checkpoint_dir,
    latest_training_state,
    load_snapshot,
    load_training_state,
    save_snapshot,
    save_training_state,
)


def _state(step):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "w": torch.randn(4, 3, generator=g), "opt": {"lr": 0.1, "m": [torch.ones(2)]}}


@pytest.fixture
def warnings():
    msgs = []
    sink = logger.add(lambda m: msgs.append(str(m)), level="WARNING")
    yield msgs
    logger.remove(sink)


def _leftovers(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path):
    d = save_training_state(tmp_path, 7, _state(7))
    assert d == tmp_path / "checkpoints" / "step_000000007"
    assert latest_training_state(tmp_path) == d
    loaded = load_training_state(d)
    assert loaded["step"] == 7 and loaded["opt"]["lr"] == 0.1
    torch.testing.assert_close(loaded["w"], _state(7)["w"], rtol=0, atol=0)
    torch.testing.assert_close(loaded["opt"]["m"][0], torch.ones(2), rtol=0, atol=0)
    marker = json.loads((d / "COMPLETE").read_text())
    assert marker["step"] == 7 and set(marker["files"]) == {"state.pt"}
    assert _leftovers(tmp_path) == []


def test_no_checkpoint_returns_none(tmp_path):
    assert latest_training_state(tmp_path) is None


def test_crash_inside_atomic_dir_leaves_previous(tmp_path):
    prev = save_training_state(tmp_path, 10, _state(10))
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_checkpoint_dir(tmp_path, 20) as tmp:
            torch.save(_state(20), tmp / "state.pt")
            (tmp / "engine").mkdir()
            (tmp / "engine" / "shard0.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert not (tmp_path / "checkpoints" / "step_000000020").exists()
    assert _leftovers(tmp_path) == []
    assert latest_training_state(tmp_path) == prev


def test_atomic_dir_seals_engine_files(tmp_path):
    with atomic_checkpoint_dir(tmp_path, 5) as tmp:
        (tmp / "engine").mkdir()
        (tmp / "engine" / "shard0.bin").write_bytes(b"abc")
    d = tmp_path / "checkpoints" / "step_000000005"
    assert set(json.loads((d / "COMPLETE").read_text())["files"]) == {"engine/shard0.bin"}
    assert latest_training_state(tmp_path) == d
    (d / "engine" / "shard0.bin").write_bytes(b"abd")  # an engine shard corrupted later
    assert latest_training_state(tmp_path) is None


def test_incomplete_and_corrupt_are_skipped(tmp_path, warnings):
    good = save_training_state(tmp_path, 1, _state(1), keep_last=5)
    corrupt = save_training_state(tmp_path, 2, _state(2), keep_last=5)
    incomplete = save_training_state(tmp_path, 3, _state(3), keep_last=5)
    (incomplete / "COMPLETE").unlink()
    blob = bytearray((corrupt / "state.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (corrupt / "state.pt").write_bytes(bytes(blob))
    assert latest_training_state(tmp_path) == good
    text = "\n".join(warnings)
    assert "step_000000003" in text and "no COMPLETE" in text
    assert "step_000000002" in text and "checksum mismatch" in text


def test_pruning_keeps_last(tmp_path):
    for step in range(0, 50, 10):
        save_training_state(tmp_path, step, _state(step), keep_last=2)
    (tmp_path / "checkpoints" / ".tmp-step_000000099-12345").mkdir()  # left by a killed process
    save_training_state(tmp_path, 50, _state(50), keep_last=3)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000000030", "step_000000040", "step_000000050"]


def test_rewrite_same_step_replaces(tmp_path):
    save_training_state(tmp_path, 4, {"v": 1})
    d = save_training_state(tmp_path, 4, {"v": 2})
    assert load_training_state(latest_training_state(tmp_path))["v"] == 2 and d.is_dir()
    assert _leftovers(tmp_path) == []


def test_pruning_never_deletes_just_written(tmp_path):
    save_training_state(tmp_path, 100, _state(100), keep_last=1)
    d = save_training_state(tmp_path, 50, _state(50), keep_last=1)  # older step, e.g. after a rewind
    assert d.is_dir() and (tmp_path / "checkpoints" / "step_000000100").is_dir()


def test_snapshot_round_trip(tmp_path):
    base = torch.randn(6, 4)
    sd = {"a.weight": base.t(), "a.bias": base[0], "n": torch.arange(3), "h": torch.ones(2, dtype=torch.float16)}
    cfg = {"backbone": "unet", "channels": [32, 64], "sigma_data": 0.5, "nested": {"x": None}}
    path = tmp_path / "snapshots" / "snapshot_000001000.safetensors"
    save_snapshot(path, sd, cfg, extra={"step": 1000})
    loaded, cfg2 = load_snapshot(path)
    assert cfg2 == cfg
    assert set(loaded) == set(sd)
    for k in sd:
        assert loaded[k].dtype == sd[k].dtype
        torch.testing.assert_close(loaded[k], sd[k], rtol=0, atol=0)
    human = json.loads(path.with_suffix(".json").read_text())
    assert human == {"model_config": cfg, "extra": {"step": 1000}}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.with_suffix(".json").name, path.name]


def test_snapshot_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_snapshot(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_snapshot(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="plain.safetensors.*not an sct snapshot"):
        load_snapshot(plain)
