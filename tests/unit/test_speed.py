"""The switchable speed options compute what the eager path computes (sct.models.speed, model.* keys).

Each test runs one sCT loss (JVP tangent + gradient forward, tiny U-Net, fp32) and its backward twice,
plain and with the option, from the same weights and randomness: same loss and gradients to 1e-5
(relative; NHWC convolutions sum in another order). torch.compile uses the "aot_eager" backend (the
real AOTAutograd forward/backward graphs without inductor's code generation, which takes > 60 s of
CPU per compile on this machine); the bf16 cast counter runs under CPU autocast.
"""
from collections import Counter

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from sct.experiment import ModelConfig, build_model
from sct.models import speed
from sct.models.unet import UNetConfig
from sct.objectives.scm import SCM, DataVelocity, SCTConfig

TINY = {"img_resolution": 8, "img_channels": 4, "model_channels": 16, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (4,)}


def _net(**model_keys):
    """The same random weights (none zero: zero-initialised layers would hide a wrong gradient) for every option."""
    torch.manual_seed(0)
    plain = build_model(ModelConfig(backbone=UNetConfig(**TINY)))
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.01)
    net = build_model(ModelConfig(backbone=UNetConfig(**TINY), **model_keys))
    net.load_state_dict(plain.state_dict())  # copy_ keeps each parameter's memory format
    return net


def _loss_and_grads(net):
    net.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    objective = SCM(SCTConfig(tangent_warmup_steps=0), 0.5, DataVelocity())
    x0 = torch.randn(2, 4, 8, 8)
    t, z = torch.rand(2) * 1.4 + 0.05, 0.5 * torch.randn(2, 4, 8, 8)
    loss = objective.loss(net, x0, None, t, z, step=0).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


def _assert_same(a, b, rtol=1e-5, atol=1e-7):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol * 10, msg=name)


def test_channels_last_same_loss_and_gradients():
    net = _net(channels_last=True)
    seen = []
    net.backbone.conv_in.register_forward_hook(lambda m, args, out: seen.append(out.is_contiguous(memory_format=torch.channels_last)))
    inputs_only = _loss_and_grads(net)  # the DeepSpeed engines' case: weights stay contiguous
    assert seen and all(seen)
    speed.finish([net], net_cfg := ModelConfig(channels_last=True), "torch")
    assert net_cfg.channels_last and net.backbone.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.backbone.conv_in.weight.is_contiguous()
    eager = _loss_and_grads(_net())
    _assert_same(eager, inputs_only)
    _assert_same(eager, _loss_and_grads(net))


def test_compile_backbone_same_loss_and_gradients_and_jvp_stays_eager():
    net = _net()
    speed.finish([net], ModelConfig(compile="backbone", compile_backend="aot_eager"), "torch")
    counters.clear()
    with torch.no_grad():  # no-grad calls (teacher, EMA, sampling) stay eager
        net(torch.randn(1, 4, 8, 8), torch.rand(1))
    assert not counters["stats"]["calls_captured"]
    compiled = _loss_and_grads(net)
    assert counters["stats"]["calls_captured"] > 0  # the gradient forward went through dynamo
    assert not counters["graph_break"], dict(counters["graph_break"])  # dual tensors never reached dynamo
    _assert_same(_loss_and_grads(_net()), compiled)


class _WeightCasts(TorchDispatchMode):
    """Counts bf16 copies made of each parameter (autocast's weight casts)."""

    def __init__(self, net):
        super().__init__()
        self.names = {p.data_ptr(): n for n, p in net.named_parameters()}
        self.casts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 and args[0].data_ptr() in self.names:
            self.casts[self.names[args[0].data_ptr()]] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("cache, per_weight", [(True, 1), (False, 2)])
def test_bf16_weight_casts_per_step(cache, per_weight):
    """The loop's autocast caches weight casts (torch engine, ZeRO 0-2): the JVP and the gradient forward share
    one bf16 copy of each weight per step. Under ZeRO-3 the cache is off (gathered weights are freed after each
    module), so each weight is cast once per pass: the cost to measure on GPU (docs/benchmarks.md)."""
    net = _net()
    objective = SCM(SCTConfig(tangent_warmup_steps=0), 0.5, DataVelocity())
    mode = _WeightCasts(net)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache), mode:
        objective(net, {"x": torch.randn(2, 4, 8, 8)}, 0)
    assert mode.casts and set(mode.casts.values()) == {per_weight}
