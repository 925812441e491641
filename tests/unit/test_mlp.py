"""The toy MLP's dropout: nn.Dropout's distribution from a thresholded uniform mask."""
import torch

from sct.models.mlp import UniformDropout


def test_uniform_dropout_matches_inverted_dropout_statistics():
    torch.manual_seed(0)
    drop = UniformDropout(0.3)
    h = torch.ones(400, 500, dtype=torch.float64)
    y = drop(h)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.005  # keep probability 1 − p (the std of 200k draws is 0.001)
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))  # survivors scaled by 1/(1 − p)
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased in expectation, as nn.Dropout


def test_uniform_dropout_is_identity_in_eval_and_at_zero():
    h = torch.randn(8, 16)
    assert torch.equal(UniformDropout(0.5).eval()(h), h)
    assert torch.equal(UniformDropout(0.0)(h), h)


def test_uniform_dropout_replays_with_the_rng_state():
    h = torch.randn(64, 32)
    drop = UniformDropout(0.5)
    state = torch.get_rng_state()
    a = drop(h)
    torch.set_rng_state(state)
    assert torch.equal(drop(h), a)  # the mask is a function of the RNG state, as the shared-mask objectives need
