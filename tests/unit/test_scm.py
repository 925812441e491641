"""sCT/sCD against independent references (MATH.md §3): the JVP tangent vs float64 central differences,
the loss gradient vs the continuous-time consistency gradient, tangent warmup, dropout-mask sharing."""

import pytest
import torch

from sct.models.mlp import MLP, MLPConfig
from sct.models.precond import TrigFlow, TrigFlowConfig, bcast
from sct.objectives.common import replay_randomness
from sct.objectives.scm import (
    SCM,
    DataVelocity,
    SCDConfig,
    SCTConfig,
    TeacherVelocity,
    finite_difference_tangent,
    jvp_tangent,
)

SD = 0.5


def random_trigflow(seed, dim=6, dropout=0.0, label_dim=0) -> TrigFlow:
    torch.manual_seed(seed)
    net = MLP(MLPConfig(dim=dim, hidden=32, depth=2, dropout=dropout, label_dim=label_dim))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return TrigFlow(net, TrigFlowConfig(sigma_data=SD)).double()


def inputs(n=5, dim=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    z = SD * torch.randn(n, dim, generator=g, dtype=torch.float64)
    t = torch.linspace(0.1, 1.45, n, dtype=torch.float64)
    return x0, z, t


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_jvp_matches_float64_central_difference():
    net = random_trigflow(0)
    x0, z, t = inputs()
    x_t = bcast(t.cos(), x0) * x0 + bcast(t.sin(), x0) * z
    dxdt = DataVelocity()(x0, z, x_t, t, None)
    cs = t.cos() * t.sin()
    primals, tangents = (x_t / SD, t), (bcast(cs, x0) * dxdt / SD, cs)
    fn = lambda xs, tt: net.raw(xs, tt)
    F, dF = jvp_tangent(fn, primals, tangents)
    F_fd, dF_fd = finite_difference_tangent(fn, primals, tangents, 1e-6)
    assert rel_err(dF, dF_fd) <= 1e-6
    torch.testing.assert_close(F, fn(*primals), rtol=0, atol=0)
    assert dF.abs().max() > 1e-3  # a non-trivial tangent


def total_derivative_of_f(net, x_t, t, dxdt, h=1e-6):
    """df⁻/dt along the trajectory by a float64 central difference, independent of the JVP code."""
    plus = net.consistency(x_t + h * dxdt, t + h)
    minus = net.consistency(x_t - h * dxdt, t - h)
    return (plus - minus) / (2 * h)


@pytest.mark.parametrize("kind", ["sct", "scd"])
@pytest.mark.parametrize("tangent", ["jvp", "finite_difference"])
def test_gradient_is_continuous_time_consistency_gradient(kind, tangent):
    net = random_trigflow(0)
    common = dict(tangent_norm_c=0.0, adaptive_weighting=False, tangent_warmup_steps=0, tangent=tangent, fd_step=1e-5)
    if kind == "sct":
        obj = SCM(SCTConfig(**common), SD, DataVelocity())
    else:
        obj = SCM(SCDConfig(teacher="in-memory", **common), SD, TeacherVelocity(random_trigflow(7)))
    x0, z, t = inputs()
    D = x0.shape[1]
    net.zero_grad()
    obj.loss(net, x0, None, t, z, step=10).sum().backward()
    grad_loss = [p.grad.clone() for p in net.parameters()]

    x_t = bcast(t.cos(), x0) * x0 + bcast(t.sin(), x0) * z
    with torch.no_grad():
        dxdt = obj.velocity(x0, z, x_t, t, None)
        dfdt = total_derivative_of_f(net, x_t, t, dxdt)
    w = 1 / (SD * t.tan())
    # form 1: ∇ −(2/D) w cos t F_θᵀ sg(df⁻/dt)
    net.zero_grad()
    surrogate = -(2 / D) * w * t.cos() * (net(x_t, t) * dfdt).sum(1)
    surrogate.sum().backward()
    grad_ref = [p.grad.clone() for p in net.parameters()]
    # form 2: ∇ w' f_θᵀ sg(df⁻/dt), w' = (2/D) w / (σd tan t)
    net.zero_grad()
    ((2 / D) * w / (SD * t.tan()) * (net.consistency(x_t, t) * dfdt).sum(1)).sum().backward()
    grad_ref2 = [p.grad.clone() for p in net.parameters()]

    flat = lambda gs: torch.cat([g.flatten() for g in gs])
    tol = 1e-6 if tangent == "jvp" else 1e-4  # the FD tangent itself carries O(h²) error
    assert rel_err(flat(grad_loss), flat(grad_ref)) <= tol
    assert rel_err(flat(grad_ref2), flat(grad_ref)) <= 1e-6


def test_no_tangent_warmup_drops_xt_and_dF_terms():
    net = random_trigflow(0)
    obj = SCM(SCTConfig(tangent_norm_c=0.0, adaptive_weighting=False, prior_weighting=False, tangent_warmup_steps=100), SD, DataVelocity())
    x0, z, t = inputs()
    loss = obj.loss(net, x0, None, t, z, step=0)  # r = 0
    x_t = bcast(t.cos(), x0) * x0 + bcast(t.sin(), x0) * z
    dxdt = DataVelocity()(x0, z, x_t, t, None)
    F = net(x_t, t).detach()
    g = -bcast(t.cos() ** 2, x0) * (SD * F - dxdt)  # only the first term of g
    torch.testing.assert_close(loss, (g**2).mean(1), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(obj.loss(net, x0, None, t, z, step=100), loss)  # r = 1 adds the tangent


def test_tangent_normalization_and_adaptive_weight():
    net = random_trigflow(0)
    cfg = SCTConfig(tangent_norm_c=0.1, adaptive_weighting=True, prior_weighting=True, tangent_warmup_steps=0)
    obj = SCM(cfg, SD, DataVelocity()).double()
    x0, z, t = inputs()
    with torch.no_grad():
        obj.logvar.mlp[-1].bias.fill_(0.3)  # u(t) = 0.3
    loss = obj.loss(net, x0, None, t, z, step=5)
    x_t = bcast(t.cos(), x0) * x0 + bcast(t.sin(), x0) * z
    dxdt = DataVelocity()(x0, z, x_t, t, None)
    cs = t.cos() * t.sin()
    F, dF = jvp_tangent(lambda xs, tt: net.raw(xs, tt), (x_t / SD, t), (bcast(cs, x0) * dxdt / SD, cs))
    g = -bcast(t.cos() ** 2, x0) * (SD * F - dxdt) - (bcast(cs, x0) * x_t + SD * dF)
    g = g / (g.norm(dim=1, keepdim=True) + 0.1)
    # at θ = θ⁻ the residual is −g, so the loss is w e^{−u} ‖g‖²/D + u
    expected = torch.exp(torch.tensor(-0.3, dtype=torch.float64)) * (g**2).mean(1) / (SD * t.tan()) + 0.3
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_dropout_mask_shared_between_tangent_and_gradient_forward():
    net = random_trigflow(0, dropout=0.5)
    net.train()
    x0, z, t = inputs()
    with replay_randomness(x0.device):
        a = net(x0, t)
    b = net(x0, t)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(net(x0, t), b)  # the mask is random from one replay to the next
    obj = SCM(SCTConfig(tangent_norm_c=0.0, adaptive_weighting=False, prior_weighting=False, tangent_warmup_steps=0), SD, DataVelocity())
    # with the same mask, F_θ − F⁻ = 0 at θ = θ⁻, so the loss is exactly ‖g‖²/D with g from the same forward
    loss = obj.loss(net, x0, None, t, z, step=1)
    assert torch.isfinite(loss).all()


def test_bf16_autocast_keeps_loss_fp32():
    torch.manual_seed(0)
    net = TrigFlow(MLP(MLPConfig(dim=6, hidden=32, depth=2)), TrigFlowConfig())
    obj = SCM(SCTConfig(), SD, DataVelocity())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = obj(net, {"x": torch.randn(8, 6)}, step=3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.mean().backward()


def test_scd_requires_teacher_in_config():
    from sct.config import ConfigError

    with pytest.raises(ConfigError, match="teacher"):
        SCDConfig().check()
