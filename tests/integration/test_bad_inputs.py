"""Malformed configs, overrides and command lines, table-driven: each must exit 2 with a message naming the
offending key, option or file, print no traceback, and leave an existing run folder exactly as it was (file
list, mtimes, sha256) -- and create no new one. Most cases call the CLI's main(argv) in-process (fast); a few
run `python -m ...` for real to prove the exit status and the absence of a traceback end to end.

    pytest tests/integration/test_bad_inputs.py        # about 20 s of CPU (the 5 subprocesses are most of it)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inputs_kit import (
    SCD,
    SHARDS,
    TOY,
    conditional_snapshot,
    folder_state,
    rename_shard,
    run_main,
    shard_dataset,
    snapshot_of,
    trained_run,
)

from pipelines import shards as shards_cli
from sct import sample, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """Every input the cases name, built once: a trained run folder, snapshots, shard datasets, files."""
    root = tmp_path_factory.mktemp("inputs")
    p = {"root": root, "run": trained_run(root / "run"), "new": root / "new_run", "marker": root / "MARKER"}
    p["sct_snap"] = p["run"] / "snapshots" / "snapshot_000000002.safetensors"
    diffusion = "configs/toy_diffusion.yaml"
    p["teacher"] = snapshot_of(root / "teacher.safetensors", diffusion)
    p["old_sct"] = snapshot_of(root / "old_sct.safetensors", "configs/toy_sct.yaml", drop=("objective",))
    p["ict"] = snapshot_of(root / "ict.safetensors", "configs/toy_ict.yaml")
    p["shape3"] = snapshot_of(root / "shape3.safetensors", diffusion, stored={"shape": [3]})
    model = json.loads((root / "teacher.json").read_text())["model_config"]["model"]
    model["backbone"]["label_dim"] = 10
    p["classes10"] = snapshot_of(root / "classes10.safetensors", diffusion, stored={"model": model})
    p["cond"] = conditional_snapshot(root / "cond.safetensors")
    p["text"] = put(root / "notes.safetensors", "not a snapshot\n")
    p["cut"] = put(root / "cut.safetensors", p["teacher"].read_bytes()[:200])
    p["file"] = put(root / "a_file", "x\n")
    p["binary"] = put(root / "binary.yaml", b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage")
    p["empty"] = put(root / "empty.yaml", "")
    for name, text in {"syntax": "run: {dir: [\n", "toplist": "- 1\n- 2\n", "dup": "run: {}\nrun: {}\n",
                       "unknown": "runn: {}\n", "nested": "objective: {p_mena: 1}\n", "type": "run: {total_steps: ten}\n",
                       "nan": "optimizer: {grad_clip: .nan}\n", "inf": "objective: {tangent_norm_c: .inf}\n",
                       "ninf": "optimizer: {lr: -.inf}\n"}.items():
        p[name] = put(root / f"{name}.yaml", text)
    for name, changes in {"ok": {}, "no_kind": {"kind": None}, "dotdot": {"shards": rename_shard("../../outside.tar")},
                          "absolute": {"shards": rename_shard("/etc/passwd")}, "scheme": {"shards": rename_shard("pipe:touch x")},
                          "mshape": {"shape": [3]}, "mclasses": {"num_classes": 10}, "total": {"total_samples": 5},
                          "images": {"kind": "images"}, "nosha": {"shards": lambda s: [{**s[0], "sha256": None}, *s[1:]]}}.items():
        p[f"ds_{name}"] = shard_dataset(root / f"ds_{name}", **changes)
    p["ds_notjson"] = put(root / "ds_notjson", None)
    (p["ds_notjson"] / "manifest.json").write_text("{not json")
    p["image"] = put(root / "img.png", b"\x89PNG fake")
    for name, text in {"badrow": "img.png\n", "neglabel": "img.png,-1\n", "noimage": "img.png,0\nmissing.png,1\n"}.items():
        p[name] = put(root / f"{name}.csv", text)
    p["noclasses"] = put(root / "noclasses", None)
    return p


def put(path: Path, data: str | bytes | None) -> Path:
    """Write text, bytes, or (None) make a folder at `path`; return it."""
    if data is None:
        path.mkdir()
    elif isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def tr(*args):  # a train command line on the toy config, aimed at the existing run folder
    return lambda w: [*TOY, f"run.dir={w['run']}", *(a(w) if callable(a) else a for a in args)]


def scd(teacher):
    return lambda w: [*SCD, f"run.dir={w['run']}", f"objective.teacher={teacher(w)}"]


def shards(ds, *more):
    return tr(SHARDS, lambda w: f"data.url={w[ds]}", *more)


def cfg_file(name):
    return lambda w: ["--config", str(w[name]), f"run.dir={w['run']}"]


def smp(*args):
    return lambda w: [*(a(w) if callable(a) else a for a in args), *(["--out", str(w["run"] / "out")] if "--out" not in args else [])]


def snap(name):
    return lambda w: str(w[name])


CASES = [
    # config files
    ("missing_config", train.main, lambda w: ["--config", str(w["root"] / "nope.yaml")], ["nope.yaml", "cannot read"]),
    ("config_is_dir", train.main, lambda w: ["--config", str(w["root"])], ["cannot read"]),
    ("binary_config", train.main, cfg_file("binary"), ["binary.yaml", "UTF-8"]),
    ("yaml_syntax", train.main, cfg_file("syntax"), ["syntax.yaml", "invalid YAML"]),
    ("top_level_list", train.main, cfg_file("toplist"), ["toplist.yaml", "mapping"]),
    ("duplicate_key", train.main, cfg_file("dup"), ["dup.yaml", "duplicate key 'run'"]),
    ("unknown_top_key", train.main, cfg_file("unknown"), ["runn", "did you mean 'run'"]),
    ("unknown_nested_key", train.main, cfg_file("nested"), ["objective.p_mena"]),
    ("wrong_type_in_file", train.main, cfg_file("type"), ["run.total_steps"]),
    ("nan_in_file", train.main, cfg_file("nan"), ["optimizer.grad_clip", "finite"]),
    ("inf_in_file", train.main, cfg_file("inf"), ["objective.tangent_norm_c", "finite"]),
    ("minus_inf_in_file", train.main, cfg_file("ninf"), ["optimizer.lr", "finite"]),
    ("empty_config_names_the_inconsistent_default", train.main, cfg_file("empty"), ["model.backbone.label_dim"]),
    ("no_config_option", train.main, lambda w: [f"run.dir={w['run']}"], ["--config"]),
    # overrides
    ("nan_grad_clip", train.main, tr("optimizer.grad_clip=.nan"), ["optimizer.grad_clip", "finite"]),
    ("nan_tangent_norm_c", train.main, tr("objective.tangent_norm_c=.NaN"), ["objective.tangent_norm_c"]),
    ("inf_lr", train.main, tr("optimizer.lr=.inf"), ["optimizer.lr"]),
    ("minus_inf_ema", train.main, tr("ema.decay=-.inf"), ["ema.decay"]),
    ("nan_sigma_data", train.main, tr("model.precond.sigma_data=.nan"), ["model.precond.sigma_data"]),
    ("inf_guidance", train.main, tr("sampling.guidance=.inf"), ["sampling.guidance"]),
    ("inf_retry_seconds", train.main, shards("ds_ok", "data.retry_seconds=.inf"), ["data.retry_seconds"]),
    ("override_without_equals", train.main, tr("run.total_steps"), ["run.total_steps"]),
    ("override_unknown_key", train.main, tr("run.stepz=1"), ["run.stepz"]),
    ("override_wrong_type", train.main, tr("run.batch_size=abc"), ["run.batch_size"]),
    ("override_into_scalar", train.main, tr("run.seed.x=1"), ["run.seed"]),
    ("zero_total_steps", train.main, tr("run.total_steps=0"), ["run.total_steps"]),
    ("negative_batch", train.main, tr("run.batch_size=-1"), ["run.batch_size"]),
    ("grad_accum_not_dividing", train.main, tr("run.grad_accum=3"), ["run.grad_accum"]),
    ("unknown_objective", train.main, tr("objective.name=nope"), ["objective.name"]),
    ("precond_mismatch", train.main, tr("model.precond.name=edm_consistency"), ["model.precond.name"]),
    ("zero_stage_5", train.main, tr("dist.engine=deepspeed", "dist.zero_stage=5"), ["dist.zero_stage"]),
    ("zero_without_deepspeed", train.main, tr("dist.zero_stage=2"), ["dist.zero_stage"]),
    ("unknown_device", train.main, tr("run.device=tpu"), ["run.device"]),
    ("mlp_dim_mismatch", train.main, tr("model.backbone.dim=3"), ["model.backbone.dim"]),
    ("ode_for_sct", train.main, tr("sampling.method=ode"), ["sampling.method"]),
    ("run_dir_is_a_file", train.main, lambda w: [*TOY, f"run.dir={w['file']}"], ["run.dir", "not a folder"]),
    ("run_dir_under_a_file", train.main, lambda w: [*TOY, f"run.dir={w['file']}/sub"], ["run.dir", "a_file"]),
    ("world_size_negative", train.main, tr("--dry-run", "--world-size", "-4"), ["--world-size"]),
    ("world_size_zero", train.main, tr("--dry-run", "--world-size", "0"), ["--world-size"]),
    # data.url and manifests
    ("url_pipe", train.main, tr(SHARDS, lambda w: f"data.url=pipe:touch {w['marker']}; echo"), ["data.url", "pipe"]),
    ("url_http", train.main, tr(SHARDS, "data.url=http://127.0.0.1:9/x"), ["data.url", "http"]),
    ("url_https", train.main, tr(SHARDS, "data.url=https://example.com/x"), ["data.url", "https"]),
    ("url_ftp", train.main, tr(SHARDS, "data.url=ftp://example.com/x"), ["data.url", "ftp"]),
    ("url_scp", train.main, tr(SHARDS, "data.url=scp://host/x"), ["data.url", "scp"]),
    ("url_empty", train.main, tr(SHARDS, "data.url="), ["data.url"]),
    ("url_missing_folder", train.main, tr(SHARDS, lambda w: f"data.url={w['root'] / 'no_data'}"), ["data.url", "no_data"]),
    ("shape_empty", train.main, tr("data={name: shards, url: x, shape: [], class_conditional: false}"), ["data.shape"]),
    ("manifest_without_kind", train.main, shards("ds_no_kind"), ["data.url", "kind"]),
    ("manifest_dotdot_name", train.main, shards("ds_dotdot"), ["data.url", "../../outside.tar"]),
    ("manifest_absolute_name", train.main, shards("ds_absolute"), ["data.url", "/etc/passwd"]),
    ("manifest_scheme_name", train.main, shards("ds_scheme"), ["data.url", "pipe:touch x"]),
    ("manifest_shape_differs", train.main, shards("ds_mshape"), ["data.shape", "[3]"]),
    ("manifest_classes_differ", train.main,
     tr("data={name: shards, shape: [2], num_classes: 5, num_workers: 0}", lambda w: f"data.url={w['ds_mclasses']}",
        "model.backbone.label_dim=5"), ["data.num_classes"]),
    ("manifest_total_wrong", train.main, shards("ds_total"), ["data.url", "total_samples"]),
    ("manifest_no_sha", train.main, shards("ds_nosha"), ["data.url", "sha256"]),
    ("manifest_not_json", train.main, shards("ds_notjson"), ["data.url", "not valid JSON"]),
    ("manifest_images_kind", train.main, shards("ds_images"), ["data.url", "images"]),
    # sCD teacher and init_from
    ("teacher_missing", train.main, scd(lambda w: w["root"] / "none.safetensors"), ["objective.teacher", "not found"]),
    ("teacher_is_sct", train.main, scd(snap("sct_snap")), ["objective.teacher", "sct"]),
    ("teacher_old_consistency", train.main, scd(snap("old_sct")), ["objective.teacher", "consistency"]),
    ("teacher_is_ict", train.main, scd(snap("ict")), ["objective.teacher", "ict"]),
    ("teacher_wrong_shape", train.main, scd(snap("shape3")), ["objective.teacher", "shape"]),
    ("teacher_wrong_classes", train.main, scd(snap("classes10")), ["objective.teacher", "classes"]),
    ("teacher_not_safetensors", train.main, scd(snap("text")), ["objective.teacher", "notes.safetensors"]),
    ("teacher_truncated", train.main, scd(snap("cut")), ["objective.teacher", "cut.safetensors"]),
    ("teacher_is_a_folder", train.main, scd(snap("root")), ["objective.teacher", "directory"]),
    ("init_from_missing", train.main, tr(lambda w: f"model.init_from={w['root'] / 'none.safetensors'}"), ["model.init_from"]),
    ("init_from_text", train.main, tr(lambda w: f"model.init_from={w['text']}"), ["model.init_from", "notes.safetensors"]),
    ("init_from_truncated", train.main, tr(lambda w: f"model.init_from={w['cut']}"), ["model.init_from", "cut.safetensors"]),
    ("init_from_other_model", train.main, tr(lambda w: f"model.init_from={w['cond']}"), ["model.init_from", "does not fit"]),
    # python -m sct.sample
    ("sample_missing_snapshot", sample.main, smp("--snapshot", lambda w: str(w["root"] / "no.safetensors")), ["--snapshot", "no.safetensors"]),
    ("sample_text_snapshot", sample.main, smp("--snapshot", snap("text")), ["--snapshot", "notes.safetensors"]),
    ("sample_truncated_snapshot", sample.main, smp("--snapshot", snap("cut")), ["--snapshot", "cut.safetensors"]),
    ("sample_num_0", sample.main, smp("--snapshot", snap("sct_snap"), "--num", "0"), ["--num"]),
    ("sample_num_negative", sample.main, smp("--snapshot", snap("sct_snap"), "--num", "-5"), ["--num"]),
    ("sample_steps_0", sample.main, smp("--snapshot", snap("sct_snap"), "--steps", "0"), ["--steps"]),
    ("sample_batch_0", sample.main, smp("--snapshot", snap("sct_snap"), "--batch", "0"), ["--batch"]),
    ("sample_label_99", sample.main, smp("--snapshot", snap("cond"), "--label", "99"), ["--label 99", "label_dim 10"]),
    ("sample_label_negative", sample.main, smp("--snapshot", snap("cond"), "--label", "-1"), ["--label -1"]),
    ("sample_label_unconditional", sample.main, smp("--snapshot", snap("sct_snap"), "--label", "3"), ["--label 3", "label_dim 0"]),
    ("sample_guidance_nan", sample.main, smp("--snapshot", snap("sct_snap"), "--guidance", "nan"), ["--guidance"]),
    ("sample_out_is_a_file", sample.main, smp("--snapshot", snap("sct_snap"), "--out", lambda w: str(w["run"] / "config.yaml")), ["--out"]),
    ("sample_steps_not_int", sample.main, smp("--snapshot", snap("sct_snap"), "--steps", "two"), ["--steps"]),
    # python -m pipelines.shards
    ("shards_size_0", shards_cli.main, lambda w: ["arrays", "--dataset", "digits", "--out", str(w["run"] / "s"), "--shard-size", "0"], ["--shard-size"]),
    ("shards_size_negative", shards_cli.main, lambda w: ["images", "--list", str(w["noimage"]), "--out", str(w["run"] / "s"), "--shard-size", "-1"], ["--shard-size"]),
    ("shards_bad_row", shards_cli.main, lambda w: ["images", "--list", str(w["badrow"]), "--out", str(w["run"] / "s")], ["badrow.csv:1"]),
    ("shards_negative_label", shards_cli.main, lambda w: ["images", "--list", str(w["neglabel"]), "--out", str(w["run"] / "s")], ["neglabel.csv:1"]),
    ("shards_missing_image", shards_cli.main, lambda w: ["images", "--list", str(w["noimage"]), "--out", str(w["run"] / "s")], ["missing.png"]),
    ("shards_missing_list", shards_cli.main, lambda w: ["images", "--list", str(w["root"] / "no.csv"), "--out", str(w["run"] / "s")], ["no.csv"]),
    ("shards_missing_folder", shards_cli.main, lambda w: ["images", "--folder", str(w["root"] / "nodir"), "--out", str(w["run"] / "s")], ["nodir"]),
    ("shards_no_class_folders", shards_cli.main, lambda w: ["images", "--folder", str(w["noclasses"]), "--out", str(w["run"] / "s")], ["noclasses"]),
    ("shards_out_pipe", shards_cli.main, lambda w: ["arrays", "--dataset", "digits", "--out", f"pipe:touch {w['marker']}"], ["--out", "pipe"]),
    ("shards_out_http", shards_cli.main, lambda w: ["arrays", "--dataset", "digits", "--out", "http://127.0.0.1:9/x"], ["--out", "http"]),
]


@pytest.mark.parametrize("name,main,argv,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clean_error_that_touches_nothing(w, name, main, argv, names):
    before, root_before = folder_state(w["run"]), sorted(p.name for p in w["root"].iterdir())
    rc, output = run_main(main, argv(w))
    assert rc == 2, output
    assert "Traceback" not in output, output
    for part in names:
        assert part in output, f"{part!r} not in: {output}"
    assert folder_state(w["run"]) == before, "the existing run folder changed"
    assert sorted(p.name for p in w["root"].iterdir()) == root_before, "a file or folder appeared"
    assert not w["marker"].exists(), "a shell command ran"


def test_device_cuda_without_cuda_is_a_config_error(w):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    before = folder_state(w["run"])
    rc, output = run_main(train.main, tr("run.device=cuda")(w))
    assert rc == 2 and "run.device" in output and "Traceback" not in output, output
    assert folder_state(w["run"]) == before


def test_a_rejected_new_run_leaves_no_folder(w):
    for argv in ([*TOY, f"run.dir={w['new']}", "optimizer.lr=.nan"], [*SCD, f"run.dir={w['new']}", f"objective.teacher={w['sct_snap']}"],
                 [*TOY, f"run.dir={w['new']}", SHARDS, f"data.url={w['ds_no_kind']}"]):
        rc, output = run_main(train.main, argv)
        assert rc == 2 and "Traceback" not in output, output
        assert not w["new"].exists()


SUBPROCESS = [
    ("sct.train", lambda w: ["--config", str(w["binary"]), f"run.dir={w['run']}"], "binary.yaml"),
    ("sct.train", lambda w: [*tr("--dry-run", "--world-size", "-4")(w)], "--world-size"),
    ("sct.train", tr(SHARDS, lambda w: f"data.url=pipe:touch {w['marker']}; echo"), "data.url"),
    ("sct.sample", smp("--snapshot", snap("sct_snap"), "--num", "0"), "--num"),
    ("pipelines.shards", lambda w: ["images", "--list", str(w["noimage"]), "--out", str(w["run"] / "s")], "missing.png"),
]


@pytest.mark.parametrize("module,argv,name", SUBPROCESS, ids=[f"{m}-{n}" for m, _, n in SUBPROCESS])
def test_bad_input_end_to_end_exit_status(w, module, argv, name):
    before = folder_state(w["run"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module, *argv(w)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output and name in output, output
    assert folder_state(w["run"]) == before and not w["marker"].exists()
