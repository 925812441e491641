"""Samplers against closed forms: Gaussian data has an exact TrigFlow model and an exact consistency
function, so 32-step ODE and 1/2-step consistency samples must reproduce the data variance; a sample
depends on its seed only."""
import math

import pytest
import torch
from torch import nn

from sct.models.mlp import MLP, MLPConfig
from sct.models.precond import EDMConsistency, EDMConsistencyConfig, TrigFlow, TrigFlowConfig
from sct.samplers import consistency_sample, mids_for_steps, ode_sample, seeded_noise

SD, S = 0.5, 0.3  # σd and the data std


def trig_stats(t):
    cos, sin = t.cos()[:, None], t.sin()[:, None]
    return cos, sin, torch.sqrt(cos**2 * S**2 + sin**2 * SD**2)  # std of x_t


class GaussianVelocityNet(nn.Module):
    """Exact F* = E[v | x_t]/σd for x0 ~ N(0, S²)."""

    def forward(self, x_scaled, t, labels=None):
        cos, sin, std = trig_stats(t.double())
        return (cos * sin * (SD**2 - S**2) / std**2 * x_scaled.double()).to(x_scaled.dtype)


class GaussianConsistencyNet(nn.Module):
    """F such that f(x_t, t) = cos x_t − sin σd F is the exact consistency map x_t · S / std(x_t)."""

    def forward(self, x_scaled, t, labels=None):
        cos, sin, std = trig_stats(t.double())
        x_t = x_scaled.double() * SD
        f = x_t * S / std
        return ((cos * x_t - f) / (SD * sin)).to(x_scaled.dtype)


@pytest.mark.parametrize(("solver", "steps"), [("heun", 32), ("euler", 256)])
def test_ode_sampler_reproduces_gaussian_variance(solver, steps):
    net = TrigFlow(GaussianVelocityNet(), TrigFlowConfig(sigma_data=SD))
    x = ode_sample(net, range(4000), (2,), steps=steps, solver=solver)
    assert x.std().item() == pytest.approx(S, rel=0.03)
    assert x.mean().abs().item() < 0.02


@pytest.mark.parametrize("mids", [[], [1.1], [1.3, 0.6]])
def test_consistency_sampler_exact_map(mids):
    net = TrigFlow(GaussianConsistencyNet(), TrigFlowConfig(sigma_data=SD))
    x = consistency_sample(net, range(4000), (2,), mids=mids)
    assert x.std().item() == pytest.approx(S, rel=0.04)


def test_one_step_trigflow_is_f_of_prior():
    net = TrigFlow(GaussianConsistencyNet(), TrigFlowConfig(sigma_data=SD))
    x = consistency_sample(net, [3, 4], (2,))
    z = seeded_noise([3, 4], (2,), 1)[0]
    expected = net.consistency(SD * z, torch.full((2,), net.t_max))
    torch.testing.assert_close(x, expected)


@pytest.mark.parametrize("wrapper", ["trigflow", "edm"])
def test_samples_depend_on_seed_not_batch(wrapper):
    torch.manual_seed(0)
    backbone = MLP(MLPConfig(dim=3, hidden=16, depth=1, label_dim=4))
    with torch.no_grad():
        for p in backbone.parameters():
            p.normal_(0, 0.3)
    net = TrigFlow(backbone, TrigFlowConfig()) if wrapper == "trigflow" else EDMConsistency(backbone, EDMConsistencyConfig())
    seeds = [11, 5, 7, 2, 9]
    labels = torch.eye(4)[torch.tensor([0, 1, 2, 3, 0])]
    mids = mids_for_steps(net, 3)
    together = consistency_sample(net, seeds, (3,), labels, mids)
    alone = torch.cat([consistency_sample(net, [s], (3,), labels[i : i + 1], mids) for i, s in enumerate(seeds)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    reordered = consistency_sample(net, seeds[::-1], (3,), labels.flip(0), mids)
    torch.testing.assert_close(reordered.flip(0), together, rtol=1e-5, atol=1e-6)


def test_intermediate_times():
    trig = TrigFlow(nn.Identity(), TrigFlowConfig())
    edm = EDMConsistency(nn.Identity(), EDMConsistencyConfig())
    assert mids_for_steps(trig, 1) == [] and mids_for_steps(trig, 2) == [1.1]
    assert mids_for_steps(edm, 2) == [0.821]
    four = mids_for_steps(trig, 4)
    assert len(four) == 3 and four[-1] == pytest.approx(1.1) and all(a > b for a, b in zip(four, four[1:]))
    assert mids_for_steps(trig, 3, [1.2, 0.5]) == [1.2, 0.5]
    with pytest.raises(ValueError, match="intermediate"):
        mids_for_steps(trig, 3, [1.0])
    assert math.isclose(trig.s_max, math.atan(160.0))
