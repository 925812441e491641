"""Real inputs for the bad-input tests (test_bad_inputs.py, test_input_defects.py): a trained toy run folder,
snapshots of every kind (built from real configs, not trained: only their stored config matters), shard
datasets with doctored manifests, and a runner that calls a CLI's main(argv) in-process and captures what a
user would see. Nothing here is mocked."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import sys
import traceback
from pathlib import Path

import numpy as np

from pipelines.shards import write_arrays
from sct import stats, train
from sct.checkpoint import save_snapshot
from sct.config import from_dict, to_dict
from sct.experiment import ModelConfig, TrainConfig, build_model, snapshot_config
from sct.samplers import SamplingConfig

SMALL = ["model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64", "run.log_every=1",
         "run.sample_every=1000", "run.snapshot_every=1000", "sampling.num=16"]
TOY = ["--config", "configs/toy_sct.yaml", *SMALL]
SCD = ["--config", "configs/toy_scd.yaml", *SMALL]
SHARDS = "data={name: shards, shape: [2], class_conditional: false, num_workers: 0}"


def run_main(main, argv: list[str]) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `main(argv)`, SystemExit included; any other exception is reported as
    the traceback a user would have seen (so the caller's "no Traceback" check catches it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - reported, not swallowed: the test asserts there is none
            traceback.print_exc(file=sys.stderr)
            rc = 1
    return rc, out.getvalue()


def folder_state(root: Path) -> dict[str, tuple]:
    """Every path under `root` -> (mtime_ns, sha256) (folders: (mtime_ns,)): any change shows."""
    state = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file():
            state[rel] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            state[rel] = (p.stat().st_mtime_ns,)
    return state


def trained_run(run_dir: Path) -> Path:
    """A real toy sCT run folder (2 steps): config.yaml, log.txt, metrics.jsonl, checkpoint, snapshot."""
    assert train.main([*TOY, f"run.dir={run_dir}", "run.total_steps=2", "run.checkpoint_every=2"]) == 0
    stats.setup_logging(None)  # detach the run's log.txt: later rejected starts must not write to it
    return run_dir


def snapshot_of(path: Path, config: str, overrides: list[str] = (), stored: dict | None = None,
                drop: tuple[str, ...] = ()) -> Path:
    """A snapshot of the model a config (plus overrides) builds, with `stored` merged into its stored config."""
    from sct.config import load

    cfg = load(TrainConfig, config, [*SMALL[:2], *overrides])
    model = build_model(cfg.model)
    meta = {**snapshot_config(cfg), **(stored or {})}
    for key in drop:
        meta.pop(key, None)
    save_snapshot(path, model.state_dict(), meta)
    return path


def conditional_snapshot(path: Path, classes: int = 10) -> Path:
    """A class-conditional 2-D MLP sCT snapshot (label_dim = classes)."""
    cfg = from_dict(ModelConfig, {"backbone": {"name": "mlp", "dim": 2, "hidden": 16, "depth": 1, "label_dim": classes}})
    save_snapshot(path, build_model(cfg).state_dict(), {"model": to_dict(cfg), "sampling": to_dict(SamplingConfig()),
                                                         "shape": [2], "objective": "sct"})
    return path


def shard_dataset(url: Path, n: int = 64, shard: int = 16, **manifest_changes) -> Path:
    """2-D float32 points in local shards; `manifest_changes` edit the manifest (None deletes a key)."""
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    write_arrays(x, None, str(url), shard, num_classes=0)
    if manifest_changes:
        path = url / "manifest.json"
        manifest = json.loads(path.read_text())
        for key, value in manifest_changes.items():
            if value is None:
                manifest.pop(key)
            elif callable(value):
                manifest[key] = value(manifest[key])
            else:
                manifest[key] = value
        path.write_text(json.dumps(manifest))
    return url


def rename_shard(new_name: str):
    """A manifest change: the first shard's name becomes `new_name` (the file is not moved)."""
    return lambda shards: [{**shards[0], "name": new_name}, *shards[1:]]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
