"""sct.dist config generation and single-process helpers, the ZeRO memory formula, FLOP counting of
the JVP, preemption flags, the sharded EMA's math without sharding, and multi-rank atomic checkpoints
(ranks emulated by threads sharing a barrier). The multi-process runs are in tests/integration."""
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sct import dist, stats, train
from sct.checkpoint import MARKER, atomic_checkpoint_dir, latest_training_state
from sct.config import ConfigError, from_dict
from sct.dist.ema_sharded import ShardedEMA
from sct.dist.flops import peak_flops, zero_model_state_bytes
from sct.dist.preempt import Preemption
from sct.ema import EMA, EMAConfig
from sct.experiment import ModelConfig, build_model
from sct.loop import LoopConfig
from sct.objectives.ict import ICTConfig
from sct.objectives.scm import jvp_tangent
from sct.optim import OptimizerConfig
from sct.samplers import SamplingConfig


def ds(**kw):
    base = dict(batch_size=32, grad_accum=2, world_size=4, grad_clip=0.0)
    return dist.ds_config(dist.DistConfig(engine="deepspeed", zero_stage=kw.pop("stage", 2)), **(base | kw))


def test_ds_config_is_explicit_about_clipping_batches_and_zero3_forward_ad():
    cfg = ds()
    assert cfg["gradient_clipping"] == 0.0  # present even when off: DeepSpeed's default clips at 1.0
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (32, 4, 2)
    assert cfg["zero_optimization"]["stage"] == 2 and "memory_efficient_linear" not in cfg["zero_optimization"]
    z3 = ds(stage=3, grad_clip=1.5)
    assert z3["zero_optimization"]["memory_efficient_linear"] is False and z3["gradient_clipping"] == 1.5
    assert not z3["bf16"]["enabled"]  # bf16 is autocast over fp32 weights (the backbones' fp32 conditioning path)
    with pytest.raises(ConfigError, match="run.batch_size"):
        ds(batch_size=30)


@pytest.mark.parametrize(("cfg", "key"), [(dist.DistConfig(engine="deepspeed", zero_stage=4), "zero_stage"),
                                          (dist.DistConfig(engine="torch", zero_stage=2), "zero_stage")])
def test_dist_config_rejects_impossible_settings(cfg, key):
    with pytest.raises(ConfigError, match=key):
        cfg.check()


def test_torch_engine_refuses_a_multi_process_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="dist.engine"):
        dist.init(dist.DistConfig(), "cpu")


def test_zero_memory_formula_matches_the_zero_paper():
    # Rajbhandari et al. 2020, Fig. 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12)
    got = [zero_model_state_bytes(7_500_000_000, s, 64, "bf16", ema=False)["total"] / 1e9 for s in (0, 1, 2, 3)]
    assert got == pytest.approx([120.0, 31.4, 16.6, 1.9], abs=0.05)


def test_dry_run_prints_the_per_gpu_memory_estimate(capsys):
    assert train.main(["--config", "configs/demo_cpu.yaml", "--dry-run", "--world-size", "8", "dist.engine=deepspeed", "dist.zero_stage=3"]) == 0
    out = capsys.readouterr().out
    assert "model states per GPU, ZeRO-3 on 8 ranks" in out
    n = int(out.split("# backbone parameters: ")[1].split()[0].replace(",", ""))
    assert f"{n * 16 / 8 / 2**20 + n * 4 / 8 / 2**20:.1f} MiB" in out  # 16 bytes/param of states + fp32 EMA, over 8 ranks


def test_flop_counter_sees_the_jvp_tangent_ops():
    """FlopCounterMode counts forward-mode AD's tangent matmuls (a linear map's JVP costs at least 2
    forwards; torch 2.14 dispatches 3 matmuls), so the MFU numerator is what ran, not a guess."""
    lin = nn.Linear(16, 16, bias=False)
    x, v = torch.randn(4, 16), torch.randn(4, 16)
    with FlopCounterMode(display=False) as fwd:
        lin(x)
    with FlopCounterMode(display=False) as jvp:
        jvp_tangent(lin, (x,), (v,))
    assert fwd.get_total_flops() == 2 * 4 * 16 * 16
    assert jvp.get_total_flops() >= 2 * fwd.get_total_flops()
    assert peak_flops(torch.device("cpu"), "bf16") is None  # no MFU on CPU


def test_preemption_flag_and_handler_restore():
    before = signal.getsignal(signal.SIGUSR1)
    p = Preemption().install()
    p.defer()  # the loop's mode: a flag for the next step boundary (before it, a signal raises StartupPreempted)
    assert not p.requested_anywhere(torch.device("cpu"))
    os.kill(os.getpid(), signal.SIGUSR1)
    assert p.requested_anywhere(torch.device("cpu")) and p.signum == signal.SIGUSR1
    p.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_single_process_collect_reduce_and_timed_sections():
    stats.collect_times()
    stats.report("a", torch.tensor([1.0, 3.0]))
    with stats.timed("x"):
        pass
    assert stats.collect(reduce=True)["a"] == 2.0
    assert set(stats.collect_times()) == {"x"} and stats.collect_times() == {}


def test_sharded_ema_without_sharding_equals_the_plain_ema():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    cfg = EMAConfig(kind="power", std=0.1)
    plain, sharded = EMA(net, cfg), ShardedEMA(net, cfg, make_model=lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    for step in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        plain.update(net, step)
        sharded.update(net, step)
    for (name, a), b in zip(plain.model.state_dict().items(), sharded.full_model().state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    sharded2 = ShardedEMA(net, cfg, make_model=sharded.make_model)
    sharded2.load_state_dict(sharded.state_dict())
    torch.testing.assert_close(sharded2.shards, sharded.shards)


def test_multi_rank_checkpoint_is_sealed_only_after_every_rank_wrote(tmp_path):
    """Two ranks emulated by threads: each writes its file into the shared temp dir; rank 0 seals."""
    barrier = threading.Barrier(2)
    seen_before_seal = []

    def rank(r):
        with atomic_checkpoint_dir(tmp_path, 7, rank=r, barrier=barrier.wait) as tmp:
            (tmp / f"shard_{r}.pt").write_bytes(bytes([r]) * 10)
            if r == 1:
                seen_before_seal.append(latest_training_state(tmp_path))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    final = latest_training_state(tmp_path)
    assert seen_before_seal == [None] and final is not None and final.name == "step_000000007"
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "shard_0.pt", "shard_1.pt"]


@pytest.mark.parametrize("path", sorted(Path("configs/pending").glob("*.yaml")), ids=lambda p: p.name)
def test_pending_ict_configs_are_valid_except_for_the_missing_data_source(path):
    """Every section but `data` (no 3x32x32 / 3x64x64 source exists yet) parses strictly and builds."""
    raw = yaml.safe_load(path.read_text())
    assert "data" not in raw
    sections = {"run": LoopConfig, "model": ModelConfig, "objective": ICTConfig, "optimizer": OptimizerConfig,
                "ema": EMAConfig, "sampling": SamplingConfig, "dist": dist.DistConfig}
    assert set(raw) == set(sections)
    parsed = {k: from_dict(cls, raw[k], source=str(path)) for k, cls in sections.items()}
    assert parsed["optimizer"].grad_clip == 0.0 and parsed["objective"].huber_c_scale == 0.00054
    with torch.device("meta"):
        assert build_model(parsed["model"]).backbone is not None
