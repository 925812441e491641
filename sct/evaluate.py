"""Sample-quality metrics through torch-fidelity, with a recorded protocol.

    python -m sct.evaluate --snapshot S.safetensors --reference array:fashion_mnist:test --num-samples 10000 --steps 2 \
        --inception-weights weights-inception-2015-12-05-6726825d.pth --out eval.json        # FID, KID, IS, precision/recall
    python -m sct.evaluate --export DIR ... --feature-extractor fmnist --domain-classifier fmnist_cnn.safetensors  # domain FD
    torchrun --nproc_per_node 8 -m sct.evaluate ...          # generation split across ranks, metrics on rank 0

Sample i uses seed `--seed + i` and class i mod classes, whichever rank draws it, so the metrics do not
depend on the world size. Latent models are decoded through their VAE first (`decode_samples`, the one
place that does it). Metrics: torch_fidelity.calculate_metrics(fid, kid, isc, prc) on uint8 images, against
a reference (`sct.reference`) whose features torch-fidelity caches in `--cache` with a provenance record.
Feature extractors: `inception` (torch-fidelity's InceptionV3; its weights from a local file: nothing is
downloaded) or `fmnist` (our Fashion-MNIST CNN, `sct.fmnist_classifier`). FD-DINOv2 is not offered:
torch-fidelity 0.4 loads DINOv2 only through torch.hub (network), not from a local weights file.
The JSON written to --out holds the metrics and the protocol: source (+ sha256), number of samples, seeds,
label rule, steps, guidance, extractor and weights sha256, reference and its statistics' sha256, world size.
Exit status 2 with `error: ...` for a missing snapshot or weights file, bad steps, or a reference that does
not match what the snapshot generates. Tests: tests/unit/test_evaluate.py.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sct.cli_errors import UsageError, check_steps, guarded, open_snapshot
from sct.config import ConfigError
from sct.reference import ImageTensors, LazyReference, cache_name, record_provenance, sha256_file, to_uint8

EXTRACTORS = {"inception": "inception-v3-compat", "fmnist": "sct-fmnist"}
METRICS = ("fid", "kid", "isc", "prc")


@dataclass
class EvalConfig:
    """`eval:` of a training config, and the defaults of `python -m sct.evaluate`."""

    every: int = 0  # training steps between evaluations; 0 = no evaluation during training
    metrics: tuple[str, ...] = ("fid",)  # any of fid, kid, isc, prc
    feature_extractor: Literal["inception", "fmnist"] = "fmnist"
    inception_weights: str = ""  # local file of torch-fidelity's InceptionV3 weights (needed for feature_extractor: inception)
    domain_classifier: str = ""  # file written by `python -m sct.fmnist_classifier train` (feature_extractor: fmnist)
    reference: str = "array:fashion_mnist:test"  # see sct.reference
    num: int = 1000  # generated samples (and reference samples)
    steps: tuple[int, ...] = (1, 2)  # consistency steps (ODE intervals for a diffusion model), one evaluation each
    seed: int = 0
    batch: int = 250
    cache: str = ""  # torch-fidelity's cache folder for reference features; "" = <run.dir>/eval_cache

    def check(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad or not self.metrics:
            raise ConfigError("metrics", f"choose from {list(METRICS)}, got {list(self.metrics)}")
        for key in ("every", "num", "batch"):
            if getattr(self, key) < (0 if key == "every" else 1):
                raise ConfigError(key, f"must be >= {0 if key == 'every' else 1}, got {getattr(self, key)}")
        if not self.steps or min(self.steps) < 1:
            raise ConfigError("steps", f"need step counts >= 1, got {list(self.steps)}")
        if self.every and self.feature_extractor == "inception" and not self.inception_weights:
            raise ConfigError("inception_weights", "feature_extractor: inception needs a local weights file (nothing is downloaded)")
        if self.every and self.feature_extractor == "fmnist" and not self.domain_classifier:
            raise ConfigError("domain_classifier", "feature_extractor: fmnist needs a classifier: python -m sct.fmnist_classifier train --out FILE")


def extractor_weights(cfg: EvalConfig) -> str:
    """The configured weights file of the chosen extractor; UsageError naming the setting when it is missing."""
    flag, key = ("--inception-weights", "inception_weights") if cfg.feature_extractor == "inception" else ("--domain-classifier", "domain_classifier")
    path = getattr(cfg, key)
    if not path:
        raise UsageError(f"{flag} / eval.{key} is not set: the {cfg.feature_extractor} feature extractor needs its weights as a local file"
                         + (" (torch-fidelity's weights-inception-2015-12-05-6726825d.pth; nothing is downloaded)" if key == "inception_weights" else ""))
    if not Path(path).is_file():
        raise UsageError(f"{flag} / eval.{key}: file not found: {path}")
    if cfg.feature_extractor == "fmnist":
        import sct.fmnist_classifier  # noqa: F401 - registers the extractor with torch-fidelity
    return path


@functools.lru_cache(maxsize=2)
def _vae(name: str):
    from pipelines.encode import load_vae

    return load_vae(name, device="cuda" if torch.cuda.is_available() else "cpu")


def decode_samples(x: Tensor, latent: dict | None) -> Tensor:
    """Model-space samples -> images in [-1, 1]: through the VAE of the snapshot's latent record
    ({"vae": hub name or folder, "stats": the shards' mean/std/sigma_data}), if it has one."""
    if not latent:
        return x.clamp(-1, 1)
    from pipelines.encode import decode

    if not latent.get("vae"):
        raise UsageError("the snapshot holds latents but records no VAE to decode them")
    return decode(_vae(latent["vae"]), x, latent["stats"])


class ModelSource:
    """Samples of an in-process model (consistency or ODE) by global index: seed + i, class i mod classes."""

    def __init__(self, net, sampling, shape: tuple, classes: int, latent: dict | None, path: Path | None, device: torch.device):
        self.net, self.sampling, self.shape, self.classes, self.latent, self.path, self.device = net, sampling, shape, classes, latent, path, device
        self.method, self.max_steps, self.guidance = sampling.method, None, sampling.guidance

    @classmethod
    def from_snapshot(cls, snapshot: Path, device: torch.device) -> "ModelSource":
        from sct.config import from_dict
        from sct.samplers import SamplingConfig

        net, stored = open_snapshot(snapshot)
        sampling = from_dict(SamplingConfig, stored["sampling"], source=str(snapshot))
        return cls(net.to(device), sampling, tuple(stored["shape"]), stored["model"]["backbone"]["label_dim"], stored.get("latent"), snapshot, device)

    def raw(self, seeds: list[int], classes: list[int] | None, steps: int, guidance: float | None) -> Tensor:
        from sct.samplers import generate

        if guidance is not None:
            self.sampling.guidance = guidance
        labels = torch.nn.functional.one_hot(torch.tensor(classes), self.classes).float().to(self.device) if classes else None
        return generate(self.net, self.sampling, steps, self.shape, seeds, labels, self.device)

    def images(self, indices: list[int], seed: int, steps: int, guidance: float | None) -> Tensor:
        seeds = [seed + i for i in indices]
        classes = [i % self.classes for i in indices] if self.classes else None
        return to_uint8(decode_samples(self.raw(seeds, classes, steps, guidance).cpu(), self.latent))


class ExportSource(ModelSource):
    """Samples of an export folder's standalone sampler (`python -m sct.export`)."""

    def __init__(self, export: Path, device: torch.device):
        from sct.export import load_export

        self.sampler = load_export(export, str(device))
        spec = self.sampler.spec
        self.path, self.shape, self.classes, self.latent, self.device = export / "weights.safetensors", tuple(spec["shape"]), spec["num_classes"], spec.get("latent"), device
        self.method, self.max_steps, self.guidance = "consistency", spec["steps"], spec["guidance"]

    def raw(self, seeds: list[int], classes: list[int] | None, steps: int, guidance: float | None) -> Tensor:
        return self.sampler.sample(seeds, classes, steps, guidance)


def _distributed() -> tuple[int, int]:
    """(rank, world size), joining the launcher's process group (torchrun, srun + torchrun) when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return tdist.get_rank(), tdist.get_world_size()


def generate_all(source: ModelSource, num: int, seed: int, steps: int, batch: int, guidance: float | None) -> Tensor | None:
    """Every rank draws indices rank, rank + W, ...; rank 0 gets all `num` images in index order, others None."""
    rank, world = _distributed()
    mine = list(range(rank, num, world))
    chunks = [source.images(mine[lo : lo + batch], seed, steps, guidance) for lo in range(0, len(mine), batch)]
    local = torch.cat(chunks) if chunks else torch.zeros(0, 3, *source.shape[1:], dtype=torch.uint8)
    if world == 1:
        return local
    from sct.dist import all_gather_objects

    parts = all_gather_objects(local)
    if rank != 0:
        return None
    out = torch.empty(num, *local.shape[1:], dtype=torch.uint8)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


def fidelity(images: Tensor, cfg: EvalConfig, weights: str, cache_dir: Path, metrics=None) -> tuple[dict, dict]:
    """torch_fidelity.calculate_metrics of `images` against the cached reference -> (metrics, reference provenance)."""
    import torch_fidelity

    metrics = tuple(metrics or cfg.metrics)
    extractor, weights_sha = EXTRACTORS[cfg.feature_extractor], sha256_file(weights)
    name = cache_name(cfg.reference, cfg.num, images.shape[-1], extractor, weights_sha)
    cache_dir.mkdir(parents=True, exist_ok=True)
    reference = LazyReference(cfg.reference, cfg.num, images.shape[-1])
    if not any(cache_dir.glob(f"{name}-*")) and reference.images.shape[1:] != images.shape[1:]:
        raise UsageError(f"--reference {cfg.reference} has images of shape {list(reference.images.shape[1:])}, "
                         f"the model generates {list(images.shape[1:])}")
    n = min(len(images), cfg.num)
    values = torch_fidelity.calculate_metrics(
        input1=ImageTensors(images), input2=reference, input2_cache_name=name, cache_root=str(cache_dir),
        fid="fid" in metrics, kid="kid" in metrics, isc="isc" in metrics, prc="prc" in metrics,
        feature_extractor=extractor, feature_extractor_weights_path=weights, kid_subset_size=min(1000, n),
        isc_splits=min(10, n), batch_size=cfg.batch, cuda=torch.cuda.is_available(), save_cpu_ram=True, verbose=False)
    return {k: float(v) for k, v in values.items()}, record_provenance(cache_dir, name, cfg.reference, cfg.num, extractor, weights, weights_sha)


def evaluate(source: ModelSource, cfg: EvalConfig, steps: int, guidance: float | None, cache_dir: Path) -> dict | None:
    """Generate, measure, and describe the protocol (rank 0; other ranks return None)."""
    weights = extractor_weights(cfg)
    if source.method == "consistency":
        check_steps(steps, source.max_steps)
    elif guidance is not None and guidance != 1.0 and not source.classes:
        raise UsageError("--guidance needs a class-conditional model")
    start = time.time()
    images = generate_all(source, cfg.num, cfg.seed, steps, cfg.batch, guidance)
    if images is None:
        return None
    values, ref = fidelity(images, cfg, weights, cache_dir)
    import torch_fidelity

    return {"metrics": values, "protocol": {
        "source": str(source.path), "source_sha256": sha256_file(source.path) if source.path else None, "method": source.method, "num_samples": cfg.num,
        "seeds": [cfg.seed, cfg.seed + cfg.num - 1], "labels": "sample i has class i mod num_classes" if source.classes else "unconditional",
        "num_classes": source.classes, "steps": steps, "guidance": source.guidance if guidance is None else guidance,
        "decoded_through_vae": bool(source.latent), "feature_extractor": EXTRACTORS[cfg.feature_extractor],
        "feature_extractor_weights_sha256": ref["weights_sha256"], "reference": cfg.reference, "reference_num": cfg.num,
        "reference_stats_sha256": ref["stats_sha256"], "world_size": _distributed()[1],
        "torch_fidelity": torch_fidelity.__version__, "seconds": round(time.time() - start, 1)}}


@guarded
def main(argv: list[str] | None = None) -> int:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="python -m sct.evaluate", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", type=Path, help="a snapshot written by sct.train (consistency or diffusion)")
    src.add_argument("--export", type=Path, help="a folder written by python -m sct.export")
    p.add_argument("--reference", default=d.reference, help="array:fashion_mnist[:test], array:digits, or a shard folder/URL")
    p.add_argument("--num-samples", "--num", dest="num", type=int, default=d.num,
                   help="generated samples (and reference samples); under torchrun write --num-samples (torchrun's own parser rejects --num)")
    p.add_argument("--steps", type=int, default=2, help="consistency steps, or ODE intervals for a diffusion snapshot")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance of ODE sampling (default: the snapshot's)")
    p.add_argument("--seed", type=int, default=d.seed, help="sample i uses seed + i")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    p.add_argument("--feature-extractor", choices=tuple(EXTRACTORS), default="inception")
    p.add_argument("--inception-weights", default=d.inception_weights, help="local InceptionV3 weights file (eval.inception_weights)")
    p.add_argument("--domain-classifier", default=d.domain_classifier, help="file from python -m sct.fmnist_classifier train (eval.domain_classifier)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--cache", type=Path, default=Path("eval_cache"), help="torch-fidelity cache of reference features (+ provenance)")
    p.add_argument("--out", type=Path, required=True, help="JSON file of metrics and protocol")
    args = p.parse_args(argv)
    cfg = EvalConfig(metrics=tuple(m for m in args.metrics.split(",") if m), feature_extractor=args.feature_extractor,
                     inception_weights=args.inception_weights, domain_classifier=args.domain_classifier, reference=args.reference,
                     num=args.num, steps=(args.steps,), seed=args.seed, batch=args.batch)
    try:
        cfg.check()
    except ConfigError as e:
        raise UsageError(f"--{e.key.replace('_', '-')}: {e.message}") from None
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    source = ExportSource(args.export, device) if args.export else ModelSource.from_snapshot(args.snapshot, device)
    result = evaluate(source, cfg, args.steps, args.guidance, args.cache)
    if result is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["metrics"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
