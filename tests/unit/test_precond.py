"""Parameterizations (MATH.md §1-2): exact boundary conditions and EDM <-> TrigFlow conversion,
checked against the closed-form optimal models of Gaussian data."""
import math

import pytest
import torch
from torch import nn

from sct.models.mlp import MLP, MLPConfig
from sct.models.precond import (
    EDMConsistency,
    EDMConsistencyConfig,
    EDMDenoiserAsTrigFlow,
    TrigFlow,
    TrigFlowAsEDMDenoiser,
    TrigFlowConfig,
)

SD = 0.5


def random_mlp(dim=6, seed=0) -> MLP:
    torch.manual_seed(seed)
    net = MLP(MLPConfig(dim=dim, hidden=32, depth=2))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)  # make the zero-initialized output layer non-trivial
    return net


def test_edm_boundary_condition_is_exact():
    f = EDMConsistency(random_mlp(), EDMConsistencyConfig())
    x = torch.randn(5, 6)
    assert torch.equal(f(x, torch.full((5,), 0.002)), x)
    assert not torch.allclose(f(x, torch.full((5,), 1.0)), x)


def test_trigflow_boundary_condition_is_exact():
    f = TrigFlow(random_mlp(), TrigFlowConfig())
    x = torch.randn(5, 6)
    assert torch.equal(f.consistency(x, torch.zeros(5)), x)
    assert not torch.allclose(f.consistency(x, torch.full((5,), 0.7)), x)


def test_edm_coefficients_match_formulas():
    captured = {}

    class Probe(nn.Module):
        def forward(self, x, c_noise, labels=None):
            captured["x"], captured["c_noise"] = x, c_noise
            return torch.ones_like(x)

    f = EDMConsistency(Probe(), EDMConsistencyConfig())
    x, s = torch.ones(1, 1, dtype=torch.float64), 3.0
    out = f(x, torch.tensor([s], dtype=torch.float64))
    c_skip = SD**2 / ((s - 0.002) ** 2 + SD**2)
    c_out = SD * (s - 0.002) / math.sqrt(SD**2 + s**2)
    assert out.item() == pytest.approx(c_skip + c_out, rel=1e-12)
    assert captured["x"].item() == pytest.approx(1 / math.sqrt(s**2 + SD**2), rel=1e-12)
    assert captured["c_noise"].item() == pytest.approx(250 * math.log(s), rel=1e-12)


class GaussianEDMDenoiser(nn.Module):
    """Optimal denoiser of x0 ~ N(0, s² I): D(x; σ) = s²/(σ² + s²) x."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x, sigma, labels=None):
        return self.s**2 / (sigma[:, None] ** 2 + self.s**2) * x


@pytest.mark.parametrize("s", [0.5, 0.3, 1.2])
def test_edm_to_trigflow_matches_closed_form(s):
    """E[v | x_t] for Gaussian data: Cov(v, x_t)/Var(x_t) x_t with v = cos z − sin x0, z ~ N(0, σd²)."""
    F = EDMDenoiserAsTrigFlow(GaussianEDMDenoiser(s), SD)
    t = torch.linspace(0.05, 1.5, 7, dtype=torch.float64)
    x_t = torch.randn(7, 3, dtype=torch.float64)
    cos, sin = t.cos()[:, None], t.sin()[:, None]
    expected = (cos * sin * (SD**2 - s**2)) / (cos**2 * s**2 + sin**2 * SD**2) * x_t / SD
    torch.testing.assert_close(F(x_t / SD, t), expected, rtol=1e-12, atol=1e-12)


def test_conversion_round_trips():
    t = torch.linspace(0.05, 1.5, 9, dtype=torch.float64)
    x = torch.randn(9, 6, dtype=torch.float64)
    trig = TrigFlow(random_mlp().double(), TrigFlowConfig(sigma_data=SD))
    back = EDMDenoiserAsTrigFlow(TrigFlowAsEDMDenoiser(trig), SD)  # TrigFlow -> EDM -> TrigFlow
    torch.testing.assert_close(back(x / SD, t), trig.raw(x / SD, t), rtol=1e-10, atol=1e-10)
    edm = GaussianEDMDenoiser(0.7)
    sigma = SD * t.tan()
    again = TrigFlowAsEDMDenoiser(TrigFlow(EDMDenoiserAsTrigFlow(edm, SD), TrigFlowConfig(sigma_data=SD)))  # EDM -> TrigFlow -> EDM
    torch.testing.assert_close(again(x, sigma), edm(x, sigma), rtol=1e-10, atol=1e-10)


def test_guided_velocity_is_linear_in_guidance():
    torch.manual_seed(0)
    net = MLP(MLPConfig(dim=4, hidden=16, depth=1, label_dim=3))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    trig = TrigFlow(net, TrigFlowConfig())
    x, t = torch.randn(2, 4), torch.full((2,), 0.8)
    labels = torch.eye(3)[:2]
    v_c, v_u = trig.velocity(x, t, labels), trig.velocity(x, t, torch.zeros_like(labels))
    torch.testing.assert_close(trig.velocity(x, t, labels, guidance=2.5), v_u + 2.5 * (v_c - v_u), rtol=1e-5, atol=1e-6)
