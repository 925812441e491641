"""Shared test settings: one intra-op thread per test process (tiny nets on a shared 2-core machine
slow down several-fold from thread oversubscription), and a fresh metrics collector per test."""
import pytest
import torch

from sct import stats


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_stats():
    stats.collect()
    yield


@pytest.fixture(scope="session")
def domain_classifier(tmp_path_factory):
    """A Fashion-MNIST DomainCNN trained briefly (6k images, 1 epoch, ~10 s; accuracy ~0.5-0.6): enough to
    separate real from distorted images. Skips where Fashion-MNIST is not installed (.ci/run installs it)."""
    from pathlib import Path

    from pipelines.arrays import FASHION_MNIST_DIR
    from sct.fmnist_classifier import train

    if not (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist is not installed")
    path = tmp_path_factory.mktemp("domain") / "fmnist_cnn.safetensors"
    train(path, epochs=1, limit=6000)
    return path
