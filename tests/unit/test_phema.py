"""EDM2 post-hoc EMA: profile math against closed forms and numerical integrals, and a toy run whose
reconstruction at sigma_rel 0.07 and 0.03 (from stored 0.05 and 0.10 profiles) matches a power EMA trained
directly at that length; resume of the profiles; a training run that stores them, resumes them exactly and
serves the reconstruction as sCD teacher and init; the CLI's errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sct import posthoc_ema, train
from sct.checkpoint import load_snapshot
from sct.config import ConfigError
from sct.ema import EMA, EMAConfig, PostHocConfig, power_gamma_from_std, power_std_from_gamma
from sct.experiment import load_snapshot_model
from sct.phema import attach, profile_inner, solve_coefficients


def _profile(t, gamma, tau):
    """EDM2 Eq. 121: p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t], else 0."""
    return np.where(tau <= t, (gamma + 1) * (tau / t) ** gamma / t, 0.0)


@pytest.mark.parametrize("gamma", [0.5, 6.94, 16.97, 40.0])
def test_sigma_rel_is_the_relative_std_of_the_profile(gamma):
    # moments of p on [0, 1]: E[tau] = (g+1)/(g+2), E[tau^2] = (g+1)/(g+3), so sigma_rel = sqrt(E[tau^2] - E[tau]^2)
    closed = math.sqrt((gamma + 1) / (gamma + 3) - ((gamma + 1) / (gamma + 2)) ** 2)
    assert power_std_from_gamma(gamma) == pytest.approx(closed, rel=1e-12)
    assert power_gamma_from_std(closed) == pytest.approx(gamma, rel=1e-9)


def test_published_gamma_values():
    # EDM2 §3.1: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94; Algorithm 2 needs gamma > 0 (sigma_rel < sqrt(1/12))
    assert power_gamma_from_std(0.05) == pytest.approx(16.97, abs=5e-3)
    assert power_gamma_from_std(0.10) == pytest.approx(6.94, abs=5e-3)
    with pytest.raises(ValueError):
        power_gamma_from_std(0.29)


@pytest.mark.parametrize(("ta", "ga", "tb", "gb"), [(100, 6.94, 100, 16.97), (40, 3.0, 100, 16.97), (100, 16.97, 30, 1.0)])
def test_profile_inner_product_against_numerical_integral(ta, ga, tb, gb):
    tau = np.linspace(0, max(ta, tb), 2_000_001)
    numeric = np.trapezoid(_profile(ta, ga, tau) * _profile(tb, gb, tau), tau)
    assert profile_inner(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-5)


def test_coefficients_reproduce_the_wanted_profile():
    times = [t for t in range(20, 1001, 20) for _ in (0, 1)]
    sigmas = [s for _ in range(20, 1001, 20) for s in (0.05, 0.10)]
    x = solve_coefficients(times, sigmas, 1000, 0.02)
    assert x.sum() == pytest.approx(1.0)
    tau = np.linspace(0, 1000, 400_001)
    want = _profile(1000, power_gamma_from_std(0.02), tau)
    got = sum(c * _profile(t, power_gamma_from_std(s), tau) for c, t, s in zip(x, times, sigmas))
    rel = np.sqrt(np.trapezoid((got - want) ** 2, tau) / np.trapezoid(want**2, tau))
    assert rel < 0.05  # L2 error of the profile itself; the weights below are far closer


def _toy_run(tmp_path, steps=400, every=10, direct=(0.07,)):
    """Adam on a noisy regression: the weights wander; PostHocEMA stores 0.05/0.10 profiles every `every` steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    opt = torch.optim.Adam(net.parameters(), lr=3e-2)
    cfg = PostHocConfig(sigma_rels=(0.05, 0.10), every=every)
    ema = attach(EMA(net, EMAConfig()), net, cfg, tmp_path / "phema", {"model": {}}, rank=0, total_steps=steps)
    directs = {s: EMA(net, EMAConfig(kind="power", std=s)) for s in direct}
    w = torch.randn(4, 1, dtype=torch.float64)
    for step in range(steps):
        x = torch.randn(32, 4, dtype=torch.float64)
        loss = (net(x) - x @ w - 0.5 * torch.randn(32, 1, dtype=torch.float64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
        for d in directs.values():
            d.update(net, step)
    return ema, directs


def _flat(state):
    return torch.cat([v.double().flatten() for k, v in sorted(state.items())])


@pytest.mark.parametrize(("sigma_rel", "tol"), [(0.07, 1e-3), (0.03, 1e-2)])
def test_reconstruction_matches_a_power_ema_trained_at_that_length(tmp_path, sigma_rel, tol):
    """Measured (400 steps, profiles every 10): |rec - direct| / |ema_0.05 - ema_0.10| = 9e-5 at 0.07 (between the
    stored lengths), 2e-3 at 0.03 (shorter than both); the nearest stored profile alone is off by 0.40."""
    ema, directs = _toy_run(tmp_path, direct=(sigma_rel,))
    profiles = posthoc_ema.list_profiles(tmp_path / "phema")
    assert len(profiles) == 2 * 40 and profiles[-1][0] == 400
    state, _, extra = posthoc_ema.reconstruct(profiles, sigma_rel)
    assert extra == {"step": 400, "sigma_rel": sigma_rel, "posthoc_inputs": 80}
    got, want = _flat(state), _flat(directs[sigma_rel].state_dict())
    spread = (_flat(ema.profiles[0].state_dict()) - _flat(ema.profiles[1].state_dict())).norm()
    err = (got - want).norm()
    assert err < tol * spread, (err.item(), spread.item())
    assert (_flat(ema.profiles[0].state_dict()) - want).norm() > 0.1 * spread  # the test can tell profiles apart


def test_resume_of_the_profiles_is_exact(tmp_path):
    ema, _ = _toy_run(tmp_path / "a", steps=30, direct=())
    saved = ema.state_dict()
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    other = attach(EMA(net, EMAConfig()), net, ema.cfg, tmp_path / "b", {}, 0, 30)
    other.load_state_dict(saved)
    for a, b in zip(ema.profiles + [ema.ema], other.profiles + [other.ema]):
        torch.testing.assert_close(_flat(a.state_dict()), _flat(b.state_dict()), rtol=0, atol=0)
    with pytest.raises(KeyError, match="post-hoc"):
        other.load_state_dict(saved["ema"])


@pytest.mark.parametrize(("kwargs", "key"), [({"sigma_rels": (0.05,), "every": 0}, "every"),
                                             ({"sigma_rels": (0.3,), "every": 5}, "sigma_rels"),
                                             ({"sigma_rels": (0.05, 0.05), "every": 5}, "sigma_rels")])
def test_config_rejects(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        PostHocConfig(**kwargs).check()


def test_training_stores_profiles_and_the_cli_writes_a_loadable_snapshot(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--config", "configs/toy_diffusion.yaml", f"run.dir={run}", "run.total_steps=7", "run.batch_size=16",
            "model.backbone.hidden=16", "model.backbone.depth=1", "run.checkpoint_every=4", "run.snapshot_every=100",
            "run.sample_every=100", "sampling.num=8", "sampling.steps=[2]", "ema.posthoc={sigma_rels: [0.05, 0.1], every: 3}"]
    assert train.main(args) == 0
    names = sorted(p.name for p in (run / "phema").glob("*.safetensors"))
    assert names == [f"phema_{s:09d}_{r:.4f}.safetensors" for s in (3, 6, 7) for r in (0.05, 0.1)]  # every 3rd step + the last
    out = tmp_path / "teacher.safetensors"
    assert posthoc_ema.main(["--run", str(run), "--sigma-rel", "0.02", "--out", str(out)]) == 0
    model, stored = load_snapshot_model(out)
    assert stored["sampling"]["method"] == "ode" and all(torch.isfinite(p).all() for p in model.parameters())
    student = ["--config", "configs/toy_scd.yaml", f"run.dir={tmp_path / 'scd'}", "run.total_steps=2", "run.batch_size=16",
               "model.backbone.hidden=16", "model.backbone.depth=1", "run.sample_every=100", "run.snapshot_every=100",
               f"objective.teacher={out}", f"model.init_from={out}"]
    assert train.main(student) == 0  # the reconstruction serves as objective.teacher and model.init_from
    parts = tmp_path / "parts"  # stopped after 4 steps (checkpointed) and resumed by the same command
    assert train.main([*args[:2], f"run.dir={parts}", *args[3:], "run.max_steps_per_job=4"]) == 0
    assert train.main([*args[:2], f"run.dir={parts}", *args[3:]]) == 0
    for name in names:
        a, _ = load_snapshot(run / "phema" / name)
        b, _ = load_snapshot(parts / "phema" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert posthoc_ema.main(["--run", str(run), "--sigma-rel", "0.02", "--out", str(out), "--step", "5"]) == 2
    assert "step 5 is not a stored step" in capsys.readouterr().err
    assert posthoc_ema.main(["--run", str(tmp_path / "nothing"), "--sigma-rel", "0.02", "--out", str(out)]) == 2
