"""Shared test settings and fixtures.

- One intra-op thread per test process (tiny nets on a shared 2-core machine slow down several-fold from
  thread oversubscription), and a fresh metrics collector per test.
- `s3_server`: a real S3 endpoint on loopback, moto's HTTP server in a thread of the test process
  (ENVIRONMENT.md). Its object store lives in this process, so `restart()` on the same port keeps the shards,
  like a real S3 outage; DataLoader workers and launched processes reach it over HTTP like any client.

      def test_x(s3_server):
          url = s3_server.bucket_url()      # a fresh bucket: s3://b-<hex>
          s3_server.stop(); s3_server.start()

- `vae_dir`: a tiny randomly initialized diffusers AutoencoderKL saved to a folder (no VAE weights exist offline).
"""
from __future__ import annotations

import logging
import sys
import urllib.request
import uuid

import pytest
import torch

from sct import stats


def pytest_configure(config):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_stats():
    stats.collect()
    yield
    from loguru import logger  # a test's setup_logging bound a sink to its own captured stderr, closed now: back to the
    logger.remove()            # process's stderr (pytest's fd capture shows it on failure; capsys does not see it)
    logger.add(sys.__stderr__)


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


class LoopbackS3:
    def __init__(self):
        self.port = 0
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]  # port=0 picks one; restarts reuse it

    def stop(self) -> None:
        if self.server is not None:
            wsgi = self.server._server
            self.server.stop()
            wsgi.server_close()  # stop() leaves the socket listening (connections would hang): release the port
            self.server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bucket_url(self) -> str:
        from pipelines import s3

        name = f"b-{uuid.uuid4().hex[:12]}"
        fs, _ = s3.filesystem(f"s3://{name}")
        fs.mkdir(name)
        return f"s3://{name}"

    def require_auth(self, on: bool) -> None:
        """moto's admin API: from now on, reject access keys it did not issue (or accept any again)."""
        body = b"0" if on else b"inf"
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=body, method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=10).read()


@pytest.fixture
def s3_server(monkeypatch):
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = LoopbackS3()
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vae_dir(tmp_path_factory):
    """A tiny randomly initialized diffusers AutoencoderKL saved to a folder (no VAE weights exist offline)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path
