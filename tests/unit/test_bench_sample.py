"""`python -m sct.bench sample`: one run times the exported 1-/2-step samplers and the teacher's ODE sampler
(with and without guidance) on the same backbone, and refuses a teacher with another backbone."""
import json

from snapshot_factory import UNET, make_snapshot

from sct.bench.__main__ import main
from sct.export import export


def test_bench_sample_rows_and_ratios(tmp_path, capsys):
    teacher = make_snapshot(tmp_path / "teacher.safetensors", UNET, "diffusion")
    export(make_snapshot(tmp_path / "student.safetensors", UNET, seed=1), tmp_path / "export", steps=2)
    argv = ["sample", "--export", str(tmp_path / "export"), "--teacher", str(teacher), "--batch", "2", "--ode-steps", "2", "3",
            "--repeats", "1", "--out", str(tmp_path / "b.json")]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["sampler"], r["guidance"], r["evaluations"]) for r in rows] == [
        ("export 1-step", 1.0, 1), ("export 2-step", 1.0, 2),
        ("teacher ODE heun 2 steps", 1.0, 3), ("teacher ODE heun 2 steps", 2.0, 6),
        ("teacher ODE heun 3 steps", 1.0, 5), ("teacher ODE heun 3 steps", 2.0, 10)]
    assert rows[1]["latency_vs_export_2step"] == 1.0 and all(r["images_per_s"] > 0 for r in rows)
    assert "| export 2-step |" in capsys.readouterr().out


def test_bench_sample_needs_the_same_backbone(tmp_path, capsys):
    teacher = make_snapshot(tmp_path / "teacher.safetensors", {**UNET, "model_channels": 8}, "diffusion")
    export(make_snapshot(tmp_path / "student.safetensors", UNET), tmp_path / "export", steps=2)
    assert main(["sample", "--export", str(tmp_path / "export"), "--teacher", str(teacher)]) == 2
    assert "different backbone configs" in capsys.readouterr().err
