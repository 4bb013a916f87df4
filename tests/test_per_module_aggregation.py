"""Per-module aggregation (per-client split points): each module's adapter is combined over exactly the
participants that trained it, sample-weighted, and ffa/fedex stay exact module by module."""
from __future__ import annotations

import torch

from common.aggregation import ClientUpdate, build_strategy, fedavg
from common.aggregation.coverage import PerModule
from common.residuals import effective_products

SHAPE_A, SHAPE_B = (2, 6), (6, 2)


def _module(prefix: str, seed: int, a: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.lora_A.weight": a if a is not None else torch.randn(SHAPE_A, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(SHAPE_B, generator=g)}


def _updates(shared_a: bool = False) -> list[ClientUpdate]:
    """Client k0 trained blocks 0 (split 1); k1 blocks 0-1 (split 2); the server copy of k0 trained block 1."""
    a = {p: torch.randn(SHAPE_A, generator=torch.Generator().manual_seed(i)) if shared_a else None
         for i, p in enumerate(("h.0", "h.1"))}
    return [ClientUpdate("k0", _module("h.0", 1, a["h.0"]), 3.0),
            ClientUpdate("k1", {**_module("h.0", 2, a["h.0"]), **_module("h.1", 3, a["h.1"])}, 5.0),
            ClientUpdate("k0@server", _module("h.1", 4, a["h.1"]), 3.0)]


def test_each_module_is_averaged_over_those_who_trained_it() -> None:
    updates = _updates()
    out = PerModule(build_strategy("fedavg")).aggregate(0, updates, None)
    block0 = fedavg([updates[0].state, {k: v for k, v in updates[1].state.items() if "h.0" in k}], [3.0, 5.0])
    block1 = fedavg([{k: v for k, v in updates[1].state.items() if "h.1" in k}, updates[2].state], [5.0, 3.0])
    assert set(out) == set(block0) | set(block1)
    assert all(torch.equal(out[k], v) for k, v in {**block0, **block1}.items())


def test_exact_strategies_stay_exact_per_module() -> None:
    for mode, shared_a in (("ffa", True), ("fedex", False)):
        updates = _updates(shared_a)
        out = PerModule(build_strategy(mode)).aggregate(0, updates, None)
        got = effective_products(out)
        for module, (who, weights) in {"h.0": ((0, 1), (3.0, 5.0)), "h.1": ((1, 2), (5.0, 3.0))}.items():
            exact = sum(w / sum(weights) * effective_products(updates[i].state)[module]
                        for i, w in zip(who, weights))
            torch.testing.assert_close(got[module], exact, atol=1e-6, rtol=0)
