"""Update-norm clipping around any strategy: each client's update (its adapter minus the current global adapter)
is scaled down to at most `clip_norm` before the inner strategy combines them, so no single client moves the
result by more than the bound."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from common.aggregation.base import ClientUpdate, Strategy, check_inputs, check_same_layout, f64, unpack
from common.aggregation.median import median
from common.lora import AdapterState
from common.residuals import split_residuals


def _norm(tensors: AdapterState) -> float:
    """L2 norm over every tensor together."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors.values()))


def update_norm(state: AdapterState, reference: AdapterState) -> float:
    """L2 norm of `state - reference` over every tensor together."""
    return _norm({k: f64(state[k]) - f64(ref) for k, ref in reference.items()})


def clip_updates(states: Sequence[AdapterState], reference: AdapterState, clip_norm: float) -> list[AdapterState]:
    """Each adapter moved towards `reference` until its update norm is at most `clip_norm`."""
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a positive number, got {clip_norm}")
    check_same_layout([reference, *states])
    ref64 = {k: f64(ref) for k, ref in reference.items()}
    clipped = []
    for state in states:
        delta = {k: f64(state[k]) - ref for k, ref in ref64.items()}
        norm = _norm(delta)
        scale = 1.0 if norm <= clip_norm else clip_norm / norm
        clipped.append({k: (ref64[k] + scale * d).to(torch.float32) for k, d in delta.items()})
    return clipped


class Clipped(Strategy):
    """`inner` applied to the clipped updates. Without a current global adapter (the first round) updates are
    taken relative to the coordinate-wise median of the submissions, since every client starts from the same
    initialization."""

    def __init__(self, inner: Strategy, clip_norm: float) -> None:
        self.inner, self.clip_norm = inner, clip_norm
        self.name, self.freezes_lora_a = inner.name, inner.freezes_lora_a

    def describe(self) -> str:
        return f"{self.inner.describe()}, updates clipped to norm {self.clip_norm:g}"

    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        states, weights = unpack(updates)
        check_inputs(states, weights)
        adapter = split_residuals(current)[0] if current is not None else None  # fedex: residuals are no update
        reference = adapter if adapter is not None else median(states, weights)
        clipped = clip_updates(states, reference, self.clip_norm)
        return self.inner.aggregate(round, [ClientUpdate(u.client_id, s, u.num_samples)
                                            for u, s in zip(updates, clipped)], current)
