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
