"""Distributed runtime: process-group init, rank helpers, the DeepSpeed config, ZeRO-3 gathers.

The only module that imports deepspeed (lazily, after DS_ACCELERATOR is settled). Owns:
- `DistConfig` (the `dist:` section): engine "torch" (one process) or "deepspeed" (ZeRO stage 0-3).
- `init(cfg, device)`: works under `deepspeed`, `torchrun` (env RANK/WORLD_SIZE/...), `srun` alone
  (SLURM_PROCID/..., read by `sct.dist.launcher`) and plain `python` (a single-rank group on a free
  loopback port, so ZeRO code paths run unchanged). NCCL on GPU, gloo on CPU.
- `ds_config(...)`: the DeepSpeed JSON generated from the sct config. Clipping is always explicit
  (DeepSpeed's default would clip at 1.0); the LR comes from our pure `lr_at`, set on every step;
  bf16 is autocast with fp32 weights (see `ds_config`).
- `build_deepspeed_engine(...)`: deepspeed.initialize around nn.ModuleDict({net, objective}), so the
  adaptive-weight head trains inside the engine and an sCD teacher (frozen, a submodule of the
  objective) is partitioned with it under ZeRO-3. Forward-mode AD through ZeRO-3 is enabled here.
- `partition_of(p)`, `slice_full(p, full)`, `gather_full(p, shard)`: ZeRO-3 partition/gather helpers.
- `to_universal(src, dst)`: DeepSpeed's universal checkpoint, for resuming on a different world size.
- `all_reduce_max`, `all_gather_objects`, `barrier`: collectives that are no-ops in one process.

Run the multi-process tests: `pytest tests/integration/test_distributed.py`.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as tdist
from loguru import logger
from torch import nn

from sct.config import ConfigError
from sct.dist import launcher


@dataclass
class DistConfig:
    engine: Literal["torch", "deepspeed"] = "torch"  # torch: one process, plain optimizer; deepspeed: ZeRO
    zero_stage: int = 0  # 0 = data parallel, 1 = optimizer states, 2 = + gradients, 3 = + parameters sharded
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on GPU, gloo on CPU
    zero3_persistence_threshold: int = 100_000  # ZeRO-3 keeps params with fewer elements unpartitioned (DeepSpeed's default)
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket (ZeRO 1/2/3)
    timeout_minutes: int = 30  # collective timeout

    def check(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.engine == "torch" and self.zero_stage:
            raise ConfigError("zero_stage", "ZeRO needs dist.engine: deepspeed")
        for key in ("zero3_persistence_threshold", "reduce_bucket_size", "timeout_minutes"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    zero_stage: int = -1  # -1: no DeepSpeed engine
    owns_group: bool = False  # init() created the process group (so the caller destroys it at exit)


def launcher_world_size() -> int:
    return launcher.world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed():
    """Import deepspeed with the CPU accelerator on GPU-less hosts and its shm-comm JIT build skipped."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else init JIT-compiles it for 60-90 s on CPU
    return deepspeed


def init(cfg: DistConfig, device_name: str) -> Dist:
    """Join (or create) the process group and pick this rank's device."""
    world = launcher_world_size()
    if cfg.engine == "torch":
        if world > 1:
            raise ConfigError("dist.engine", f"{world} processes were launched: set dist.engine: deepspeed (ZeRO 0-3) for data parallelism")
        device = torch.device("cuda" if device_name == "auto" and torch.cuda.is_available() else ("cpu" if device_name == "auto" else device_name))
        return Dist(device=device)
    launch = launcher.from_env()
    if launch.kind == "single":  # plain `python`: a single-rank group instead of an MPI lookup
        launch = replace(launch, master_addr="127.0.0.1", master_port=_free_port())
    launcher.export(launch)  # srun alone: torch's env:// variables from SLURM's
    local_rank = launch.local_rank
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    # srun's GPU binding may leave one visible device per task: the local rank modulo what is visible
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    deepspeed = _deepspeed()
    owns = not tdist.is_initialized()
    if owns:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(minutes=cfg.timeout_minutes))
    return Dist(rank=tdist.get_rank(), world_size=tdist.get_world_size(), local_rank=local_rank, device=device,
                zero_stage=cfg.zero_stage, owns_group=owns)


def shutdown() -> None:
    if not tdist.is_initialized():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and ds_comm.cdb is not None and ds_comm.cdb.is_initialized():
        ds_comm.destroy_process_group()  # also drops DeepSpeed's cached groups: a later init in this process starts clean
    else:
        tdist.destroy_process_group()


