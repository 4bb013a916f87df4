"""Cross-client batching: per client, the same loss and cut gradient as one-by-one steps with the same weights;
one optimizer step on the sum of the per-client mean losses; failures and queue order handled."""
from __future__ import annotations

import threading
from functools import partial
from pathlib import Path

import torch

from common.lora import adapter_state
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.split.parts import LoraSettings, SplitPart
from splitlora_server.engine.batching import BatchSettings
from splitlora_server.engine.compute import split_rows, stack
from splitlora_server.engine.core import ServerEngine
from splitlora_server.engine.jobs import Step
from tests.support.servers import ClientSide, join, running_server, train_ok, valid_forward
from tests.support.split_reference import lora_params, randomize_lora_b
from tests.support.steps import random_step

LORA = LoraSettings(dropout=0.0)  # and the tiny model has no dropout: batched == one by one, exactly
OPTIM = OptimSettings(learning_rate=1e-2, warmup_steps=2, total_steps=10)
BATCHING = BatchSettings(window_ms=0.0, max_clients=8)
_step = partial(random_step, step=0, ignore_first=2)


def _part(model_dir: Path) -> SplitPart:
    part = SplitPart(model_dir, "server", 2, LORA, lora_seed=5)
    randomize_lora_b(part, seed=11)  # LoRA B starts at zero, which would hide a wrong gradient
    return part


def _run_together(engine: ServerEngine, steps: list[Step]) -> list:
    """Queue the steps behind a blocked job so the worker finds all of them waiting at once."""
    gate = threading.Event()
    engine.call(gate.wait)
    futures = [engine.submit_step(s) for s in steps]
    gate.set()
    return [f.result(timeout=60) for f in futures]


def test_stack_pads_and_split_rows_undoes_it():
    a, b = _step("a", 0, 2, 5), _step("b", 1, 1, 9, pad_from=6)
    stacked, spans = stack([a, b])
    assert stacked.hidden.shape == (3, 9, 32) and spans == [(0, 2, 5), (2, 3, 9)]
    assert (stacked.attention_mask[:2, 5:] == 0).all() and (stacked.labels[:2, 5:] == -100).all()
    assert (stacked.hidden[:2, 5:] == 0).all()
    back = split_rows(stacked.hidden, spans)
    assert torch.equal(back[0], a.hidden) and torch.equal(back[1], b.hidden)


def test_batched_steps_equal_one_by_one_with_the_same_weights(tiny_gpt2_dir: Path):
    steps = [_step("a", 0, 2, 5), _step("b", 1, 3, 9, pad_from=4), _step("c", 2, 1, 7)]
    engine = ServerEngine(_part(tiny_gpt2_dir), "shared", OPTIM, label_smoothing=0.1, batching=BATCHING).start()
    try:
        outcomes = _run_together(engine, steps)
        after = engine.server_adapter()
    finally:
        engine.stop()
    assert engine.batch_sizes == {3: 1}

    reference = _part(tiny_gpt2_dir).train()
    params = list(lora_params(reference.peft).values())
    opt, sched = build_optimizer(params, OPTIM)
    for step, outcome in zip(steps, outcomes):  # each client alone, every one on the initial weights
        hidden = step.hidden.clone().requires_grad_(True)
        loss, tokens = causal_lm_loss(reference(hidden, step.attention_mask, step.position_ids), step.labels, 0.1)
        loss.backward()  # parameter gradients add up: the gradient of the sum of the per-client losses
        assert outcome.tokens == tokens
        assert abs(outcome.loss - loss.item()) < 1e-5
        torch.testing.assert_close(outcome.grad, hidden.grad, atol=1e-5, rtol=1e-4)
    optimizer_step(params, opt, sched, OPTIM.max_grad_norm)  # one update on the combined objective
    expected = adapter_state(reference.peft)
    for key, value in expected.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=1e-5)


def test_the_schedule_counts_client_steps(tiny_gpt2_dir: Path):
    engine = ServerEngine(_part(tiny_gpt2_dir), "shared", OPTIM, batching=BATCHING).start()
    try:
        _run_together(engine, [_step(c, i, 2, 5) for i, c in enumerate("abc")])
        lr = engine.call(lambda: engine.slots["default"].sched.get_last_lr()[0]).result()
    finally:
        engine.stop()
    _, sched = build_optimizer([torch.nn.Parameter(torch.zeros(1))], OPTIM)
    assert lr == OPTIM.learning_rate * sched.lr_lambdas[0](3)  # three client steps into the schedule


