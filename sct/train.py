"""Training entry point: `python -m sct.train --config configs/demo_cpu.yaml [key=value ...] [--dry-run]`.

Builds the pieces a config names and hands them to `sct.loop.run`. The resolved config is saved as
`<run.dir>/config.yaml`; rerunning the same command resumes from the latest complete checkpoint.
"""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed sct/train.py` / `torchrun sct/train.py` run this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from loguru import logger
from torch import nn

from pipelines.data import build_stream, data_shape, num_classes
from sct import loop, stats
from sct.config import ConfigError, parse_cli, save_yaml, to_yaml
from sct.ema import EMA
from sct.engine import TorchEngine
from sct.experiment import TrainConfig, build_model, build_objective, count_parameters, snapshot_config
from sct.images import save_curve
from sct.optim import build_optimizer, lr_at
from sct.sample import write_grids


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def plot_losses(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    save_curve({"loss": [r["loss"] for r in records if "loss" in r]}, run_dir / "loss.png", title=f"{run_dir.name}: loss per tick")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_cli(sys.argv[1:] if argv is None else argv, TrainConfig)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        with torch.device("meta"):
            print(f"# backbone parameters: {count_parameters(build_model(cfg.model).backbone):,}")
        return 0
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stats.setup_logging(run_dir)
    save_yaml(cfg, run_dir / "config.yaml")
    device = pick_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    net = build_model(cfg.model).to(device)
    try:
        objective = build_objective(cfg).to(device)
    except ConfigError as e:
        print(f"config error: {args.config}: {e}", file=sys.stderr)
        return 2
    logger.info(f"{cfg.objective.name}: backbone {cfg.model.backbone.name} with {count_parameters(net.backbone):,} parameters on {device}")
    module = nn.ModuleDict({"net": net, "objective": objective})
    engine = TorchEngine(module, build_optimizer(cfg.optimizer, module.parameters()), cfg.optimizer.grad_clip, cfg.run.grad_accum)
    data = build_stream(cfg.data, cfg.run.batch_size // cfg.run.grad_accum)
    parts = loop.Parts(
        net=net,
        objective=objective,
        engine=engine,
        ema=EMA(net, cfg.ema),
        data=data,
        lr=partial(lr_at, cfg.optimizer, total_steps=cfg.run.total_steps),
        snapshot_config=snapshot_config(cfg),
        write_samples=partial(write_grids, cfg=cfg.sampling, shape=data_shape(cfg.data), classes=num_classes(cfg.data), device=device),
    )
    reached = loop.run(cfg.run, parts, run_dir, device)
    plot_losses(run_dir)
    logger.info(f"stopped at step {reached}/{cfg.run.total_steps}; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
