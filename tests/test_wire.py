"""Wire codecs and chunking: error bounds, bytes, validation, and negotiation over real gRPC."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.wire import Reassembler, WireError, chunked, decode_tensor, encode_tensor
from tests.support.servers import ClientSide, grad_of, join, running_server, train_ok, valid_forward

CODECS = {"float32": tpb.CODEC_RAW, "float16": tpb.CODEC_FLOAT16, "bfloat16": tpb.CODEC_BFLOAT16,
          "int8": tpb.CODEC_INT8}


def _activations() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 64, 256, generator=g) * torch.rand(8, 64, 1, generator=g) * 10  # rows of mixed scale


@pytest.mark.parametrize("name", CODECS)
def test_codecs_round_trip_within_their_precision(name: str):
    t = _activations()
    out = decode_tensor(encode_tensor(t, CODECS[name]))
    assert out.dtype == torch.float32 and out.shape == t.shape
    err = (out - t).abs()
    if name == "float32":
        assert torch.equal(out, t)
    elif name == "int8":  # per-row absmax: at most half a quantization step of each row
        assert (err <= t.abs().amax(-1, keepdim=True) / 254 + 1e-6).all()
    else:
        rel = {"float16": 2 ** -11, "bfloat16": 2 ** -8}[name]
        assert (err <= t.abs() * rel + 1e-6).all()


@pytest.mark.parametrize(("name", "ratio"), [("float16", 2.0), ("bfloat16", 2.0), ("int8", 4.0)])
def test_lossy_codecs_cut_the_bytes(name: str, ratio: float):
    t = _activations()
    raw, coded = encode_tensor(t).ByteSize(), encode_tensor(t, CODECS[name]).ByteSize()
    assert raw / coded == pytest.approx(ratio, rel=0.02)  # int8 pays 4 bytes of scale per 256 values


@pytest.mark.parametrize("shape", [(), (5,), (2, 0), (0, 3), (3, 1, 4)])
def test_int8_handles_every_shape(shape: tuple[int, ...]):
    t = torch.randn(shape)
    assert decode_tensor(encode_tensor(t, tpb.CODEC_INT8)).shape == t.shape


def test_integer_tensors_stay_raw_whatever_the_codec():
    labels = torch.tensor([[1, -100, 3]])
    msg = encode_tensor(labels, tpb.CODEC_INT8)
    assert msg.codec == tpb.CODEC_RAW and torch.equal(decode_tensor(msg), labels)


def test_bad_byte_counts_and_scales_are_refused():
    msg = encode_tensor(torch.randn(4, 8), tpb.CODEC_INT8)
    short = tpb.Tensor(); short.CopyFrom(msg); short.scales = msg.scales[:-4]
    with pytest.raises(WireError, match="row scales"):
        decode_tensor(short)
    cut = tpb.Tensor(); cut.CopyFrom(msg); cut.data = msg.data[:-1]
    with pytest.raises(WireError, match="needs 32 bytes, got 31"):
        decode_tensor(cut)


def test_chunked_frames_reassemble_and_refuse_disorder():
    frame = spb.ClientFrame(forward=spb.StepForward(step=3, hidden=encode_tensor(_activations())))
    pieces = list(chunked([frame], spb.ClientFrame, 100_000))
    assert len(pieces) > 1 and all(p.ByteSize() < 100_100 for p in pieces)
    parts = Reassembler(max_bytes=1 << 30)
    results = [parts.add(p.part) for p in pieces]
    assert results[:-1] == [None] * (len(pieces) - 1)
    assert spb.ClientFrame.FromString(results[-1]) == frame
    with pytest.raises(WireError, match="out of order"):
        parts.add(pieces[0].part), parts.add(pieces[2].part)
    assert list(chunked([frame], spb.ClientFrame, 10 << 20)) == [frame]  # small frames travel whole


def test_codec_is_negotiated_and_used_for_both_directions(builtin_model_dir: Path, tmp_path: Path):
    side = ClientSide(builtin_model_dir)
    with running_server(builtin_model_dir, tmp_path / "a", codecs=["float32", "int8"]) as server:
        exact = join(server, "exact", codecs=[tpb.CODEC_FLOAT16, tpb.CODEC_RAW])
        small = join(server, "small", codecs=[tpb.CODEC_INT8, tpb.CODEC_RAW])
        assert (exact.reply.codec, small.reply.codec) == (tpb.CODEC_RAW, tpb.CODEC_INT8)  # float16 not accepted
    with running_server(builtin_model_dir, tmp_path / "b", clients=1, codecs=["int8"]) as server:
        client = join(server, "c", codecs=[tpb.CODEC_INT8])
        forward = valid_forward(side, 0, 3, codec=tpb.CODEC_INT8)
        reply = train_ok(server, client.metadata, forward)[0]
    assert reply.grad.codec == tpb.CODEC_INT8 and reply.bytes_received == forward.ByteSize()
    with running_server(builtin_model_dir, tmp_path / "c", clients=1) as server:
        client = join(server, "c")
        exact_reply = train_ok(server, client.metadata, valid_forward(side, 0, 3))[0]
    assert abs(reply.loss - exact_reply.loss) < 0.01 * exact_reply.loss
    rel = (grad_of(reply) - grad_of(exact_reply)).norm() / grad_of(exact_reply).norm()
    assert rel < 0.05


def test_the_client_sends_integer_tensors_compactly(builtin_model_dir: Path, tmp_path: Path):
    from tests.support.servers import server_fingerprint, step_forward
    from splitlora_client.session import SplitSession

    side = ClientSide(builtin_model_dir)
    batch = side.batch(4)
    hidden = side.hidden(batch)
    with running_server(builtin_model_dir, tmp_path, clients=1) as server:
        session = SplitSession(server.channel, "c")
        session.join(server_fingerprint(server), [tpb.CODEC_INT8])
        result = session.step(0, 0, hidden, batch["attention_mask"], batch["labels"], batch["position_ids"])
        session.close()
    assert result.tokens > 0 and result.grad.shape == hidden.shape
    tokens = batch["attention_mask"].numel()
    wide = step_forward(0, 0, hidden, batch, tpb.CODEC_INT8).ByteSize()  # int64 mask, labels and positions
    assert wide - result.bytes_sent >= 14.9 * tokens  # 1 + 4 + 4 bytes a token instead of 3 x 8
