"""FFA-LoRA (arXiv 2403.12313): every client keeps LoRA A frozen at the shared initialisation and trains only B,
so mean(B_i)·A = mean(B_i·A): averaging B is averaging the updates, exactly, with a standard PEFT adapter.

The strategy refuses a round whose A matrices differ (a client that trained A, or was initialised with another
seed): the average would silently not be exact. B is combined by `inner` (FedAvg by default; any coordinate-wise
strategy works, since A is shared: median(B_i)·A is the median of the updates along the frozen directions).
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.aggregation.base import ClientUpdate, Strategy, check_inputs, unpack
from common.aggregation.fedavg import FedAvg
from common.lora import AdapterState
from common.residuals import A_SUFFIX


def check_frozen_a(updates: Sequence[ClientUpdate], current: AdapterState | None) -> None:
    """Every update's lora_A tensors equal the first one's (and the current global's); ValueError naming the
    client and module otherwise."""
    first = updates[0]
    for update in updates[1:]:
        for key, value in update.state.items():
            if key.endswith(A_SUFFIX) and not torch.equal(value, first.state[key]):
                raise ValueError(f"ffa: client {update.client_id}'s {key} differs from client {first.client_id}'s; "
                                 "ffa clients keep LoRA A frozen at the shared initialisation (same --seed, a "
                                 "client that knows ffa)")
    for key, value in (current or {}).items():
        if key.endswith(A_SUFFIX) and key in first.state and not torch.equal(value, first.state[key]):
            raise ValueError(f"ffa: the submitted {key} differs from the global adapter's; LoRA A must stay frozen")


class FFA(Strategy):
    """Frozen A, B combined by `inner`: exact when `inner` is a mean."""

    name = "ffa"
    freezes_lora_a = True

    def __init__(self, inner: Strategy | None = None) -> None:
        self.inner = inner or FedAvg()

    def describe(self) -> str:
        return f"ffa (A frozen, B by {self.inner.describe()})"

    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        check_inputs(*unpack(updates))
        check_frozen_a(updates, current)
        return self.inner.aggregate(round, updates, current)
