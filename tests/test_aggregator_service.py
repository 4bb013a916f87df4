"""Tests for splitlora_server.aggregator.service through real gRPC on loopback: rounds, fetch, errors, chunking."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import torch
from safetensors.torch import load_file

from common.lora import to_bytes
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from splitlora_client.aggregator import fetch_global, submit_adapter
from splitlora_server.aggregator.service import KEEP_IN_MEMORY, AggregatorService
from tests.support.loopback import adapter, aggregators, rpc_error

Code = grpc.StatusCode
Start = Callable[..., tuple[AggregatorService, agrpc.AggregatorStub]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start an aggregator on a loopback port; return (service, stub). Everything is stopped afterwards."""
    yield from aggregators(restore=False, workers=16)


def raw_submit(stub: agrpc.AggregatorStub, *messages: apb.AdapterUpload) -> apb.SubmitReply:
    return stub.Submit(iter(messages), timeout=5)


def test_fetch_blocks_until_round_closes_then_returns_weighted_average(start: Start, tmp_path: Path) -> None:
    closed: list[tuple[int, dict]] = []
    service, stub = start(output_dir=tmp_path, on_round_closed=lambda r, s: closed.append((r, s)))
    reply = submit_adapter(stub, "alice", 0, 1, adapter(1.0), timeout=5)
    assert (reply.round, reply.submitted, reply.expected) == (0, 1, 2)
    with ThreadPoolExecutor(1) as pool:
        fetch = pool.submit(fetch_global, stub, "alice", 0, timeout=5)
        time.sleep(0.2)
        assert not fetch.done() and service.open_round == 0
        assert submit_adapter(stub, "bob", 0, 3, adapter(5.0), timeout=5).submitted == 2
        state, num_clients, total_samples = fetch.result(timeout=5)
    assert (num_clients, total_samples) == (2, 4)
    assert torch.equal(state["m.lora_A.weight"], torch.full((2, 3), 4.0))  # 0.25 * 1 + 0.75 * 5
    assert torch.equal(state["m.lora_B.weight"], torch.full((3, 2), 8.0))
    on_disk = load_file(tmp_path / "global" / "round-0000.safetensors")
    assert all(torch.equal(on_disk[k], state[k]) for k in state)
    assert closed[0][0] == 0 and torch.equal(closed[0][1]["m.lora_A.weight"], state["m.lora_A.weight"])
    assert service.open_round == 1 and service.closed_rounds == (0,) and not service.finished
    assert service.fetched(0) == {"alice"} and service.wait_until_closed(0, timeout=0)
    assert torch.equal(service.global_adapter(0)["m.lora_A.weight"], state["m.lora_A.weight"])


def test_three_clients_over_all_rounds(start: Start) -> None:
    service, stub = start(expected_clients=3, rounds=2)
    for r in range(2):
        for cid, n, v in (("a", 1, 0.0), ("b", 2, 3.0), ("c", 5, 6.0)):
            submit_adapter(stub, cid, r, n, adapter(v + r), timeout=5)
        state, num_clients, total = fetch_global(stub, "c", r, timeout=5)
        assert (num_clients, total) == (3, 8)
        expected = (1 * 0.0 + 2 * 3.0 + 5 * 6.0) / 8 + r  # 4.5 + r
        assert torch.allclose(state["m.lora_A.weight"], torch.full((2, 3), expected))
    assert service.finished and service.closed_rounds == (0, 1)
    assert not service.wait_until_closed(2, timeout=0)


