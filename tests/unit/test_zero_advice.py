"""`--dry-run --gpu-memory-gib G` recommends the lowest ZeRO stage whose model states fit G per GPU
(sct.dist.flops.lowest_zero_stage over the ZeRO formula: fp32 weights, grads, Adam, EMA, sCD teacher)."""
import pytest

from sct import train
from sct.dist.flops import lowest_zero_stage, zero_model_state_bytes

XXL = 1_585_229_188  # edm2-xxl with sCM's adaptive double normalization (tests/unit/test_presets.py)


@pytest.mark.parametrize(("gib", "stage"), [(80, 0), (30, 1), (22, 2), (5, 3), (4, None)])
def test_lowest_stage_that_fits_an_xxl_scd_on_8_ranks(gib, stage):
    got, mem = lowest_zero_stage(XXL, 8, gib * 2**30, n_frozen=XXL)
    assert got == stage  # states: 35.4 / 25.1 / 19.9 / 4.4 GiB for ZeRO-0/1/2/3
    if stage is not None:
        assert mem == zero_model_state_bytes(XXL, stage, 8, "fp32", n_frozen=XXL, ema_sharded=stage == 3)


def test_dry_run_prints_the_recommendation(capsys):
    argv = ["--config", "configs/demo_cpu.yaml", "--dry-run", "--world-size", "4"]
    assert train.main([*argv, "--gpu-memory-gib", "80"]) == 0
    assert "# recommended: dist.zero_stage=0 (lowest stage whose model states fit 80 GiB per GPU on 4 ranks" in capsys.readouterr().out
    assert train.main([*argv, "--gpu-memory-gib", "0.001"]) == 0
    assert "# no ZeRO stage fits 0.001 GiB per GPU on 4 ranks" in capsys.readouterr().out
    assert train.main(argv) == 0
    assert "recommended" not in capsys.readouterr().out


def test_post_hoc_ema_profiles_count_against_the_gpu():
    without = train.zero_advice(XXL, XXL, 8, 40)
    with_profiles = train.zero_advice(XXL, XXL, 8, 40, extra_bytes=2 * 4 * XXL)  # two fp32 profiles: 11.8 GiB
    assert "dist.zero_stage=0" in without and "dist.zero_stage=1" in with_profiles  # 35.4 GiB fits 40, 35.4 + 11.8 does not
