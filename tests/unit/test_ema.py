"""EMA: hand-computed constant updates, EDM2 power-EMA closed forms, exact resume, start_step."""

import math

import pytest
import torch
from torch import nn

from sct.config import ConfigError
from sct.ema import EMA, EMAConfig, ema_beta, power_gamma_from_std, power_std_from_gamma


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        model[1].running_mean.add_(1.0)
        model[1].num_batches_tracked.add_(1)


def test_constant_update_by_hand():
    model = _net()
    ema = EMA(model, EMAConfig(decay=0.9))
    assert not ema.model.training and not any(p.requires_grad for p in ema.model.parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _perturb(model, 1)
    ema.update(model, step=0)
    after = model.state_dict()
    got = ema.model.state_dict()
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(got[k], 0.9 * before[k] + 0.1 * after[k])
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # buffers are copied
        torch.testing.assert_close(got[k], after[k], rtol=0, atol=0)


def test_start_step_copies_weights():
    cfg = EMAConfig(decay=0.5, start_step=3)
    assert [ema_beta(cfg, s) for s in range(5)] == [0.0, 0.0, 0.0, 0.5, 0.5]
    model = _net()
    ema = EMA(model, cfg)
    for step in range(3):
        _perturb(model, step)
        ema.update(model, step)
        for p_ema, p in zip(ema.model.parameters(), model.parameters()):
            torch.testing.assert_close(p_ema, p, rtol=0, atol=0)
    prev = [p.clone() for p in ema.model.parameters()]
    _perturb(model, 3)
    ema.update(model, 3)
    for p_ema, p0, p in zip(ema.model.parameters(), prev, model.parameters()):
        torch.testing.assert_close(p_ema, 0.5 * p0 + 0.5 * p)


@pytest.mark.parametrize("gamma", [0.3, 1.0, 6.94, 16.97, 100.0])
def test_power_gamma_std_round_trip(gamma):
    std = math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))  # EDM2 Eq. 123
    assert power_std_from_gamma(gamma) == pytest.approx(std, rel=1e-12)
    assert power_gamma_from_std(std) == pytest.approx(gamma, rel=1e-9)


def test_power_published_pairs():
    # EDM2 Sec. 3.1: sigma_rel 0.05 <-> gamma 16.97, sigma_rel 0.10 <-> gamma 6.94
    assert power_gamma_from_std(0.05) == pytest.approx(16.97, abs=5e-3)
    assert power_gamma_from_std(0.10) == pytest.approx(6.94, abs=5e-3)


def test_power_ema_is_power_weighted_average():
    # Unrolled, beta_t = (1-1/t)^(g+1) weights the value from step t by (t^(g+1) - (t-1)^(g+1)) / T^(g+1).
    cfg = EMAConfig(kind="power", std=0.1)
    g = power_gamma_from_std(cfg.std)
    model = nn.Linear(1, 1, bias=False)
    ema = EMA(model, cfg)
    values = torch.randn(60, dtype=torch.float64)
    for step, v in enumerate(values):
        with torch.no_grad():
            model.weight.fill_(v.item())
        ema.update(model, step)
    T = len(values)
    t = torch.arange(1, T + 1, dtype=torch.float64)
    w = (t ** (g + 1) - (t - 1) ** (g + 1)) / T ** (g + 1)
    assert w.sum().item() == pytest.approx(1.0)
    assert ema.model.weight.item() == pytest.approx((w * values).sum().item(), rel=1e-4, abs=1e-6)
    assert ema_beta(cfg, 0) == 0.0


def test_resume_continues_identically():
    cfg = EMAConfig(decay=0.8)
    model = _net()
    ref, first = EMA(model, cfg), EMA(model, cfg)
    for step in range(10):
        _perturb(model, step)
        ref.update(model, step)
        if step < 5:
            first.update(model, step)
        if step == 4:
            saved = {k: v.clone() for k, v in first.state_dict().items()}
            resumed = EMA(_net(seed=123), cfg)  # fresh process: different initial weights
            resumed.load_state_dict(saved)
        if step >= 5:
            resumed.update(model, step)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"decay": 1.0}, "decay"),
        ({"decay": -0.1}, "decay"),
        ({"kind": "power", "std": 0.0}, "std"),
        ({"kind": "power", "std": 0.29}, "std"),
        ({"start_step": -1}, "start_step"),
    ],
)
def test_check_rejects(kwargs, key):
    with pytest.raises(ConfigError) as e:
        EMAConfig(**kwargs).check()
    assert key in str(e.value)


def test_check_accepts_defaults():
    EMAConfig().check()
    EMAConfig(kind="power", std=0.05).check()
