"""One launched multi-process job that runs several distributed checks (tests/integration/test_distributed.py).

    torchrun --standalone --nproc_per_node 2 tests/integration/dist_worker.py --out DIR --jobs train,jvp_snapshot
    deepspeed --num_gpus 2 tests/integration/dist_worker.py --out DIR --jobs train        (DS_ACCELERATOR=cpu)

Jobs (the process group is created once and reused by every run, so each job costs seconds):
- train: `sct.train.main` for diffusion and sCT under ZeRO 0, 1, 2 and 3, 5 steps each; run dirs
  DIR/<objective>_z<stage>/ with rank 0's metrics.jsonl (losses pooled over ranks); and sCT in bf16
  (autocast) under ZeRO-3 (DIR/sct_bf16_z3).
- preempt: a 60-step ZeRO-2 sCT run in DIR/preempt (the test sends SIGTERM to every process
  mid-run; the worker then exits with the run's status 75 and the same command resumes it, then
  goes on to the next jobs).
- scd: sCD from the ZeRO-3 diffusion run's snapshot under ZeRO 0 and 3 (DIR/scd_z<stage>), and a
  check that the frozen teacher is partitioned with the student under ZeRO-3 (DIR/scd.json).
- nonfinite: sCT under ZeRO 0 and 3 whose loss is NaN on rank 1 only at steps 2 and 3: every
  rank must skip those optimizer steps (DIR/nan_z<stage>); then a run whose loss is NaN on every rank
  from step 2 on stops with status 3 on every rank, each logging its reason (DIR/nan_stop).
- jvp_snapshot: the sCT tangent through the ZeRO-3 engine vs torch.func.jvp on an unsharded copy
  (DIR/jvp.json); a few ZeRO-3 steps with the sharded EMA, then an inference snapshot and samples
  drawn through the partitioned engine module carrying the EMA (DIR/engine_samples.pt).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sct import dist, exit_codes, loop, train  # noqa: E402
from sct.checkpoint import save_snapshot  # noqa: E402
from sct.config import load  # noqa: E402
from sct.dist.ema_sharded import ShardedEMA  # noqa: E402
from sct.dist.engine import DeepSpeedEngine  # noqa: E402
from sct.experiment import TrainConfig, build_model, build_objective, snapshot_config  # noqa: E402
from sct.objectives.scm import jvp_tangent  # noqa: E402
from sct.optim import build_optimizer  # noqa: E402
from sct.samplers import generate  # noqa: E402

TINY = ["model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=16", "run.log_every=1",
        "run.checkpoint_every=1000", "run.snapshot_every=1000", "run.sample_every=1000", "sampling.num=8",
        "dist.engine=deepspeed", "dist.zero3_persistence_threshold=0", "optimizer.warmup_steps=0"]
CONFIGS = {"diffusion": "configs/toy_diffusion.yaml", "sct": "configs/toy_sct.yaml"}


def train_job(out: Path) -> None:
    for objective, config in CONFIGS.items():
        for stage in (0, 1, 2, 3):
            args = ["--config", config, *TINY, f"dist.zero_stage={stage}", "run.total_steps=5", f"run.dir={out / f'{objective}_z{stage}'}"]
            if objective == "sct":
                args.append("objective.tangent_warmup_steps=2")
            else:  # post-hoc EMA profiles: replicated (ZeRO 0-2) and sharded (ZeRO-3)
                args.append("ema.posthoc={sigma_rels: [0.05, 0.1], every: 2}")
            assert train.main(args) == 0, f"{objective} ZeRO-{stage} failed"
    args = ["--config", CONFIGS["sct"], *TINY, "objective.tangent_warmup_steps=2", "run.precision=bf16", "dist.zero_stage=3",
            "run.total_steps=5", f"run.dir={out / 'sct_bf16_z3'}"]
    assert train.main(args) == 0, "sCT bf16 ZeRO-3 failed"


def preempt_job(out: Path) -> None:
    args = ["--config", CONFIGS["sct"], *TINY, "objective.tangent_warmup_steps=2", "dist.zero_stage=2",
            "run.total_steps=60", f"run.dir={out / 'preempt'}"]
    rc = train.main(args)
    if rc:
        _exit(rc)


def scd_job(out: Path, d: dist.Dist) -> None:
    teacher = out / "diffusion_z3" / "snapshots" / "snapshot_000000005.safetensors"
    common = ["--config", "configs/toy_scd.yaml", *TINY, "objective.tangent_warmup_steps=2", f"objective.teacher={teacher}"]
    for stage in (0, 3):
        assert train.main([*common, f"dist.zero_stage={stage}", "run.total_steps=5", f"run.dir={out / f'scd_z{stage}'}"]) == 0
    cfg = load(TrainConfig, "configs/toy_scd.yaml", [*TINY, f"objective.teacher={teacher}", "dist.zero_stage=3"])
    module = nn.ModuleDict({"net": build_model(cfg.model), "objective": build_objective(cfg)})
    ds_cfg = dist.ds_config(cfg.dist, batch_size=16, grad_accum=1, world_size=d.world_size, grad_clip=0.0)
    dist.build_deepspeed_engine(module, build_optimizer(cfg.optimizer, module.parameters()), ds_cfg)
    params = list(module["objective"].velocity.teacher.parameters())
    report = {"params": len(params), "local_numel": sum(p.numel() for p in params), "trainable": any(p.requires_grad for p in params),
              "partition_numel": sum(p.ds_tensor.numel() for p in params), "full_numel": sum(p.ds_numel for p in params)}
    if d.rank == 0:
        (out / "scd.json").write_text(json.dumps(report))


def nonfinite_job(out: Path, d: dist.Dist) -> None:
    from sct.objectives import scm

    real = scm.SCM.forward

    def poisoned(self, net, batch, step):  # one rank diverges: the others must not step either
        loss = real(self, net, batch, step)
        return loss * float("nan") if d.rank == 1 and step in (2, 3) else loss

    scm.SCM.forward = poisoned
    try:
        for stage in (0, 3):
            args = ["--config", CONFIGS["sct"], *TINY, "objective.tangent_warmup_steps=2", f"dist.zero_stage={stage}",
                    "run.total_steps=6", f"run.dir={out / f'nan_z{stage}'}"]
            assert train.main(args) == 0
        scm.SCM.forward = lambda self, net, batch, step: real(self, net, batch, step) * (float("nan") if step >= 2 else 1.0)
        args = ["--config", CONFIGS["sct"], *TINY, "run.total_steps=6", "run.max_nonfinite_in_a_row=2", f"run.dir={out / 'nan_stop'}"]
        assert train.main(args) == exit_codes.NONFINITE
    finally:
        scm.SCM.forward = real


def jvp_snapshot_job(out: Path, d: dist.Dist) -> None:
    cfg = load(TrainConfig, CONFIGS["sct"], [*TINY, "dist.zero_stage=3"])
    torch.manual_seed(0)
    net, objective = build_model(cfg.model), build_objective(cfg)
    for p in net.parameters():  # the zero-initialized output layer would make every tangent 0
        nn.init.normal_(p, std=0.3)
    reference = copy.deepcopy(net)
    module = nn.ModuleDict({"net": net, "objective": objective})
    ds_cfg = dist.ds_config(cfg.dist, batch_size=16, grad_accum=1, world_size=d.world_size, grad_clip=0.0)
    engine = DeepSpeedEngine(dist.build_deepspeed_engine(module, build_optimizer(cfg.optimizer, module.parameters()), ds_cfg))
    assert all(p.numel() == 0 for p in net.parameters()), "ZeRO-3 did not partition the parameters"
    gen = torch.Generator().manual_seed(1)
    x, t, vx, vt = torch.randn(6, 2, generator=gen), torch.rand(6, generator=gen) * 1.5, torch.randn(6, 2, generator=gen), torch.randn(6, generator=gen)
    got = jvp_tangent(lambda xs, tt: net.raw(xs, tt, None), (x, t), (vx, vt))
    want = torch.func.jvp(lambda xs, tt: reference.raw(xs, tt, None), (x, t), (vx, vt))
    ema = ShardedEMA(net, cfg.ema, make_model=lambda: build_model(cfg.model))
    for step in range(3):
        torch.manual_seed(loop.step_seed(0, step, d.rank))
        batch = {"x": torch.randn(8, 2, generator=torch.Generator().manual_seed(100 * step + d.rank))}
        engine.backward(objective(net, batch, step).mean())
        assert engine.step(1e-2)
        ema.update(net, step)
    full = ema.full_model()  # collective
    seeds = list(range(10))
    with ema.swapped_into(net):  # every rank samples through the partitioned module (hooks gather)
        in_engine = generate(net.eval(), cfg.sampling, 2, (2,), seeds, None)
    if d.rank == 0:
        save_snapshot(out / "ema.safetensors", full.state_dict(), snapshot_config(cfg))
        torch.save({"samples": in_engine, "seeds": seeds}, out / "engine_samples.pt")
        report = {"primal": (got[0] - want[0]).abs().max().item(), "tangent": (got[1] - want[1]).abs().max().item(),
                  "tangent_scale": want[1].abs().max().item()}
        (out / "jvp.json").write_text(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", default="train")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args = parser.parse_args()
    d = dist.init(dist.DistConfig(engine="deepspeed"), "cpu")
    for job in args.jobs.split(","):
        jobs = {"train": lambda: train_job(args.out), "preempt": lambda: preempt_job(args.out), "nonfinite": lambda: nonfinite_job(args.out, d),
                "scd": lambda: scd_job(args.out, d),
                "jvp_snapshot": lambda: jvp_snapshot_job(args.out, d)}
        jobs[job]()
        dist.barrier()
    _exit(0)


def _exit(code: int) -> None:
    """Leave without the interpreter's teardown of torch/deepspeed/inductor modules (3-6 s per process here)."""
    dist.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
