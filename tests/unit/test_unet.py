"""U-Net backbone and JVP-capable attention: shapes, init, conditioning, batch independence,
JVP against float64 central differences, bf16 autocast islands, config checks, gradient coverage."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

from sct.config import ConfigError
from sct.models.attention import attention, forward_ad_mode, in_forward_ad_mode, math_attention
from sct.models.unet import AttentionBlock, Modulation, UNet, UNetConfig, build_unet


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny nets: intra-op threads only add spin-wait cost on a shared 2-core machine (10x slower seen)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = UNetConfig(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=(1, 2),
                  num_blocks=1, attn_resolutions=(8, 4))


def tiny(**kw) -> UNet:
    torch.manual_seed(0)
    return build_unet(dataclasses.replace(TINY, **kw))


def randomize_(net: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter random (zero-init ones included) so the function is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / fan_in**0.5 * (1.0 if p.ndim > 1 else 0.3))


def reinit_zero_layers_(net: torch.nn.Module) -> None:
    """Ordinary init for the zero-init convs (out_conv, residual conv2, attention proj)."""
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.reset_parameters()


def inputs(B=4, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g, dtype=dtype) * 1.5
    labels = F.one_hot(torch.randint(0, 3, (B,), generator=g), 3).to(dtype)
    return x, t, labels


def test_shape_and_fresh_output_is_exactly_zero():
    net = tiny()
    x, t, y = inputs()
    out = net(x, t, y)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, torch.zeros_like(out))
    assert net.embed(t, y).shape == (4, net.time_embedding_dim) and net.time_embedding_dim == 32


@pytest.mark.parametrize("time_embedding", ["positional", "fourier"])
def test_output_depends_on_noise_and_labels_and_zero_row_is_no_label(time_embedding):
    net = tiny(time_embedding=time_embedding, fourier_scale=0.02 if time_embedding == "fourier" else 16.0).eval()
    reinit_zero_layers_(net)  # with only out_conv perturbed the zero-init residual branches carry no conditioning
    x, t, y = inputs()
    c = t if time_embedding == "positional" else 250 * torch.log(t + 0.01)  # TrigFlow t / iCT c_noise
    out = net(x, c, y)
    assert torch.isfinite(out).all() and out.abs().max() > 1e-4
    assert (net(x, c + 0.3, y) - out).abs().max() > 1e-5
    assert (net(x, c, y.roll(1, dims=1)) - out).abs().max() > 1e-5
    torch.testing.assert_close(net(x, c, torch.zeros_like(y)), net(x, c, None), rtol=0, atol=0)


@pytest.mark.parametrize("double_norm", [True, False])
def test_init_magnitudes_are_sane(double_norm):
    """All zero-init layers given ordinary init: activations stay finite and O(1) over t in [0, π/2]."""
    net = tiny(adaptive_double_norm=double_norm, model_channels=16).eval()
    reinit_zero_layers_(net)
    x, _, y = inputs()
    for t in (0.0, 0.7, 1.5707):
        out = net(x, torch.full((4,), t), y)
        rms = out.square().mean().sqrt().item()
        assert torch.isfinite(out).all() and 1e-3 < rms < 10, (t, rms)


@pytest.mark.parametrize("double_norm", [True, False])
def test_modulation_equation(double_norm):
    torch.manual_seed(0)
    mod = Modulation(channels=6, emb_dim=5, groups=2, double_norm=double_norm)
    h, emb = torch.randn(3, 6, 4, 4) * 3 + 1, torch.randn(3, 5)
    s, b = (F.silu(emb) @ mod.affine.weight.T + mod.affine.bias).chunk(2, dim=1)
    hg = h.reshape(3, 2, -1)
    norm = ((hg - hg.mean(-1, keepdim=True)) / (hg.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()).reshape(h.shape)
    if double_norm:  # y = norm(h) * pnorm(s) + pnorm(b), pnorm(v) = v / rms over channels
        s, b = s / s.square().mean(1, keepdim=True).sqrt(), b / b.square().mean(1, keepdim=True).sqrt()
    else:  # AdaGN: y = norm(h) * (1 + s) + b
        s = 1 + s
    torch.testing.assert_close(mod(h, emb), norm * s[:, :, None, None] + b[:, :, None, None], rtol=1e-5, atol=1e-5)


def test_batch_independence():
    net = tiny().eval()
    randomize_(net)
    x, t, y = inputs()
    full = net(x, t, y)
    for i in range(4):
        torch.testing.assert_close(net(x[i:i + 1], t[i:i + 1], y[i:i + 1]), full[i:i + 1], rtol=1e-5, atol=1e-5)


def test_jvp_matches_central_difference_float64(monkeypatch):
    net = tiny(attn_resolutions=(8,)).double().eval()  # attention at 8x8 plus the 4x4 middle block
    fused_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a: fused_calls.append(1) or sdpa(*a))
    randomize_(net)
    x, c, y = inputs(B=2, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    tx, tc = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)

    def f(x_, c_):
        return net(x_, c_, y)

    with torch.no_grad(), forward_ad_mode():
        _, jvp = torch.func.jvp(f, (x, c), (tx, tc))
    assert not fused_calls  # the JVP went through math_attention (fused kernels have no forward AD)
    with torch.no_grad():
        h = 1e-6
        ref = (f(x + h * tx, c + h * tc) - f(x - h * tx, c - h * tc)) / (2 * h)
    n_attn = sum(isinstance(m, AttentionBlock) for m in net.modules())
    assert ref.norm() > 1e-3 and n_attn == 4 and len(fused_calls) == 2 * n_attn  # fused path outside the mode
    assert ((jvp - ref).norm() / ref.norm()).item() <= 1e-6


def test_forward_ad_dual_tensors_match_func_jvp():
    net = tiny().double().eval()
    randomize_(net)
    x, c, y = inputs(B=2, dtype=torch.float64)
    tx, tc = torch.ones_like(x), torch.ones_like(c)
    with torch.no_grad(), forward_ad_mode():
        _, ref = torch.func.jvp(lambda a, b: net(a, b, y), (x, c), (tx, tc))
        with torch.autograd.forward_ad.dual_level():
            out = net(torch.autograd.forward_ad.make_dual(x, tx), torch.autograd.forward_ad.make_dual(c, tc), y)
            tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, ref, rtol=1e-10, atol=1e-12)


def test_attention_paths_agree_and_flag_is_thread_local():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g) for _ in range(3))
    fused = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v), fused)
    torch.testing.assert_close(math_attention(q, k, v), fused, rtol=1e-5, atol=1e-6)
    assert not in_forward_ad_mode()
    seen = []
    with forward_ad_mode():
        with forward_ad_mode():
            assert in_forward_ad_mode()
        assert in_forward_ad_mode()  # nesting: the inner exit keeps the outer flag
        torch.testing.assert_close(attention(q, k, v, "math"), math_attention(q, k, v), rtol=0, atol=0)
        torch.testing.assert_close(attention(q, k, v), math_attention(q, k, v), rtol=1e-5, atol=1e-6)  # chunked
        th = threading.Thread(target=lambda: seen.append(in_forward_ad_mode()))
        th.start()
        th.join()
    assert seen == [False] and not in_forward_ad_mode()


def test_attention_jvp_matches_central_difference():
    g = torch.Generator().manual_seed(5)
    q, k, v, tq, tk, tv = (torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64) for _ in range(6))
    with forward_ad_mode():
        _, jvp = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    h = 1e-6
    ref = (attention(q + h * tq, k + h * tk, v + h * tv) - attention(q - h * tq, k - h * tk, v - h * tv)) / (2 * h)
    assert ((jvp - ref).norm() / ref.norm()).item() <= 1e-6


def test_attention_block_heads():
    assert AttentionBlock(128, 32).heads == 2 and AttentionBlock(96, 24).heads == 1 and AttentionBlock(16, 4).heads == 1


def test_bf16_autocast_runs_and_embedding_stays_fp32():
    net = tiny()
    randomize_(net)
    x, t, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, y)
        emb = net.embed(t, y)
        mod = net.mid[0].mod.affine(F.silu(emb))
    assert torch.isfinite(out).all() and out.dtype == torch.float32
    assert emb.dtype == torch.float32 and mod.dtype == torch.float32
    torch.testing.assert_close(emb, net.embed(t, y), rtol=0, atol=0)  # no bf16 rounding anywhere on the path
    assert (out - net(x, t, y)).norm() / net(x, t, y).norm() < 0.1  # bf16 convs, close to fp32


@pytest.mark.parametrize("key,value", [
    ("img_resolution", 12), ("attn_resolutions", (16, 3)), ("dropout", 1.0), ("dropout", -0.1),
    ("model_channels", 36 * 4 + 2), ("channel_mult", ()), ("num_blocks", 0), ("time_embedding", "learned"),
])
def test_check_rejects_bad_values_naming_the_key(key, value):
    cfg = dataclasses.replace(UNetConfig(img_resolution=32, channel_mult=(1, 2, 2, 2), attn_resolutions=(16,)),
                              **{key: value})
    with pytest.raises(ConfigError) as err:
        cfg.check()
    assert err.value.key == key and key in str(err.value)
    UNetConfig().check()  # defaults are valid


def test_gradient_reaches_every_parameter():
    net = tiny(dropout=0.1)
    x, t, y = inputs()
    net(x, t, y).square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())  # fresh net: no unused parameters
    net.zero_grad(set_to_none=True)
    randomize_(net)
    net(x, t, y).square().sum().backward()
    silent = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not silent, silent


def test_checkpointing_gives_the_same_gradients_and_is_off_inside_the_jvp(monkeypatch):
    x, t, y = inputs()
    grads = []
    for checkpointing in (False, True):
        net = tiny(dropout=0.2, checkpointing=checkpointing)
        randomize_(net)
        torch.manual_seed(5)
        net(x, t, y).square().sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), forward_ad_mode():
        torch.func.jvp(lambda a: net(a, t, y), (x,), (x,))
    assert not calls
    net(x, t, y)
    assert calls  # the gradient-carrying forward checkpoints


def test_dropout_limited_to_low_resolutions():
    """sCM Table 4's dropout at resolutions <= 16 only: a 32x32 net's 32-res blocks get none, its 16/8 blocks get it."""
    cfg = dataclasses.replace(TINY, img_resolution=32, channel_mult=(1, 1, 1), attn_resolutions=(8,), dropout=0.3,
                              dropout_max_resolution=16)
    net = build_unet(cfg)
    # output resolution of each block: enc conv block, then (down, block) per level; mid; dec (blocks, then up + blocks)
    resolutions = [32, 16, 16, 8, 8] + [8, 8] + [8, 8, 16, 16, 16, 32, 32, 32]
    blocks = [*net.enc, *net.mid, *net.dec]
    assert [b.dropout.p for b in blocks] == [0.3 if r <= 16 else 0.0 for r in resolutions]
    randomize_(net)  # the zero-init conv after the dropout would hide it
    x, t = torch.randn(2, 2, 32, 32), torch.rand(2)
    net.train()
    emb = net.embed(t)
    h = net.conv_in(x)
    torch.testing.assert_close(net.enc[0](h, emb), net.enc[0](h, emb), rtol=0, atol=0)  # 32x32: no dropout in training
    assert not torch.equal(net.enc[1](h, emb), net.enc[1](h, emb))  # 16x16: dropout
    every = build_unet(dataclasses.replace(cfg, dropout_max_resolution=0))
    assert {m.p for m in every.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
