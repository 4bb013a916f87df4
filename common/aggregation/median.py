"""Coordinate-wise median: a minority of bad clients cannot drag it far; sample counts are ignored (a client
could inflate its own)."""
from __future__ import annotations

from typing import Sequence

from common.aggregation.base import ClientUpdate, Strategy, check_inputs, sorted_mean, unpack
from common.lora import AdapterState


def median(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Coordinate-wise median, each client counted once (an even count averages the two middle values)."""
    check_inputs(states, weights)
    return sorted_mean(states, (len(states) - 1) // 2)


class Median(Strategy):
    """Coordinate-wise median of the clients' adapters."""

    name = "median"

    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        return median(*unpack(updates))
