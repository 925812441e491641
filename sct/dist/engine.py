"""The single-process training engine: backward, gradient checks, clipping and the optimizer step.

The loop talks to an engine only through `backward(loss)`, `step(lr) -> bool`, `state_dict()` and
`load_state_dict()`; `DeepSpeedEngine` (below, built by sct.dist) offers the same surface for ZeRO 0-3.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from sct import dist


class TorchEngine:
    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0, grad_accum: int = 1):
        self.module, self.optimizer = module, optimizer
        self.grad_clip, self.grad_accum = grad_clip, grad_accum
        self.last_grad_norm = float("nan")

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self, lr: float) -> bool:
        """Apply the accumulated gradient at `lr`; returns False (and skips) when the gradient is not finite."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self.last_grad_norm = norm.item()
        finite = bool(torch.isfinite(norm))
        if finite:
            if self.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedEngine:
    """ZeRO 0-3 through a DeepSpeed engine (built by `sct.dist.build_deepspeed_engine`); TorchEngine's surface.

    DeepSpeed counts micro-batches itself: every `backward` but the last of a step is followed by its
    (non-boundary, no-op) `step()`; `step(lr)` sets our LR and takes the boundary step. A step whose
    gradient norm is not finite is skipped: ZeRO 1-3 skip it themselves (we read `skipped_steps`);
    under ZeRO-0 we drop the gradients first so the torch optimizer leaves weights and moments alone.
    Checkpoints are DeepSpeed's own per-rank files: `save(dir)` / `load(dir, saved_world_size)`
    (collectives); a different number of ranks is loaded through DeepSpeed's universal checkpoint.
    """

    TAG = "engine"

    def __init__(self, ds, grad_accum: int = 1):
        self.ds, self.module, self.grad_accum = ds, ds.module, grad_accum
        self.zero_stage = ds.zero_optimization_stage()
        self._micro = 0
        self.last_grad_norm = float("nan")

    def backward(self, loss: torch.Tensor) -> None:
        if self._micro:  # close the previous micro-batch (DeepSpeed's non-boundary step)
            self.ds.step()
        self.ds.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps
        self._micro += 1

    def step(self, lr: float) -> bool:
        if self._micro != self.grad_accum:
            raise RuntimeError(f"step() after {self._micro} backward() calls, expected grad_accum={self.grad_accum}")
        self._micro = 0
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        skipped_before = self.ds.skipped_steps
        if self.zero_stage == 0:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            self.last_grad_norm = norm.item()
            if not torch.isfinite(norm):  # grads are already all-reduced: every rank agrees
                for p in self.module.parameters():
                    p.grad = None
                self.ds.step()
                return False
        self.ds.step()
        if self.zero_stage:
            norm = self.ds.get_global_grad_norm()
            self.last_grad_norm = float("nan") if norm is None else float(norm)
        return self.ds.skipped_steps == skipped_before

    def save(self, directory) -> None:
        self.ds.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load(self, directory, saved_world_size: int) -> None:
        """Load DeepSpeed's files from `directory`; ZeRO 1-3 shards written by a different number of
        ranks go through DeepSpeed's universal checkpoint (converted next to it, then removed)."""
        directory = Path(directory)
        if self.zero_stage == 0 or saved_world_size == self.ds.dp_world_size:
            path, _ = self.ds.load_checkpoint(str(directory), tag=self.TAG, load_lr_scheduler_states=False)
        else:
            universal = directory.parent / f".universal-{directory.name}"
            if self.ds.global_rank == 0:
                logger.info(f"{directory}: {saved_world_size} ranks' ZeRO-{self.zero_stage} shards -> universal checkpoint for {self.ds.dp_world_size}")
                dist.to_universal(directory / self.TAG, universal / self.TAG)
            dist.barrier()
            self.ds._config.load_universal_checkpoint = True
            try:
                path, _ = self.ds.load_checkpoint(str(universal), tag=self.TAG, load_lr_scheduler_states=False)
            finally:
                self.ds._config.load_universal_checkpoint = False
                dist.barrier()
                if self.ds.global_rank == 0:
                    shutil.rmtree(universal, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{self.TAG}")
