"""Averaging of client LoRA adapters into a global adapter: pure maths, no I/O.

`aggregate` is the public entry and dispatches on a mode name. Only sample-weighted FedAvg
exists today; robust modes (norm clipping, coordinate-wise median, trimmed mean) plug in by
adding a function with the same signature to `MODES`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from common.lora import AdapterState

Aggregator = Callable[[Sequence[AdapterState], Sequence[float]], AdapterState]


def _check_inputs(states: Sequence[AdapterState], weights: Sequence[float]) -> list[float]:
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
    _check_same_layout(states)
    return ws


def _check_same_layout(states: Sequence[AdapterState]) -> None:
    """Every adapter must have the keys and shapes of the first one."""
    first = states[0]
    if not first:
        raise ValueError("adapter 0 has no tensors")
    for i, state in enumerate(states[1:], start=1):
        missing, extra = sorted(set(first) - set(state)), sorted(set(state) - set(first))
        if missing or extra:
            raise ValueError(f"adapter {i} keys differ from adapter 0: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, ref in first.items():
            if tuple(state[key].shape) != tuple(ref.shape):
                raise ValueError(f"adapter {i} tensor {key} has shape {tuple(state[key].shape)}, "
                                 f"adapter 0 has {tuple(ref.shape)}")


def fedavg(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Weighted mean of the adapters, each counted exactly once; float64 maths, float32 result."""
    ws = _check_inputs(states, weights)
    total = sum(ws)
    out: AdapterState = {}
    for key in states[0]:
        acc = torch.zeros(states[0][key].shape, dtype=torch.float64)
        for state, w in zip(states, ws):
            acc.add_(state[key].detach().to("cpu", torch.float64), alpha=w / total)
        out[key] = acc.to(torch.float32)
    return out


MODES: dict[str, Aggregator] = {"fedavg": fedavg}


def aggregate(states: Sequence[AdapterState], weights: Sequence[float], mode: str = "fedavg") -> AdapterState:
    """Combine client adapters into one with the named mode (see `MODES`)."""
    try:
        fn = MODES[mode]
    except KeyError:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {sorted(MODES)}") from None
    return fn(states, weights)
