"""Per-client split points over real gRPC: a server that allows split layers 1..3 of a 4-block model, one client
at K=1 and one at K=3. Each step's loss and every client LoRA gradient equal the unsplit model's with the same
adapters; the server's LoRA gradients too (its blocks [K, L) only); at the round end each block's adapter is the
sample-weighted mean over everyone who trained it, on both sides; a split layer outside the range is refused
naming it, and the server keeps serving."""
from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from common.adapter_layout import in_blocks
from common.aggregation import fedavg
from common.loss import causal_lm_loss
from common.lora import adapter_state, export_adapter
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.lora_settings import whole_model_lora_config
from common.split.parts import LoraSettings, SplitPart
from common.wire import decode_tensor
from splitlora_client.aggregator import fetch_global, submit_adapter
from tests.support.servers import fingerprint_for, join, running_server, step_forward, train_ok
from tests.support.split_reference import padded_batch

RANGE = {"split_layer": 2, "split_range": "1:3", "lora_dropout": 0.0, "label_smoothing": 0.0, "local_steps": 3,
         "rounds": 2, "server_adapter_mode": "per-client", "learning_rate": 1e-2, "seed": 5}
LAYERS = "transformer.h"
RANGE_LORA = LoraSettings(dropout=0.0)
ROWS = {1: (9, 5, 7, 4), 3: (6, 10)}  # client K -> sequence lengths of its batches (unequal sample counts)


def _client(h, model_dir: Path, k: int) -> SplitPart:
    return SplitPart(model_dir, "client", k, h.config.lora_settings(), lora_seed=h.config.seed, per_module_init=True)


def _unsplit(model_dir: Path, part: SplitPart, client: dict, server: dict, tmp: Path) -> PeftModel:
    """The whole model with the client's adapter on [0, K) and the server's on the rest, through an export."""
    out = export_adapter(tmp, whole_model_lora_config(part.lora, part.family, part.config), client,
                         {k: v for k, v in server.items() if k not in client})
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(out), is_trainable=True)
    return model.eval()


def _step(h, joined, part: SplitPart, step: int, batch: dict) -> float:
    """One step through the server: the client's gradients are left in its parameters; returns the loss."""
    hidden = part(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    reply = train_ok(h, joined.metadata, step_forward(step, 0, hidden.detach(), batch))[0]
    hidden.backward(decode_tensor(reply.grad, name="grad"))
    return reply.loss


def _train_round(h, model_dir: Path, tmp: Path) -> tuple[dict, dict, list[float], dict]:
    """Round 0 for a client at K=1 ("low") and one at K=3 ("high"), every step checked against the unsplit model
    on its last step; returns the clients' adapters, the server's copies before the close, the sample weights
    and the global adapter."""
    parts, joined, opts = {}, {}, {}
    for k, cid in ((1, "low"), (3, "high")):
        joined[k] = join(h, cid, fingerprint_for(str(model_dir), k, h.config.lora_settings()))
        parts[k] = _client(h, model_dir, k).eval()
        opts[k] = torch.optim.AdamW([p for p in parts[k].parameters() if p.requires_grad], lr=1e-2)
    engine = h.running.engine
    for step in range(3):
        for k, cid in ((1, "low"), (3, "high")):
            batch = padded_batch(96, lengths=ROWS[k], seed=10 * step + k)
            server_before, client_before = engine.adapter_of(cid), adapter_state(parts[k].peft)
            opts[k].zero_grad()
            loss = _step(h, joined[k], parts[k], step, batch)
            if step == 2:  # the unsplit model with the same adapters: the same loss and client gradients
                _check_exact(model_dir, parts[k], client_before, server_before, batch, loss, tmp / f"ref{k}")
            opts[k].step()
    server_copies = {cid: engine.adapter_of(cid) for cid in ("low", "high")}
    stub = agrpc.AggregatorStub(h.channel)
    samples = {1: 3 * len(ROWS[1]), 3: 3 * len(ROWS[3])}
    clients = {k: adapter_state(parts[k].peft) for k in (1, 3)}
    for k, cid in ((1, "low"), (3, "high")):
        submit_adapter(stub, cid, 0, samples[k], clients[k])
    glob, n, total = fetch_global(stub, "low", 0, timeout=30)
    assert (n, total) == (2, samples[1] + samples[3])
    engine.call(lambda: None).result()  # the round end's engine job is done
    return clients, server_copies, [float(samples[1]), float(samples[3])], glob


def _check_exact(model_dir: Path, part: SplitPart, client: dict, server: dict, batch: dict, loss: float,
                 tmp: Path) -> None:
    model = _unsplit(model_dir, part, client, server, tmp)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    ref, _ = causal_lm_loss(logits, batch["labels"], 0.0)
    ref.backward()
    assert abs(ref.item() - loss) < 1e-5
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    mine = {n: p.grad for n, p in part.peft.named_parameters() if p.requires_grad}
    assert mine and all(g is not None for g in mine.values())
    for name, grad in mine.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=0)
    assert any(g.abs().sum() > 0 for n, g in mine.items() if "lora_A" in n)


