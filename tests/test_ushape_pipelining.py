"""Pipelined u-shape steps (GPipe semantics, two exchanges per micro-batch): through real gRPC the same adapters
on both client segments and the server as whole u-shape steps for 1, 2 and 4 micro-batches (padded batches of
the built-in data) and the unsplit model's loss; the activation defenses applied to each micro-batch as in
standard mode; every bad micro-batch frame a gRPC status that leaves nothing behind while another client trains
on; in the engine, micro-batches never stacked with other clients' steps and summing to the whole step."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import grpc
import pytest
import torch

from common.optim import OptimSettings
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.parts import LoraSettings, SplitPart
from common.split.ushape import u_shape_parts
from common.wire import decode_tensor, encode_tensor
from splitlora_bench.privacy_wire import Capture, forward_steps
from splitlora_client.pipeline import micro_rows
from splitlora_server.engine.batching import BatchSettings
from splitlora_server.engine.core import ServerEngine
from splitlora_server.engine.jobs import Step
from tests.support.servers import ClientSide, Harness, join, running_server, server_frames, step_forward
from tests.support.solo import max_diff, solo_run
from tests.support.split_reference import randomize_lora_b

U_SHAPE = {"split_mode": "u-shape", "top_blocks": 1}
K = 2


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, no_dropout_model: Path) -> dict:
    """One client, 2 rounds x 3 steps of batch 4, whole u-shape steps and 2 and 4 micro-batches (and one
    standard-mode run for the loss of the unsplit model)."""
    tmp, exact = tmp_path_factory.mktemp("u-pipelined"), {"lora_dropout": 0.0, "model": str(no_dropout_model)}
    out = {m: (tmp / str(m), *solo_run(tmp / str(m), seed=3, serve={**exact, **U_SHAPE}, micro_batches=m, **exact))
           for m in (1, 2, 4)}
    out["standard"] = (tmp / "standard", *solo_run(tmp / "standard", seed=3, serve=exact, **exact))
    return out


def test_pipelined_u_shape_equals_whole_u_shape_steps(runs: dict) -> None:
    _, client1, whole1 = runs[1]
    assert any(".h.5." in k for k in client1)  # the client's top block is in what is compared
    losses = {m: [r["loss"] for r in _metrics(runs[m][0] / "solo" / "metrics.jsonl") if r["event"] == "step"]
              for m in (1, 2, 4, "standard")}
    for m in (2, 4):
        _, client, whole = runs[m]
        assert max_diff(client, client1) < 1e-6, f"client adapter (both segments), {m} micro-batches"
        assert max_diff(whole, whole1) < 1e-6, f"whole-model adapter (server part too), {m} micro-batches"
        assert max(abs(a - b) for a, b in zip(losses[m], losses[1])) < 1e-5 and len(losses[m]) == 6
    # steps 0 and 1 run on the initial weights (LoRA B = 0; step 0 at learning rate 0): the unsplit model's loss,
    # as the standard-mode server computes it
    assert max(abs(a - b) for a, b in zip(losses[2][:2], losses["standard"][:2])) < 1e-5
    served = _metrics(runs[2][0] / "server" / "metrics.jsonl")  # the server's step log: the order on the wire
    assert [(r["step"], r["micro"], r["answer"]) for r in served] == [
        (s, m, a) for s in range(6) for a in ("top", "backward") for m in range(2)]


def test_defenses_apply_to_each_micro_batch_as_in_standard_mode(tmp_path: Path, no_dropout_model: Path,
                                                                runs: dict) -> None:
    exact, defended = {"lora_dropout": 0.0, "model": str(no_dropout_model)}, {"defense_clip": 0.5,
                                                                               "defense_noise": 0.5}
    sent = {}
    for mode, serve in (("u-shape", U_SHAPE), ("standard", {})):
        capture = Capture()
        solo_run(tmp_path / mode, seed=3, serve={**exact, **serve}, micro_batches=2,
                 observe=lambda channel, c=capture: grpc.intercept_channel(channel, c), **exact, **defended)
        sent[mode] = forward_steps(capture)
    assert len(sent["u-shape"]) == len(sent["standard"]) == 12  # 6 steps of 2 micro-batches each
    for u, std in zip(sent["u-shape"][:4], sent["standard"][:4]):  # steps 0 and 1: the same weights in both modes
        assert u["labels"] is None and std["labels"] is not None
        assert torch.equal(u["hidden"], std["hidden"])  # clipped and noised the same way, micro-batch by micro-batch
    for u in sent["u-shape"]:
        norms = u["hidden"][u["attention_mask"].bool()].norm(dim=-1)
        assert norms.max() > 0.5  # noised (clipping alone would bound every token at 0.5)
    nopeek, _ = solo_run(tmp_path / "nopeek", seed=3, serve={**exact, **U_SHAPE}, micro_batches=2,
                         defense_nopeek=1.0, **exact)
    assert max_diff(nopeek, runs[2][1]) > 1e-4  # NoPeek's term reaches the client's adapter per micro-batch


# -- bad input on a u-shape server with micro-batches -------------------------------------------------------
@pytest.fixture(scope="module")
def u_micro(no_dropout_model: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(no_dropout_model, tmp_path_factory.mktemp("u-micro"), split_layer=K, micro_batches=2,
                        server_adapter_mode="per-client", local_steps=4, lora_dropout=0.0, **U_SHAPE) as harness:
        yield harness


def _forwards(client: ClientSide, step: int, count: int = 2) -> list[spb.ClientFrame]:
    """A u-shape step of real data as `count` micro-batches (no labels, no step_tokens)."""
    batch = client.batch(4, seed=step)
    hidden = client.hidden(batch)
    frames = []
    for i, rows in enumerate(micro_rows(4, count)):
        fwd = step_forward(step, step // 4, hidden[rows], {k: v[rows] for k, v in batch.items()})
        fwd.ClearField("labels")
        fwd.micro, fwd.micro_count = i, count
        frames.append(spb.ClientFrame(forward=fwd))
    return frames


def _top_grad(forward: spb.ClientFrame, extra_width: int = 0, value: float | None = None) -> spb.ClientFrame:
    """A (random) top-cut gradient for a micro-batch's forward, `extra_width` positions too wide, `value` in it."""
    fwd = forward.forward
    rows, width, hidden = decode_tensor(fwd.hidden).shape
    grad = torch.randn(rows, width + extra_width, hidden, generator=torch.Generator().manual_seed(10 * fwd.step + fwd.micro)) * 1e-2
    if value is not None:
        grad[0, 0, 0] = value
    return spb.ClientFrame(top_grad=spb.StepTopGrad(step=fwd.step, micro=fwd.micro, grad=encode_tensor(grad)))


