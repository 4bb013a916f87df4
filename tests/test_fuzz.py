"""Hostile input, generated: thousands of malformed or random handshakes, frames and uploads to a live server.

One split server (with its in-process aggregator) on loopback receives FUZZ_CASES calls built by
hypothesis: random bytes as the request of every method, Join requests with random ids, fingerprints,
codecs and limits, Train streams of random, nearly valid and chunked frames (with the sessions of real
clients or with random metadata), and Submit streams of random uploads. Every call must end with a gRPC
status the server chose (never UNKNOWN, which is an uncaught exception, never UNAVAILABLE or a timeout);
afterwards the server is still healthy and trains a legitimate client correctly.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.lora import to_bytes
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.wire import chunked
from tests.support.servers import ClientSide, Harness, join, metadata, running_server, train_ok, valid_forward

# The number of generated cases of each kind (the test checks that exactly these many were sent).
FUZZ_CASES = {"raw": 600, "join": 600, "train": 1500, "submit": 400}
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
CALL_TIMEOUT = 20.0
HIDDEN, VOCAB, POSITIONS, BATCH, LOCAL_STEPS = 128, 128, 128, 4, 3
FUZZ_CLIENTS = 6
Code = grpc.StatusCode
NEVER = {Code.UNKNOWN, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, Code.CANCELLED}
METHODS = {  # full name -> (request streaming, response streaming)
    "/splitlora.v1.SplitTraining/Join": (False, False), "/splitlora.v1.SplitTraining/Train": (True, True),
    "/splitlora.v1.SplitTraining/Status": (False, False), "/splitlora.v1.Aggregator/Submit": (True, False),
    "/splitlora.v1.Aggregator/FetchGlobal": (False, True),
}


# -- strategies ------------------------------------------------------------------------------------------------
@st.composite
def float_bytes(draw, numel: int, dtype: int) -> bytes:
    """numel values of a float dtype: ordinary, extreme, NaN/Inf or arbitrary bit patterns."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    style = draw(st.sampled_from(["normal", "huge", "special", "bits"]))
    np_dtype = {tpb.DTYPE_FLOAT16: np.float16, tpb.DTYPE_BFLOAT16: np.int16}.get(dtype, np.float32)
    if style == "bits" or np_dtype is np.int16:
        return rng.integers(0, 256, numel * np.dtype(np_dtype).itemsize, dtype=np.uint8).tobytes()
    values = rng.standard_normal(numel) * (1e30 if style == "huge" else 1.0)
    if style == "special" and numel:
        values[rng.integers(0, numel)] = rng.choice([np.nan, np.inf, -np.inf])
    with np.errstate(over="ignore"):  # huge values become Inf in float16: one more kind of bad input
        return values.astype(np_dtype).tobytes()


@st.composite
def int_bytes(draw, numel: int, dtype: int, low: int, high: int) -> bytes:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    np_dtype = {tpb.DTYPE_INT32: np.int32, tpb.DTYPE_INT8: np.int8, tpb.DTYPE_UINT8: np.uint8,
                tpb.DTYPE_BOOL: np.bool_}.get(dtype, np.int64)
    values = rng.integers(low, high, numel) if numel else np.zeros(0)
    return values.astype(np_dtype).tobytes()


def junk_tensor() -> st.SearchStrategy[tpb.Tensor]:
    """Anything at all: shapes, dtypes and codecs out of range, byte counts that do not match."""
    return st.builds(tpb.Tensor, shape=st.lists(st.integers(-5, 1 << 40), max_size=10),
                     dtype=st.integers(0, 12), codec=st.integers(0, 7), data=st.binary(max_size=512),
                     scales=st.binary(max_size=32))


