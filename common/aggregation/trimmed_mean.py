"""Coordinate-wise trimmed mean: the extremes of every coordinate dropped, the rest averaged, each client once."""
from __future__ import annotations

import math
from typing import Sequence

from common.aggregation.base import ClientUpdate, Strategy, check_inputs, sorted_mean, unpack
from common.lora import AdapterState

DEFAULT_TRIM_FRACTION = 0.2


def trimmed_mean(states: Sequence[AdapterState], weights: Sequence[float],
                 trim_fraction: float = DEFAULT_TRIM_FRACTION) -> AdapterState:
    """Coordinate-wise mean after dropping floor(trim_fraction * n) values at each end, each client once."""
    check_inputs(states, weights)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return sorted_mean(states, math.floor(trim_fraction * len(states)))


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean with `trim_fraction` of the clients dropped at each end."""

    name = "trimmed-mean"

    def __init__(self, trim_fraction: float = DEFAULT_TRIM_FRACTION) -> None:
        self.trim_fraction = trim_fraction

    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        return trimmed_mean(*unpack(updates), trim_fraction=self.trim_fraction)
