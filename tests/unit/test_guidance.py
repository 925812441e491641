"""Guidance: the sCD teacher must have been trained with label dropout to be guided; the guidance-conditioned
student (sCM Table 4) gets each sample's own scale, the teacher is guided with the same scale, the JVP treats
the scale as a constant; config rules; a tiny teacher -> guidance-conditioned sCD -> sample run."""
import dataclasses

import pytest
import torch

from sct import sample, train
from sct.config import ConfigError, load
from sct.experiment import TrainConfig, build_objective
from sct.guidance import check_teacher_guidance
from sct.models.precond import TrigFlow, TrigFlowConfig
from sct.models.unet import UNetConfig, build_unet
from sct.objectives.scm import SCM, SCDConfig, TeacherVelocity, jvp_tangent

NET = UNetConfig(img_resolution=8, img_channels=1, label_dim=3, model_channels=8, channel_mult=(1, 2), num_blocks=1,
                 attn_resolutions=())


def _net(seed, **kw):
    torch.manual_seed(seed)
    net = TrigFlow(build_unet(dataclasses.replace(NET, **kw)), TrigFlowConfig())
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # every parameter random (zero-init ones too), so each input matters
        for p in net.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return net


def test_per_sample_scale_reaches_the_teacher_and_the_student():
    teacher, student = _net(0), _net(1, guidance_embedding=True)
    seen = {"teacher": [], "student": []}
    real_velocity = TrigFlow.velocity

    def spy_velocity(self, x_t, t, labels=None, guidance=1.0):
        seen["teacher"].append(guidance)
        return real_velocity(self, x_t, t, labels, guidance)

    student.backbone.register_forward_pre_hook(lambda m, args, kw: seen["student"].append(kw.get("guidance")), with_kwargs=True)
    obj = SCM(SCDConfig(teacher="t", guidance_max=2.0, adaptive_weighting=False), 0.5, TeacherVelocity(teacher))
    x = torch.randn(6, 1, 8, 8)
    labels = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).float()
    torch.manual_seed(3)
    TrigFlow.velocity = spy_velocity
    try:
        loss = obj(student, {"x": x, "labels": labels}, step=10)
    finally:
        TrigFlow.velocity = real_velocity
    (w,) = seen["teacher"]
    assert w.shape == (6,) and (w >= 1).all() and (w <= 2).all() and w.std() > 0  # one scale per sample, uniform in [1, 2]
    assert len(seen["student"]) == 2 and all(torch.equal(s, w) for s in seen["student"])  # JVP forward and gradient forward
    assert torch.isfinite(loss).all()
    # the per-sample CFG velocity is sample i's velocity at its own scale
    t = torch.rand(6) + 0.2
    v = teacher.velocity(x, t, labels, w)
    for i in range(6):
        torch.testing.assert_close(v[i:i + 1], teacher.velocity(x[i:i + 1], t[i:i + 1], labels[i:i + 1], w[i].item()), rtol=1e-5, atol=1e-6)


def test_the_jvp_tangent_of_the_scale_is_zero():
    student = _net(1, guidance_embedding=True).double()
    x, t, w = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.2, torch.rand(4, dtype=torch.float64) + 1
    labels = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    tx, tt = torch.randn_like(x), torch.rand_like(t)
    _, ours = jvp_tangent(lambda xs, ts: student.raw(xs, ts, labels, w), (x, t), (tx, tt))  # as SCM.loss calls it
    _, zero_w = torch.func.jvp(lambda xs, ts, ws: student.raw(xs, ts, labels, ws), (x, t, w), (tx, tt, torch.zeros_like(w)))
    _, with_w = torch.func.jvp(lambda xs, ts, ws: student.raw(xs, ts, labels, ws), (x, t, w), (tx, tt, torch.ones_like(w)))
    torch.testing.assert_close(ours, zero_w, rtol=1e-10, atol=1e-12)
    assert (with_w - zero_w).abs().max() > 1e-3  # the scale is a real input: a non-zero tangent would change dF


def test_a_fresh_guidance_input_leaves_the_net_unchanged():
    torch.manual_seed(0)
    plain = TrigFlow(build_unet(NET), TrigFlowConfig())
    torch.manual_seed(0)
    conditioned = TrigFlow(build_unet(dataclasses.replace(NET, guidance_embedding=True)), TrigFlowConfig())
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all(".map_guidance." in k for k in missing) and not unexpected
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.eye(3)[:2]
    for p in plain.parameters():  # random weights where the U-Net zero-initializes, so the output is non-trivial
        torch.nn.init.normal_(p, std=0.1) if p.ndim > 1 else None
    conditioned.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(conditioned(x, t, y, torch.tensor([1.7, 1.2])), plain(x, t, y), rtol=0, atol=0)


