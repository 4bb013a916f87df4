"""Averaging of client LoRA adapters into a global adapter: pure maths, no I/O.

`aggregate` is the public entry and dispatches on a mode name (`MODES`): sample-weighted `fedavg`, and two
modes a minority of bad clients cannot drag far: coordinate-wise `median` and `trimmed-mean`. These count
each client once and ignore sample counts, which a client could inflate. Any mode can be combined with
update-norm clipping (`clip_norm`): each adapter's difference from a reference (the previous global adapter)
is scaled down to at most that L2 norm, so no single client moves the result by more than the bound.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch

from common.lora import AdapterState

Aggregator = Callable[[Sequence[AdapterState], Sequence[float]], AdapterState]
DEFAULT_TRIM_FRACTION = 0.2


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` detached, on the CPU, in float64: the precision every mode computes in."""
    return tensor.detach().to("cpu", torch.float64)


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
            acc.add_(_f64(state[key]), alpha=w / total)
        out[key] = acc.to(torch.float32)
    return out


def _sorted_mean(states: Sequence[AdapterState], trim: int) -> AdapterState:
    """Per coordinate: drop the `trim` lowest and highest values and average the rest (float64 maths)."""
    out: AdapterState = {}
    for key in states[0]:
        stacked = torch.stack([_f64(s[key]) for s in states])
        kept = stacked.sort(dim=0).values[trim:len(states) - trim]
        out[key] = kept.mean(dim=0).to(torch.float32)
    return out


def median(states: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Coordinate-wise median, each client counted once (an even count averages the two middle values)."""
    _check_inputs(states, weights)
    return _sorted_mean(states, (len(states) - 1) // 2)


def trimmed_mean(states: Sequence[AdapterState], weights: Sequence[float],
                 trim_fraction: float = DEFAULT_TRIM_FRACTION) -> AdapterState:
    """Coordinate-wise mean after dropping floor(trim_fraction * n) values at each end, each client once."""
    _check_inputs(states, weights)
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    return _sorted_mean(states, math.floor(trim_fraction * len(states)))


def _norm(tensors: AdapterState) -> float:
    """L2 norm over every tensor together."""
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors.values()))


def update_norm(state: AdapterState, reference: AdapterState) -> float:
    """L2 norm of `state - reference` over every tensor together."""
    return _norm({k: _f64(state[k]) - _f64(ref) for k, ref in reference.items()})


def clip_updates(states: Sequence[AdapterState], reference: AdapterState, clip_norm: float) -> list[AdapterState]:
    """Each adapter moved towards `reference` until its update norm is at most `clip_norm`."""
    if not clip_norm > 0 or not math.isfinite(clip_norm):
        raise ValueError(f"clip_norm must be a positive number, got {clip_norm}")
    _check_same_layout([reference, *states])
    ref64 = {k: _f64(ref) for k, ref in reference.items()}
    clipped = []
    for state in states:
        delta = {k: _f64(state[k]) - ref for k, ref in ref64.items()}
        norm = _norm(delta)
        scale = 1.0 if norm <= clip_norm else clip_norm / norm
        clipped.append({k: (ref64[k] + scale * d).to(torch.float32) for k, d in delta.items()})
    return clipped


MODES: dict[str, Aggregator] = {"fedavg": fedavg, "median": median, "trimmed-mean": trimmed_mean}


def aggregate(states: Sequence[AdapterState], weights: Sequence[float], mode: str = "fedavg", *,
              clip_norm: float = 0.0, reference: AdapterState | None = None,
              trim_fraction: float = DEFAULT_TRIM_FRACTION) -> AdapterState:
    """Combine client adapters into one with the named mode (see `MODES`).

    `clip_norm` > 0 first clips every adapter's update relative to `reference` (the previous global adapter);
    without a reference (the first round) it is taken relative to the coordinate-wise median of `states`,
    since every client starts from the same initialization. `trim_fraction` is used by `trimmed-mean`.
    """
    try:
        fn = MODES[mode]
    except KeyError:
        raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {sorted(MODES)}") from None
    if fn is trimmed_mean:
        fn = functools.partial(trimmed_mean, trim_fraction=trim_fraction)
    if clip_norm:
        _check_inputs(states, weights)
        states = clip_updates(states, reference if reference is not None else median(states, weights), clip_norm)
    return fn(states, weights)


def non_finite_keys(state: AdapterState) -> list[str]:
    """Keys of the tensors of `state` that hold NaN or Inf."""
    return [k for k, v in state.items() if not bool(torch.isfinite(v).all())]


def _peak(state: AdapterState) -> float:
    return max((float(v.detach().abs().max()) if v.numel() else 0.0 for v in state.values()), default=0.0)


def guarded_aggregate(states: Sequence[AdapterState], names: Sequence[str], weights: Sequence[float],
                      previous: AdapterState | None, **kwargs) -> tuple[AdapterState | None, str | None]:
    """`aggregate`, but never a result with NaN or Inf: then the previous global adapter (or, without one, the
    combination of the adapters that are finite) is the result, and the second value says which adapters were
    to blame (those not finite themselves, else the one with the largest value). (result, None) when all is well."""
    result = aggregate(states, weights, **kwargs)
    if not non_finite_keys(result):
        return result, None
    blamed = [n for n, s in zip(names, states) if non_finite_keys(s)] or \
        [max(zip(names, states), key=lambda pair: _peak(pair[1]))[0]]
    why = f"the combination was not finite; blamed: {', '.join(blamed)}"
    if previous is not None:
        return previous, why + "; the previous global adapter is kept"
    kept = [(s, w) for n, s, w in zip(names, states, weights) if n not in blamed]
    fallback = aggregate([s for s, _ in kept], [w for _, w in kept], **kwargs) if kept else None
    if fallback is None or non_finite_keys(fallback):
        return None, why + "; no finite combination is left"
    return fallback, why + "; combined without them"
