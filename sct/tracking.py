"""Optional experiment tracking beside metrics.jsonl: TensorBoard and Weights & Biases, on rank 0 only.

    tracking: {sinks: [tensorboard, wandb], wandb_project: sct}     # in a training config
    pip install -e '.[tensorboard,wandb]'                          # neither is needed to train without them

TensorBoard: `<run.dir>/tensorboard/` holds every scalar of each tick (the keys of metrics.jsonl), the sample
grids as images and the resolved config as text; `tensorboard --logdir runs/`. A resumed run writes to the same
folder with `purge_step` = the first step it can log (the checkpoint's step + 1), so whatever the interrupted job
logged after that checkpoint is dropped by TensorBoard instead of being shown twice (a job that starts at step 0
drops all earlier steps: the run was restarted).

Weights & Biases: the run id is kept in `<run.dir>/wandb_run.json` (with the last step logged), and every job of
the run resumes that id (`resume="allow"`); steps the run already holds are not sent again (W&B needs increasing
steps). A job that starts at step 0 starts a new W&B run. `tracking.wandb_mode`: `auto` takes $WANDB_MODE if set, else `online` when logged in (`wandb login`, or
WANDB_API_KEY), else `offline`: the run is written under `<run.dir>/wandb/` without any network, and
`wandb sync <run.dir>/wandb/offline-run-*` uploads it later.

The sinks are objects with scalars(record, step), images(paths, step) and close(); `sct.stats` fans records out
to them. Imports are lazy; a sink that is chosen but not installed is a config error.
Tests: tests/integration/test_tracking.py.
"""
from __future__ import annotations

import importlib.util
import json
import netrc
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import yaml
from loguru import logger
from PIL import Image

from sct.config import ConfigError

EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb"}  # sink -> the module it needs (and the pyproject extra)


@dataclass
class TrackingConfig:
    sinks: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)  # beside metrics.jsonl (always written)
    wandb_project: str = "sct"
    wandb_entity: str = ""  # "" = the logged-in user's default entity
    wandb_mode: Literal["auto", "online", "offline"] = "auto"  # auto: $WANDB_MODE, else online if logged in, else offline

    def check(self) -> None:
        if len(set(self.sinks)) != len(self.sinks):
            raise ConfigError("sinks", f"each sink at most once, got {list(self.sinks)}")
        for sink in self.sinks:
            if importlib.util.find_spec(EXTRA[sink]) is None:
                raise ConfigError("sinks", f"'{sink}' is chosen but not installed: pip install 'sct[{sink}]' (or drop it from tracking.sinks)")


def open_sinks(cfg: TrackingConfig, run_dir: Path, start_step: int, config_text: str = "") -> list:
    """The configured sinks for a job that starts (or resumes) at `start_step`; call on rank 0 only."""
    run_dir = Path(run_dir)
    makers = {"tensorboard": lambda: TensorBoardSink(run_dir / "tensorboard", start_step, config_text),
              "wandb": lambda: WandbSink(cfg, run_dir, start_step, config_text)}
    return [makers[name]() for name in cfg.sinks]


def _image_tag(path: Path) -> str:
    """samples/step_000000500_2step.png -> samples/2step (one TensorBoard/W&B series per grid kind)."""
    return "samples/" + re.sub(r"^step_\d+_", "", Path(path).stem)


def _scalars(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardSink:
    def __init__(self, log_dir: Path, start_step: int, config_text: str):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard discards events at steps >= it from earlier files of this folder (a fresh start: all)
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step + 1)
        if config_text:
            code = "\n".join("    " + line for line in config_text.splitlines())  # Markdown code block
            self.writer.add_text("config", code, global_step=start_step)  # each job's resolved config, at its first step
        self.writer.flush()
        logger.info(f"tracking: TensorBoard in {log_dir}" + (f" (continuing after step {start_step})" if start_step else ""))

    def scalars(self, record: dict, step: int) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def images(self, paths, step: int) -> None:
        for path in paths:
            self.writer.add_image(_image_tag(path), np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_logged_in() -> bool:
    """True when wandb would find credentials: WANDB_API_KEY, or the netrc entry that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc  # the machine `wandb login` writes
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink:
    STATE = "wandb_run.json"  # {"id": run id, "step": last step logged}, in the run folder

    def __init__(self, cfg: TrackingConfig, run_dir: Path, start_step: int, config_text: str):
        import wandb

        self._wandb, self.state_path = wandb, run_dir / self.STATE
        resuming = start_step > 0 and self.state_path.exists()  # a job that starts at step 0 starts a new W&B run
        state = json.loads(self.state_path.read_text()) if resuming else {"id": uuid.uuid4().hex[:12], "step": 0}
        self.run_id, self.logged = state["id"], int(state["step"])
        self.held = self.logged  # the last step earlier jobs sent to this run
        mode = cfg.wandb_mode
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, name=run_dir.name, id=self.run_id,
                              resume="allow", dir=str(run_dir), mode=mode)
        if config_text:
            self.run.config.update(yaml.safe_load(config_text), allow_val_change=True)
        self._save()
        where = f"; upload with `wandb sync {run_dir / 'wandb'}/offline-run-*`" if mode == "offline" else ""
        logger.info(f"tracking: W&B run {self.run_id} ({mode}) in {run_dir / 'wandb'}" + (f", continuing after step {self.logged}" if self.logged else "") + where)

    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": self.run_id, "step": self.logged}))
        tmp.replace(self.state_path)

    def _log(self, values: dict, step: int) -> None:
        if step <= self.held:  # the run already holds this step: an earlier job logged it after its last checkpoint
            return
        self.run.log(values, step=step)
        if step > self.logged:
            self.logged = step
            self._save()

    def scalars(self, record: dict, step: int) -> None:
        self._log(_scalars(record), step)

    def images(self, paths, step: int) -> None:
        self._log({_image_tag(p): self._wandb.Image(str(p)) for p in paths}, step)

    def close(self) -> None:
        self.run.finish()
