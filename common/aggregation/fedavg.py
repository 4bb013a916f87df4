"""FedAvg: the sample-weighted mean of the clients' adapters, each client counted once."""
from __future__ import annotations

from typing import Sequence

import torch

from common.aggregation.base import ClientUpdate, Strategy, check_inputs, f64, unpack
from common.lora import AdapterState


def fedavg(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Weighted mean of the adapters, each counted exactly once; float64 maths, float32 result."""
    ws = check_inputs(states, weights)
    total = sum(ws)
    out: AdapterState = {}
    for key in states[0]:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for state, w in zip(states, ws):
            acc.add_(f64(state[key]), alpha=w / total)
        out[key] = acc.to(torch.float32)
    return out


class FedAvg(Strategy):
    """Sample-weighted mean (A and B averaged separately, as every split-learning runtime does)."""

    name = "fedavg"

    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        return fedavg(*unpack(updates))
