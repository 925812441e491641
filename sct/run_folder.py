"""The run folder's life cycle at start-up: one job per folder, nothing loaded that another user could
have written, no silent change of config on resume, nothing stale left over.

    with run_folder.open_run(run_dir, cfg, d, restart=False) as folder:  # every rank; rank 0 does the work
        ... loop.run(..., resume_from=folder.checkpoint) ...                # the lock is released on exit

`open_run` (rank 0; the outcome is shared with the other ranks, which touch nothing) in this order:
1. config diff: when run.dir already holds config.yaml and checkpoints, the stored config is compared
   with the current one; a change to any key outside `OPERATIONAL_KEYS` (and tracking.*) is refused (status 2) naming
   the dotted keys. Nothing in the folder is touched by a refused start. Then run.dir is created if
   missing (never group/other-writable) and must pass the ownership check of 4 (status 6).
2. lock: `fcntl.flock(LOCK_EX | LOCK_NB)` on `<run.dir>/.lock`, held until `close()` (or the process
   dies: the kernel releases it, so a killed job never leaves a stale lock). The holder writes
   `host pid start-time` into the file; a second job is refused (status 7) naming that holder. Only
   global rank 0 takes it: a second job has its own rank 0, which is enough to exclude it, and ranks on
   other nodes need no lock of their own. Multi-node runs put run.dir on a shared filesystem; flock
   there must be cluster-wide (NFSv4 and Linux NFSv3 clients map it to byte-range locks; Lustre needs
   the `flock` mount option, `localflock` is node-local only). Where flock is unsupported the run
   warns and goes on unlocked.
3. leftovers: unsealed `.tmp-*` checkpoint folders and `.universal-*` conversions of a dead job are
   removed; a `.old-step_*` folder (a replace interrupted between its two renames) is put back when
   its step folder is missing, else removed.
4. permissions: checkpoints/ and the chosen step folder with everything in it must be owned
   by this user and not writable by group or others (no symlinks inside); otherwise the run is refused
   (status 6) before anything in it is read, DeepSpeed's engine files included. sct itself seals
   checkpoints without group/other write permission whatever the umask.
5. choice: the newest checkpoint that verifies. If there are step folders but none verifies, the run
   is refused (status 6) listing each and why, unless `restart` (`--restart-if-no-valid-checkpoint`):
   then they are moved to `checkpoints/rejected-<UTC time>/` (kept as evidence) and the run starts at 0.
6. metrics: `metrics.jsonl` is rewritten atomically with only the records up to the resumed step.

Tests: `pytest tests/integration/test_run_folder.py`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import yaml
from loguru import logger

from sct import exit_codes
from sct.checkpoint import MARKER, atomic_write, latest_training_state, step_dirs, verify
from sct.config import ConfigError, from_dict, to_dict
from sct.dist import Dist, all_gather_objects

LOCK_FILE = ".lock"
# Keys a resume may change: how long, how often, where, how patiently; never the math or the data order.
OPERATIONAL_KEYS = frozenset({
    "run.dir", "run.device", "run.total_steps", "run.max_steps_per_job", "run.log_every", "run.checkpoint_every",
    "run.snapshot_every", "run.sample_every", "run.keep_checkpoints", "run.max_nonfinite_in_a_row",
    "data.url",  # the data stream's state fingerprints the shards' sha256: a moved copy resumes, other data does not
    "data.num_workers",  # the stream maps saved reader positions onto another layout (none read twice, none skipped)
    "data.prefetch_factor", "data.retry_seconds", "data.max_bad_shards", "data.worker_start",
    "dist.backend", "dist.timeout_minutes",
})
OPERATIONAL_SECTIONS = ("tracking.",)  # TensorBoard / W&B sinks


class Refused(exit_codes.Fatal):
    pass


@dataclass
class RunFolder:
    run_dir: Path
    checkpoint: Path | None = None  # the step folder to resume from (None: start at step 0)
    _lock_fd: int | None = None

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: tree}


def changed_keys(stored_text: str, cfg) -> dict[str, tuple]:
    """{dotted key: (stored value, current value)} where the stored YAML and `cfg` differ (both resolved with defaults)."""
    try:
        stored = from_dict(type(cfg), yaml.safe_load(stored_text) or {}, source="stored config.yaml")
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError("run.dir", f"the stored config.yaml no longer loads ({e}); resume it with the sct version that wrote it, or use a new run.dir") from None
    old, new = _flatten(to_dict(stored)), _flatten(to_dict(cfg))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_config(run_dir: Path, cfg) -> None:
    """Refuse (ConfigError, status 2) a resume whose config differs outside OPERATIONAL_KEYS."""
    stored = run_dir / "config.yaml"
    if not stored.is_file() or not step_dirs(run_dir / "checkpoints"):
        return
    try:
        text = stored.read_bytes().decode()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("run.dir", f"cannot read the stored {stored} ({e.__class__.__name__}); use a new run.dir") from None
    bad = {k: v for k, v in changed_keys(text, cfg).items() if k not in OPERATIONAL_KEYS and not k.startswith(OPERATIONAL_SECTIONS)}
    if bad:
        changes = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in bad.items())
        raise ConfigError("run.dir", f"{run_dir} holds a run whose config differs in {changes} ({stored}); a resume may change "
                                     f"only {', '.join(sorted(OPERATIONAL_KEYS))}, tracking.*. Restore those values, or start a new run.dir")


def lock(run_dir: Path) -> int | None:
    """Take `<run_dir>/.lock` exclusively (non-blocking) and write the holder into it; the open fd holds it."""
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = Path(path).read_text().strip() or "unknown (it has not written its name yet)"
        os.close(fd)
        raise Refused(exit_codes.BUSY, f"{run_dir} is in use by another job ({holder}); wait for it to end or use another run.dir") from None
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        logger.warning(f"{path}: this filesystem does not support flock ({e.strerror}): make sure no other job uses {run_dir}")
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
    return fd


def remove_leftovers(ckpt_root: Path) -> None:
    """Drop unsealed temp folders of a dead job; restore a replaced checkpoint caught between its two renames."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.name.startswith(".old-"):
            name = p.name[len(".old-"):].rsplit("-", 1)[0]
            if not (ckpt_root / name).exists() and verify(p) is None:
                os.rename(p, ckpt_root / name)
                logger.warning(f"restored {ckpt_root / name} from {p.name} (a replace was interrupted)")
                continue
        if p.name.startswith((".tmp-", ".old-", ".universal-")):
            shutil.rmtree(p, ignore_errors=True)
            logger.info(f"removed unsealed leftover {p}")


