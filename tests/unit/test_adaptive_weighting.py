"""objective.adaptive_weighting (MATH.md §3): paper e^{-u}·w·m + u, decoupled w·sg(e^{-u})·m + e^{-u}·sg(m) + u, off w·m.
Gradients against hand-written closed forms; the decoupled network gradient equals the paper's for a fixed head;
the head's input option; the teacher's guidance taken from SCDConfig alone."""
import pytest
import torch
from test_scm import SD, inputs, random_trigflow

from sct.config import ConfigError, from_dict
from sct.objectives.scm import SCM, DataVelocity, SCDConfig, SCTConfig, TeacherVelocity


def _objective(weighting: str, **kw) -> SCM:
    return SCM(SCTConfig(adaptive_weighting=weighting, tangent_norm_c=0.1, tangent_warmup_steps=0, **kw), SD, DataVelocity()).double()


@pytest.mark.parametrize("weighting", ["paper", "decoupled", "off"])
@pytest.mark.parametrize("prior", [True, False])
def test_gradients_of_each_form_match_closed_forms(weighting, prior):
    obj = _objective(weighting, prior_weighting=prior)
    t = torch.linspace(0.2, 1.4, 6, dtype=torch.float64)
    m = torch.linspace(0.5, 3.0, 6, dtype=torch.float64).requires_grad_()
    u = torch.linspace(-0.7, 0.9, 6, dtype=torch.float64).requires_grad_()
    if obj.logvar is not None:
        obj.logvar.forward = lambda tt: u  # the head's output as a leaf, to read dL/du
    obj.weighted(m, t).sum().backward()
    w = 1 / (SD * t.tan()) if prior else torch.ones_like(t)
    e = torch.exp(-u.detach())
    expected_dm = {"paper": e * w, "decoupled": w * e, "off": w}[weighting]
    torch.testing.assert_close(m.grad, expected_dm, rtol=1e-14, atol=0)
    if weighting == "paper":  # d/du [e^{-u} w m + u] = 1 − e^{-u} w m
        torch.testing.assert_close(u.grad, 1 - e * w * m.detach(), rtol=1e-14, atol=1e-15)
    elif weighting == "decoupled":  # d/du [e^{-u} m + u] = 1 − e^{-u} m: no prior in the head's term
        torch.testing.assert_close(u.grad, 1 - e * m.detach(), rtol=1e-14, atol=1e-15)
    else:
        assert u.grad is None


def test_decoupled_network_gradient_equals_paper_for_a_fixed_head():
    x0, z, t = inputs()
    grads, head_grads = {}, {}
    for weighting in ("paper", "decoupled"):
        net, obj = random_trigflow(0), _objective(weighting)
        torch.manual_seed(5)
        with torch.no_grad():
            for p in obj.logvar.parameters():
                p.normal_(0, 0.3)  # a non-trivial u(t)
        obj.loss(net, x0, None, t, z, step=1).sum().backward()
        grads[weighting] = [p.grad.clone() for p in net.parameters()]
        head_grads[weighting] = [p.grad.clone() for p in obj.logvar.parameters()]
    for a, b in zip(grads["paper"], grads["decoupled"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert any(not torch.allclose(a, b) for a, b in zip(head_grads["paper"], head_grads["decoupled"]))  # only the head's optimum moves


def test_head_input_is_t_or_log_sigma():
    seen = {}
    for kind in ("t", "log_sigma"):
        obj = _objective("paper", adaptive_input=kind)
        head = obj.logvar.forward
        obj.logvar.forward = lambda tt, kind=kind, head=head: seen.__setitem__(kind, tt) or head(tt)
        t = torch.tensor([0.3, 1.0, 1.5], dtype=torch.float64)
        obj.weighted(torch.ones(3, dtype=torch.float64), t)
    torch.testing.assert_close(seen["t"], torch.tensor([0.3, 1.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(seen["log_sigma"], torch.log(SD * torch.tan(seen["t"])))


def test_config_values_and_the_boolean_alias():
    assert from_dict(SCTConfig, {"adaptive_weighting": True}).adaptive_weighting == "paper"
    assert from_dict(SCTConfig, {"adaptive_weighting": False}).adaptive_weighting == "off"
    assert from_dict(SCTConfig, {"adaptive_weighting": "decoupled"}).adaptive_weighting == "decoupled"
    with pytest.raises(ConfigError, match="adaptive_weighting"):
        from_dict(SCTConfig, {"adaptive_weighting": "both"})
    with pytest.raises(ConfigError, match="adaptive_input"):
        from_dict(SCTConfig, {"adaptive_input": "sigma"})
    assert SCM(SCTConfig(adaptive_weighting=False), SD, DataVelocity()).logvar is None


def test_scd_guidance_comes_from_the_config_alone():
    teacher = random_trigflow(7, label_dim=3)
    x0, z, t = inputs()
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).double()
    obj = SCM(SCDConfig(teacher="in-memory", guidance_scale=2.5), SD, TeacherVelocity(teacher))
    x_t = x0 * t.cos()[:, None] + z * t.sin()[:, None]
    got = obj.velocity(x0, z, x_t, t, labels)
    torch.testing.assert_close(got, teacher.velocity(x_t, t, labels, 2.5), rtol=0, atol=0)
    assert not torch.allclose(got, teacher.velocity(x_t, t, labels, 1.0))
