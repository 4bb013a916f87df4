"""U-shape mode on a real server over gRPC: the two exchanges of a step, every refusal a gRPC status that changes
nothing (standard frames to a u-shape server and the reverse, a wrong J, a missing or malformed top-cut gradient)
while another client trains on."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch

from common.fingerprint import compute_fingerprint
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.wire import decode_tensor, encode_tensor
from tests.support.servers import ClientSide, Harness, join, running_server, server_frames, valid_forward

K, J = 2, 1


@pytest.fixture(scope="module")
def u_server(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(builtin_model_dir, tmp_path_factory.mktemp("u"), split_mode="u-shape", top_blocks=J,
                        split_layer=K, server_adapter_mode="per-client", local_steps=4) as harness:
        yield harness


@pytest.fixture(scope="module")
def client(builtin_model_dir: Path) -> ClientSide:
    return ClientSide(builtin_model_dir, split_layer=K)


def _fingerprint(harness: Harness, u_shape: bool = True, top_blocks: int = J) -> spb.Fingerprint:
    cfg = harness.config
    return compute_fingerprint(harness.running.part.model_dir, K, cfg.lora_settings(), u_shape, top_blocks)


def _unlabelled(fwd: spb.StepForward) -> spb.StepForward:
    """A copy of `fwd` without labels, as a u-shape client sends it."""
    copy = spb.StepForward()
    copy.CopyFrom(fwd)
    copy.ClearField("labels")
    return copy


def _adapter(harness: Harness, client_id: str) -> dict[str, torch.Tensor]:
    return harness.running.engine.adapter_of(client_id)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _good_step(harness: Harness, md, client: ClientSide, step: int) -> spb.StepBackward:
    """A whole u-shape step by the protocol: forward (no labels), top activations back, a top-cut gradient out."""
    fwd = _unlabelled(valid_forward(client, step, harness.config.local_steps))
    replies, err = server_frames(harness, md, [spb.ClientFrame(forward=fwd)])
    # one stream per exchange here: a stream that ends is not an error, and the server keeps the awaited step
    assert err is None and [r.WhichOneof("kind") for r in replies] == ["top"], err
    top = decode_tensor(replies[0].top.hidden, name="top")
    assert top.shape == decode_tensor(fwd.hidden).shape
    grad = torch.randn(top.shape, generator=torch.Generator().manual_seed(step)) * 1e-2
    replies, err = server_frames(harness, md, [spb.ClientFrame(top_grad=spb.StepTopGrad(step=step,
                                                                                 grad=encode_tensor(grad)))])
    assert err is None and [r.WhichOneof("kind") for r in replies] == ["backward"], err
    back = replies[0].backward
    assert (back.loss, back.tokens) == (0.0, 0)  # the server never sees the loss
    assert decode_tensor(back.grad).shape == top.shape and decode_tensor(back.grad).abs().sum() > 0
    return back


def test_join_refuses_a_standard_client_and_a_wrong_j(u_server: Harness) -> None:
    for fp, said in ((_fingerprint(u_server, u_shape=False), "split mode: server u-shape, client standard"),
                     (_fingerprint(u_server, top_blocks=J + 1), f"client top blocks (J): server {J}, client {J + 1}")):
        with pytest.raises(grpc.RpcError) as err:
            join(u_server, "stranger", fp)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and said in err.value.details()


def test_bad_frames_are_refused_and_change_nothing_while_another_client_trains(u_server: Harness,
                                                                               client: ClientSide) -> None:
    alice, bob = join(u_server, "alice", _fingerprint(u_server)), join(u_server, "bob", _fingerprint(u_server))
    local = u_server.config.local_steps
    _good_step(u_server, bob.metadata, client, 0)
    before = _adapter(u_server, "alice")

    def refused(frames: list[spb.ClientFrame], code: grpc.StatusCode, said: str) -> None:
        _, err = server_frames(u_server, alice.metadata, frames)
        assert err is not None and err.code() == code and said in err.details(), err
        assert _same(_adapter(u_server, "alice"), before)
        assert u_server.client_status("alice").steps == 0

    labelled = valid_forward(client, 0, local)  # a standard-mode client's frame: it carries the labels
    refused([spb.ClientFrame(forward=labelled)], grpc.StatusCode.INVALID_ARGUMENT,
            "labels are refused in u-shape mode")
    grad = spb.StepTopGrad(step=0, grad=encode_tensor(torch.zeros(4, 8, 64)))
    refused([spb.ClientFrame(top_grad=grad)], grpc.StatusCode.FAILED_PRECONDITION, "no step awaits one")
    fwd = _unlabelled(valid_forward(client, 0, local))
    refused([spb.ClientFrame(forward=fwd), spb.ClientFrame(forward=fwd)], grpc.StatusCode.FAILED_PRECONDITION,
            "step 0 awaits its top-cut gradient")  # the top-cut gradient is missing
    hidden = decode_tensor(fwd.hidden)
    wrong = spb.StepTopGrad(step=0, grad=encode_tensor(torch.zeros(hidden.shape[0], hidden.shape[1] + 1, hidden.shape[2])))
    refused([spb.ClientFrame(forward=fwd), spb.ClientFrame(top_grad=wrong)], grpc.StatusCode.INVALID_ARGUMENT,
            "top-cut grad has shape")
    refused([spb.ClientFrame(forward=fwd), spb.ClientFrame(top_grad=spb.StepTopGrad(step=0))],
            grpc.StatusCode.INVALID_ARGUMENT, "top-cut grad is missing")

    _good_step(u_server, bob.metadata, client, 1)  # bob trains on
    alice = join(u_server, "alice", _fingerprint(u_server))  # and alice, after rejoining, too
    _good_step(u_server, alice.metadata, client, 0)
    _good_step(u_server, alice.metadata, client, 1)  # (step 0 trains at learning rate 0: the warm-up starts there)
    assert not _same(_adapter(u_server, "alice"), before)
    assert u_server.client_status("alice").steps == 2 and u_server.client_status("bob").steps == 2
    logged = [json.loads(line) for line in (Path(u_server.config.output) / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["answer"]) for r in logged if r["client"] == "bob"] == [
        (0, "top"), (0, "backward"), (1, "top"), (1, "backward")]  # the server's step log: both exchanges


def test_a_standard_server_refuses_u_shape_frames(builtin_model_dir: Path, tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path, split_layer=K) as harness:
        client = ClientSide(builtin_model_dir, split_layer=K)
        joined = join(harness, "carol")
        before = harness.running.engine.server_adapter()
        fwd = valid_forward(client, 0, harness.config.local_steps)
        for frames, said in (([spb.ClientFrame(forward=_unlabelled(fwd))], "labels is missing"),
                             ([spb.ClientFrame(top_grad=spb.StepTopGrad(step=0, grad=fwd.hidden))],
                              "the server runs --split-mode standard")):
            _, err = server_frames(harness, joined.metadata, frames)
            assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT and said in err.details()
            assert _same(harness.running.engine.server_adapter(), before)
        replies, err = server_frames(harness, joined.metadata, [spb.ClientFrame(forward=fwd)])  # a standard step still works
        assert err is None and replies[0].backward.tokens > 0
