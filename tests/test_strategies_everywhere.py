"""Every strategy through the same interface in both places: the engine's per-client server copies at a round end
and the aggregator (over gRPC) give the strategy's own result for the same updates; ffa keeps the copies' A
frozen, fedex folds its residual into the server's base weights and carries it in the checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.aggregation import STRATEGIES, ClientUpdate, build_strategy
from common.optim import OptimSettings
from common.residuals import effective_products, split_residuals
from common.split.parts import LoraSettings, SplitPart
from splitlora_client.aggregator import fetch_global, submit_adapter
from splitlora_server.aggregator.service import AggregatorService
from splitlora_server.engine.core import SHARED, ServerEngine
from splitlora_server.engine.state import ServerCheckpoints
from tests.support.loopback import AggregatorServers
from tests.support.steps import random_step

LORA = LoraSettings(dropout=0.0)
OPTIM = OptimSettings(learning_rate=5e-2, warmup_steps=0, total_steps=10)
CLIENTS = ("a", "b", "c")
WEIGHTS = {"a": 3.0, "b": 7.0, "c": 13.0}


def trained_engine(model_dir: Path, mode: str) -> tuple[ServerEngine, dict[str, dict]]:
    """A per-client engine with three copies trained on different steps; returns it and the copies' adapters."""
    engine = ServerEngine(SplitPart(model_dir, "server", 2, LORA, lora_seed=3), "per-client", OPTIM,
                          strategy=build_strategy(mode)).start()
    for i, client in enumerate(CLIENTS):
        engine.add_client(client).result()
        for step in range(2):
            engine.submit_step(random_step(client, 10 * i + step, pad_from=3)).result()
    return engine, {c: engine.adapter_of(c) for c in CLIENTS}


@pytest.mark.parametrize("mode", sorted(STRATEGIES))
def test_engine_and_aggregator_apply_the_same_strategy(mode: str, tiny_gpt2_dir: Path) -> None:
    engine, states = trained_engine(tiny_gpt2_dir, mode)
    try:
        initial = engine.adapter_of(SHARED)
        expected = build_strategy(mode).aggregate(0, [ClientUpdate(c, states[c], WEIGHTS[c]) for c in CLIENTS],
                                                  initial)
        engine.end_round(0, WEIGHTS).result()
        in_engine = engine.server_adapter()
    finally:
        engine.stop()
    servers = AggregatorServers()
    try:
        stub = servers.serve(AggregatorService(3, 1, None, strategy=build_strategy(mode)))
        for c in CLIENTS:
            submit_adapter(stub, c, 0, int(WEIGHTS[c]), states[c], timeout=30)
        in_aggregator, _, _ = fetch_global(stub, "a", 0, timeout=30)
    finally:
        servers.close()
    assert set(in_engine) == set(expected) == set(in_aggregator)
    for key, value in expected.items():
        assert torch.equal(in_engine[key], value), key
        assert torch.equal(in_aggregator[key], value), key


def test_ffa_freezes_a_on_per_client_copies_and_is_exact(tiny_gpt2_dir: Path) -> None:
    engine, states = trained_engine(tiny_gpt2_dir, "ffa")
    try:
        initial = engine.adapter_of(SHARED)
        assert all(torch.equal(states[c][k], initial[k]) for c in CLIENTS for k in initial if "lora_A" in k)
        assert all(not torch.equal(states["a"][k], initial[k]) for k in initial if "lora_B" in k)
        engine.end_round(0, WEIGHTS).result()
        merged = engine.server_adapter()
    finally:
        engine.stop()
    total = sum(WEIGHTS.values())
    exact = {k: sum(WEIGHTS[c] / total * effective_products(states[c])[k] for c in CLIENTS)
             for k in effective_products(initial)}
    for key, value in effective_products(merged).items():
        torch.testing.assert_close(value, exact[key], atol=1e-6, rtol=0)


def test_fedex_folds_into_the_server_base_and_survives_a_checkpoint(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    checkpoints = ServerCheckpoints(tmp_path, {"run": 1})
    engine, states = trained_engine(tiny_gpt2_dir, "fedex")
    engine.on_boundary = checkpoints.save
    try:
        engine.close_round(0, WEIGHTS, list(CLIENTS)).result()
        merged = engine.server_adapter()
        step = random_step("a", 77, pad_from=3)
        engine.part.eval()
        with torch.no_grad():
            before_restart = engine.part(step.hidden, step.attention_mask, step.position_ids)
    finally:
        engine.stop()
    total = sum(WEIGHTS.values())
    exact = {k: sum(WEIGHTS[c] / total * effective_products(states[c])[k] for c in CLIENTS)
             for k in effective_products(states["a"])}
    for key, value in effective_products(merged).items():
        torch.testing.assert_close(value, exact[key], atol=1e-6, rtol=0)
    assert split_residuals(merged)[1], "fedex keeps residuals next to the adapter"

    restarted = ServerEngine(SplitPart(tiny_gpt2_dir, "server", 2, LORA, lora_seed=3), "per-client", OPTIM,
                             strategy=build_strategy("fedex")).start()
    try:
        state = checkpoints.latest()
        assert state is not None and set(state.strategy_state) == set(split_residuals(merged)[1])
        restarted.restore(state).result()
        restarted.part.eval()
        with torch.no_grad():
            after_restart = restarted.part(step.hidden, step.attention_mask, step.position_ids)
        assert torch.equal(after_restart, before_restart)
        assert all(torch.equal(restarted.server_adapter()[k], v) for k, v in merged.items())
    finally:
        restarted.stop()