@st.composite
def sized_tensor(draw, shape: tuple[int, ...], kind: str) -> tpb.Tensor:
    """A tensor whose bytes fit its shape (so validation looks at the values), sometimes in a lossy codec."""
    numel = math.prod(shape)
    if kind == "float":
        dtype = draw(st.sampled_from([tpb.DTYPE_FLOAT32] * 4 + [tpb.DTYPE_FLOAT16, tpb.DTYPE_BFLOAT16,
                                                                  tpb.DTYPE_INT64]))
        codec = draw(st.sampled_from([tpb.CODEC_RAW] * 4 + [tpb.CODEC_FLOAT16, tpb.CODEC_INT8]))
        if dtype == tpb.DTYPE_INT64:
            return tpb.Tensor(shape=shape, dtype=dtype, codec=tpb.CODEC_RAW,
                              data=draw(int_bytes(numel, dtype, -5, 5)))
        if codec == tpb.CODEC_INT8:
            rows = numel // shape[-1] if shape and shape[-1] else 1
            data = draw(int_bytes(numel, tpb.DTYPE_INT8, -127, 128))
            return tpb.Tensor(shape=shape, dtype=dtype, codec=codec, data=data,
                              scales=draw(float_bytes(rows, tpb.DTYPE_FLOAT32)))
        wire = tpb.DTYPE_FLOAT16 if codec == tpb.CODEC_FLOAT16 else dtype
        return tpb.Tensor(shape=shape, dtype=dtype, codec=codec, data=draw(float_bytes(numel, wire)))
    dtype = draw(st.sampled_from([tpb.DTYPE_INT64] * 4 + [tpb.DTYPE_INT32, tpb.DTYPE_UINT8, tpb.DTYPE_BOOL,
                                                            tpb.DTYPE_FLOAT32]))
    low, high = {"mask": (0, 2), "labels": (-101, VOCAB + 2), "positions": (-1, POSITIONS + 2)}[kind]
    low, high = draw(st.sampled_from([(low, high), (0, 1), (-(2**31), 2**31)]))
    if dtype == tpb.DTYPE_FLOAT32:
        return tpb.Tensor(shape=shape, dtype=dtype, data=draw(float_bytes(numel, dtype)))
    if dtype in (tpb.DTYPE_UINT8, tpb.DTYPE_BOOL):
        low, high = 0, 2
    return tpb.Tensor(shape=shape, dtype=dtype, data=draw(int_bytes(numel, dtype, low, high)))


@st.composite
def step_forward(draw) -> spb.StepForward:
    """A StepForward that is nearly valid in random ways."""
    b, s = draw(st.integers(0, BATCH + 1)), draw(st.integers(0, 12))
    h = draw(st.sampled_from([HIDDEN] * 6 + [HIDDEN // 2, 1]))
    hidden_shape = draw(st.sampled_from([(b, s, h)] * 6 + [(b, s), (b * s * h,), (1, b, s, h)]))

    def part(shape: tuple[int, ...], kind: str) -> st.SearchStrategy:
        return st.one_of(sized_tensor(shape, kind), sized_tensor(shape, kind), sized_tensor(shape, kind),
                         junk_tensor(), st.none())

    tensors = {"hidden": draw(part(hidden_shape, "float")),
               "attention_mask": draw(part(draw(st.sampled_from([(b, s)] * 4 + [(s, b), (b, s + 1)])), "mask")),
               "labels": draw(part((b, s), "labels")), "position_ids": draw(part((b, s), "positions"))}
    fwd = spb.StepForward(step=draw(st.sampled_from([0, 0, 0, 1, 2, 5, 2**63])), round=draw(st.sampled_from(
        [0, 0, 0, 1, 7, 2**31])))
    for name, tensor in tensors.items():
        if tensor is not None:
            getattr(fwd, name).CopyFrom(tensor)
    return fwd


@st.composite
def client_frames(draw) -> list[spb.ClientFrame]:
    """1-3 frames: whole forwards, their pieces (sometimes shuffled or corrupted), random pieces, empty frames."""
    frames: list[spb.ClientFrame] = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["forward"] * 5 + ["pieces", "random-part", "empty"]))
        if kind == "forward":
            frames.append(spb.ClientFrame(forward=draw(step_forward())))
        elif kind == "pieces":
            pieces = list(chunked([spb.ClientFrame(forward=draw(step_forward()))], spb.ClientFrame, 1024))
            if pieces and draw(st.booleans()):
                i = draw(st.integers(0, len(pieces) - 1))
                pieces[i].part.data = draw(st.binary(max_size=64)) if pieces[i].HasField("part") else b""
            frames += draw(st.permutations(pieces)) if draw(st.booleans()) else pieces
        elif kind == "random-part":
            frames.append(spb.ClientFrame(part=tpb.FramePart(
                message_id=draw(st.integers(0, 2**64 - 1)), index=draw(st.integers(0, 3)),
                count=draw(st.sampled_from([0, 1, 2, 2**32 - 1])), data=draw(st.binary(max_size=256)))))
        else:
            frames.append(spb.ClientFrame())
    return frames


ids = st.one_of(st.text(max_size=70), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True))
fingerprints = st.builds(spb.Fingerprint, family=st.sampled_from(["gpt2", "", "llama"]), config_sha256=st.text(
    max_size=64), split_layer=st.integers(0, 2**32 - 1), hidden_size=st.integers(0, 2**32 - 1))


