"""Gradient accumulation of pipelined steps: a step sent as micro-batches (GPipe semantics).

Each micro-batch runs forward and backward as its own job, its loss being its summed loss over the whole step's
target tokens, so the micro-batches' gradients add up to the whole step's. Between two micro-batches of a step
the gradient of the slot's parameters is held here, not in `.grad`: other clients' steps on a shared adapter may
run in between, and their updates must not take in a partial step. After the last micro-batch the held sum is
put back and the update takes one optimizer step for the whole step.

The weights do not change between the micro-batches of a step unless another client's update on a shared
adapter lands in between (the same interleaving as whole steps of several clients; with one client, or
per-client adapters, a pipelined step equals the unpipelined one up to float summation order).
Engine thread only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class _Held:
    step: int
    grads: list[torch.Tensor | None]
    counted: int = 0  # micro-batches whose loss was backpropagated


@dataclass
class MicroAccumulator:
    """The gradients of each client's step in progress, between its micro-batches."""

    held: dict[str, _Held] = field(default_factory=dict)

    def hold(self, client_id: str, step: int, micro: int, params: Sequence[torch.Tensor], counted: int) -> None:
        """Move a micro-batch's gradient out of `params` and add it to the step's sum (micro 0 starts it)."""
        held = self.held.get(client_id)
        if micro == 0 or held is None or held.step != step:  # a new step (or a redone one after a rejoin)
            held = self.held[client_id] = _Held(step, [None] * len(params))
        for i, p in enumerate(params):
            if p.grad is not None:
                held.grads[i] = p.grad if held.grads[i] is None else held.grads[i].add_(p.grad)
            p.grad = None
        held.counted += counted

    def release(self, client_id: str, params: Sequence[torch.Tensor]) -> int:
        """Put a step's summed gradient back into `params` for its update; return how many micro-batches
        counted."""
        held = self.held.pop(client_id)
        for p, g in zip(params, held.grads):
            p.grad = g
        return held.counted

    def discard(self, client_id: str) -> None:
        """Forget the held gradient of a client's abandoned step."""
        self.held.pop(client_id, None)
