"""Closed forms of MATH.md §1 and §3: Karras grid, N(k) curriculum, lognormal intervals, Pseudo-Huber, time proposal."""
import math

import numpy as np
import pytest
import torch

from sct.objectives.ict import pseudo_huber
from sct.objectives.schedules import (
    ict_curriculum_n,
    karras_sigmas,
    lognormal_interval_probs,
    sample_trigflow_t,
    tangent_warmup,
)


@pytest.mark.parametrize(("k", "expected"), [(0, 11), (49_999, 11), (50_000, 21), (99_999, 21), (100_000, 41), (399_999, 1281)])
def test_curriculum_published_400k(k, expected):
    # K' = floor(400000 / (log2(floor(1280/10)) + 1)) = floor(400000 / 8) = 50000
    assert ict_curriculum_n(k, 400_000, 10, 1280) == expected


def test_karras_grid_closed_form():
    n, lo, hi, rho = 11, 0.002, 80.0, 7.0
    sigmas = karras_sigmas(n, lo, hi, rho).numpy()
    reference = [(lo ** (1 / rho) + (i - 1) / (n - 1) * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho for i in range(1, n + 1)]
    np.testing.assert_allclose(sigmas, reference, rtol=1e-14)
    assert sigmas[0] == pytest.approx(0.002, rel=1e-14) and sigmas[-1] == pytest.approx(80.0, rel=1e-14)
    assert np.all(np.diff(sigmas) > 0)


@pytest.mark.parametrize("n", [11, 161, 1281])
def test_lognormal_interval_probabilities(n):
    sigmas = karras_sigmas(n, 0.002, 80.0)
    probs = lognormal_interval_probs(sigmas, -1.1, 2.0).numpy()
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(probs >= 0)
    # independent: the normal CDF of ln σ with math.erf, interval by interval
    cdf = [0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2)))) for s in sigmas.tolist()]
    mass = np.diff(cdf)
    np.testing.assert_allclose(probs, mass / mass.sum(), rtol=1e-10, atol=1e-15)


def test_pseudo_huber_on_per_sample_norm():
    c = 0.00054 * math.sqrt(3072)  # CIFAR-10: D = 3·32·32
    assert c == pytest.approx(0.029929, abs=1e-6)
    diff = torch.zeros(2, 3, 32, 32, dtype=torch.float64)
    diff[0, 0, 0, :2] = torch.tensor([3.0, 4.0])  # ‖·‖ = 5
    d = pseudo_huber(diff, c)
    assert d[0].item() == pytest.approx(math.sqrt(25 + c * c) - c, rel=1e-14)
    assert d[1].item() == 0.0
    elementwise = (torch.sqrt(diff[0] ** 2 + c * c) - c).sum().item()
    assert abs(elementwise - d[0].item()) > 1.0  # not the element-wise Huber


def test_trigflow_time_proposal_is_lognormal_in_sigma():
    torch.manual_seed(0)
    t = sample_trigflow_t(200_000, -1.0, 1.4, 0.5)
    assert t.dtype == torch.float32 and bool(((t > 0) & (t < math.pi / 2)).all())
    log_sigma = torch.log(0.5 * torch.tan(t.double()))  # σ = σd tan t = e^τ
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.4, abs=0.02)


def test_tangent_warmup():
    assert tangent_warmup(0, 10_000) == 0.0
    assert tangent_warmup(2_500, 10_000) == 0.25
    assert tangent_warmup(20_000, 10_000) == 1.0
    assert tangent_warmup(0, 0) == 1.0
