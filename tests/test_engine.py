"""The server engine: one worker computes exactly what a direct computation gives; adapter modes behave."""
from __future__ import annotations

import torch

from common.aggregation import build_strategy, fedavg, median
from common.lora import adapter_state
from common.loss import causal_lm_loss
from common.optim import OptimSettings
from common.split.parts import LoraSettings, SplitPart
from splitlora_server.engine.core import SHARED, ServerEngine
from tests.support.steps import random_step

LORA = LoraSettings(dropout=0.0)
OPTIM = OptimSettings(learning_rate=1e-2, warmup_steps=0, total_steps=10)


def test_step_matches_direct_computation(tiny_gpt2_dir):
    engine = ServerEngine(SplitPart(tiny_gpt2_dir, "server", 2, LORA, lora_seed=3), "shared", OPTIM,
                          label_smoothing=0.1).start()
    reference = SplitPart(tiny_gpt2_dir, "server", 2, LORA, lora_seed=3)
    step = random_step("a", 0, hidden=reference.hidden_size, vocab=reference.vocab_size, pad_from=3)
    try:
        outcome = engine.submit_step(step).result()
    finally:
        engine.stop()
    hidden = step.hidden.clone().requires_grad_(True)
    loss, tokens = causal_lm_loss(reference.train()(hidden, step.attention_mask, step.position_ids), step.labels, 0.1)
    loss.backward()
    assert tokens == outcome.tokens == 4 + 2  # shifted targets: row 0 has 4, row 1 (3 real tokens) 2
    assert abs(outcome.loss - loss.item()) < 1e-6
    torch.testing.assert_close(outcome.grad, hidden.grad, atol=1e-6, rtol=0)


def test_shared_mode_updates_one_adapter_for_every_client(tiny_gpt2_dir):
    engine = ServerEngine(SplitPart(tiny_gpt2_dir, "server", 2, LORA), "shared", OPTIM).start()
    before = adapter_state(engine.part.peft)
    try:
        for i, client in enumerate(("a", "b")):
            engine.add_client(client).result()
            engine.submit_step(random_step(client, i, pad_from=3)).result()
        after = engine.server_adapter()
    finally:
        engine.stop()
    assert list(engine.slots) == [SHARED]
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_per_client_mode_keeps_copies_and_averages_them_at_round_end(tiny_gpt2_dir):
    engine = ServerEngine(SplitPart(tiny_gpt2_dir, "server", 2, LORA), "per-client", OPTIM).start()
    try:
        for client in ("a", "b"):
            engine.add_client(client).result()
        assert [s.name for s in engine.slots.values()] == [SHARED, "client1", "client2"]
        for i, client in enumerate(("a", "b", "a")):
            engine.submit_step(random_step(client, i, pad_from=3)).result()
        states = {c: engine.adapter_of(c) for c in ("a", "b")}
        assert any(not torch.equal(states["a"][k], states["b"][k]) for k in states["a"])
        engine.end_round(0, {"a": 2.0, "b": 1.0}).result()
        expected = fedavg([states["a"], states["b"]], [2.0, 1.0])
        for name in ("a", "b", SHARED):
            merged = engine.adapter_of(name)
            for key, value in expected.items():
                torch.testing.assert_close(merged[key], value, atol=1e-7, rtol=0)
    finally:
        engine.stop()


def test_a_failing_job_does_not_kill_the_worker(tiny_gpt2_dir):
    engine = ServerEngine(SplitPart(tiny_gpt2_dir, "server", 2, LORA), "shared", OPTIM).start()
    try:
        bad = random_step("a", 0, pad_from=3)
        bad.hidden = torch.randn(2, 5, 7)  # wrong width: the model raises inside the worker
        error = engine.submit_step(bad).exception(timeout=30)
        assert isinstance(error, RuntimeError)
        assert engine.submit_step(random_step("a", 1, pad_from=3)).result(timeout=30).tokens > 0
    finally:
        engine.stop()


def test_per_client_copies_are_averaged_by_the_given_strategy(tiny_gpt2_dir):
    """The engine takes any aggregation strategy for its round-end average (here: the median of three)."""
    engine = ServerEngine(SplitPart(tiny_gpt2_dir, "server", 2, LORA), "per-client", OPTIM,
                          strategy=build_strategy("median")).start()
    try:
        clients = ("a", "b", "c")
        for i, client in enumerate(clients):
            engine.add_client(client).result()
            engine.submit_step(random_step(client, i, pad_from=3)).result()
        states = [engine.adapter_of(c) for c in clients]
        engine.end_round(0, {"a": 1.0, "b": 1.0, "c": 100.0}).result()  # the median ignores sample counts
        expected = median(states, [1.0, 1.0, 1.0])
        for name in (*clients, SHARED):
            merged = engine.adapter_of(name)
            assert all(torch.equal(merged[k], expected[k]) for k in expected)
    finally:
        engine.stop()