def _mean(first: dict, second: dict, blocks: range, w: list[float]) -> dict:
    """The sample-weighted mean of two adapters' `blocks`."""
    return fedavg([in_blocks(first, LAYERS, blocks), in_blocks(second, LAYERS, blocks)], w)


def _assert_close(got: dict, expected: dict) -> None:
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-7, rtol=0)


def test_clients_with_different_split_layers_train_exactly_and_average_per_block(tiny_gpt2_dir: Path,
                                                                                  tmp_path: Path) -> None:
    with running_server(tiny_gpt2_dir, tmp_path / "server", **RANGE) as h:
        clients, copies, w, glob = _train_round(h, tiny_gpt2_dir, tmp_path)
        # block 0: both clients; blocks 1-2: the high client's own copy and the low client's server copy
        expected = {**_mean(clients[1], clients[3], range(0, 1), w), **_mean(copies["low"], clients[3], range(1, 3), w)}
        assert set(glob) == set(expected)
        _assert_close(glob, expected)
        # the server took the combined blocks 1-2 into every copy and averaged block 3 over both copies
        block3 = fedavg([in_blocks(copies[c], LAYERS, range(3, 4)) for c in ("low", "high")], w)
        for cid in ("low", "high"):
            _assert_close(h.running.engine.adapter_of(cid), {**in_blocks(expected, LAYERS, range(1, 3)), **block3})


def test_a_shared_server_adapter_counts_as_everyone_who_trained_it_there(tiny_gpt2_dir: Path,
                                                                          tmp_path: Path) -> None:
    with running_server(tiny_gpt2_dir, tmp_path / "server", **{**RANGE, "server_adapter_mode": "shared",
                                                              "max_batch_clients": 2}) as h:
        clients, copies, w, glob = _train_round(h, tiny_gpt2_dir, tmp_path)
        shared = copies["low"]
        # blocks 1-2: the high client's copy and the shared one, which the low client (K=1) trained there
        expected = {**_mean(clients[1], clients[3], range(0, 1), w), **_mean(shared, clients[3], range(1, 3), w)}
        assert set(glob) == set(expected)
        _assert_close(glob, expected)
        after = h.running.engine.adapter_of("low")
        _assert_close(after, {**in_blocks(expected, LAYERS, range(1, 3)), **in_blocks(shared, LAYERS, range(3, 4))})


def test_batching_stacks_only_steps_of_the_same_split_layer() -> None:
    import queue
    from collections import deque

    from splitlora_server.engine.batching import BatchPolicy, BatchSettings
    from splitlora_server.engine.jobs import Forward
    from tests.support.steps import random_step

    steps = [random_step(c, i) for i, c in enumerate(("a", "b", "c"))]
    steps[0].start, steps[1].start, steps[2].start = 1, 3, 1
    jobs: queue.Queue = queue.Queue()
    for step in steps[1:]:
        jobs.put(Forward(step))
    carry: deque = deque()
    group = BatchPolicy(BatchSettings(max_clients=3)).collect(Forward(steps[0]), jobs, carry)
    assert [j.step.client_id for j in group] == ["a"] and [j.step.client_id for j in carry] == ["b"]


