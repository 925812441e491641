"""Opening an inference snapshot that a user named (`objective.teacher`, `model.init_from`,
`sct.sample --snapshot`): every way it can be wrong is a ConfigError naming that key, never a traceback.

    state, stored = open_snapshot(path, "objective.teacher")   # missing / not safetensors / corrupt / no sct config
    check_teacher(stored, path, shape=(1, 16, 16), classes=10)   # a diffusion (TrigFlow) teacher for this data

What a snapshot stores is `sct.experiment.snapshot_config`: model, sampling, shape and (since this module)
the objective's name; an older snapshot without "objective" is a diffusion teacher iff it samples with the
ODE (TrainConfig.check ties `sampling.method: ode` to `objective.name: diffusion`).
Tests: tests/integration/test_bad_inputs.py (the teacher_*, init_from_*, sample_* cases), test_input_defects.py.
"""
from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError

from sct.checkpoint import load_snapshot
from sct.config import ConfigError


def open_snapshot(path: str | Path, key: str) -> tuple[dict, dict]:
    """(state_dict, stored config) of the snapshot at `path`; ConfigError(key) if it cannot be one."""
    if not Path(path).is_file():
        what = "teacher snapshot" if key == "objective.teacher" else "snapshot"
        raise ConfigError(key, f"{what} not found: {path}" + (" (a directory)" if Path(path).is_dir() else ""))
    try:
        state, stored = load_snapshot(Path(path))
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:  # not safetensors, truncated, bad JSON metadata
        raise ConfigError(key, f"{path} is not a readable sct snapshot ({' '.join(str(e).split())[:300]})") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise ConfigError(key, f"{path}: its stored config has no 'model' section")
    return state, stored


def stored_objective(stored: dict) -> str:
    """The objective that trained the snapshot ('diffusion', 'sct', 'scd', 'ict'; older snapshots: from sampling)."""
    objective = stored.get("objective")
    if isinstance(objective, dict) and isinstance(objective.get("name"), str):
        return objective["name"]
    if isinstance(objective, str):
        return objective
    method = _get(stored, "sampling", "method")
    return {"ode": "diffusion", "consistency": "a consistency objective (sct/scd/ict)"}.get(method, "unknown")


def check_teacher(stored: dict, path: str, shape: tuple[int, ...], classes: int) -> None:
    """ConfigError("objective.teacher") unless the snapshot is a diffusion teacher for data of `shape` and `classes`."""
    key, objective = "objective.teacher", stored_objective(stored)
    if objective != "diffusion":
        raise ConfigError(key, f"{path} was trained with {objective}, not a diffusion (TrigFlow) teacher: sCD distills "
                               "a snapshot of objective.name: diffusion")
    if _get(stored, "model", "precond", "name") != "trigflow":
        raise ConfigError(key, f"{path} is not a TrigFlow model (precond {_get(stored, 'model', 'precond')})")
    if not isinstance(stored.get("shape"), list) or stored["shape"] != list(shape):
        raise ConfigError(key, f"{path} was trained on samples of shape {stored.get('shape')}, the data are {list(shape)}")
    label_dim = _get(stored, "model", "backbone", "label_dim")
    if label_dim != classes:
        raise ConfigError(key, f"{path} has {label_dim} classes (label_dim), the data have {classes}")


def _get(tree, *keys):
    """tree[k1][k2]... or None where a level is missing or not a mapping."""
    for k in keys:
        tree = tree.get(k) if isinstance(tree, dict) else None
    return tree
