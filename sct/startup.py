"""Start-up checks of sct.train that need no model or data, and opening the run folder once a start is accepted.

    startup.check_device("cuda")        # ConfigError("run.device") on a machine without CUDA
    startup.check_run_dir(Path(d))      # ConfigError("run.dir"): a file, under a file, or not writable
    startup.open_run_dir(Path(d), rank) # mkdir + log.txt (rank 0): only after every check has passed

Tests: tests/integration/test_bad_inputs.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from sct import stats
from sct.config import ConfigError


def check_device(name: str) -> None:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device", "cuda was asked for, but torch sees no CUDA device here (use auto or cpu)")


def check_run_dir(run_dir: Path) -> None:
    """ConfigError("run.dir") unless `run_dir` is a folder, or can be created as one, that this user can write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError("run.dir", f"{run_dir} exists and is not a folder")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError("run.dir", f"{run_dir} cannot be created: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("run.dir", f"{run_dir} cannot be written: no write permission on {existing}")


def open_run_dir(run_dir: Path, rank: int) -> None:
    """Create the run folder and send the log to its log.txt (rank 0) as well as to the console."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stats.setup_logging(run_dir, rank)
