"""Distributed training on CPU: 2 real processes, gloo, real DeepSpeed engines (ZeRO 0-3), launched
through torchrun and through the deepspeed launcher (tests/integration/dist_worker.py runs several
checks per launch: 4 launches in all).

The single-process reference (`reference_losses`) is an independent re-implementation of data
parallelism in one process: plain torch Adam, and each step's global batch split into the ranks'
micro-batches exactly as the ranks see them (ArrayStream rank r of W, RNG seeded by (seed, step, r)),
the gradients averaged over ranks. A rank's noise is drawn from its own RNG stream, so this, not a
one-big-batch run, is the single-process computation the ranks must reproduce.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from pipelines.arrays import ArrayStream, load_arrays
from sct.config import load
from sct.experiment import (
    TrainConfig,
    build_model,
    build_objective,
    load_snapshot_model,
)
from sct.loop import step_seed
from sct.optim import build_optimizer, lr_at
from sct.samplers import generate

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "integration" / "dist_worker.py"
TINY = ["model.backbone.hidden=32", "model.backbone.depth=1", "run.batch_size=16", "run.log_every=1",
        "run.checkpoint_every=1000", "run.snapshot_every=1000", "run.sample_every=1000", "sampling.num=8",
        "dist.engine=deepspeed", "dist.zero3_persistence_threshold=0", "optimizer.warmup_steps=0"]
CONFIGS = {"diffusion": "configs/toy_diffusion.yaml", "sct": "configs/toy_sct.yaml", "scd": "configs/toy_scd.yaml"}
EXTRA = {"diffusion": [], "sct": ["objective.tangent_warmup_steps=2"], "scd": ["objective.tangent_warmup_steps=2"]}


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.executable).parent.parent / "torch_extensions"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(kind: str, script: Path | str, *args: str) -> list[str]:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_port()), str(script), *args]


def run_logged(cmd: list[str], log: Path, timeout: float = 300) -> int:
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    return rc


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reference_losses(objective: str, ranks_per_step: list[int], overrides=(), skip=()) -> list[float]:
    """One process, plain torch Adam: step k splits the global batch over ranks_per_step[k] emulated
    ranks; steps in `skip` consume their data but change nothing (NaN in the output)."""
    cfg = load(TrainConfig, ROOT / CONFIGS[objective], [*TINY, *EXTRA[objective], *overrides])
    torch.manual_seed(cfg.run.seed)
    net, obj = build_model(cfg.model), build_objective(cfg)
    module = nn.ModuleDict({"net": net, "objective": obj})
    opt = build_optimizer(cfg.optimizer, module.parameters())
    x, labels = load_arrays(cfg.data)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.run.precision == "bf16")
    position, out = 0, []
    for step, world in enumerate(ranks_per_step):
        if step in skip:
            position += cfg.run.batch_size
            out.append(float("nan"))
            continue
        per_rank = []
        for rank in range(world):
            stream = ArrayStream(x, labels, cfg.run.batch_size // world, seed=cfg.data.seed, rank=rank, world_size=world)
            stream.load_state_dict({"position": position})
            torch.manual_seed(step_seed(cfg.run.seed, step, rank))
            with autocast:
                loss = obj(net, next(stream), step)
            (loss.mean() / world).backward()  # the all-reduce average of the ranks' gradients
            per_rank.append(loss.detach())
        position += cfg.run.batch_size
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg.optimizer, step, cfg.run.total_steps)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(torch.cat(per_rank).double().mean().item())
    return out


@pytest.fixture(scope="module")
def references() -> dict[str, list[float]]:
    return {name: reference_losses(name, [2] * 5) for name in ("diffusion", "sct")}


@pytest.fixture(scope="module")
def torchrun_job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    rc = run_logged(launcher("torchrun", WORKER, "--out", str(out), "--jobs", "train,scd,nonfinite,jvp_snapshot"), out / "log.txt")
    assert rc == 0, (out / "log.txt").read_text()[-4000:]
    return out


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines (exit {proc.poll()})")


def _wait_for_group_exit(pgid: int, timeout: float = 120) -> None:
    """Until every process of the group has exited: the deepspeed runner dies of the group's SIGTERM at once, while
    its ranks still finish the step, write its metrics line and checkpoint."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of group {pgid} still running {timeout:.0f} s after SIGTERM")


