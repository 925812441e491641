"""Sample quality on the 2-D Gaussian mixture (the issue's acceptance): a TrigFlow teacher, iCT, sCT and
sCD trained on CPU; 1- and 2-step samples scored by sliced Wasserstein distance to held-out data must be
within 2x of the teacher's 32-step ODE samples and far below the starting noise. Several minutes."""
import pytest

from sct import toy


@pytest.fixture(scope="module")
def table():
    rows, _ = toy.run(toy.ToySettings())
    print("\n" + toy.table(rows))
    return rows


@pytest.mark.parametrize("method", ["iCT 1-step", "iCT 2-step", "sCT 1-step", "sCT 2-step", "sCD 2-step"])
def test_few_step_samples_within_2x_of_teacher(table, method):
    teacher, noise = table["teacher ODE (Heun, 32 steps)"]["swd"], table["noise"]["swd"]
    assert teacher < 0.25 * noise  # the teacher itself learned the distribution
    assert table[method]["swd"] <= 2 * teacher, toy.table(table)
    assert table[method]["swd"] <= 0.35 * noise, toy.table(table)