def test_header_errors(start: Start) -> None:
    _, stub = start(is_enrolled=lambda cid: cid != "mallory")
    data = to_bytes(adapter(1.0))
    cases = [
        (Code.INVALID_ARGUMENT, "client_id is empty", [apb.AdapterUpload(round=0, num_samples=1, safetensors_chunk=data)]),
        (Code.INVALID_ARGUMENT, "stream was empty", []),
        (Code.PERMISSION_DENIED, "not enrolled", [apb.AdapterUpload(client_id="mallory", num_samples=1)]),
        (Code.INVALID_ARGUMENT, "num_samples=0", [apb.AdapterUpload(client_id="a", safetensors_chunk=data)]),
        (Code.OUT_OF_RANGE, "0..2", [apb.AdapterUpload(client_id="a", round=3, num_samples=1)]),
        (Code.FAILED_PRECONDITION, "round 1 is not open yet", [apb.AdapterUpload(client_id="a", round=1, num_samples=1)]),
        (Code.INVALID_ARGUMENT, "num_samples=2", [apb.AdapterUpload(client_id="a", num_samples=1, safetensors_chunk=data[:5]),
                                                  apb.AdapterUpload(num_samples=2, safetensors_chunk=data[5:])]),
        (Code.INVALID_ARGUMENT, "client_id='b'", [apb.AdapterUpload(client_id="a", num_samples=1, safetensors_chunk=data[:5]),
                                                  apb.AdapterUpload(client_id="b", safetensors_chunk=data[5:])]),
    ]
    for code, text, messages in cases:
        err = rpc_error(raw_submit, stub, *messages)
        assert err.code() == code and text in err.details(), (code, text, err.details())
    # repeating the same header on later messages is fine
    reply = raw_submit(stub, apb.AdapterUpload(client_id="a", num_samples=1, safetensors_chunk=data[:5]),
                       apb.AdapterUpload(client_id="a", num_samples=1, safetensors_chunk=data[5:]))
    assert reply.submitted == 1


def test_round_state_errors(start: Start) -> None:
    _, stub = start()
    submit_adapter(stub, "a", 0, 1, adapter(1.0), timeout=5)
    err = rpc_error(submit_adapter, stub, "a", 0, 1, adapter(2.0), timeout=5)
    assert err.code() == Code.ALREADY_EXISTS
    submit_adapter(stub, "b", 0, 1, adapter(3.0), timeout=5)
    err = rpc_error(submit_adapter, stub, "c", 0, 1, adapter(2.0), timeout=5)
    assert err.code() == Code.FAILED_PRECONDITION and "round 0 is closed; fetch its global adapter" in err.details()
    assert rpc_error(fetch_global, stub, "a", 3, timeout=5).code() == Code.OUT_OF_RANGE
    assert rpc_error(fetch_global, stub, "", 0, timeout=5).code() == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("bad, text", [
    (b"not safetensors at all", "not valid safetensors"),
    (to_bytes({"m.lora_A.weight": torch.zeros(2, 3)}), "keys differ"),
    (to_bytes({**adapter(1.0), "m.lora_B.weight": torch.zeros(2, 2)}), "shape (2, 2)"),
    (to_bytes({**adapter(1.0), "m.lora_B.weight": torch.full((3, 2), float("nan"))}), "NaN or Inf"),
    (to_bytes({"m.lora_A.weight": torch.zeros(2, 3, dtype=torch.int64), "m.lora_B.weight": torch.zeros(3, 2)}),
     "dtype"),
])
def test_bad_adapters_rejected_without_changing_state(start: Start, bad: bytes, text: str) -> None:
    service, stub = start()
    submit_adapter(stub, "a", 0, 1, adapter(2.0), timeout=5)
    err = rpc_error(raw_submit, stub, apb.AdapterUpload(client_id="b", num_samples=9, safetensors_chunk=bad))
    assert err.code() == Code.INVALID_ARGUMENT and text in err.details(), err.details()
    assert service.open_round == 0
    assert submit_adapter(stub, "b", 0, 1, adapter(4.0), timeout=5).submitted == 2
    assert torch.equal(service.global_adapter(0)["m.lora_A.weight"], torch.full((2, 3), 3.0))


def test_oversized_adapter_names_the_limit_and_flag(start: Start) -> None:
    service, stub = start(max_adapter_bytes=100)
    err = rpc_error(submit_adapter, stub, "a", 0, 1, adapter(1.0), chunk_bytes=16, timeout=5)
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert "100 bytes" in err.details() and "--max-adapter-bytes" in err.details()
    assert service.open_round == 0