def test_the_server_runs_and_trains_only_the_blocks_from_the_clients_split_layer(tiny_gpt2_dir: Path) -> None:
    lora = SplitPart(tiny_gpt2_dir, "client", 1, RANGE_LORA).lora
    server = SplitPart(tiny_gpt2_dir, "server", 1, lora, lora_seed=5, per_module_init=True).eval()
    whole = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_gpt2_dir)),
                           whole_model_lora_config(lora, server.family, server.config)).eval()
    gen = torch.Generator().manual_seed(3)
    mine = dict(server.peft.named_parameters())
    with torch.no_grad():
        for name, param in sorted(whole.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                if name in mine:
                    mine[name].copy_(param)
    batch = padded_batch(96, lengths=(8, 5), seed=2)
    mask, pos = batch["attention_mask"], batch["position_ids"]
    out = whole(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos, output_hidden_states=True)
    ref, _ = causal_lm_loss(out.logits, batch["labels"])
    ref.backward()
    cut = out.hidden_states[2].detach().requires_grad_(True)
    loss, _ = causal_lm_loss(server(cut, mask, pos, start=2), batch["labels"])
    loss.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    whole_grads = dict(whole.named_parameters())
    for name, param in mine.items():
        if "lora_" not in name:
            continue
        if ".h.1." in name:  # block 1 is the client's (K=2): not run, not trained
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, whole_grads[name].grad, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot start at block 0"):
        server(cut, mask, pos, start=0)


def test_a_split_layer_outside_the_range_is_refused_and_the_server_keeps_serving(tiny_gpt2_dir: Path,
                                                                                 tmp_path: Path) -> None:
    with running_server(tiny_gpt2_dir, tmp_path / "server", **RANGE) as h:
        far = spb.Fingerprint()
        far.CopyFrom(fingerprint_for(str(tiny_gpt2_dir), 3, h.config.lora_settings()))
        far.split_layer = 4
        with pytest.raises(grpc.RpcError) as refused:
            join(h, "far", far)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "split layer 4 is outside the server's --split-range 1:3" in refused.value.details()
        assert h.status().clients == []
        assert join(h, "near", fingerprint_for(str(tiny_gpt2_dir), 3, h.config.lora_settings())).reply.session
        assert [c.client_id for c in h.status().clients] == ["near"]
        with pytest.raises(grpc.RpcError) as changed:  # a client keeps its split layer for the whole run
            join(h, "near", fingerprint_for(str(tiny_gpt2_dir), 1, h.config.lora_settings()))
        assert changed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "trains with split layer 3 in this run; it cannot change to 1" in changed.value.details()
        assert join(h, "near", fingerprint_for(str(tiny_gpt2_dir), 3, h.config.lora_settings())).reply.session


def test_a_client_choice_the_range_does_not_allow_is_refused_before_joining(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                            capsys) -> None:
    from splitlora_client.cli import main as client_main

    with running_server(tiny_gpt2_dir, tmp_path / "server", **RANGE) as h:
        base = ["train", "--server", h.address, "--insecure", "--client-id", "c", "--output", str(tmp_path / "c"),
                "--model", str(tiny_gpt2_dir), "--no-progress"]
        assert client_main([*base, "--split-layer", "4"]) == 1
        assert "--split-layer 4 is outside the server's --split-range 1:3" in capsys.readouterr().err
        assert client_main([*base, "--split-layer", "auto", "--max-memory", "1KB"]) == 1
        err = capsys.readouterr().err
        assert "even the smallest split layer of the server's --split-range 1:3 needs" in err
        assert "more than --max-memory 0.0 MiB" in err and "frozen base" in err
        with pytest.raises(SystemExit):  # a usage error, before any contact
            client_main([*base, "--split-layer", "auto"])
        assert "--split-layer auto needs --max-memory" in capsys.readouterr().err
        assert h.status().clients == []  # refused before joining: no slot taken, the server serves on


def test_auto_takes_the_largest_split_layer_that_fits(tiny_gpt2_dir: Path) -> None:
    from splitlora_client.split_choice import choose_split_layer, estimate_memory

    def estimate(k: int):
        return estimate_memory(tiny_gpt2_dir, k, RANGE_LORA, "float32", 4, 64)

    sizes = [estimate(k).total for k in (1, 2, 3)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3  # each block costs memory
    assert choose_split_layer("auto", 2, (1, 3), sizes[1], estimate)[0] == 2
    assert choose_split_layer("auto", 2, (1, 3), sizes[2], estimate)[0] == 3
    assert choose_split_layer("auto", 2, (1, 3), sizes[0], estimate)[0] == 1
    assert choose_split_layer(None, 2, (1, 3), None, estimate) == (2, None)


def test_options_that_do_not_combine_with_a_split_range_are_refused_naming_them() -> None:
    from common.config.engine import ConfigError
    from splitlora_server.options import AggregateConfig, ServeConfig

    base = {"insecure": True, "split_range": "1:3", "split_layer": 2}
    for extra, message in (({"aggregation": "fedex"}, "cannot be combined with --aggregation fedex"),
                           ({"aggregator": "127.0.0.1:1"}, "cannot be combined with --aggregator"),
                           ({"split_range": "3:1"}, "split_range must be K_MIN:K_MAX"),
                           ({"split_range": "2:3", "split_layer": 1}, "split_layer 1 is outside --split-range 2:3")):
        with pytest.raises(ConfigError, match=message):
            ServeConfig(**{**base, **extra}).validate()
    ServeConfig(**base).validate()
    with pytest.raises(ConfigError, match="the aggregator runs in the split server's process"):
        AggregateConfig(**base).validate()
