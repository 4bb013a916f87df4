"""The strategy interface: how a round's client adapters become one. Pure maths, no I/O.

A `Strategy` sees the round's updates (each client's adapter and its sample count), the current global
adapter (the one the clients started the round from, None when unknown) and its own state, and returns the
new global adapter. The aggregator applies one to the clients' adapters, the split server's engine to its
per-client server adapters at the round end. A new strategy is one module here and one line in
`common.aggregation.STRATEGIES`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch

from common.lora import AdapterError, AdapterState, check_adapter


@dataclass(frozen=True)
class ClientUpdate:
    """One client's adapter for a round and the number of samples behind it."""

    client_id: str
    state: AdapterState
    num_samples: float


class Strategy(ABC):
    """One aggregation algorithm (see the module docstring)."""

    name: str
    freezes_lora_a: bool = False  # clients (and per-client server copies) keep LoRA A at its initialisation

    @abstractmethod
    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        """The new global adapter from the round's updates (in a fixed order: the result must not depend on
        arrival order); raises ValueError on inconsistent inputs."""

    def describe(self) -> str:
        """How the strategy combines adapters, for logs."""
        return self.name

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a stateful strategy must carry over a restart (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state_dict` returned."""


def f64(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached, on the CPU, in float64: the precision every strategy computes in."""
    return tensor.detach().to("cpu", torch.float64)


def check_inputs(states: Sequence[AdapterState], weights: Sequence[float]) -> list[float]:
    """Validate states and weights together; return the weights as floats."""
    if not states:
        raise ValueError("cannot aggregate zero adapters: at least one client must submit")
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} adapters but {len(weights)} weights; give one weight per adapter")
    ws = [float(w) for w in weights]
    for i, w in enumerate(ws):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight {i} is {w}; weights (sample counts) must be finite and >= 0")
    if sum(ws) <= 0:
        raise ValueError("total weight is 0; at least one adapter needs a positive sample count")
    check_same_layout(states)
    return ws


def check_same_layout(states: Sequence[AdapterState]) -> None:
    """Every adapter must have the keys and shapes of the first one (common.lora.check_adapter)."""
    if not states[0]:
        raise ValueError("adapter 0 has no tensors")
    try:
        for i, state in enumerate(states[1:], start=1):
            check_adapter(state, states[0], what=f"adapter {i}", against="adapter 0's", values=False)
    except AdapterError as err:
        raise ValueError(str(err)) from None


def sorted_mean(states: Sequence[AdapterState], trim: int) -> AdapterState:
    """Per coordinate: drop the `trim` lowest and highest values and average the rest (float64 maths)."""
    out: AdapterState = {}
    for key in states[0]:
        stacked = torch.stack([f64(s[key]) for s in states])
        kept = stacked.sort(dim=0).values[trim:len(states) - trim]
        out[key] = kept.mean(dim=0).to(torch.float32)
    return out


def unpack(updates: Sequence[ClientUpdate]) -> tuple[list[AdapterState], list[float]]:
    """The states and sample counts of `updates`, in their order."""
    return [u.state for u in updates], [u.num_samples for u in updates]
