"""A round's combination is never published with NaN or Inf: the guard every strategy runs behind.

Adapters are checked (float32, finite) when they are accepted, so a strategy's result should be finite; the guard
is what makes that certain for every strategy, present and future, in the aggregator and for the split server's
per-client adapters. When the result is not finite, the current global adapter is kept (or, without one, the
adapters that are to blame are left out), and the caller is told which adapters were to blame.
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.aggregation.base import ClientUpdate, Strategy
from common.lora import AdapterState


def non_finite_keys(state: AdapterState) -> list[str]:
    """Keys of the tensors of `state` that hold NaN or Inf."""
    return [k for k, v in state.items() if not bool(torch.isfinite(v).all())]


def _peak(state: AdapterState) -> float:
    return max((float(v.detach().abs().max()) if v.numel() else 0.0 for v in state.values()), default=0.0)


def guarded_aggregate(strategy: Strategy, round: int, updates: Sequence[ClientUpdate],
                      current: AdapterState | None) -> tuple[AdapterState | None, str | None]:
    """`strategy.aggregate`, never with NaN or Inf in the result: (result, None) when all is well, else (the
    fallback, why). The fallback is `current`, or without one the combination of the adapters not to blame (those
    not finite themselves, else the one with the largest value), or None when nothing finite is left."""
    result = strategy.aggregate(round, updates, current)
    if not non_finite_keys(result):
        return result, None
    blamed = [u.client_id for u in updates if non_finite_keys(u.state)] or \
        [max(updates, key=lambda u: _peak(u.state)).client_id]
    why = f"the combination was not finite; blamed: {', '.join(blamed)}"
    if current is not None:
        return current, why + "; the previous global adapter is kept"
    kept = [u for u in updates if u.client_id not in blamed]
    fallback = strategy.aggregate(round, kept, None) if kept else None
    if fallback is None or non_finite_keys(fallback):
        return None, why + "; no finite combination is left"
    return fallback, why + "; combined without them"
