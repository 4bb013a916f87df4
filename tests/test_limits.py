"""Message limits set deliberately on both ends: negotiated at Join and FetchGlobal, and when a message is too
large anyway, an error that names the end that refused, its limit and the flag that raises it."""
from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from common.limits import ENVELOPE_BYTES, MessageTooLarge
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.wire import WireError, decode_tensor, encode_tensor
from splitlora_client.aggregator import fetch_global, submit_adapter
from splitlora_client.session import SplitSession
from splitlora_server.aggregator.service import AggregatorService
from tests.support.servers import ClientSide, exchange, join, running_server, server_fingerprint, step_forward

SERVER_LIMIT, SERVER_CHUNK = 256 << 10, 64 << 10
CLIENT_LIMIT = 32 << 10


@pytest.fixture(scope="module")
def client(builtin_model_dir: Path) -> ClientSide:
    return ClientSide(builtin_model_dir)


def big_step(client: ClientSide) -> tuple[dict, torch.Tensor]:
    batch = client.batch(4, seed=0, min_width=40)  # 4 x >= 40 x 128 float32 activations: > 80 KiB each way
    return batch, client.hidden(batch)


def session_step(session: SplitSession, batch: dict, hidden: torch.Tensor):
    return session.step(0, 0, hidden, batch["attention_mask"], batch["labels"], batch["position_ids"])


def test_the_server_sends_pieces_that_fit_the_limit_the_client_states(client: ClientSide, builtin_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    batch, hidden = big_step(client)
    with running_server(builtin_model_dir, tmp_path, max_message_bytes=SERVER_LIMIT, chunk_bytes=SERVER_CHUNK,
                        clients=3) as server:
        small = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", CLIENT_LIMIT)])
        session = SplitSession(small, "small", max_message_bytes=CLIENT_LIMIT)
        reply = session.join(server_fingerprint(server), [tpb.CODEC_RAW], timeout=30)
        assert reply.chunk_bytes == CLIENT_LIMIT - ENVELOPE_BYTES and reply.max_message_bytes == SERVER_LIMIT
        result = session_step(session, batch, hidden)
        assert result.grad.shape == hidden.shape and math.isfinite(result.loss)
        assert result.bytes_received > CLIENT_LIMIT  # the gradient came in pieces
        session.close()

        # a client that does not state its limit gets the server's pieces, and is told which flag to raise
        unaware = SplitSession(small, "unaware")
        assert unaware.join(server_fingerprint(server), [tpb.CODEC_RAW], timeout=30).chunk_bytes == SERVER_CHUNK
        with pytest.raises(MessageTooLarge, match=r"this client cannot receive a message of \d+ bytes from the "
                                                  r"split server: its own limit is 32768 bytes; raise this client's "
                                                  r"--max-message-bytes"):
            session_step(unaware, batch, hidden)
        small.close()


def test_a_message_over_the_servers_limit_names_the_server_flag(client: ClientSide, builtin_model_dir: Path,
                                                                tmp_path: Path) -> None:
    batch, hidden = big_step(client)
    with running_server(builtin_model_dir, tmp_path, max_message_bytes=64 << 10, chunk_bytes=16 << 10) as server:
        session = SplitSession(server.channel, "bulky")
        session.join(server_fingerprint(server), [tpb.CODEC_RAW], timeout=30)
        session.reply.chunk_bytes = 1 << 30  # a client that ignores the negotiated piece size
        with pytest.raises(MessageTooLarge) as info:
            session_step(session, batch, hidden)
        assert re.search(r"the split server refused a message of \d+ bytes: its limit is 65536 bytes; raise it "
                         r"with `splitlora-server serve --max-message-bytes`", str(info.value)), str(info.value)
        assert server.client_status("bulky").steps == 0


def test_a_limit_too_small_to_train_is_refused_at_join(builtin_model_dir: Path, tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path) as server:
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Join(spb.JoinRequest(client_id="tiny", fingerprint=server_fingerprint(server),
                                             max_message_bytes=2000), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raise the client's --max-message-bytes" in info.value.details()


def test_hidden_must_use_the_codec_negotiated_at_join(client: ClientSide, builtin_model_dir: Path,
                                                       tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path) as server:
        joined = join(server, "raw-only", codecs=(tpb.CODEC_RAW,))
        batch = client.batch(2, seed=3)
        frame = step_forward(0, 0, client.hidden(batch), batch, codec=tpb.CODEC_FLOAT16)
        _, err = exchange(server, joined.metadata, [spb.ClientFrame(forward=frame)])
        assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hidden is encoded as float16, but float32 was negotiated at Join" in err.details()


def test_aggregator_limits_are_named_too() -> None:
    service = AggregatorService(1, 1, None, chunk_bytes=64 << 10)
    server = grpc.server(ThreadPoolExecutor(4), options=[("grpc.max_receive_message_length", 16 << 10)])
    agrpc.add_AggregatorServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 16 << 10)])
    stub = agrpc.AggregatorStub(channel)
    state = {"m.lora_A.weight": torch.randn(64, 64), "m.lora_B.weight": torch.randn(64, 64)}  # ~32 KiB
    try:
        with pytest.raises(MessageTooLarge, match=r"the aggregator refused a message of \d+ bytes: its limit is 16384 "
                                                  r"bytes; raise it with `splitlora-server aggregate\|serve "
                                                  r"--max-message-bytes`, or send smaller pieces"):
            submit_adapter(stub, "a", 0, 1, state, chunk_bytes=32 << 10, timeout=10)
        submit_adapter(stub, "a", 0, 1, state, chunk_bytes=8 << 10, timeout=10)
        with pytest.raises(MessageTooLarge, match="this client cannot receive"):
            fetch_global(stub, "a", 0, timeout=10)  # the aggregator's 64 KiB pieces
        got, _, _ = fetch_global(stub, "a", 0, timeout=10, max_message_bytes=16 << 10)  # pieces that fit
        assert all(torch.equal(got[k], state[k]) for k in state)
    finally:
        channel.close()
        server.stop(None)


