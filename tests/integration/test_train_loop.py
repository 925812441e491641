"""The training loop end to end in one process, on the toy distribution: exact resume, non-finite
steps skipped and then a clean stop with the last good checkpoint intact, artifacts written."""
import json
from pathlib import Path

import pytest
import torch

from sct import train
from sct.checkpoint import latest_training_state

SMALL = ["model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=64",
       "run.log_every=1", "run.sample_every=1000", "run.snapshot_every=1000", "sampling.num=64"]
TOY = ["--config", "configs/toy_sct.yaml", *SMALL]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", ["sct", "ict"])
def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path, objective):
    args = ["--config", f"configs/toy_{objective}.yaml", *SMALL, "run.total_steps=12", "run.checkpoint_every=4", "run.grad_accum=2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(args + [f"run.dir={whole}"]) == 0
    assert train.main(args + [f"run.dir={parts}", "run.max_steps_per_job=6"]) == 0  # stops at step 6 (checkpointed)
    assert latest_training_state(parts).name == "step_000000006"
    assert train.main(args + [f"run.dir={parts}"]) == 0  # the same command resumes
    assert len(losses(whole)) == 12
    assert losses(parts) == losses(whole)
    assert (whole / "loss.png").exists() and (whole / "samples" / "step_000000012_2step.png").exists()
    assert (whole / "snapshots" / "snapshot_000000012.safetensors").exists()


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    """...with status 3 (sct.exit_codes.NONFINITE) and the one-line reason in log.txt, not a traceback."""
    from sct import exit_codes
    from sct.objectives import scm

    real = scm.SCM.forward

    def poisoned(self, net, batch, step):  # NaN from step 5 on, e.g. a diverged run
        loss = real(self, net, batch, step)
        return loss * float("nan") if step >= 5 else loss

    monkeypatch.setattr(scm.SCM, "forward", poisoned)
    run_dir = tmp_path / "nan"
    args = TOY + [f"run.dir={run_dir}", "run.total_steps=20", "run.checkpoint_every=3", "run.max_nonfinite_in_a_row=3"]
    assert train.main(args) == exit_codes.NONFINITE
    fatal = [line for line in (run_dir / "log.txt").read_text().splitlines() if "fatal" in line]
    assert len(fatal) == 1 and "(status 3, non-finite stop): 3 non-finite steps in a row at step 7" in fatal[0] and "step_000000003" in fatal[0]
    good = latest_training_state(run_dir)
    assert good is not None and good.name == "step_000000003"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped"] == 2 and records[-1]["step"] == 7  # step 8 raised before its tick


def test_snapshot_samples_through_the_cli(tmp_path):
    from sct import sample

    run_dir = tmp_path / "run"
    assert train.main(TOY + [f"run.dir={run_dir}", "run.total_steps=3", "run.checkpoint_every=3"]) == 0
    snap = run_dir / "snapshots" / "snapshot_000000003.safetensors"
    sample.main(["--snapshot", str(snap), "--steps", "2", "--num", "10", "--out", str(tmp_path / "a"), "--batch", "3"])
    sample.main(["--snapshot", str(snap), "--steps", "2", "--num", "10", "--out", str(tmp_path / "b"), "--batch", "10"])
    a, b = torch.load(tmp_path / "a" / "samples.pt"), torch.load(tmp_path / "b" / "samples.pt")
    assert a["samples"].shape == (10, 2) and torch.isfinite(a["samples"]).all()
    torch.testing.assert_close(a["samples"], b["samples"], rtol=1e-5, atol=1e-6)  # a sample depends on its seed only
    assert (tmp_path / "a" / "samples_2step.png").exists()


def test_scd_distills_a_teacher_snapshot(tmp_path):
    """diffusion -> snapshot -> sCD reading it through objective.teacher, the student starting from it
    (model.init_from); loss finite."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
    assert train.main(["--config", "configs/toy_diffusion.yaml", *SMALL, f"run.dir={teacher_dir}", "run.total_steps=4", "sampling.steps=[4]"]) == 0
    snap = teacher_dir / "snapshots" / "snapshot_000000004.safetensors"
    assert train.main(["--config", "configs/toy_scd.yaml", *SMALL, f"run.dir={student_dir}", "run.total_steps=4", f"objective.teacher={snap}", f"model.init_from={snap}"]) == 0
    records = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["loss"] == r["loss"] and abs(r["loss"]) < 1e3 for r in records)
    assert train.main(["--config", "configs/toy_scd.yaml", *SMALL, f"run.dir={tmp_path / 'x'}", "objective.teacher=/nonexistent.safetensors"]) == 2
