"""Per-block aggregation for clients that train different blocks (per-client split points).

With split layers K_i in [K_min, K_max], the adapters of blocks [K_min, K_max) are trained client-side by the
clients whose K_i is above the block and server-side (in the client's server copy) for the others. Each
module's adapter is then averaged over everyone who trained it, sample-weighted: the updates are grouped by
which participants hold a module, and `inner` combines each group over exactly those participants. A module
held by every participant gets the ordinary result; exactness (ffa, fedex) holds module by module, since the
product B·A of a module only involves that module's A and B.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from common.aggregation.base import ClientUpdate, Strategy
from common.lora import AdapterState
from common.residuals import A_SUFFIX, B_SUFFIX, RESIDUAL


def module_of(key: str) -> str:
    """The module prefix of an adapter (or residual) key."""
    for suffix in (A_SUFFIX, B_SUFFIX, RESIDUAL):
        if key.endswith(suffix):
            return key[:-len(suffix)]
    return key


class PerModule(Strategy):
    """`inner`, applied to each module over the participants that trained it (see the module docstring)."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name, self.freezes_lora_a = inner.name, inner.freezes_lora_a

    def describe(self) -> str:
        return f"{self.inner.describe()}, per module over the participants that trained it"

    def aggregate(self, round: int, updates: Sequence[ClientUpdate], current: AdapterState | None) -> AdapterState:
        if not updates:
            raise ValueError("cannot aggregate zero adapters: at least one client must submit")
        holders: dict[str, set[int]] = defaultdict(set)
        for i, update in enumerate(updates):
            for key in update.state:
                holders[module_of(key)].add(i)
        groups: dict[frozenset[int], list[str]] = defaultdict(list)
        for module, who in sorted(holders.items()):
            groups[frozenset(who)].append(module)
        out: AdapterState = {}
        for who, modules in sorted(groups.items(), key=lambda g: sorted(g[0])):
            mods = set(modules)
            part = [ClientUpdate(updates[i].client_id, {k: v for k, v in updates[i].state.items()
                                                       if module_of(k) in mods}, updates[i].num_samples)
                    for i in sorted(who)]
            previous = {k: v for k, v in (current or {}).items() if module_of(k) in mods} if current else None
            out.update(self.inner.aggregate(round, part, previous))
        return out