@pytest.mark.parametrize(("overrides", "key"), [
    (["objective.guidance_max=2.0"], "model.backbone.guidance_embedding"),
    (["model.backbone.guidance_embedding=true"], "model.backbone.guidance_embedding"),
    (["objective.guidance_max=2.0", "model.backbone.guidance_embedding=true", "objective.guidance_scale=1.5"], "objective.guidance_scale"),
    (["objective.guidance_max=2.0", "model.backbone.guidance_embedding=true", "sampling.guidance=2.5"], "sampling.guidance"),
    (["sampling.guidance=1.5"], "sampling.guidance"),
    (["objective.guidance_max=0.5"], "objective.guidance_max"),
])
def test_config_rules(overrides, key):
    base = ["objective.name=scd", "objective.teacher=t.safetensors"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(TrainConfig, "configs/demo_cpu.yaml", base + overrides)


def test_teacher_without_label_dropout_cannot_be_guided():
    obj = SCDConfig(teacher="teacher.safetensors", guidance_scale=1.2)
    with pytest.raises(ConfigError) as e:
        check_teacher_guidance(obj, {"objective": {"name": "diffusion", "label_dropout": 0.0}})
    assert "objective.guidance_scale" in str(e.value) and "objective.label_dropout" in str(e.value) and "teacher.safetensors" in str(e.value)
    with pytest.raises(ConfigError, match="records no objective config"):
        check_teacher_guidance(obj, {"model": {}})  # a snapshot that stored no objective
    with pytest.raises(ConfigError, match="objective.guidance_max"):
        check_teacher_guidance(SCDConfig(teacher="t", guidance_max=2.0), {"objective": {"label_dropout": 0.0}})
    check_teacher_guidance(obj, {"objective": {"label_dropout": 0.1}})
    check_teacher_guidance(SCDConfig(teacher="t"), {"model": {}})  # unguided: any teacher


SMALL = ["model.backbone.model_channels=8", "model.backbone.channel_mult=[1, 2]", "run.batch_size=8", "run.log_every=1",
         "run.checkpoint_every=100", "run.snapshot_every=100", "run.sample_every=100", "sampling.num=6", "run.total_steps=3"]


def test_tiny_guidance_conditioned_scd_trains_and_samples_at_a_chosen_scale(tmp_path, capsys):
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    teacher_args = ["--config", "configs/demo_cpu.yaml", *SMALL, f"run.dir={teacher_dir}", "objective={name: diffusion}",
                    "sampling={method: ode, steps: [2], num: 6}"]
    assert train.main(teacher_args) == 0  # no label dropout
    snap = teacher_dir / "snapshots" / "snapshot_000000003.safetensors"
    student = ["--config", "configs/demo_cpu.yaml", *SMALL, f"run.dir={student_dir}", f"model.init_from={snap}",
               f"objective={{name: scd, teacher: {snap}, guidance_max: 2.0, tangent_warmup_steps: 2, adaptive_weighting: false}}",
               "model.backbone.guidance_embedding=true", "sampling.guidance=1.5",
               "optimizer={name: adam, lr: 1.0e-2, warmup_steps: 0}", "ema={kind: constant, decay: 0.0}"]  # the guidance input moves
    assert train.main(student) == 2  # the teacher was trained without label dropout
    assert "objective.label_dropout" in capsys.readouterr().err
    assert train.main(teacher_args + ["objective.label_dropout=0.1", f"run.dir={tmp_path / 't2'}"]) == 0
    snap = tmp_path / "t2" / "snapshots" / "snapshot_000000003.safetensors"
    student = [a.replace(str(teacher_dir), str(tmp_path / "t2")) for a in student]
    assert train.main(student) == 0
    assert (student_dir / "samples" / "step_000000003_2step.png").exists()
    final = student_dir / "snapshots" / "snapshot_000000003.safetensors"
    outs = {}
    for w in ("1.0", "2.0"):
        sample.main(["--snapshot", str(final), "--steps", "2", "--num", "6", "--guidance", w, "--out", str(tmp_path / w)])
        outs[w] = torch.load(tmp_path / w / "samples.pt")["samples"]
    assert torch.isfinite(outs["2.0"]).all() and not torch.equal(outs["1.0"], outs["2.0"])  # the chosen scale matters
    plain = _plain_student(tmp_path)
    with pytest.raises(SystemExit):  # a student without the guidance input refuses --guidance != 1
        sample.main(["--snapshot", str(plain), "--steps", "2", "--num", "2", "--guidance", "1.5", "--out", str(tmp_path / "x")])


def _plain_student(tmp_path):
    """An sCT snapshot (no guidance input) for the CLI's refusal."""
    run = tmp_path / "sct"
    assert train.main(["--config", "configs/demo_cpu.yaml", *SMALL, "run.total_steps=1", f"run.dir={run}"]) == 0
    return run / "snapshots" / "snapshot_000000001.safetensors"


def test_build_objective_checks_the_stored_teacher(tmp_path):
    run = tmp_path / "teacher"
    assert train.main(["--config", "configs/demo_cpu.yaml", *SMALL, "run.total_steps=1", f"run.dir={run}", "objective={name: diffusion}",
                       "sampling={method: ode, steps: [2], num: 6}"]) == 0
    snap = run / "snapshots" / "snapshot_000000001.safetensors"
    cfg = load(TrainConfig, "configs/demo_cpu.yaml", [*SMALL, f"objective={{name: scd, teacher: {snap}, guidance_scale: 1.3}}"])
    with pytest.raises(ConfigError, match=r"objective\.guidance_scale.*objective\.label_dropout"):
        build_objective(cfg)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_both_backbones_take_the_scale_and_none_means_one(backbone):
    from sct.models.dit import DiTConfig, build_dit

    torch.manual_seed(0)
    if backbone == "unet":
        net = build_unet(dataclasses.replace(NET, guidance_embedding=True))
    else:
        net = build_dit(DiTConfig(img_resolution=8, img_channels=1, label_dim=3, patch_size=2, hidden_size=16, depth=1, num_heads=2,
                                  frequency_dim=16, guidance_embedding=True))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(std=0.2)
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.eye(3)[:2]
    torch.testing.assert_close(net(x, t, y), net(x, t, y, torch.ones(2)), rtol=0, atol=0)
    assert (net(x, t, y, torch.full((2,), 2.0)) - net(x, t, y)).abs().max() > 1e-4
    plain = build_unet(NET)
    with pytest.raises(ValueError, match="guidance_embedding"):
        plain(x, t, y, torch.ones(2))
