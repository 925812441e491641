"""`model.backbone.checkpoint_min_resolution`: activation checkpointing of the U-Net's high-resolution blocks only
gives the eager gradients (fp32, to 1e-5) and stores less than no checkpointing, more than checkpointing every
block (exact storage accounting of `sct.bench.memory.peak_bytes` on CPU)."""
import torch

from sct.bench.memory import peak_bytes
from sct.models.unet import UNet, UNetConfig

TINY = {"img_resolution": 16, "img_channels": 4, "model_channels": 16, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": (8,)}


def _run(**keys):
    torch.manual_seed(0)
    net = UNet(UNetConfig(**TINY, **keys))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.01)
    torch.manual_seed(1)
    x, t = torch.randn(4, 4, 16, 16), torch.rand(4)

    def step():
        net(x, t).square().mean().backward()

    _, peak = peak_bytes(step)
    return peak, {n: p.grad for n, p in net.named_parameters()}, net


def test_checkpointing_only_the_high_resolution_blocks():
    none, grads, _ = _run()
    part, grads_part, net = _run(checkpointing=True, checkpoint_min_resolution=16)
    every, _, _ = _run(checkpointing=True)
    assert {b.res for b in [*net.enc, *net.dec] if b.checkpointed} == {16}
    assert any(not b.checkpointed for b in net.mid)
    assert every < part < none
    for name, g in grads.items():
        torch.testing.assert_close(grads_part[name], g, rtol=1e-5, atol=1e-7, msg=name)
