"""Per-client split points on the server: which blocks each client's steps run, and the server's share of the
averaging of the blocks trained on both sides.

With `serve --split-range K_MIN:K_MAX` the server part holds blocks [K_min, L) and runs [K_i, L) for client i.
A block b in [K_min, K_max) is trained client-side by the clients with K_i > b and server-side for those with
K_i <= b. Each such block's adapter is averaged over everyone who trained it, sample-weighted
(common.aggregation.coverage.PerModule): the aggregator combines the clients' adapters with the server-side
copies given here, and the result goes to both sides (`overlap`). The server-side copies of block b are:

- per-client server adapters: each client's own copy, for the blocks it ran server-side ([K_i, K_max)), weighted
  by its samples (so client and server copies of one client form its whole-model adapter);
- one shared server adapter: its block b, weighted by the samples of every client that trained it there
  (K_i <= b), or left out when no client did.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from common.adapter_layout import in_blocks
from common.aggregation import ClientUpdate
from common.lora import AdapterState


@dataclass(frozen=True)
class SplitPoints:
    """The range of split layers clients may choose, both ends included, and where the model keeps its blocks."""

    low: int
    high: int
    layers_path: str

    @property
    def overlap(self) -> range:
        """The blocks trained client-side by some clients and server-side for others."""
        return range(self.low, self.high)

    @property
    def ranged(self) -> bool:
        """Whether clients may choose different split layers."""
        return self.high > self.low

    def overlap_of(self, state: AdapterState) -> AdapterState:
        """The entries of `state` in the overlapping blocks."""
        return in_blocks(state, self.layers_path, self.overlap)

    def outside_overlap(self, state: AdapterState) -> AdapterState:
        """The entries of `state` outside the overlapping blocks."""
        inside = self.overlap_of(state)
        return {k: v for k, v in state.items() if k not in inside}


def per_client_updates(points: SplitPoints, states: dict[str, AdapterState], split_layers: dict[str, int],
                       weights: dict[str, float]) -> list[ClientUpdate]:
    """Per-client server adapters: each client's copy of the overlapping blocks it ran server-side."""
    updates = []
    for client in sorted(weights):
        if client not in states:
            continue
        blocks = range(split_layers.get(client, points.low), points.high)
        part = in_blocks(states[client], points.layers_path, blocks)
        if part:
            updates.append(ClientUpdate(f"{client}@server", part, weights[client]))
    return updates


def shared_updates(points: SplitPoints, state: AdapterState, split_layers: dict[str, int],
                   weights: dict[str, float]) -> list[ClientUpdate]:
    """The shared server adapter, cut into bands of blocks trained server-side by the same clients, each
    weighted by their samples; blocks no client trained server-side are left out."""
    bands: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for block in points.overlap:
        trainers = tuple(sorted(c for c in weights if split_layers.get(c, points.low) <= block))
        if trainers:
            bands[trainers].append(block)
    updates = []
    for trainers, blocks in sorted(bands.items(), key=lambda band: band[1][0]):
        part = in_blocks(state, points.layers_path, range(blocks[0], blocks[-1] + 1))
        if part:
            updates.append(ClientUpdate(f"server:{'+'.join(trainers)}", part, sum(weights[c] for c in trainers)))
    return updates