def _good_step(harness: Harness, md, client: ClientSide, step: int) -> None:
    """Both micro-batches' forwards first, then their top-cut gradients, on one stream (as the client sends them)."""
    forwards = _forwards(client, step)
    replies, err = server_frames(harness, md, [*forwards, *map(_top_grad, forwards)])
    assert err is None, err
    assert [(r.WhichOneof("kind"), getattr(r, r.WhichOneof("kind")).micro) for r in replies] == [
        ("top", 0), ("top", 1), ("backward", 0), ("backward", 1)]


def test_bad_micro_batch_frames_are_refused_and_leave_nothing_behind(u_micro: Harness, no_dropout_model: Path
                                                                     ) -> None:
    client = ClientSide(no_dropout_model, split_layer=K, lora=LoraSettings(dropout=0.0))
    alice, bob = join(u_micro, "alice"), join(u_micro, "bob")
    _good_step(u_micro, bob.metadata, client, 0)
    _good_step(u_micro, alice.metadata, client, 0)
    before = u_micro.running.engine.adapter_of("alice")
    f0, f1 = _forwards(client, 1)

    def refused(frames: list[spb.ClientFrame], code: grpc.StatusCode, said: str) -> None:
        _, err = server_frames(u_micro, alice.metadata, frames)  # the same session: no rejoin in between
        assert err is not None and err.code() == code and said in err.details(), err
        assert all(torch.equal(a, b) for a, b in zip(u_micro.running.engine.adapter_of("alice").values(),
                                                     before.values()))
        assert u_micro.client_status("alice").steps == 1

    precondition, invalid = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
    refused([f1], precondition, "expects micro-batch 0")
    refused([f0, _top_grad(f1)], precondition,
            "a top-cut gradient for micro-batch 1 of step 1 arrived, but micro-batch 0 of step 1 (sent first)")
    refused([f0, f0], precondition, "micro-batch 0 of step 1 awaits its top-cut gradient")
    refused([f0, f1, _top_grad(f0, extra_width=1)], invalid, "top-cut grad has shape")
    refused([f0, _top_grad(f0, value=float("nan"))], invalid, "NaN or Inf")
    refused(_forwards(client, 1, count=4)[:1], invalid, "at most 2 were negotiated")
    # micro-batch 0 backpropagated (its gradient held), then a new forward while micro-batch 1 awaits its gradient
    refused([f0, f1, _top_grad(f0), f0], precondition, "micro-batch 1 of step 1 awaits its top-cut gradient")
    _good_step(u_micro, bob.metadata, client, 1)  # bob trains on
    _good_step(u_micro, alice.metadata, client, 1)  # and alice redoes step 1 on the same session
    alice_after, bob_after = (u_micro.running.engine.adapter_of(c) for c in ("alice", "bob"))
    assert max_diff(alice_after, before) > 0  # step 1 trained (learning rate > 0)
    assert all(torch.equal(alice_after[k], bob_after[k]) for k in bob_after)  # nothing of the refused tries in it


