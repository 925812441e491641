"""Sample quality on the 2-D Gaussian mixture: a TrigFlow teacher, iCT, sCT and sCD trained on CPU;
1- and 2-step samples scored by sliced Wasserstein distance (SWD) to held-out data, relative to the
teacher's 32-step Heun ODE samples and to the starting noise. About 4 minutes on an idle 2-core machine.

The issue's target is <= 2x the teacher for every row, and the test holds every row to it. iCT 1-step is
the closest call: across eight training seeds its network (hidden 192, depth 2) scored 1.03x to 2.05x,
median 1.33x (docs/benchmarks.md); the seed this run uses scored 1.48x."""
import pytest
import torch

from sct import toy

BOUND_VS_TEACHER = {"iCT 1-step": 2.0, "iCT 2-step": 2.0, "sCT 1-step": 2.0, "sCT 2-step": 2.0, "sCD 1-step": 2.0, "sCD 2-step": 2.0}


@pytest.fixture(scope="module")
def table():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the benchmark's setting; the suite runs serially on 2 cores
    try:
        rows, _ = toy.run(toy.ToySettings())
    finally:
        torch.set_num_threads(threads)
    print("\n" + toy.table(rows))
    return rows


@pytest.mark.parametrize("method", list(BOUND_VS_TEACHER))
def test_few_step_samples_close_to_teacher(table, method):
    teacher, noise = table["teacher ODE (Heun, 32 steps)"]["swd"], table["noise"]["swd"]
    assert teacher < 0.25 * noise  # the teacher itself learned the distribution
    assert table[method]["swd"] <= BOUND_VS_TEACHER[method] * teacher, toy.table(table)
    assert table[method]["swd"] <= 0.6 * noise, toy.table(table)
