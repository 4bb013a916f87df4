"""The aggregator after a restart (closed rounds and stored submissions come back) and with stragglers (a round
closes at its deadline with a quorum, late submissions are refused, without a quorum it waits and says so).
Real gRPC on loopback."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import torch

from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from splitlora_client.aggregator import fetch_global, submit_adapter
from splitlora_server.aggregator.service import AggregatorService
from splitlora_server.aggregator.store import AggregatorStore, RoundSummary
from splitlora_server.rounds.gate import Quorum
from tests.support.loopback import adapter, aggregators, rpc_error

Code = grpc.StatusCode
Start = Callable[..., tuple[AggregatorService, agrpc.AggregatorStub]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start an aggregator (restored from its output directory first); return (service, stub)."""
    yield from aggregators(restore=True)


def test_a_restarted_aggregator_keeps_closed_rounds_and_stored_submissions(start: Start, tmp_path: Path) -> None:
    _, stub = start(output_dir=tmp_path)
    submit_adapter(stub, "a", 0, 1, adapter(1.0), timeout=5)
    submit_adapter(stub, "b", 0, 3, adapter(5.0), timeout=5)
    submit_adapter(stub, "a", 1, 2, adapter(2.0), timeout=5)
    # a new process on the same directory (the first one is simply abandoned, as if killed)
    service, stub = start(output_dir=tmp_path)
    assert service.open_round == 1 and service.has_submitted("a", 1) and not service.has_submitted("b", 1)
    state, num_clients, total = fetch_global(stub, "b", 0, timeout=5)
    assert (num_clients, total) == (2, 4) and torch.equal(state["m.lora_A.weight"], torch.full((2, 3), 4.0))
    assert rpc_error(submit_adapter, stub, "a", 1, 2, adapter(2.0), timeout=5).code() == Code.ALREADY_EXISTS
    submit_adapter(stub, "b", 1, 2, adapter(4.0), timeout=5)
    state, num_clients, _ = fetch_global(stub, "a", 1, timeout=5)
    assert num_clients == 2 and torch.equal(state["m.lora_A.weight"], torch.full((2, 3), 3.0))
    assert service.included(1) == {"a", "b"}


def test_a_round_killed_during_its_close_closes_on_restart(start: Start, tmp_path: Path) -> None:
    store = AggregatorStore(tmp_path)  # what a kill between the last stored submission and the close leaves
    store.write_pending(0, "a", 1, adapter(1.0))
    store.write_pending(0, "b", 1, adapter(3.0))
    service, stub = start(output_dir=tmp_path)
    assert service.open_round == 1 and not (tmp_path / "pending" / "round-0000").exists()
    assert torch.equal(fetch_global(stub, "a", 0, timeout=5)[0]["m.lora_A.weight"], torch.full((2, 3), 2.0))


def test_next_to_a_restarted_server_it_follows_the_servers_checkpoint(start: Start, tmp_path: Path) -> None:
    store = AggregatorStore(tmp_path)
    for r in range(2):
        store.write_global(r, adapter(float(r)), RoundSummary({"a": 1, "b": 1}))
    store.write_pending(2, "a", 1, adapter(9.0))
    service, _ = start(output_dir=tmp_path, up_to=1, store_submissions=False)  # the server resumes at round 1
    assert service.open_round == 1 and not store.global_path(1).exists() and store.global_path(0).exists()
    assert not service.has_submitted("a", 1)
    with pytest.raises(ValueError, match="rounds 1..2 are missing"):
        start(output_dir=tmp_path, up_to=3, store_submissions=False)


def test_at_the_deadline_a_quorum_closes_the_round_and_late_submissions_are_rpc_error(start: Start) -> None:
    service, stub = start(expected_clients=3, quorum=Quorum(3, min_clients=2, deadline=0.5))
    submit_adapter(stub, "a", 0, 1, adapter(1.0), timeout=5)
    text, waiting = service.round_status()
    assert "round 0: 1 of 3 clients submitted (quorum 2, deadline 0.5s" in text and not waiting
    submit_adapter(stub, "b", 0, 1, adapter(3.0), timeout=5)
    assert service.open_round == 0  # not before the deadline
    assert service.wait_until_closed(0, timeout=5)
    assert service.included(0) == {"a", "b"}
    late = rpc_error(submit_adapter, stub, "c", 0, 1, adapter(7.0), timeout=5)
    assert late.code() == Code.FAILED_PRECONDITION and "round 0 is closed" in late.details()
    state, num_clients, _ = fetch_global(stub, "c", 0, timeout=5)  # the late client continues from it
    assert num_clients == 2 and torch.equal(state["m.lora_A.weight"], torch.full((2, 3), 2.0))
    submit_adapter(stub, "c", 1, 1, adapter(1.0), timeout=5)  # and takes part in the next round


def test_without_a_quorum_the_round_waits_and_says_so(start: Start) -> None:
    service, stub = start(expected_clients=3, quorum=Quorum(3, min_clients=2, deadline=0.2))
    submit_adapter(stub, "a", 0, 1, adapter(1.0), timeout=5)
    time.sleep(0.5)
    text, waiting = service.round_status()
    assert service.open_round == 0 and waiting and "waiting for quorum: 1 more needed" in text
    submit_adapter(stub, "b", 0, 1, adapter(3.0), timeout=5)  # the quorum: the overdue round closes at once
    assert service.open_round == 1 and service.included(0) == {"a", "b"}