@pytest.fixture(scope="module")
def deepspeed_job(tmp_path_factory) -> Path:
    """Under the deepspeed launcher, a run gets kill -TERM (to every process, as SLURM does) mid-run;
    the same command then resumes it and goes on to the ZeRO matrix."""
    out = tmp_path_factory.mktemp("deepspeed")
    cmd = launcher("deepspeed", WORKER, "--out", str(out), "--jobs", "preempt,train")
    with open(out / "log1.txt", "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_for_lines(out / "preempt" / "metrics.jsonl", 5, proc)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)
            _wait_for_group_exit(proc.pid)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    (out / "preempt" / "metrics_before_rerun.jsonl").write_text((out / "preempt" / "metrics.jsonl").read_text())
    rc = run_logged(cmd, out / "log2.txt")
    assert rc == 0, (out / "log2.txt").read_text()[-4000:]
    return out


@pytest.mark.parametrize("launch", ["torchrun", "deepspeed"])
def test_zero_stages_reproduce_the_single_process_loss_sequence(launch, references, request):
    out = request.getfixturevalue(f"{launch}_job")
    for objective, want in references.items():
        for stage in (0, 1, 2, 3):
            got = losses(out / f"{objective}_z{stage}")
            assert len(got) == 5
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0, msg=f"{objective} ZeRO-{stage} via {launch}")


def test_scd_under_zero0_and_zero3_with_the_teacher_partitioned(torchrun_job):
    teacher = torchrun_job / "diffusion_z3" / "snapshots" / "snapshot_000000005.safetensors"
    want = reference_losses("scd", [2] * 5, [f"objective.teacher={teacher}"])
    for stage in (0, 3):
        torch.testing.assert_close(torch.tensor(losses(torchrun_job / f"scd_z{stage}")), torch.tensor(want), rtol=1e-5, atol=0, msg=f"ZeRO-{stage}")
    report = json.loads((torchrun_job / "scd.json").read_text())
    assert report["params"] > 0 and report["local_numel"] == 0 and not report["trainable"]  # frozen and sharded
    assert report["partition_numel"] * 2 >= report["full_numel"] > report["partition_numel"]  # half each (padded)


def test_a_nonfinite_stop_is_logged_on_every_rank(torchrun_job):
    fatal = [line for line in (torchrun_job / "nan_stop" / "log.txt").read_text().splitlines() if "fatal (status 3" in line]
    assert sorted(line.split(" | ")[2] for line in fatal) == ["rank 0", "rank 1"], fatal


