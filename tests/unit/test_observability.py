"""What a run reports about itself: the tangent norm ‖g‖ before normalization (checked against the loss it
implies), the global gradient norm before clipping in every tick of metrics.jsonl, and loss.png drawn
against the step and redrawn at every checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from sct import images, stats, train
from sct.models.mlp import MLP, MLPConfig
from sct.models.precond import TrigFlow, TrigFlowConfig
from sct.objectives.scm import SCM, DataVelocity, SCTConfig

TOY = ["--config", "configs/toy_sct.yaml", "model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64",
       "run.sample_every=1000", "run.snapshot_every=1000", "sampling.num=16"]


@pytest.mark.parametrize("c", [0.0, 0.1])
def test_tangent_norm_is_reported_before_normalization(c):
    """At the current weights F = F⁻, so the unweighted loss is ‖ĝ‖²/D with ĝ = g / (‖g‖ + c): it pins ‖g‖ down."""
    torch.manual_seed(0)
    net = TrigFlow(MLP(MLPConfig(dim=6, hidden=32, depth=2)), TrigFlowConfig(sigma_data=0.5)).double()
    cfg = SCTConfig(tangent_norm_c=c, prior_weighting=False, adaptive_weighting=False, tangent_warmup_steps=0)
    g = torch.Generator().manual_seed(1)
    x0, z = torch.randn(5, 6, generator=g, dtype=torch.float64), 0.5 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    stats.collect()
    loss = SCM(cfg, 0.5, DataVelocity()).loss(net, x0, None, torch.linspace(0.1, 1.4, 5, dtype=torch.float64), z, step=0)
    reported = stats.collect()
    norm = (loss.detach() * 6).sqrt()  # ‖ĝ‖ per sample
    g_norm = norm if c == 0 else c * norm / (1 - norm)  # invert ‖ĝ‖ = ‖g‖ / (‖g‖ + c)
    assert reported["tangent_norm"] == pytest.approx(g_norm.mean().item(), rel=1e-9)
    assert reported["tangent_norm/std"] == pytest.approx(g_norm.std(correction=0).item(), rel=1e-6)


def test_every_tick_has_the_gradient_norm_before_clipping_and_the_tangent_norm(tmp_path):
    run_dir = tmp_path / "run"
    assert train.main([*TOY, f"run.dir={run_dir}", "run.total_steps=3", "run.log_every=1", "optimizer.grad_clip=1e-8"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    for r in records:  # clipped to 1e-8, the gradient that was reported is the one before clipping
        assert 1e-4 < r["grad_norm"] < 1e4 and 0 < r["tangent_norm"] < 1e4


def test_loss_png_is_drawn_against_step_at_every_checkpoint(tmp_path, monkeypatch):
    drawn = []
    real = images.save_curve
    monkeypatch.setattr(images, "save_curve", lambda series, path, **kw: (drawn.append(series["loss"][0]), real(series, path, **kw)))
    run_dir = tmp_path / "run"
    assert train.main([*TOY, f"run.dir={run_dir}", "run.total_steps=6", "run.log_every=2", "run.checkpoint_every=2"]) == 0
    assert [list(xs) for xs in drawn] == [[2], [2, 4], [2, 4, 6]] and (run_dir / "loss.png").is_file()