# -- the server and the calls ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(builtin_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    with running_server(builtin_model_dir, tmp_path_factory.mktemp("fuzz"), clients=64, rounds=1000, max_workers=32,
                        max_message_bytes=1 << 20, chunk_bytes=64 << 10) as harness:
        yield harness


class Fuzzer:
    """Sends cases to the live server and checks that each is answered with a status the server chose."""

    def __init__(self, harness: Harness) -> None:
        self.harness, self.sent = harness, dict.fromkeys(FUZZ_CASES, 0)
        self.agg = agrpc.AggregatorStub(harness.channel)
        self.sessions = [join(harness, f"fz-{i}").metadata for i in range(FUZZ_CLIENTS)]
        self.codes: dict[str, int] = {}

    def answered(self, kind: str, call) -> None:
        self.sent[kind] += 1
        try:
            result = call()
            if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
                list(result)
            code = Code.OK
        except grpc.RpcError as err:
            code = err.code()
            assert code not in NEVER, f"{kind}: {code.name}: {err.details()}"
            assert code != Code.INTERNAL or kind == "raw", f"{kind}: INTERNAL: {err.details()}"
        self.codes[code.name] = self.codes.get(code.name, 0) + 1

    def raw(self, method: str, payloads: list[bytes]) -> None:
        req_stream, resp_stream = METHODS[method]
        kind = ("stream_" if req_stream else "unary_") + ("stream" if resp_stream else "unary")
        fn = getattr(self.harness.channel, kind)(method, request_serializer=lambda b: b,
                                                 response_deserializer=lambda b: b)
        request = iter(payloads) if req_stream else payloads[0]
        self.answered("raw", lambda: fn(request, timeout=CALL_TIMEOUT if method.endswith("Submit") else 2.0)
                      if not method.endswith("FetchGlobal") else _fetch_quick(fn, request))


def _fetch_quick(fn, request):
    """FetchGlobal waits for its round to close; a short deadline there is the expected answer."""
    try:
        return list(fn(request, timeout=0.3))
    except grpc.RpcError as err:
        if err.code() != Code.DEADLINE_EXCEEDED:
            raise
        return []