@pytest.mark.parametrize("stage", [0, 3])
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(torchrun_job, stage):
    records = [json.loads(line) for line in (torchrun_job / f"nan_z{stage}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert records[2]["loss/nonfinite"] > 0  # rank 1's NaN observations, pooled
    want = reference_losses("sct", [2] * 6, ["run.total_steps=6"], skip=(2, 3))
    got = [r["loss"] for r in records]
    torch.testing.assert_close(torch.tensor([got[i] for i in (0, 1, 4, 5)]), torch.tensor([want[i] for i in (0, 1, 4, 5)]), rtol=1e-5, atol=0)


def test_bf16_autocast_under_zero3_matches_the_single_process_bf16_run(torchrun_job):
    want = reference_losses("sct", [2] * 5, ["run.precision=bf16"])
    torch.testing.assert_close(torch.tensor(losses(torchrun_job / "sct_bf16_z3")), torch.tensor(want), rtol=1e-5, atol=0)


def test_sct_jvp_under_zero3_equals_the_single_process_jvp(torchrun_job):
    report = json.loads((torchrun_job / "jvp.json").read_text())
    assert report["tangent_scale"] > 0.1  # a non-trivial tangent
    assert report["primal"] <= 1e-6 and report["tangent"] <= 1e-6 * report["tangent_scale"] * 10


def test_zero3_snapshot_samples_like_the_in_engine_ema(torchrun_job):
    model, stored = load_snapshot_model(torchrun_job / "ema.safetensors")  # one process, no deepspeed
    engine = torch.load(torchrun_job / "engine_samples.pt")
    cfg = load(TrainConfig, ROOT / CONFIGS["sct"], TINY)
    ours = generate(model, cfg.sampling, 2, tuple(stored["shape"]), engine["seeds"], None)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, engine["samples"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["diffusion", "sct"])
def test_sharded_zero3_ema_equals_the_replicated_zero0_ema(torchrun_job, objective):
    """The runs' final snapshots: ZeRO-0 keeps a full EMA copy, ZeRO-3 the EMA of each rank's partition."""
    from sct.checkpoint import load_snapshot

    snap = "snapshots/snapshot_000000005.safetensors"
    full, _ = load_snapshot(torchrun_job / f"{objective}_z0" / snap)
    sharded, _ = load_snapshot(torchrun_job / f"{objective}_z3" / snap)
    assert full.keys() == sharded.keys()
    for name in full:
        torch.testing.assert_close(sharded[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_posthoc_ema_profiles_under_zero3_equal_zero0(torchrun_job, tmp_path):
    """ema.posthoc under ZeRO-3 keeps each profile sharded like the EMA; the stored profiles (steps 2, 4 and the
    last, 5) equal ZeRO-0's replicated ones, and python -m sct.posthoc_ema reconstructs from them."""
    from sct import posthoc_ema
    from sct.checkpoint import load_snapshot

    z0, z3 = (posthoc_ema.list_profiles(torchrun_job / f"diffusion_z{s}" / "phema") for s in (0, 3))
    assert [(step, r) for step, r, _ in z3] == [(step, r) for step, r, _ in z0] == [(s, r) for s in (2, 4, 5) for r in (0.05, 0.1)]
    for (_, _, a), (_, _, b) in zip(z0, z3):
        full, _ = load_snapshot(a)
        sharded, _ = load_snapshot(b)
        for name in full:
            torch.testing.assert_close(sharded[name], full[name], rtol=1e-5, atol=1e-6, msg=f"{b.name}: {name}")
    out = tmp_path / "rec.safetensors"
    assert posthoc_ema.main(["--run", str(torchrun_job / "diffusion_z3"), "--sigma-rel", "0.02", "--out", str(out)]) == 0
    model, _ = load_snapshot_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_on_one_process_from_two_ranks_zero3(torchrun_job, tmp_path):
    """2 ranks' ZeRO-3 checkpoint at step 5 -> one process (universal checkpoint) continues to step 7."""
    run_dir = tmp_path / "sct_z3"
    shutil.copytree(torchrun_job / "sct_z3", run_dir)
    args = ["--config", CONFIGS["sct"], *TINY, *EXTRA["sct"], "dist.zero_stage=3", "run.total_steps=7", f"run.dir={run_dir}"]
    rc = run_logged([sys.executable, "sct/train.py", *args], tmp_path / "log.txt")  # as a script, like `deepspeed sct/train.py`
    assert rc == 0, (tmp_path / "log.txt").read_text()[-4000:]
    assert "universal checkpoint" in (tmp_path / "log.txt").read_text()
    want = reference_losses("sct", [2] * 5 + [1] * 2, ["run.total_steps=7"])
    torch.testing.assert_close(torch.tensor(losses(run_dir)), torch.tensor(want), rtol=1e-5, atol=0)


def test_sigterm_checkpoints_at_the_step_boundary_and_the_same_command_resumes_exactly(deepspeed_job):
    out = deepspeed_job / "preempt"
    log1 = (deepspeed_job / "log1.txt").read_text()
    assert "exiting with status 75" in log1, log1[-4000:]
    first = [json.loads(line)["loss"] for line in (out / "metrics_before_rerun.jsonl").read_text().splitlines()]
    assert 5 <= len(first) < 60, "the signal did not land mid-run"
    assert "resumed from" in (deepspeed_job / "log2.txt").read_text()
    assert f"resumed from {out / 'checkpoints' / f'step_{len(first):09d}'}" in (deepspeed_job / "log2.txt").read_text()  # nothing lost
    want = reference_losses("sct", [2] * 60, ["run.total_steps=60"])
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(want), rtol=1e-5, atol=0)