def is_distributed() -> bool:
    return tdist.is_initialized() and tdist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        tdist.barrier()


def all_reduce_max(value: float, device: torch.device) -> float:
    """Max of `value` over ranks (flags: any rank set => all see it)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def ds_config(dist: DistConfig, *, batch_size: int, grad_accum: int, world_size: int, grad_clip: float,
              load_universal: bool = False) -> dict:
    """DeepSpeed's config dict. Optimizer and LR stay ours (a torch optimizer; LR set per step).

    DeepSpeed's bf16 mode stays off: `run.precision: bf16` is torch autocast around the forward (the
    loop's), and weights, gradients and Adam states stay fp32. DeepSpeed's bf16 mode would cast every
    parameter to bf16, breaking the backbones' fp32 time-embedding/modulation path (MATH.md §2)."""
    if batch_size % (grad_accum * world_size):
        raise ConfigError("run.batch_size", f"{batch_size} is not divisible by grad_accum {grad_accum} x world size {world_size}")
    zero = {"stage": dist.zero_stage, "reduce_bucket_size": dist.reduce_bucket_size, "allgather_bucket_size": dist.reduce_bucket_size}
    if dist.zero_stage == 3:
        zero |= {
            "memory_efficient_linear": False,  # its F.linear replacement has no forward-AD formula (the JVP)
            "stage3_param_persistence_threshold": dist.zero3_persistence_threshold,
            "stage3_gather_16bit_weights_on_model_save": False,
        }
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // (grad_accum * world_size),
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),  # explicit: DeepSpeed would otherwise clip at 1.0
        "bf16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch Adam/RAdam/AdamW, wrapped by ZeRO
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _identity_jvp(ctx, *tangents):
    return tangents[0] if len(tangents) == 1 else tangents


def enable_forward_ad_under_zero3(module: nn.Module) -> None:
    """Give ZeRO-3's per-module hook autograd.Functions (identity in value) an identity JVP, so
    torch.autograd.forward_ad dual tensors pass through the partitioned modules."""
    for m in module.modules():
        for name in ("pre_bwd_fn", "post_bwd_fn"):
            fn = m.__dict__.get(name)
            if fn is not None and "jvp" not in fn.__dict__:
                fn.jvp = staticmethod(_identity_jvp)


def build_deepspeed_engine(module: nn.Module, optimizer: torch.optim.Optimizer, config: dict):
    """deepspeed.initialize around `module` with our torch optimizer; returns the DeepSpeed engine."""
    deepspeed = _deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if config["zero_optimization"]["stage"] == 3:
        enable_forward_ad_under_zero3(engine.module)
    return engine


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def partition_of(p: torch.Tensor) -> torch.Tensor:
    """This rank's flat slice of a parameter: the ZeRO-3 partition (padded), or the whole tensor flattened."""
    return p.ds_tensor if is_zero3_param(p) else p.data.view(-1)


def slice_full(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's partition of a full tensor shaped like parameter `p` (the inverse of gather_full)."""
    if not is_zero3_param(p):
        return full.reshape(-1)
    size = p.ds_tensor.numel()
    start = tdist.get_rank() * size if is_distributed() else 0
    flat = full.reshape(-1)
    part = flat[start:start + size]
    return torch.cat([part, part.new_zeros(size - part.numel())]) if part.numel() < size else part


def gather_full(p: torch.Tensor, shard: torch.Tensor) -> torch.Tensor:
    """Whole tensor (shape of `p`) from every rank's partition `shard` of it (a collective under ZeRO-3)."""
    if not is_zero3_param(p):
        return shard.view(p.shape)
    if not is_distributed():
        return shard[: p.ds_numel].view(p.ds_shape)
    parts = [torch.empty_like(shard) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, shard.contiguous())
    return torch.cat(parts)[: p.ds_numel].view(p.ds_shape)


def to_universal(src: Path, dst: Path) -> None:
    """Convert DeepSpeed ZeRO shards (`src`, one tag folder) into a universal checkpoint at `dst`,
    loadable by any number of ranks (deepspeed.checkpoint.ds_to_universal; run on one rank)."""
    _deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(dst, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(dst), num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)  # our client state has no
    ds_to_universal.main(args)  # Megatron-style universal_checkpoint_info: the default one fits plain modules


def log_setup(d: Dist) -> None:
    logger.info(f"rank {d.rank}/{d.world_size} on {d.device}" + (f", DeepSpeed ZeRO-{d.zero_stage}" if d.zero_stage >= 0 else ""))
