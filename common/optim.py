"""AdamW with linear warm-up and linear decay, the paper's optimizer, built the same way on both sides."""
from __future__ import annotations

import logging
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


WARMUP_CAP_FRACTION = 0.1  # a warm-up as long as the run is capped to this fraction of its steps


def capped_warmup(warmup_steps: int, total_steps: int) -> int:
    """The warm-up a run of `total_steps` client steps uses: `warmup_steps`, unless the learning rate would still
    be rising at the last step (the 500-step default on a short run); then a tenth of the run, said in the log."""
    if warmup_steps < total_steps:
        return warmup_steps
    capped = int(total_steps * WARMUP_CAP_FRACTION)
    logging.getLogger("splitlora").warning(
        "--warmup-steps %d is not shorter than this run's %d client steps (the learning rate would peak at the "
        "end): warm-up capped at %d steps (%d%% of the run)", warmup_steps, total_steps, capped,
        round(WARMUP_CAP_FRACTION * 100))
    return capped
