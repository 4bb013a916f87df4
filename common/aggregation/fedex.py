"""FedEx-LoRA (arXiv 2410.09432): A and B averaged as in FedAvg, plus, per LoRA module, the residual
mean(B_i·A_i) - mean(B)·mean(A) that every holder folds into its frozen base weights, so the global model is the
exact sample-weighted average of what the clients trained.

The residual is cumulative (this round's plus the previous global's, read from `current`), keyed as in
`common.residuals`; the global state is therefore the adapter and the residuals, and a restart that reloads it
needs nothing else. Only a mean has a residual: fedex composes with clipping (the exact mean of the clipped
products) but not with median or trimmed mean.
"""
from __future__ import annotations

from typing import Sequence

import torch

from common.aggregation.base import ClientUpdate, Strategy, check_inputs, f64, unpack
from common.aggregation.fedavg import fedavg
from common.lora import AdapterState
from common.residuals import lora_pairs, residual_key, split_residuals


def fedex(states: Sequence[AdapterState], weights: Sequence[float],
          previous: AdapterState | None = None) -> AdapterState:
    """The FedAvg adapter plus each module's cumulative residual (`previous`: the last global's residuals)."""
    ws = check_inputs(states, weights)
    total = sum(ws)
    mean = fedavg(states, ws)
    out = dict(mean)
    for prefix, (a, b) in lora_pairs(states[0]).items():
        exact = sum((w / total) * (f64(s[b]) @ f64(s[a])) for s, w in zip(states, ws))
        residual = exact - f64(mean[b]) @ f64(mean[a])  # against the float32 means the holders apply
        before = (previous or {}).get(residual_key(prefix))
        if before is not None:
            residual = residual + f64(before)
        out[residual_key(prefix)] = residual.to(torch.float32)
    return out


class FedEx(Strategy):
    """FedAvg of A and B plus the folded residual (exact)."""

    name = "fedex"

    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        return fedex(*unpack(updates), previous=split_residuals(current or {})[1])