def test_int8_codec_decodes_empty_tensors() -> None:
    """Found by the fuzz test: an empty int8-coded tensor crashed the decoder instead of decoding."""
    for shape in ([0, 4], [4, 0], [0]):
        msg = encode_tensor(torch.zeros(shape), tpb.CODEC_INT8)
        assert decode_tensor(msg).shape == tuple(shape)
        msg.scales += b"\0\0\x80?"  # one scale too many: refused with a reason, not a crash
        with pytest.raises(WireError, match="row scales"):
            decode_tensor(msg)


def test_huge_strings_are_not_echoed_back(builtin_model_dir: Path, tmp_path: Path) -> None:
    """A refusal quotes at most a bounded part of what it refuses, so its status fits in the reply."""
    with running_server(builtin_model_dir, tmp_path) as server:
        fp = spb.Fingerprint()
        fp.CopyFrom(server_fingerprint(server))
        fp.family = "f" * (1 << 20)
        cases = [(spb.JoinRequest(client_id="ok", fingerprint=fp), grpc.StatusCode.FAILED_PRECONDITION),
                 (spb.JoinRequest(client_id="x" * (1 << 20), fingerprint=server_fingerprint(server)),
                  grpc.StatusCode.INVALID_ARGUMENT)]
        for request, code in cases:
            with pytest.raises(grpc.RpcError) as info:
                server.stub.Join(request, timeout=10)
            assert info.value.code() == code and len(info.value.details()) < 1000
        with pytest.raises(grpc.RpcError) as info:
            submit_adapter(agrpc.AggregatorStub(server.channel), "x" * (1 << 20), 0, 1, {"w": torch.ones(1)},
                           timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 1000
