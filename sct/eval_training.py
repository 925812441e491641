"""Evaluation during training: the `eval:` config section (`sct.evaluate.EvalConfig`) at a cadence.

    eval: {every: 500, metrics: [fid], feature_extractor: fmnist, domain_classifier: fmnist_cnn.safetensors, num: 1000, steps: [1, 2]}

Every `eval.every` steps (and at the last step) the loop hands the EMA model to `TrainingEval`: each rank
generates its share of `eval.num` samples per step count (sample i: seed eval.seed + i, class i mod classes,
as `python -m sct.evaluate`), rank 0 measures them with torch-fidelity against the cached reference and
appends `{"step": N, "eval/<extractor>_<metric>_<k>step": value, ...}` to metrics.jsonl, then redraws
`eval.png` (each metric against the step). A missing weights file or a reference/classifier that does not
fit the data fails at start-up as a config error naming the eval key. Tests: tests/integration/test_eval_training.py.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from sct.cli_errors import UsageError
from sct.config import ConfigError
from sct.evaluate import EvalConfig, ModelSource, extractor_weights, fidelity, generate_all

SHORT = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid", "inception_score_mean": "is",
         "precision": "precision", "recall": "recall"}


def check_eval(cfg: EvalConfig, shape: tuple[int, ...]) -> None:
    """Cross-component rule of TrainConfig: evaluation needs image samples."""
    if cfg.every and len(shape) != 3:
        raise ConfigError("eval.every", f"evaluation measures images; the data samples are {list(shape)}")


def decoded_scale(latent: dict) -> int:
    """How many pixels a latent pixel decodes to: 2^(down blocks - 1) of the run's AutoencoderKL (loaded once, as evaluation will)."""
    from sct.evaluate import _vae

    if not latent.get("vae"):
        raise ConfigError("sampling.vae", "evaluating latents needs a VAE to decode them; the shards' manifest names none")
    try:
        vae = _vae(latent["vae"])
    except Exception as e:  # noqa: BLE001 - a missing folder, an unreachable hub or a broken config: the same setting to fix
        raise ConfigError("sampling.vae", f"evaluation decodes latents through {latent['vae']!r}, which does not load: {type(e).__name__}: {e}") from None
    return 2 ** (len(vae.config.block_out_channels) - 1)


class TrainingEval:
    """`(model, step) -> None`, called by every rank at the eval cadence (generation is split across ranks)."""

    def __init__(self, cfg: EvalConfig, sampling, shape: tuple, classes: int, latent: dict | None, run_dir: Path,
                 device: torch.device, rank: int):
        try:
            self.weights = extractor_weights(cfg)
        except UsageError as e:
            key = "inception_weights" if cfg.feature_extractor == "inception" else "domain_classifier"
            raise ConfigError(f"eval.{key}", str(e).split(": ", 1)[-1]) from None
        if cfg.feature_extractor == "fmnist":
            from sct.fmnist_classifier import load_classifier

            _, meta = load_classifier(self.weights)
            pixels = shape[-1] * (decoded_scale(latent) if latent else 1)
            if pixels != meta["resolution"]:
                raise ConfigError("eval.domain_classifier", f"{self.weights} takes {meta['resolution']}px images, the "
                                  f"{'decoded ' if latent else ''}data is {pixels}px")
        self.cfg, self.sampling, self.shape, self.classes, self.latent = cfg, sampling, shape, classes, latent
        self.run_dir, self.device, self.rank = run_dir, device, rank
        self.cache = Path(cfg.cache) if cfg.cache else run_dir / "eval_cache"

    def __call__(self, model: nn.Module, step: int) -> None:
        was_training = model.training
        model.eval()
        record = {"step": step}
        for steps in self.cfg.steps:
            source = ModelSource(model, copy.copy(self.sampling), self.shape, self.classes, self.latent, None, self.device)
            images = generate_all(source, self.cfg.num, self.cfg.seed, steps, self.cfg.batch, None)
            if images is not None:
                values, _ = fidelity(images, self.cfg, self.weights, self.cache)
                record |= {f"eval/{self.cfg.feature_extractor}_{SHORT[k]}_{steps}step": v for k, v in values.items() if k in SHORT}
        model.train(was_training)
        if self.rank != 0:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        logger.info("eval: " + "  ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in record.items() if k != "step"))
        plot_eval(self.run_dir / "metrics.jsonl", self.run_dir / "eval.png")


def plot_eval(metrics: Path, path: Path) -> None:
    """Each eval/ metric of metrics.jsonl against the training step."""
    from matplotlib.figure import Figure

    from sct.images import _save

    series: dict[str, list[tuple[int, float]]] = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for k, v in record.items():
            if k.startswith("eval/"):
                series.setdefault(k.removeprefix("eval/"), []).append((record["step"], v))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for name, points in sorted(series.items()):
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(f"{path.parent.name}: evaluation")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def build_training_eval(cfg, snapshot: dict, run_dir: Path, device: torch.device, rank: int) -> TrainingEval | None:
    """The evaluator of a TrainConfig (`snapshot`: what its snapshots store, for the latent statistics), or None."""
    if not cfg.eval.every:
        return None
    from pipelines.data import num_classes

    return TrainingEval(cfg.eval, cfg.sampling, tuple(snapshot["shape"]), num_classes(cfg.data), snapshot.get("latent"), run_dir, device, rank)
