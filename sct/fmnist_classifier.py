"""A domain metric for data Inception knows nothing about: a small Fashion-MNIST CNN as a torch-fidelity feature extractor.

    python -m sct.fmnist_classifier train --out fmnist_cnn.safetensors [--epochs 3] [--dataset fashion_mnist|digits]
    python -m sct.evaluate --snapshot S --metrics fid --feature-extractor fmnist --domain-classifier fmnist_cnn.safetensors ...

Trains on the demo's own view of the data (`pipelines.arrays.load_arrays`: Debian's dataset-fashion-mnist,
2x2-averaged to 14x14 and padded to 16x16, values in [-1, 1]) and stores the weights as safetensors with
the architecture, the dataset and the test accuracy in the metadata (no pickle). `FMNISTFeatures` is
registered with torch-fidelity as `sct-fmnist`: it takes uint8 images [B, 1 or 3, 16, 16] (3 channels are
averaged) and gives the 128-d penultimate activations (`"128"`, used for FID/KID/PR, so the Fréchet
distance works offline) and the logits (`"logits_unbiased"`, used for the Inception-Score analogue).
Without Fashion-MNIST installed, `train` stops with the apt command; `--dataset digits` is the explicit
fallback (scikit-learn's bundled 8x8 digits, upsampled). Tests: tests/unit/test_fmnist_classifier.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from sct.cli_errors import UsageError, guarded

EXTRACTOR = "sct-fmnist"
FEATURES = ("128", "logits_unbiased")


class DomainCNN(nn.Module):
    """16x16 grey -> conv 32 -> conv 64 (/2) -> conv 128 (/2) -> mean pool -> 128 features -> 10 logits."""

    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, width, 3, padding=1), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                    nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)])
        self.features = nn.Linear(4 * width, 128)
        self.head = nn.Linear(128, classes)

    def embed(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return F.relu(self.features(x.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def train(out: Path, dataset: str = "fashion_mnist", epochs: int = 3, batch: int = 128, lr: float = 2e-3, seed: int = 0,
          limit: int | None = None, root: str | None = None) -> dict:
    """Train the CNN on the training split (first `limit` samples if given), store it with its test accuracy."""
    from pipelines.arrays import ArrayDataConfig, load_arrays

    cfg = ArrayDataConfig(dataset=dataset, **({"root": root} if root else {}))
    if dataset == "fashion_mnist" and not (Path(cfg.root) / "train-images-idx3-ubyte.gz").exists():
        raise UsageError(f"no Fashion-MNIST at {cfg.root}: `apt-get install dataset-fashion-mnist`, or pass --dataset digits")
    x, y = load_arrays(cfg, "train")
    x_test, y_test = load_arrays(cfg, "test") if dataset == "fashion_mnist" else (x[-300:], y[-300:])
    if dataset != "fashion_mnist":
        x, y = x[:-300], y[:-300]
    x, y = (x[:limit], y[:limit]) if limit else (x, y)
    torch.manual_seed(seed)
    net = DomainCNN()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            loss = F.cross_entropy(net(x[idx]), y[idx].argmax(1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = sum((net(xb).argmax(1) == yb.argmax(1)).sum().item() for xb, yb in zip(x_test.split(1000), y_test.split(1000))) / len(x_test)
    meta = {"arch": "DomainCNN", "classes": 10, "width": 32, "resolution": 16, "dataset": dataset, "train_samples": len(x),
            "epochs": epochs, "seed": seed, "test_accuracy": accuracy, "test_samples": len(x_test), "train_seconds": round(time.time() - start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out, metadata={"sct_domain_classifier": json.dumps(meta)})
    return meta


def load_classifier(path: str | Path) -> tuple[DomainCNN, dict]:
    """(classifier in eval mode, its metadata) from a file written by `train`; UsageError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"domain classifier weights not found: {path} (train one: python -m sct.fmnist_classifier train --out {path})")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {})["sct_domain_classifier"])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UsageError(f"{path} is not a domain classifier written by sct.fmnist_classifier ({e!r})") from None
    net = DomainCNN(meta["classes"], meta["width"])
    net.load_state_dict(state)
    return net.eval().requires_grad_(False), meta


class FMNISTFeatures(FeatureExtractorBase):
    """torch-fidelity feature extractor around a trained DomainCNN (`feature_extractor_weights_path`: its file)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise UsageError("the domain metric needs a classifier file: --domain-classifier / eval.domain_classifier")
        self.net, self.meta = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits_unbiased" if metric == "isc" else "128"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x: Tensor):
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != self.meta["resolution"]:
            raise ValueError(f"{EXTRACTOR} takes uint8 images [B, C, {self.meta['resolution']}, {self.meta['resolution']}], got {x.dtype} {list(x.shape)}")
        grey = x.float().mean(dim=1, keepdim=True) / 127.5 - 1
        emb = self.net.embed(grey)
        out = {"128": emb, "logits_unbiased": self.net.head(emb)}
        return tuple(out[name] for name in self.features_list)


if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR, FMNISTFeatures)


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sct.fmnist_classifier", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the CNN and store it with its test accuracy")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--dataset", choices=("fashion_mnist", "digits"), default="fashion_mnist")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    meta = train(args.out, args.dataset, args.epochs, seed=args.seed)
    print(f"wrote {args.out}: test accuracy {meta['test_accuracy']:.4f} on {meta['test_samples']} {args.dataset} test images "
          f"({meta['train_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