# -- the engine: micro-batches with batching on ---------------------------------------------------------------
def test_u_shape_micro_batches_run_alone_and_sum_to_the_whole_step(tiny_gpt2_dir: Path) -> None:
    """b and c (whole u-shape steps) waiting with a's two micro-batches: b and c are stacked, the micro-batches
    run alone, and their accumulated update equals a's whole step (with the same top-cut gradient) run after b+c."""
    gen = torch.Generator().manual_seed(0)

    def u_step(client: str, rows: int) -> Step:
        mask = torch.ones(rows, 6, dtype=torch.int64)
        mask[-1, 4:] = 0  # padding
        return Step(client, 1, torch.randn(rows, 6, 32, generator=gen), mask, (mask.cumsum(-1) - 1).clamp(min=0),
                    None, top_grad=torch.randn(rows, 6, 32, generator=gen) * (mask.unsqueeze(-1)))

    b, c, a = u_step("b", 2), u_step("c", 3), u_step("a", 4)
    micro = [dataclasses.replace(a, hidden=a.hidden[r], attention_mask=a.attention_mask[r],
                                 position_ids=a.position_ids[r], top_grad=a.top_grad[r], micro=i, micro_count=2)
             for i, r in enumerate(micro_rows(4, 2))]
    results = {}
    for name, a_steps in (("whole", [a]), ("micro", micro)):
        part = SplitPart(tiny_gpt2_dir, u_shape_parts(tiny_gpt2_dir, 1, 1)[1], None, LoraSettings(dropout=0.0),
                         lora_seed=5)
        randomize_lora_b(part, seed=11)
        engine = ServerEngine(part, "shared", OptimSettings(learning_rate=1e-2, warmup_steps=0, total_steps=10),
                              batching=BatchSettings(max_clients=8)).start()
        try:
            gate = threading.Event()
            engine.call(gate.wait)  # the worker finds every step waiting at once (the whole step: b and c's)
            futures = [engine.submit_step(s) for s in (b, c, *(a_steps if name == "micro" else []))]
            gate.set()
            grads = [f.result(timeout=60).grad for f in futures]
            grads += [engine.submit_step(a).result(timeout=60).grad] if name == "whole" else []  # after b+c, alone
            results[name] = (engine.server_adapter(), torch.cat(grads[2:]), dict(engine.batch_sizes))
        finally:
            engine.stop()
    (whole, whole_grad, whole_sizes), (pipelined, micro_grad, micro_sizes) = results["whole"], results["micro"]
    assert whole_sizes == micro_sizes == {2: 1, 1: 1}  # b+c stacked, a alone (whole, or as its micro-batches)
    assert max_diff(pipelined, whole) < 1e-6
    torch.testing.assert_close(micro_grad, whole_grad, atol=1e-6, rtol=1e-5)
