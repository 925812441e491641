"""The single-process training engine: backward, gradient checks, clipping and the optimizer step.

The loop talks to an engine only through `backward(loss)`, `step(lr) -> bool`, `state_dict()` and
`load_state_dict()`; the DeepSpeed engine (sct.dist) offers the same surface for ZeRO 1/2/3.
"""
from __future__ import annotations

import torch
from torch import nn


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