def test_rejections_do_not_disturb_a_concurrent_round(start: Start) -> None:
    service, stub = start(expected_clients=3, is_enrolled=lambda cid: not cid.startswith("x"))
    stop = threading.Event()

    def spam() -> None:
        bad = [("x1", 0, 1, adapter(100.0)), ("ok-but-nan", 0, 1, adapter(float("nan"))), ("early", 2, 1, adapter(9.0))]
        while not stop.is_set():
            for args in bad:
                with pytest.raises(grpc.RpcError):
                    submit_adapter(stub, *args, timeout=5)

    with ThreadPoolExecutor(4) as pool:
        spammers = [pool.submit(spam) for _ in range(2)]
        good = [pool.submit(submit_adapter, stub, f"c{i}", 0, i + 1, adapter(float(i)), timeout=5) for i in range(3)]
        assert sorted(f.result().submitted for f in good) == [1, 2, 3]
        stop.set()
        for f in spammers:
            f.result(timeout=5)
    state, num_clients, total = fetch_global(stub, "c0", 0, timeout=5)
    assert (num_clients, total) == (3, 6)
    assert torch.allclose(state["m.lora_A.weight"], torch.full((2, 3), (0 * 1 + 1 * 2 + 2 * 3) / 6))


def test_chunked_submission_and_download_equal_unchunked(start: Start) -> None:
    results = []
    for chunk in (1 << 20, 7):
        service, stub = start(chunk_bytes=chunk)
        submit_adapter(stub, "a", 0, 2, adapter(1.5), chunk_bytes=chunk, timeout=5)
        submit_adapter(stub, "b", 0, 5, adapter(-0.25), chunk_bytes=chunk, timeout=5)
        results.append(fetch_global(stub, "a", 0, timeout=5))
    (s1, *meta1), (s2, *meta2) = results
    assert meta1 == meta2 == [2, 7]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_old_rounds_served_from_disk_or_not_found(start: Start, tmp_path: Path) -> None:
    rounds = KEEP_IN_MEMORY + 2
    for output_dir in (None, tmp_path):
        service, stub = start(expected_clients=1, rounds=rounds, output_dir=output_dir)
        for r in range(rounds):
            submit_adapter(stub, "a", r, 1, adapter(float(r)), timeout=5)
        latest, _, _ = fetch_global(stub, "a", rounds - 1, timeout=5)
        assert torch.equal(latest["m.lora_A.weight"], torch.full((2, 3), float(rounds - 1)))
        if output_dir is None:
            err = rpc_error(fetch_global, stub, "a", 0, timeout=5)
            assert err.code() == Code.NOT_FOUND and "output directory" in err.details()
            assert service.global_adapter(0) is None
        else:
            oldest, num_clients, total = fetch_global(stub, "a", 0, timeout=5)
            assert (num_clients, total) == (1, 1) and torch.equal(oldest["m.lora_A.weight"], torch.zeros(2, 3))


def test_expired_fetches_free_their_threads(start: Start) -> None:
    _, stub = start(workers=2)
    for _ in range(2):
        assert rpc_error(fetch_global, stub, "a", 0, timeout=0.2).code() == Code.DEADLINE_EXCEEDED
    time.sleep(0.7)  # waiting fetches notice within WAIT_SLICE_S
    assert submit_adapter(stub, "a", 0, 1, adapter(1.0), timeout=2).submitted == 1


def test_without_enrolment_the_first_clients_are_the_only_ones_served(start: Start) -> None:
    service, stub = start(expected_clients=2, rounds=2)
    submit_adapter(stub, "a", 0, 1, adapter(1.0), timeout=5)
    submit_adapter(stub, "b", 0, 1, adapter(3.0), timeout=5)
    for call in (lambda: submit_adapter(stub, "intruder", 1, 1, adapter(9.0), timeout=5),
                 lambda: fetch_global(stub, "intruder", 0, timeout=5)):
        err = rpc_error(call)
        assert err.code() == Code.PERMISSION_DENIED
        assert "serves the 2 clients that submitted first (a, b)" in err.details()
    assert submit_adapter(stub, "a", 1, 1, adapter(2.0), timeout=5).submitted == 1
    assert fetch_global(stub, "b", 0, timeout=5)[1] == 2
