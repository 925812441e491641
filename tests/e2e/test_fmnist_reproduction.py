"""The Fashion-MNIST reproduction's one command (`python -m sct.reproduce_fmnist`, issue 13 item 6), rehearsed small:
the real configs with the network and every count shrunk by flags and `--set`, two variants instead of seven.

First run: SIGTERM once the teacher has checkpointed -> exit 75, the teacher checkpoints again. The same command then
finishes every stage (the teacher resumes) and writes results.json, report.md and samples.png; a third run
finds every stage done and only rewrites the report. The FDs of these untrained networks mean nothing;
the test checks the path, the bookkeeping and that the training images' FD is the smallest.
Marked `e2e` (`.ci/run` runs it after the suite): about 3 minutes on the 2-core machine.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def command(out: Path, teacher_steps: int) -> list[str]:
    return [sys.executable, "-m", "sct.reproduce_fmnist", "--out", str(out), "--teacher-steps", str(teacher_steps), "--student-steps", "3",
            "--ict-steps", "4", "--ode-steps", "2", "--num-samples", "100", "--classifier-epochs", "1", "--variants", "scd-decoupled,sct-off",
            "--set", "model.backbone.model_channels=8", "--set", "run.batch_size=8"]


@pytest.mark.skipif(not FMNIST.exists(), reason="Fashion-MNIST is not installed (scripts/fashion_mnist.sh)")
def test_the_reproduction_stops_on_sigterm_resumes_and_reports(tmp_path):
    out = tmp_path / "fmnist"
    first = subprocess.Popen(command(out, teacher_steps=10**6), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoints, deadline = out / "teacher" / "checkpoints", time.time() + 300
    while not list(checkpoints.glob("step_*/COMPLETE")):  # the teacher is under way (it checkpoints every 200 steps)
        assert first.poll() is None and time.time() < deadline, first.communicate()[0]
        time.sleep(0.5)
    first.send_signal(signal.SIGTERM)
    said = first.communicate(timeout=120)[0]
    assert first.returncode == 75, said
    assert "rerun the same command to continue" in said
    stopped_at = max(int(p.name.removeprefix("step_")) for p in checkpoints.glob("step_*"))
    assert "preempted: checkpointed at step" in (out / "teacher" / "log.txt").read_text()

    cmd = command(out, teacher_steps=stopped_at + 20)  # a smaller total on resume is allowed: the test ends soon
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed from {checkpoints / f'step_{stopped_at:09d}'}" in (out / "teacher" / "log.txt").read_text()
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert set(rows) == {"data", "teacher", "ict", "scd-decoupled", "sct-off"}
    for name in ("ict", "scd-decoupled", "sct-off"):
        for key in ("fd_1", "fd_2"):
            assert math.isfinite(rows[name][key]) and rows[name][key] > 0
        assert rows[name]["ratio_2"] == pytest.approx(rows[name]["fd_2"] / rows["teacher"]["fd"])
        assert rows[name]["train_s"] > 0
    assert rows["data"]["fd"] < min(rows["teacher"]["fd"], *(rows[n]["fd_2"] for n in ("ict", "scd-decoupled", "sct-off")))
    assert res["protocol"]["num_samples"] == 100 and res["protocol"]["feature_extractor"] == "sct-fmnist"
    report = (out / "report.md").read_text()
    assert "| scd-decoupled | 3 |" in report and "target <= 1.3x" in report and "target <= 2.0x" in report
    width, height = Image.open(out / "samples.png").size
    assert width == 1000 and height > 200  # 5 rows: the teacher's ODE, two variants and iCT at 1 and 2 steps

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "started" not in again.stdout and again.stdout.count("done before") == 13

