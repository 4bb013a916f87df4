"""Wire codecs and chunking: error bounds, bytes, validation, and negotiation over real gRPC."""
from __future__ import annotations

from pathlib import Path

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.wire import (CODEC_NAMES, Reassembler, WireError, chunked, codec_from_name, decode_tensor, encode_tensor,
                         serialized)
from splitlora_server.frames import FrameLimits, decode_step
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


def _torch_casts(x: torch.Tensor, codec: int) -> torch.Tensor:
    """What the codecs computed with torch ops before they moved to numpy: the reference."""
    if codec != tpb.CODEC_INT8:
        wire = {tpb.CODEC_RAW: x.dtype, tpb.CODEC_FLOAT16: torch.float16, tpb.CODEC_BFLOAT16: torch.bfloat16}[codec]
        return x.to(wire).to(x.dtype)
    rows = x.float().reshape(x.shape[0], -1)
    scales = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return (torch.round(rows / scales[:, None]).clamp(-127, 127).to(torch.int8).float() * scales[:, None]
            ).reshape(x.shape).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codec", list(CODECS.values()))
def test_numpy_codecs_equal_torch_casts_bit_for_bit(dtype: torch.dtype, codec: int):
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-40 if dtype != torch.float16 else -7, 4, (4, 250), generator=g).float()
    x = torch.cat([torch.randn(4, 250, generator=g) * scale, torch.tensor([[0.0, -0.0, 1e-40, 6e4]] * 4)], 1)
    x = x.to(dtype)
    out = decode_tensor(encode_tensor(x, codec))
    assert out.dtype == dtype and torch.equal(out, _torch_casts(x, codec))


_METADATA_OPS = {"aten::lift_fresh", "aten::empty", "aten::as_strided", "aten::view", "aten::reshape",
                 "aten::_reshape_alias", "aten::alias", "aten::detach", "detach", "aten::_unsafe_view",
                 "aten::resolve_conj", "aten::resolve_neg",  # no data touched
                 "aten::to"}  # Tensor.numpy()'s .cpu() of a CPU tensor; a real conversion shows as aten::_to_copy
_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller element-wise ops never open a parallel region


@pytest.mark.parametrize("codec", list(CODECS.values()))
def test_the_handler_path_runs_no_parallel_torch_op(codec: int):
    """Decoding a step frame and encoding its answer (the gRPC handler thread's work) touch a hidden-sized
    tensor only with metadata ops: the finiteness check and the codecs run in numpy on the raw buffers, so the
    handler thread never gets an OpenMP team of its own beside the compute thread's."""
    batch, seq, width = 4, 64, 768
    hidden = torch.randn(batch, seq, width)
    frame = spb.StepForward(step=0, round=0, hidden=encode_tensor(hidden, codec),
                            attention_mask=encode_tensor(torch.ones(batch, seq, dtype=torch.uint8)),
                            labels=encode_tensor(torch.randint(0, 100, (batch, seq), dtype=torch.int32)),
                            position_ids=encode_tensor(torch.arange(seq, dtype=torch.int32).repeat(batch, 1)))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step = decode_step(frame, FrameLimits(width, 1000, batch, seq, 1024), codec)
        encode_tensor(hidden, codec)
    assert step.hidden.shape == hidden.shape
    large = {e.name for e in prof.events() if any(s and math.prod(s) >= _GRAIN for s in e.input_shapes)}
    assert large <= _METADATA_OPS, f"torch ops on hidden-sized tensors: {sorted(large - _METADATA_OPS)}"


def test_non_finite_values_are_refused_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bad in (float("nan"), float("inf")):
            t = torch.ones(3, 5, dtype=dtype)
            t[1, 2] = bad
            with pytest.raises(WireError, match="NaN or Inf"):
                decode_tensor(encode_tensor(t), name="hidden")
            assert torch.isnan(decode_tensor(encode_tensor(t), require_finite=False)[1, 2]) == (bad != bad)


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


class _Collect:
    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic = handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def test_frames_are_serialized_once_by_construction(builtin_model_dir: Path, tmp_path: Path):
    """The Train stream has no serializers on either side: each frame is serialized once by the sender
    (`serialized`), which counts its bytes with len(), and parsed once by the receiver; nothing serializes
    a frame only to measure it."""
    from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
    from splitlora_server.service import add_to_server
    from splitlora_client.session import SplitSession
    from tests.support.servers import server_fingerprint

    collected = _Collect()
    add_to_server(sgrpc.SplitTrainingServicer(), collected)
    train = collected.handlers["Train"]
    assert train.request_deserializer is None and train.response_serializer is None
    assert collected.handlers["Join"].request_deserializer is not None  # the other methods as generated
    frame = spb.ClientFrame(forward=spb.StepForward(step=3, hidden=encode_tensor(_activations())))
    assert serialized(frame, spb.ClientFrame, 10 << 20) == [frame.SerializeToString()]
    pieces = serialized(frame, spb.ClientFrame, 100_000)
    parts = Reassembler(max_bytes=1 << 30)
    assert spb.ClientFrame.FromString([parts.add(spb.ClientFrame.FromString(p).part) for p in pieces][-1]) == frame
    side = ClientSide(builtin_model_dir)
    batch = side.batch(4)
    with running_server(builtin_model_dir, tmp_path, clients=1) as server:
        session = SplitSession(server.channel, "c")
        session.join(server_fingerprint(server), [tpb.CODEC_RAW])
        queued: list = []
        session._open()
        session._requests.put = queued.append  # what the stream would carry
        sent = session.send(0, 0, side.hidden(batch), batch["attention_mask"], batch["labels"], batch["position_ids"])
        assert queued and all(isinstance(q, bytes) for q in queued) and sent == sum(map(len, queued))
        session.close()


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
    assert reply.grad.codec == tpb.CODEC_INT8 and reply.bytes_received == spb.ClientFrame(forward=forward).ByteSize()
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


@pytest.mark.parametrize("codec", sorted(set(CODEC_NAMES) - {"raw"}))
@pytest.mark.parametrize("float32", [False, True])
def test_a_zero_dimensional_tensor_decodes_with_every_codec(codec: str, float32: bool) -> None:
    """numpy arithmetic on a 0-d array gives a numpy scalar: decoding must still give a tensor (a fuzzed frame
    found this as an UNKNOWN status)."""
    out = decode_tensor(encode_tensor(torch.tensor(1.5), codec_from_name(codec)), float32=float32)
    assert out.shape == () and abs(float(out) - 1.5) < 0.02
