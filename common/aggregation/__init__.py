"""Aggregation strategies behind one interface (`base.Strategy`), and the registry that names them.

Adding a strategy: write one module here with a `Strategy` subclass, and add one line to `STRATEGIES` (its
`--aggregation` name and how to build it from `StrategyOptions`). The aggregator and the split server's engine
then use it through `build_strategy`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from common.aggregation.base import ClientUpdate, Strategy, check_inputs
from common.aggregation.clipping import Clipped, clip_updates, update_norm
from common.aggregation.fedavg import FedAvg, fedavg
from common.aggregation.fedex import FedEx, fedex
from common.aggregation.ffa import FFA
from common.aggregation.median import Median, median
from common.aggregation.trimmed_mean import DEFAULT_TRIM_FRACTION, TrimmedMean, trimmed_mean
from common.lora import AdapterState

__all__ = ["DEFAULT_TRIM_FRACTION", "MODES", "STRATEGIES", "ClientUpdate", "Strategy", "StrategyOptions",
           "aggregate", "build_strategy", "clip_updates", "fedavg", "fedex", "freezes_lora_a", "median", "trimmed_mean",
           "update_norm"]


@dataclass(frozen=True)
class StrategyOptions:
    """The server's options a strategy may read."""

    trim_fraction: float = DEFAULT_TRIM_FRACTION


STRATEGIES: dict[str, Callable[[StrategyOptions], Strategy]] = {
    "fedavg": lambda o: FedAvg(),
    "median": lambda o: Median(),
    "trimmed-mean": lambda o: TrimmedMean(o.trim_fraction),
    "ffa": lambda o: FFA(),
    "fedex": lambda o: FedEx(),
}
MODES = STRATEGIES  # the --aggregation names


def build_strategy(mode: str = "fedavg", clip_norm: float = 0.0,
                   options: StrategyOptions = StrategyOptions()) -> Strategy:
    """The named strategy, wrapped in update-norm clipping when `clip_norm` > 0."""
    try:
        strategy = STRATEGIES[mode](options)
    except KeyError:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {sorted(STRATEGIES)}") from None
    return Clipped(strategy, clip_norm) if clip_norm else strategy


def freezes_lora_a(mode: str) -> bool:
    """Whether the named strategy needs LoRA A frozen at its initialisation (what a client must know at Join)."""
    return build_strategy(mode).freezes_lora_a


def aggregate(states: Sequence[AdapterState], weights: Sequence[float], mode: str = "fedavg", *,
              clip_norm: float = 0.0, reference: AdapterState | None = None,
              trim_fraction: float = DEFAULT_TRIM_FRACTION) -> AdapterState:
    """Combine adapters with the named strategy in one call (`reference`: the current global adapter)."""
    strategy = build_strategy(mode, clip_norm, StrategyOptions(trim_fraction))
    check_inputs(states, weights)
    return strategy.aggregate(0, [ClientUpdate(str(i), s, w) for i, (s, w) in enumerate(zip(states, weights))],
                              reference)
