"""The bookkeeping of `python -m sct.reproduce_fmnist` (the whole command: tests/e2e/test_fmnist_reproduction.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from sct.reproduce_fmnist import plan, report, train_seconds

ROOT = Path(__file__).resolve().parents[2]


def test_bad_options_are_refused_by_name(tmp_path):
    for args, named in ((["--variants", "scd-paper,nope"], "--variants"), (["--jobs", "0"], "--jobs"), (["--set", "run.batch_size"], "--set"),
                        (["--student-steps", "0"], "--student-steps")):
        done = subprocess.run([sys.executable, "-m", "sct.reproduce_fmnist", "--out", str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True, check=False)
        assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list(tmp_path.iterdir())


def test_train_seconds_sums_each_tick_across_a_resume(tmp_path):
    rows = [{"step": 10, "sec_per_step": 0.5}, {"step": 20, "sec_per_step": 0.25}, {"step": 25, "sec_per_step": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_seconds(tmp_path) == pytest.approx(10 * 0.5 + 10 * 0.25 + 5 * 1.0)


def args(tmp_path, variants=("scd-decoupled", "sct-paper")) -> Namespace:
    return Namespace(out=tmp_path, teacher_steps=30, student_steps=6, ict_steps=8, ode_steps=4, num_samples=50, classifier_epochs=1,
                     variants=list(variants), set=["run.batch_size=8"])


def test_students_start_from_the_teacher_snapshot_and_evaluations_wait_for_their_model(tmp_path):
    jobs = {j.name: j for j in plan(args(tmp_path))}
    teacher = str(tmp_path / "teacher" / "snapshots" / "snapshot_000000030.safetensors")
    assert jobs["teacher"].output == Path(teacher)
    scd, sct = jobs["scd-decoupled"].argv, jobs["sct-paper"].argv
    assert f"model.init_from={teacher}" in scd and f"objective.teacher={teacher}" in scd and "objective.adaptive_weighting=decoupled" in scd
    assert f"model.init_from={teacher}" in sct and not any(a.startswith("objective.teacher=") for a in sct)
    assert scd[-1] == "run.batch_size=8" and "run.total_steps=6" in scd
    assert jobs["eval teacher 4"].needs == ("teacher", "data") and jobs["eval sct-paper 2"].needs == ("sct-paper", "data")
    assert jobs["data"].needs == ("classifier",) and jobs["scd-decoupled"].needs == ("teacher",)
    assert len(jobs) == 6 + 1 + 3 * 2


def test_the_report_says_which_targets_were_met(tmp_path):
    rows = {"data": {"fd": 1.0}, "teacher": {"fd": 10.0, "steps": 30, "train_s": 5.0, "nfe": 7},
            "ict": {"fd_1": 40.0, "fd_2": 30.0, "ratio_1": 4.0, "ratio_2": 3.0, "steps": 8, "train_s": 2.0},
            "scd-decoupled": {"fd_1": 14.0, "fd_2": 12.0, "ratio_1": 1.4, "ratio_2": 1.2, "steps": 6, "train_s": 3.0},
            "sct-paper": {"fd_1": 30.0, "fd_2": 25.0, "ratio_1": 3.0, "ratio_2": 2.5, "steps": 6, "train_s": 3.0}}
    text = report({"rows": rows, "num_samples": 50}, args(tmp_path))
    assert "| scd-decoupled | 6 | 3 | 14.00 | 12.00 | 1.40 | 1.20 |" in text
    assert "scd-decoupled: 2-step 1.20x the teacher, target <= 1.3x: **met**" in text
    assert "sct-paper: 2-step 2.50x the teacher, target <= 2.0x: **not met**" in text
