"""TensorBoard and W&B (offline) sinks through a crash, a resume that stops at max_steps_per_job, and a final
resume: what the event files and the offline W&B runs hold, read back with tensorboard's and wandb's own code.

The job sequence (toy sCT, checkpoint every 4 steps, a tick every step): job 1 crashes during step 7 after
logging steps 1-6 (checkpoint at 4); job 2 resumes at 4 and stops at 8 (max_steps_per_job); job 3 finishes 12.
Steps 5 and 6 were logged twice by the jobs; each reader must see every step 1-12 exactly once.
"""
import json
import struct
import sys
from pathlib import Path

import pytest

from sct import train

SINKS = ["--config", "configs/toy_sct.yaml", "model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64",
         "run.log_every=1", "run.total_steps=12", "run.checkpoint_every=4", "run.sample_every=4", "run.snapshot_every=1000",
         "sampling.num=64", "tracking.sinks=[tensorboard, wandb]", "tracking.wandb_project=sct-test"]
STEPS = list(range(1, 13))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: the run is written under <run.dir>/wandb/
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


def _train_three_jobs(run_dir: Path, monkeypatch) -> None:
    from sct.objectives import scm

    real = scm.SCM.forward

    def crash_at_step_6(self, net, batch, step):  # 0-based step 6 = the 7th step: a node failure, say
        if step == 6:
            raise RuntimeError("node lost")
        return real(self, net, batch, step)

    with monkeypatch.context() as m:
        m.setattr(scm.SCM, "forward", crash_at_step_6)
        with pytest.raises(RuntimeError, match="node lost"):
            train.main(SINKS + [f"run.dir={run_dir}"])
    assert train.main(SINKS + [f"run.dir={run_dir}", "run.max_steps_per_job=4"]) == 0  # resumes at 4, stops at 8
    assert train.main(SINKS + [f"run.dir={run_dir}"]) == 0  # resumes at 8, finishes


def _wandb_records(path: Path):
    """Records of a .wandb file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of checksum/length/type
    chunks) of wandb.proto.wandb_internal_pb2.Record messages. wandb 0.31 ships no Python reader for it (its
    reader is in the wandb-core binary), so the framing is read here and each record with W&B's own protobuf."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_tensorboard_and_wandb_continue_the_run_without_duplicate_steps(tmp_path, monkeypatch, offline_wandb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    run_dir = tmp_path / "run"
    _train_three_jobs(run_dir, monkeypatch)
    jsonl = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        jsonl[json.loads(line)["step"]] = json.loads(line)["loss"]  # the last record of a step: the surviving job's

    # TensorBoard, as its own reader sees it: every step once, the values of the job that survived
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss")] == STEPS
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx([jsonl[s] for s in STEPS], rel=1e-6)
    assert {"time/backward", "images_per_s", "lr"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Images("samples/2step")] == [4, 8, 12]
    assert "config/text_summary" in ea.Tags()["tensors"]
    assert b"objective:" in ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0]

    # the raw files: one per job, each resumed job opens with a purge marker at its first step (checkpoint + 1);
    # applying only those markers (not the reader's own out-of-order heuristics) leaves each step once
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    assert len(files) == 3
    kept, starts = [], []
    for f in files:
        for event in EventFileLoader(str(f)).Load():
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                starts.append(event.step)
                kept = [s for s in kept if s < event.step]
            for v in event.summary.value:
                if v.tag == "loss":
                    kept.append(event.step)
    assert starts == [1, 5, 9] and kept == STEPS

    # W&B offline: three offline runs of one run id (stored in the run folder), steps 1-6, 7-8, 9-12
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 3
    steps, losses, images = [], {}, []
    for folder in offline:
        (log,) = folder.glob("*.wandb")
        for record in _wandb_records(log):
            if record.HasField("run"):
                assert record.run.run_id == run_id and record.run.project == "sct-test"
            if record.HasField("history"):
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                steps.append(items["_step"])
                losses[items["_step"]] = items["loss"]
                if items.get("samples/2step/_type") == "image-file":
                    images.append(items["_step"])
    assert sorted(steps) == STEPS and len(steps) == len(STEPS)  # every step once across the three jobs
    assert [losses[s] for s in STEPS] == pytest.approx([jsonl[s] for s in STEPS], rel=1e-6)
    assert images == [4, 8, 12]


def test_a_sink_chosen_but_not_installed_is_a_config_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without the package looks like to import
    assert train.main(SINKS[:2] + ["tracking.sinks=[wandb]", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "tracking.sinks: 'wandb' is chosen but not installed: pip install 'sct[wandb]'" in err and "Traceback" not in err


def test_training_without_sinks_imports_neither(tmp_path, monkeypatch):
    for name in ("wandb", "tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # any import of them would now fail
    assert train.main(SINKS[:-2] + [f"run.dir={tmp_path / 'plain'}", "run.total_steps=2"]) == 0
    assert not (tmp_path / "plain" / "tensorboard").exists() and not (tmp_path / "plain" / "wandb").exists()


def test_wandb_auto_mode_is_online_only_with_credentials(tmp_path, monkeypatch):
    """auto mode's login check reads what `wandb login` writes: a netrc entry for the W&B host (or WANDB_API_KEY)."""
    from sct.tracking import _wandb_logged_in

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert not _wandb_logged_in()  # no file
    netrc.write_text("machine example.org login me password x\n")
    netrc.chmod(0o600)
    assert not _wandb_logged_in()
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert _wandb_logged_in()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not _wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert _wandb_logged_in()