def test_a_bad_step_in_a_batch_fails_alone(tiny_gpt2_dir: Path):
    good = _step("b", 1, 2, 5)
    bad = _step("a", 0, 2, 5)
    bad.hidden = torch.randn(2, 5, 7)  # wrong width: cannot be stacked, and fails on its own
    engine = ServerEngine(_part(tiny_gpt2_dir), "shared", OPTIM, batching=BATCHING).start()
    gate = threading.Event()
    try:
        engine.call(gate.wait)
        bad_future, good_future = engine.submit_step(bad), engine.submit_step(good)
        gate.set()
        assert isinstance(bad_future.exception(timeout=60), RuntimeError)
        outcome = good_future.result(timeout=60)
    finally:
        engine.stop()
    reference = _part(tiny_gpt2_dir).train()
    hidden = good.hidden.clone().requires_grad_(True)
    loss, _ = causal_lm_loss(reference(hidden, good.attention_mask, good.position_ids), good.labels, 0.1)
    loss.backward()
    assert abs(outcome.loss - loss.item()) < 1e-5
    torch.testing.assert_close(outcome.grad, hidden.grad, atol=1e-5, rtol=1e-4)


def test_a_job_queued_between_steps_keeps_its_place(tiny_gpt2_dir: Path):
    engine = ServerEngine(_part(tiny_gpt2_dir), "shared", OPTIM, batching=BATCHING).start()
    gate = threading.Event()
    try:
        engine.call(gate.wait)
        first = engine.submit_step(_step("a", 0, 2, 5))
        seen = engine.call(lambda: engine.steps_done)
        second = engine.submit_step(_step("b", 1, 2, 5))
        gate.set()
        first.result(timeout=60), second.result(timeout=60)
        assert seen.result(timeout=60) == 1  # the job ran between the two steps: they were not stacked
    finally:
        engine.stop()
    assert engine.batch_sizes == {1: 2}


def test_the_window_waits_only_for_clients_with_a_stream_open(tiny_gpt2_dir: Path):
    engine = ServerEngine(_part(tiny_gpt2_dir), "shared", OPTIM, batching=BATCHING).start()
    try:
        for client in ("a", "b", "c"):
            engine.stream_opened(client)
            engine.submit_step(_step(client, 0, 1, 4)).result(timeout=60)
        assert engine.awaited({"a"}) == {"b", "c"}
        engine.stream_opened("b")  # b reconnects before its old stream ends
        engine.stream_closed("b")
        assert engine.awaited({"a"}) == {"b", "c"}
        engine.stream_closed("b")
        engine.stream_closed("c")
        assert engine.awaited({"a"}) == set()  # departed clients no longer hold the other clients' steps
        engine.stream_opened("c")
        assert engine.awaited({"a"}) == {"c"}
    finally:
        engine.stop()


def test_per_client_mode_is_never_batched(tiny_gpt2_dir: Path):
    engine = ServerEngine(_part(tiny_gpt2_dir), "per-client", OPTIM, batching=BATCHING)
    assert not engine.batching.enabled


def test_two_clients_are_batched_over_grpc(builtin_model_dir: Path, tmp_path: Path):
    with running_server(builtin_model_dir, tmp_path, max_batch_clients=2, batch_window_ms=2000.0) as server:
        clients = {name: join(server, name) for name in ("a", "b")}
        side = ClientSide(builtin_model_dir)
        forwards = {name: [valid_forward(side, step, 3, seed=10 * i + step) for step in range(3)]
                    for i, name in enumerate(clients)}
        replies: dict[str, list] = {}

        def run(name: str) -> None:
            replies[name] = train_ok(server, clients[name].metadata, *forwards[name])

        threads = [threading.Thread(target=run, args=(name,)) for name in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        engine = server.running.engine
    assert sorted(replies) == ["a", "b"] and all(len(r) == 3 for r in replies.values())
    assert all(r.tokens > 0 and r.loss > 0 for rs in replies.values() for r in rs)
    assert engine.batch_sizes[2] >= 1 and engine.steps_done == 6
