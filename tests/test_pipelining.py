"""Pipelined steps (GPipe semantics): a step's batch sent as micro-batches equals the whole step, through real
gRPC: the same adapters on both sides after a round for 1, 2 and 4 micro-batches, with codecs and chunking;
refusals of micro-batches that do not follow; kill-and-resume mid-step stays bit-identical (real processes)."""
from __future__ import annotations

from pathlib import Path

import json

import grpc
import pytest

from common.loss import target_tokens
from common.rpc.splitlora.v1 import split_pb2 as spb
from splitlora_client.pipeline import micro_rows
from tests.support import procs
from tests.support.procs import CLIENTS, assert_identical, free_port, results, run_all
from tests.support.servers import ClientSide, exchange, join, running_server, server_fingerprint, step_forward
from tests.support.solo import max_diff, solo_run



def test_micro_rows_cover_the_batch_in_order():
    assert micro_rows(8, 1) == [slice(0, 8)]
    assert micro_rows(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert micro_rows(5, 2) == [slice(0, 2), slice(2, 5)]
    assert micro_rows(3, 4) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # never an empty micro-batch


# float32: equal up to summation order (~1e-8 seen). With a lossy codec a rounding boundary of the codec can fall
# between two values that differ in the last float32 bit, so equality holds to the codec's precision (float16:
# ~1e-6 seen).
@pytest.mark.parametrize(("extra", "tolerance"), [({}, 1e-6), ({"codecs": ["float16"], "chunk_bytes": 4096}, 1e-5)],
                         ids=["float32", "float16+chunks"])
def test_pipelined_rounds_equal_whole_steps_on_both_sides(tmp_path: Path, no_dropout_model: Path, extra: dict,
                                                          tolerance: float):
    """2 rounds x 3 steps of batch 4 with one client; the client asks for the micro-batches at Join."""
    exact = {"lora_dropout": 0.0, "model": str(no_dropout_model)}
    runs = {m: solo_run(tmp_path / str(m), seed=3, serve={**exact, "chunk_bytes": extra.get("chunk_bytes", 4 << 20)},
                        micro_batches=m, **exact, **extra) for m in (1, 2, 4)}
    client1, whole1 = runs[1]
    for m in (2, 4):
        client, whole = runs[m]
        assert max_diff(client, client1) < tolerance, f"client adapter, {m} micro-batches"
        assert max_diff(whole, whole1) < tolerance, f"whole-model adapter (both sides), {m} micro-batches"
    steps = [json.loads(line) for line in (tmp_path / "2" / "solo" / "metrics.jsonl").read_text().splitlines()]
    phases = ("forward_s", "send_s", "prepare_s", "wait_s", "decode_s", "backward_s", "optimizer_s")  # the step's parts
    assert all(sum(r[p] for p in phases) <= r["seconds"] + 1e-3 for r in steps if r.get("event") == "step")
    served = [json.loads(line) for line in (tmp_path / "2" / "server" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["micro"]) for r in served] == [(s, m) for s in range(6) for m in range(2)]  # each micro-batch
    assert all(r["server_s"] > 0 and r["decode_s"] > 0 and r["encode_s"] > 0 and r["cpu_s"] >= 0 for r in served)
    if not extra:  # the comparison can fail: another seed trains other adapters
        other = solo_run(tmp_path / "other", seed=4, serve=exact, **exact)[1]
        assert max_diff(other, whole1) > 1e-3


def _micro_frames(side: ClientSide, count: int, step_tokens: int | None = None) -> list[spb.ClientFrame]:
    batch = side.batch(4, seed=1)
    hidden, tokens = side.hidden(batch), target_tokens(batch["labels"])
    frames = []
    for i, rows in enumerate(micro_rows(4, count)):
        fwd = step_forward(0, 0, hidden[rows], {k: v[rows] for k, v in batch.items()})
        fwd.micro, fwd.micro_count, fwd.step_tokens = i, count, tokens if step_tokens is None else step_tokens
        frames.append(spb.ClientFrame(forward=fwd))
    return frames


def test_micro_batches_are_negotiated_and_checked(tmp_path: Path, builtin_model_dir: Path):
    side = ClientSide(builtin_model_dir)
    with running_server(builtin_model_dir, tmp_path, micro_batches=2) as server:
        client = join(server, "a")
        assert client.reply.micro_batches == 2  # the server's default for a client that does not ask
        asked = server.stub.Join(spb.JoinRequest(client_id="b", fingerprint=server_fingerprint(server), micro_batches=4))
        assert asked.micro_batches == 4
        with pytest.raises(grpc.RpcError) as refused:
            server.stub.Join(spb.JoinRequest(client_id="b", fingerprint=server_fingerprint(server), micro_batches=5))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "batch size 4" in refused.value.details()
        frames = _micro_frames(side, 2)
        replies, err = exchange(server, client.metadata, [frames[1]])
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "expects micro-batch 0" in err.details()
        client = join(server, "a")
        replies, err = exchange(server, client.metadata, _micro_frames(side, 4))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 2" in err.details()
        client = join(server, "a")
        replies, err = exchange(server, client.metadata, _micro_frames(side, 2, step_tokens=10_000))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "step_tokens says 10000" in err.details()
        assert [r.micro for r in replies] == [0]  # the first micro-batch was answered, the step never completed
        client = join(server, "a")
        replies, err = exchange(server, client.metadata, _micro_frames(side, 2))
        assert err is None and [(r.step, r.micro) for r in replies] == [(0, 0), (0, 1)]
        whole = sum(r.loss for r in replies)
        status = server.running.registry.clients["a"]
        assert status.next_step == 1 and abs(status.last_loss - whole) < 1e-6


@pytest.fixture(scope="module")
def pipelined_uninterrupted(tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path) -> dict:
    tmp, port = tmp_path_factory.mktemp("pipelined"), free_port()
    run_all([procs.server(tmp, port, "--micro-batches", "2").start(),
             *(procs.client(tmp, name, port).start() for name in CLIENTS)])
    return results(tmp)


def test_kill_and_resume_mid_pipelined_step_stays_bit_identical(tmp_path: Path, pipelined_uninterrupted: dict):
    """The server dies after its 3rd answer (between the two micro-batches of alice's or bob's 2nd step), alice
    inside her step 3; both restart and the run ends with the uninterrupted pipelined run's adapters."""
    port = free_port()
    server = procs.server(tmp_path, port, "--micro-batches", "2", faults=["server:reply=3"])
    alice = procs.client(tmp_path, "alice", port, faults=["client:step=3"])
    run_all([server.start(), alice.start(), procs.client(tmp_path, "bob", port).start()])
    run = results(tmp_path)
    for what, tensors in pipelined_uninterrupted.items():
        assert_identical(run[what], tensors, what)