# -- the test --------------------------------------------------------------------------------------------------
def test_fuzzed_calls_are_all_answered_and_the_server_still_trains(server: Harness, builtin_model_dir: Path) -> None:
    fuzzer = Fuzzer(server)
    legit = join(server, "legit")  # enrolled before the fuzzing, which may fill every other slot
    stub = server.stub

    @settings(max_examples=FUZZ_CASES["raw"], **SETTINGS)
    @given(method=st.sampled_from(sorted(METHODS)), payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
    def raw(method: str, payloads: list[bytes]) -> None:
        fuzzer.raw(method, payloads)

    @settings(max_examples=FUZZ_CASES["join"], **SETTINGS)
    @given(client_id=ids, fingerprint=st.one_of(st.none(), fingerprints),
           codecs=st.lists(st.integers(-3, 9), max_size=5),
           limit=st.sampled_from([0, 1, 5000, 5120, 1 << 20, 2**64 - 1]), same_model=st.booleans())
    def handshake(client_id: str, fingerprint, codecs: list[int], limit: int, same_model: bool) -> None:
        fp = server.running.service.fingerprint if same_model else fingerprint
        request = spb.JoinRequest(client_id=client_id, fingerprint=fp, codecs=codecs, max_message_bytes=limit)
        fuzzer.answered("join", lambda: stub.Join(request, timeout=CALL_TIMEOUT))

    @settings(max_examples=FUZZ_CASES["train"], **SETTINGS)
    @given(frames=client_frames(), who=st.integers(0, FUZZ_CLIENTS + 1), aligned=st.sampled_from([True] * 3 + [False]),
           session=st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
    def train(frames: list[spb.ClientFrame], who: int, aligned: bool, session: str) -> None:
        md = fuzzer.sessions[who] if who < FUZZ_CLIENTS else (None if who == FUZZ_CLIENTS else
                                                              metadata(f"fz-{who % FUZZ_CLIENTS}", session))
        if aligned and who < FUZZ_CLIENTS:  # the step the server expects next, so the frame's contents are checked
            expected = server.running.registry.clients[f"fz-{who}"].next_step
            for frame in frames:
                if frame.HasField("forward"):
                    frame.forward.step, frame.forward.round = expected, expected // LOCAL_STEPS
        fuzzer.answered("train", lambda: stub.Train(iter(frames), metadata=md, timeout=CALL_TIMEOUT))

    @settings(max_examples=FUZZ_CASES["submit"], **SETTINGS)
    @given(client_id=st.sampled_from(["fz-0", "fz-1", "", "nobody"]), rnd=st.sampled_from([0, 1, 2, 2**32 - 1]),
           samples=st.sampled_from([0, 1, 2**64 - 1]), body=st.one_of(
               st.binary(max_size=400), st.builds(lambda n: to_bytes({"w": torch.full((2, 2), n)}),
                                                  st.sampled_from([0.0, float("nan"), 1e38])),
               st.builds(lambda b: (8).to_bytes(8, "little") + b, st.binary(max_size=64))))
    def submit(client_id: str, rnd: int, samples: int, body: bytes) -> None:
        upload = apb.AdapterUpload(client_id=client_id, round=rnd, num_samples=samples, safetensors_chunk=body)
        fuzzer.answered("submit", lambda: fuzzer.agg.Submit(iter([upload]), timeout=CALL_TIMEOUT))

    for run in (raw, handshake, train, submit):
        run()
    assert fuzzer.sent == FUZZ_CASES, fuzzer.sent
    assert sum(fuzzer.codes.values()) == sum(FUZZ_CASES.values()) >= 3000
    assert fuzzer.codes.get("INVALID_ARGUMENT", 0) > 1000, fuzzer.codes  # most cases reached the validation

    # the server is alive and healthy, and trains a legitimate client correctly
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    client = ClientSide(builtin_model_dir)
    before = server.client_status("legit")
    assert (before.steps, before.last_error) == (0, "")
    replies = train_ok(server, legit.metadata, *[valid_forward(client, s, LOCAL_STEPS) for s in range(LOCAL_STEPS)])
    assert all(math.isfinite(r.loss) and r.tokens > 0 for r in replies)
    after = server.client_status("legit")
    assert (after.steps, after.round, after.last_error) == (LOCAL_STEPS, 1, "")
