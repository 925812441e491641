"""The domain metric: a Fashion-MNIST CNN registered with torch-fidelity gives a Fréchet distance offline that is ~0
between two halves of the test set and grows monotonically with noise, blur and pixel shuffling."""
import json

import pytest
import torch
import torch_fidelity
import torchvision.transforms.functional as TF
from safetensors import safe_open

from pipelines.arrays import ArrayDataConfig, load_arrays
from sct.cli_errors import UsageError
from sct.fmnist_classifier import EXTRACTOR, load_classifier, main, train
from sct.reference import ImageTensors, to_uint8


def _fd(a: torch.Tensor, b: torch.Tensor, weights) -> float:
    return torch_fidelity.calculate_metrics(
        input1=ImageTensors(to_uint8(a)), input2=ImageTensors(to_uint8(b)), fid=True, feature_extractor=EXTRACTOR,
        feature_extractor_weights_path=str(weights), cuda=False, save_cpu_ram=True, verbose=False, cache=False,
        batch_size=1000)["frechet_inception_distance"]


def _shuffle(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Permute a random `fraction` of the pixel positions among themselves (the same permutation for every image)."""
    flat = x.flatten(1).clone()
    idx = torch.randperm(flat.shape[1], generator=gen)[: int(fraction * flat.shape[1])]
    flat[:, idx] = flat[:, idx[torch.randperm(len(idx), generator=gen)]]
    return flat.view_as(x)


def test_domain_fd_is_near_zero_between_halves_and_grows_with_each_distortion(domain_classifier):
    x, _ = load_arrays(ArrayDataConfig(dataset="fashion_mnist"), "test")
    a, b = x[:2500], x[2500:5000]
    gen = torch.Generator().manual_seed(0)
    halves = _fd(a, b, domain_classifier)
    distortions = {
        "noise": [b + s * torch.randn(b.shape, generator=gen) for s in (0.1, 0.2, 0.4)],
        "blur": [TF.gaussian_blur(b, 5, s) for s in (0.5, 1.0, 2.0)],
        "shuffle": [_shuffle(b, f, gen) for f in (0.1, 0.3, 0.6)],
    }
    for name, levels in distortions.items():
        fds = [_fd(a, level, domain_classifier) for level in levels]
        assert fds == sorted(fds) and fds[0] > fds[-1] / 1000, (name, fds)
        assert halves < 0.5 * fds[0], (name, halves, fds)
        assert fds[-1] > 20 * halves, (name, halves, fds)


def test_train_cli_stores_test_accuracy_and_fails_clearly(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "c.safetensors"), "--dataset", "digits", "--epochs", "8"]) == 0
    with safe_open(tmp_path / "c.safetensors", framework="pt") as f:
        meta = json.loads(f.metadata()["sct_domain_classifier"])
    assert meta["dataset"] == "digits" and 0.5 < meta["test_accuracy"] <= 1.0 and meta["test_samples"] == 300
    assert main(["train", "--out", str(tmp_path / "d.safetensors"), "--epochs", "0"]) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist"):
        train(tmp_path / "e.safetensors", root=str(tmp_path))
    with pytest.raises(UsageError, match="domain classifier weights not found"):
        load_classifier(tmp_path / "missing.safetensors")
