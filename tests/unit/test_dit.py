"""DiT backbone: shapes and zero init, conditioning, batch independence, fp32 islands under bf16 autocast,
config checks, gradient coverage, and activation checkpointing giving the same gradients."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sct.config import ConfigError
from sct.jvp_check import randomize_
from sct.models.dit import DiT, DiTConfig, build_dit
from sct.models.precond import TrigFlow, TrigFlowConfig

TINY = DiTConfig(img_resolution=8, img_channels=2, label_dim=3, patch_size=2, hidden_size=16, depth=2, num_heads=2)


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return build_dit(dataclasses.replace(TINY, **kw))


def inputs(B=4, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype) * 1.5
    return x, t, F.one_hot(torch.randint(0, 3, (B,), generator=g), 3).to(dtype)


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_shape_and_fresh_output_is_exactly_zero(patch):
    net = tiny(patch_size=patch)
    x, t, y = inputs()
    out = net(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
    assert TrigFlow(net, TrigFlowConfig())(x, t, y).shape == x.shape  # the wrappers take it unchanged


def test_conditioning_and_batch_independence():
    net = randomize_(tiny()).eval()
    x, t, y = inputs()
    out = net(x, t, y)
    assert (net(x, t + 0.3, y) - out).abs().max() > 1e-4 and (net(x, t, y.roll(1, dims=1)) - out).abs().max() > 1e-4
    torch.testing.assert_close(net(x, t, torch.zeros_like(y)), net(x, t, None), rtol=0, atol=0)
    for i in range(4):
        torch.testing.assert_close(net(x[i:i + 1], t[i:i + 1], y[i:i + 1]), out[i:i + 1], rtol=1e-5, atol=1e-5)


def test_unpatchify_inverts_the_patch_layout():
    """Blocks made identities (zero adaLN gates): each output patch depends on its own input patch only."""
    net = randomize_(tiny(patch_size=2)).eval()
    for block in net.blocks:
        torch.nn.init.zeros_(block.ada.weight)
        torch.nn.init.zeros_(block.ada.bias)
    x, t, y = inputs(B=1)
    x2 = x.clone()
    x2[..., 2:4, 4:6] += 1.0  # the patch at grid (1, 2)
    d = (net(x2, t, y) - net(x, t, y)).abs().sum(1)[0]
    assert d[2:4, 4:6].min() > 0 and d.sum() == d[2:4, 4:6].sum()


def test_bf16_autocast_keeps_conditioning_in_fp32():
    net = randomize_(tiny())
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, emb = net(x, t, y), net.embed(t, y)
        ada = net.blocks[0].ada(F.silu(emb))
    assert out.dtype == torch.float32 and emb.dtype == torch.float32 and ada.dtype == torch.float32
    torch.testing.assert_close(emb, net.embed(t, y), rtol=0, atol=0)
    ref = net(x, t, y)
    assert (out - ref).norm() / ref.norm() < 0.1


@pytest.mark.parametrize("key,value", [("img_resolution", 9), ("hidden_size", 15), ("num_heads", 0), ("dropout", 1.0),
                                       ("jvp_attention", "flash"), ("preset", "dit-xxl/2"), ("frequency_dim", 3)])
def test_check_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        dataclasses.replace(TINY, **{key: value}).check()
    assert err.value.key == key


def test_gradient_reaches_every_parameter_and_checkpointing_gives_the_same_gradients():
    x, t, y = inputs()
    grads = []
    for checkpointing in (False, True):
        net = randomize_(tiny(dropout=0.2, checkpointing=checkpointing))
        torch.manual_seed(5)
        net(x, t, y).square().sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    silent = [n for n, g in grads[0].items() if g is None or g.abs().max() == 0]
    assert not silent, silent
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)