def unsafe(path: Path, recursive: bool = False) -> str | None:
    """Why `path` (and, recursive, everything under it) could have been written by someone else; None if it could not."""
    me = os.geteuid()
    todo = [path]
    while todo:
        p = todo.pop()
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            return f"{p} is a symbolic link"
        if st.st_uid != me:
            return f"{p} is owned by uid {st.st_uid}, not by this user (uid {me})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{p} is writable by {'group' if st.st_mode & stat.S_IWGRP else 'others'} (mode {stat.S_IMODE(st.st_mode):04o}): `chmod -R go-w {p}` if you trust its content"
        if recursive and stat.S_ISDIR(st.st_mode):
            todo.extend(p.iterdir())
    return None


def choose_checkpoint(run_dir: Path, restart: bool) -> Path | None:
    """The newest checkpoint that verifies and is safe to load; Refused (status 6) when there is none to trust."""
    ckpt_root = run_dir / "checkpoints"
    found = step_dirs(ckpt_root)
    if not found:
        return None
    if reason := unsafe(ckpt_root):
        raise Refused(exit_codes.STATE, f"refusing to resume from {run_dir}: {reason}")
    latest = latest_training_state(run_dir)
    if latest is not None:
        if reason := unsafe(latest, recursive=True):
            raise Refused(exit_codes.STATE, f"refusing to resume from {latest}: {reason}")
        return latest
    listing = "; ".join(f"{p.name}: {verify(p)}" for _, p in found)
    if not restart:
        raise Refused(exit_codes.STATE, f"no valid checkpoint in {ckpt_root} ({listing}); rerun with "
                                        "--restart-if-no-valid-checkpoint to move them aside and start again at step 0")
    aside = ckpt_root / time.strftime("rejected-%Y%m%dT%H%M%SZ", time.gmtime())
    aside.mkdir()
    for _, p in found:
        os.rename(p, aside / p.name)
    logger.warning(f"no valid checkpoint ({listing}): moved them to {aside}; starting at step 0")
    return None


def _step_of(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line of a killed job: dropped


def roll_back_metrics(path: Path, step: int) -> None:
    """Keep only the records up to `step` (atomic rewrite): a resumed run repeats nothing in metrics.jsonl."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _step_of(line) <= step]
    if len(keep) < len(lines):
        atomic_write(path, lambda p: p.write_text("".join(f"{line}\n" for line in keep)))
        logger.info(f"{path}: dropped {len(lines) - len(keep)} records after step {step} (resuming there)")


def _open_rank0(run_dir: Path, cfg, restart: bool) -> RunFolder:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run.dir", f"{run_dir} exists and is not a folder")
    check_config(run_dir, cfg)
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        os.chmod(run_dir, stat.S_IMODE(run_dir.stat().st_mode) & ~0o022)  # ours: never group/other-writable
    if reason := unsafe(run_dir):
        raise Refused(exit_codes.STATE, f"refusing to use {run_dir}: {reason}")
    folder = RunFolder(run_dir, _lock_fd=lock(run_dir))
    try:
        remove_leftovers(run_dir / "checkpoints")
        folder.checkpoint = choose_checkpoint(run_dir, restart)
        step = json.loads((folder.checkpoint / MARKER).read_text())["step"] if folder.checkpoint else 0
        roll_back_metrics(run_dir / "metrics.jsonl", step)
    except BaseException:
        folder.close()
        raise
    return folder


def open_run(run_dir: Path, cfg, d: Dist, restart: bool = False) -> RunFolder:
    """Every rank calls this; rank 0 checks, locks and chooses, the others learn the outcome (or the refusal)."""
    folder, outcome = RunFolder(Path(run_dir)), None
    if d.rank == 0:
        try:
            folder = _open_rank0(Path(run_dir), cfg, restart)
            outcome = ("ok", str(folder.checkpoint) if folder.checkpoint else None)
        except ConfigError as e:
            outcome = ("config", e.key, e.message)
        except exit_codes.Fatal as e:
            outcome = ("fatal", e.status, str(e))
    outcome = all_gather_objects(outcome)[0]
    if outcome[0] == "config":
        raise ConfigError(outcome[1], outcome[2])
    if outcome[0] == "fatal":
        raise Refused(outcome[1], outcome[2])
    folder.checkpoint = Path(outcome[1]) if outcome[1] else None
    return folder
