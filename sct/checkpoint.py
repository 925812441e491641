"""Checkpoints, both kinds (DESIGN rule 7).

Owns:
- resumable training state: `run/checkpoints/step_000001000/` directories written atomically
  (temp dir -> fsync -> `COMPLETE` marker with per-file sha256 -> rename), pruned to the newest
  `keep_last`; `latest_training_state` returns the newest one that `verify`s (its marker lists exactly the
  files present, each with its sha256; a malformed marker is reported by size and hash, never echoed).
  Sealed checkpoints are not group/other-writable whatever the umask (sct.run_folder refuses those);
  `load_training_state` unpickles plain data only (weights_only=True).
  `atomic_checkpoint_dir` yields the temp dir so an engine (DeepSpeed) can add its own files; with a
  `barrier` every rank writes into the same temp dir and rank 0 seals it after all are done.
- inference snapshots: EMA weights as safetensors with the model config in the metadata
  (key "sct_model_config") plus a sibling .json for humans. Generation reads only these.

Tests: `pytest tests/unit/test_checkpoint.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from loguru import logger
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

MARKER = "COMPLETE"
STATE_FILE = "state.pt"
CONFIG_KEY = "sct_model_config"
EXTRA_KEY = "sct_extra"
_STEP_DIR = re.compile(r"^step_(\d{9})$")
_STEP_IN = re.compile(r"step_(\d{9})")  # also in `.old-step_000000100-<pid>`
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directory entries survive a power cut only after this)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """0o666 less the process umask: the mode `open()` gives a new file (mkstemp and safetensors use 0o600)."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        mask = os.umask(0o022)  # no /proc: read it by setting it (briefly process-wide)
        os.umask(mask)
    return 0o666 & ~mask


def _no_group_write(path: Path) -> None:
    """Checkpoints are sealed without group/other write permission whatever the umask (sct.run_folder refuses those)."""
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode & 0o022:
        os.chmod(path, mode & ~0o022)


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, dir) for every `step_*` directory, newest first."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def _prune(ckpt_root: Path, keep_last: int, protect: Path) -> None:
    """Keep the newest `keep_last` complete step dirs (and `protect`); drop stale temp dirs."""
    complete = [p for _, p in step_dirs(ckpt_root) if (p / MARKER).is_file()]
    for p in complete[keep_last:]:
        if p != protect:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_root.iterdir():
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_checkpoint_dir(run_dir: Path, step: int, keep_last: int = 2, rank: int = 0,
                          barrier: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temp dir to fill; on clean exit seal it with COMPLETE and move it to step_{step}.

    Multi-rank (`barrier` given): every rank calls this and writes its own files into the same temp
    dir; rank 0 creates it, and after a barrier (all ranks done) hashes, marks and renames it.
    On an exception the temp dir is removed and the exception re-raised; nothing else changes.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    ckpt_root = Path(run_dir) / "checkpoints"
    name = f"step_{step:09d}"
    final = ckpt_root / name
    tmp = ckpt_root / (f".tmp-{name}" if barrier else f".tmp-{name}-{os.getpid()}")
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if barrier:
        barrier()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if barrier:
        barrier()
    if rank == 0:
        _seal(tmp, final, step, ckpt_root, keep_last)
    if barrier:
        barrier()


def _seal(tmp: Path, final: Path, step: int, ckpt_root: Path, keep_last: int) -> None:
    """Hash + fsync every file, write the marker, rename tmp -> final (replacing), prune."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _no_group_write(f)
        _fsync_path(f)
        files[f.relative_to(tmp).as_posix()] = _sha256(f)
    marker = {"step": step, "time": time.time(), "files": files}
    with open(tmp / MARKER, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _no_group_write(tmp / MARKER)
    for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _no_group_write(d)
        _fsync_path(d)
    if final.exists():  # replace: move the old one aside first so a crash leaves a valid dir or none
        old = ckpt_root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(ckpt_root)
    _prune(ckpt_root, keep_last, protect=final)


def save_training_state(run_dir: Path, step: int, state: dict, keep_last: int = 2) -> Path:
    """torch.save `state` into run_dir/checkpoints/step_{step:09d}/state.pt atomically; return the dir."""
    with atomic_checkpoint_dir(run_dir, step, keep_last) as tmp:
        torch.save(state, tmp / STATE_FILE)
    return Path(run_dir) / "checkpoints" / f"step_{step:09d}"


def _marker_files(step_dir: Path) -> dict[str, str] | str:
    """The marker's {relative path: sha256}, or why the marker is not one sct wrote (its content is never echoed)."""
    try:
        raw = (step_dir / MARKER).read_bytes()
    except FileNotFoundError:
        return f"no {MARKER} marker"
    try:
        marker = json.loads(raw)
        files, step = marker["files"], marker["step"]
        ok = (step == int(_STEP_IN.search(step_dir.name).group(1)) and isinstance(files, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) and _safe_relative(k) for k, v in files.items()))
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        return f"invalid {MARKER} marker ({len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()[:16]}...)"
    return files


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not name.startswith("/") and all(p not in ("", ".", "..") for p in parts) and name.isprintable()


def verify(step_dir: Path) -> str | None:
    """None when `step_dir` is sealed and intact (exactly the files its marker lists, each with its sha256), else why not."""
    files = _marker_files(step_dir)
    if isinstance(files, str):
        return files
    present = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if not p.is_dir()} - {MARKER}
    if present - files.keys():
        return f"{len(present - files.keys())} file(s) not listed in its {MARKER} marker"
    for rel, digest in files.items():
        f = step_dir / rel
        if not f.is_file():
            return f"missing file {rel}"
        if _sha256(f) != digest:
            return f"checksum mismatch in {rel}"
    return None


def latest_training_state(run_dir: Path) -> Path | None:
    """Newest step dir that is complete and verifies; skipped ones are logged with the reason."""
    for _, step_dir in step_dirs(Path(run_dir) / "checkpoints"):
        reason = verify(step_dir)
        if reason is None:
            return step_dir
        logger.warning(f"skipping checkpoint {step_dir}: {reason}")
    return None


def load_training_state(step_dir: Path) -> dict:
    """state.pt as plain data: weights_only=True unpickles tensors and containers only, never code."""
    return torch.load(Path(step_dir) / STATE_FILE, weights_only=True, map_location="cpu")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then os.replace it onto `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        _fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_snapshot(
    path: Path, state_dict: dict[str, Tensor], model_config: dict, extra: dict | None = None
) -> None:
    """Write a self-contained inference snapshot (safetensors + config metadata + sibling .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    metadata = {CONFIG_KEY: json.dumps(model_config), EXTRA_KEY: json.dumps(extra or {})}
    human = json.dumps({"model_config": model_config, "extra": extra or {}}, indent=2)
    atomic_write(path.with_suffix(".json"), lambda p: p.write_text(human + "\n"))
    atomic_write(path, lambda p: save_file(tensors, p, metadata=metadata))
    _fsync_path(path.parent)


def load_snapshot(path: Path) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, model_config) from a snapshot written by `save_snapshot`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a safetensors file: {e}") from e
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{path} is not an sct snapshot (no {CONFIG_KEY!r} in its metadata)")
    return load_file(path, device="cpu"), json.loads(metadata[CONFIG_KEY])
