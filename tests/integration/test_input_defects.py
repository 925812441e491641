"""One test per input-validation defect of issue 11 (items 2, 3, 8, 9, 10, 14): each fails on the code before
the fix (a shell ran, a file changed, a bad teacher trained, NaN passed, a lying manifest crashed, a traceback)
and passes after. Real files, real shards, real CLIs; nothing mocked.

    pytest tests/integration/test_input_defects.py     # about 6 s of CPU
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from inputs_kit import SCD, SHARDS, TOY, folder_state, rename_shard, run_main, shard_dataset, snapshot_of, trained_run

from pipelines import s3
from pipelines import shards as shards_cli
from pipelines.data import build_stream
from pipelines.shards import write_arrays
from pipelines.stream import ShardDataConfig, TooManyBadShards
from sct import sample, train
from sct.config import ConfigError, load
from sct.experiment import TrainConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory.mktemp("defects") / "run")


# item 2: no URL reaches a shell
def test_pipe_data_url_is_rejected_and_its_command_never_runs(tmp_path, run):
    marker = tmp_path / "MARKER"
    rc, output = run_main(train.main, [*TOY, f"run.dir={tmp_path / 'r'}", "run.total_steps=1", SHARDS, f"data.url=pipe:touch {marker}; echo"])
    assert rc == 2 and "data.url" in output and "pipe" in output, output
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_webdataset_shell_and_curl_handlers_are_disabled(tmp_path):
    marker = tmp_path / "MARKER"
    for url in (f"pipe:touch {marker}", "http://127.0.0.1:9/x.tar", "https://127.0.0.1:9/x.tar", "scp://h/x.tar"):
        with pytest.raises(ValueError, match="not accepted"):
            wds.gopen(url, "rb").read()
        with pytest.raises(ValueError, match="not accepted"):
            s3.read_bytes(url, budget_s=1)
    assert not marker.exists()
    (tmp_path / "x.bin").write_bytes(b"ok")
    assert s3.read_bytes(str(tmp_path / "x.bin")) == b"ok" and s3.read_bytes(f"file://{tmp_path / 'x.bin'}") == b"ok"


# item 3: a rejected (re)start writes nothing
def test_a_rejected_rerun_changes_nothing_in_the_run_folder(tmp_path, run):
    before = folder_state(run)
    for bad in ([SHARDS, f"data.url={tmp_path / 'no_data'}"], ["model.init_from=/no/such.safetensors"]):  # storage, init_from
        rc, output = run_main(train.main, [*TOY, f"run.dir={run}", "run.total_steps=1", *bad])
        assert rc == 2 and "Traceback" not in output, output
        assert folder_state(run) == before
    rc, _ = run_main(train.main, [*SCD, f"run.dir={tmp_path / 'new'}", "run.total_steps=1", f"objective.teacher={tmp_path / 'none'}"])
    assert rc == 2 and not (tmp_path / "new").exists()


# item 8: the sCD teacher is checked against the run
def test_scd_teacher_must_be_a_diffusion_snapshot_of_the_runs_shape(tmp_path, run):
    sct_snapshot = run / "snapshots" / "snapshot_000000002.safetensors"
    wide = snapshot_of(tmp_path / "wide.safetensors", "configs/toy_diffusion.yaml", ["model.backbone.hidden=48"], stored={"shape": [3]})
    (tmp_path / "text.safetensors").write_text("hello")
    for teacher, expect in ((sct_snapshot, "not a diffusion"), (wide, r"shape \[3\]"), (tmp_path / "text.safetensors", "not a readable")):
        argv = [*SCD, f"run.dir={tmp_path / 'student'}", "run.total_steps=1", f"objective.teacher={teacher}"]
        rc, output = run_main(train.main, argv)
        assert rc == 2 and "objective.teacher" in output and "Traceback" not in output, output
        assert re.search(expect, output), output
    good = snapshot_of(tmp_path / "teacher.safetensors", "configs/toy_diffusion.yaml")
    assert json.loads((tmp_path / "teacher.json").read_text())["model_config"]["objective"]["name"] == "diffusion"
    rc, output = run_main(train.main, [*SCD, f"run.dir={tmp_path / 'student'}", "run.total_steps=1", f"objective.teacher={good}"])
    assert rc == 0, output


# item 9: non-finite floats
@pytest.mark.parametrize("override", ["optimizer.grad_clip=.nan", "objective.tangent_norm_c=.inf", "optimizer.lr=-.inf", "ema.decay=.NaN"])
def test_non_finite_floats_are_rejected_with_the_dotted_key(override):
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: must be a finite number"):
        load(TrainConfig, "configs/toy_sct.yaml", [override])


# item 10: the manifest and each decoded sample are validated
def test_manifest_keys_and_shard_names_are_validated(tmp_path):
    base = {"shape": (2,), "class_conditional": False, "num_workers": 0}
    for name, changes, expect in (("nokind", {"kind": None}, "'kind'"), ("dotdot", {"shards": rename_shard("../x.tar")}, r"\.\./x\.tar"),
                                  ("abs", {"shards": rename_shard("/etc/passwd")}, "/etc/passwd")):
        url = shard_dataset(tmp_path / name, **changes)
        with pytest.raises(ConfigError, match=rf"data\.url: .*{expect}"):
            build_stream(ShardDataConfig(url=str(url), **base), 4)


def test_a_sample_that_lies_about_its_shape_or_label_is_a_bad_shard_named_in_the_error(tmp_path):
    """Four shards of 8; shard 1 holds [3]-shaped samples under a manifest saying [2], shard 2 a label 12 of 10."""
    x, labels = np.zeros((32, 2), np.float32), np.arange(32) % 10
    write_arrays(x, labels, str(tmp_path / "ok"), 8, num_classes=10)
    write_arrays(np.zeros((8, 3), np.float32), labels[:8], str(tmp_path / "wide"), 8, num_classes=10)
    write_arrays(x[:8], np.full(8, 12), str(tmp_path / "label"), 8, num_classes=10)
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    for i, src in ((1, "wide"), (2, "label")):
        (tmp_path / "ok" / f"shard-00000{i}.tar").write_bytes((tmp_path / src / "shard-000000.tar").read_bytes())
        manifest["shards"][i] = {**json.loads((tmp_path / src / "manifest.json").read_text())["shards"][0], "name": f"shard-00000{i}.tar"}
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps(manifest))
    cfg = {"url": str(tmp_path / "ok"), "shape": (2,), "num_classes": 10, "num_workers": 0, "shuffle_shards": False, "shuffle_buffer": 1}
    strict = build_stream(ShardDataConfig(**cfg), 8)
    with pytest.raises(TooManyBadShards, match=r"shard-000001\.tar.*\[3\].*data\.shape"):
        for _ in range(4):
            next(strict)
    stream = build_stream(ShardDataConfig(**cfg, max_bad_shards=2), 8)
    batches = [next(stream) for _ in range(4)]  # the two good shards, twice (two epochs)
    assert all(b["x"].shape == (8, 2) for b in batches)
    assert stream.counters["bad_shards"] == 2 and set(stream.bad) == {"shard-000001.tar", "shard-000002.tar"}
    assert "label '12'" in stream.bad["shard-000002.tar"] and stream.counters["skipped_samples"] >= 16


# item 14: tracebacks become errors naming the thing
def test_cli_mistakes_exit_2_naming_the_option_or_file(tmp_path, run):
    snapshot = str(run / "snapshots" / "snapshot_000000002.safetensors")
    (binary := tmp_path / "b.yaml").write_bytes(b"\xff\xfe\x00\x01")
    (rows := tmp_path / "l.csv").write_text("a.png\n")
    cases = [(train.main, ["--config", str(binary)], "b.yaml"), (train.main, [*TOY, f"run.dir={run / 'config.yaml'}"], "run.dir"),
             (train.main, [*TOY, "--dry-run", "--world-size", "-4"], "--world-size"),
             (sample.main, ["--snapshot", str(tmp_path / "no.safetensors"), "--out", str(tmp_path / "o")], "--snapshot"),
             (sample.main, ["--snapshot", snapshot, "--out", str(tmp_path / "o"), "--steps", "0"], "--steps"),
             (sample.main, ["--snapshot", snapshot, "--out", str(tmp_path / "o"), "--label", "99"], "--label"),
             (shards_cli.main, ["arrays", "--dataset", "digits", "--out", str(tmp_path / "s"), "--shard-size", "0"], "--shard-size"),
             (shards_cli.main, ["images", "--list", str(rows), "--out", str(tmp_path / "s")], "l.csv:1")]
    for main, argv, name in cases:
        rc, output = run_main(main, argv)
        assert rc == 2 and name in output and "Traceback" not in output, (argv, output)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()
