"""Clear command-line failures for the snapshot tools (export, evaluate, sample --export, fmnist_classifier).

`UsageError` is bad input from the user (a missing snapshot or weights file, bad steps, a config that
does not match the snapshot); `guarded(main)` prints it as `error: ...` (a `ConfigError` as
`config error: ...`) on stderr and returns exit status 2, without a traceback.
`open_snapshot` loads an inference snapshot (sct.experiment.load_snapshot_model) and turns every way it can be
wrong into a UsageError.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from sct.config import ConfigError


class UsageError(Exception):
    """Bad input named by the message; the CLI exits with status 2."""


def guarded(main: Callable[..., int | None]) -> Callable[..., int]:
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
        except UsageError as e:
            print(f"error: {e}", file=sys.stderr)
        return 2

    return run


def open_snapshot(path: str | Path, key: str = "--snapshot") -> tuple[nn.Module, dict]:
    """(model in eval mode, stored config) of an sct snapshot, or a UsageError naming `key`, the file and the problem."""
    from sct.experiment import load_snapshot_model

    try:
        net, stored = load_snapshot_model(path, key)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if not isinstance(stored.get("shape"), list) or not isinstance(stored.get("sampling"), dict):
        raise UsageError(f"{key}: {path}: its stored config has no sample 'shape' or 'sampling' section")
    return net, stored


def check_steps(steps: int, most: int | None = None, what: str = "--steps") -> int:
    if steps < 1 or (most is not None and steps > most):
        raise UsageError(f"{what} must be between 1 and {most}, got {steps}" if most else f"{what} must be >= 1, got {steps}")
    return steps
