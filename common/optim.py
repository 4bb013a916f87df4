"""AdamW with linear warm-up and linear decay, the paper's optimizer, built the same way on both sides."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from transformers import get_linear_schedule_with_warmup


@dataclass(frozen=True)
class OptimSettings:
    """Optimizer hyper-parameters (defaults: the reference's)."""

    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    total_steps: int = 1000
    max_grad_norm: float = 1.0


def build_optimizer(params: Iterable[torch.nn.Parameter], s: OptimSettings
                    ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `params` and its warm-up + linear-decay schedule."""
    opt = torch.optim.AdamW(list(params), lr=s.learning_rate, weight_decay=s.weight_decay)
    warmup = min(s.warmup_steps, max(s.total_steps - 1, 0))
    return opt, get_linear_schedule_with_warmup(opt, warmup, max(s.total_steps, 1))


def optimizer_step(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float) -> None:
    """Clip, step, advance the schedule, clear gradients."""
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
