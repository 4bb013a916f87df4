"""Kill anything at any time, lose nothing: SIGKILL the server, the aggregator or a client at exact points
(common.faults), restart it, and the run ends with adapters bit-identical to an uninterrupted run's.

Every role is a real process started through its console script; a killed one is restarted with the same
arguments, as a supervisor would. Two clients, per-client server adapters, 3 rounds of 2 steps.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import CLIENTS, assert_identical, free_port, results, run_all


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, builtin_model_dir: Path) -> dict:
    """The final adapters of a run without faults (server with its aggregator, two clients)."""
    tmp, port = tmp_path_factory.mktemp("uninterrupted"), free_port()
    run_all([procs.server(tmp, port).start(), *(procs.client(tmp, name, port).start() for name in CLIENTS)])
    return results(tmp)


def _compare(run: dict, reference: dict) -> None:
    for what, tensors in reference.items():
        assert_identical(run[what], tensors, what)


def test_server_killed_mid_step_mid_round_and_during_aggregation(tmp_path: Path, uninterrupted: dict) -> None:
    # 4 server steps per round. 1st life: killed inside its 3rd step (round 0, nothing checkpointed yet);
    # 2nd: during the close of round 1 (averaged, not yet checkpointed); 3rd: between steps of round 2 (after
    # its 6th reply: 4 to redo round 1, 2 of round 2); the 4th finishes. (A kill in the middle of writing a
    # checkpoint is covered by test_checkpointing.)
    port = free_port()
    server = procs.server(tmp_path, port, faults=["server:step=3", "server:round-end=1", "server:reply=6"])
    run_all([server.start(), *(procs.client(tmp_path, name, port).start() for name in CLIENTS)])
    _compare(results(tmp_path), uninterrupted)


def test_aggregator_killed_after_a_submission_and_during_aggregation(tmp_path: Path, uninterrupted: dict) -> None:
    # the aggregator on its own: 1st life killed right after storing the 1st submission it accepted, 2nd during
    # the FedAvg of round 1 (all submissions of the round stored, no global adapter yet); the 3rd finishes
    port, agg_port = free_port(), free_port()
    agg = procs.aggregator(tmp_path, agg_port, faults=["aggregator:submit=1", "aggregator:close=1"])
    server = procs.server(tmp_path, port, "--aggregator", f"127.0.0.1:{agg_port}")
    run_all([agg.start(), server.start(), *(procs.client(tmp_path, name, port).start() for name in CLIENTS)])
    _compare(results(tmp_path, aggregator_dir=tmp_path / "aggregator"), uninterrupted)


def test_client_killed_mid_step_and_after_submitting(tmp_path: Path, uninterrupted: dict) -> None:
    # alice's 1st life is killed inside step 3 (round 1), her 2nd right after submitting round 1; bob never stops
    port = free_port()
    alice = procs.client(tmp_path, "alice", port, faults=["client:step=3", "client:submit=1"])
    run_all([procs.server(tmp_path, port).start(), alice.start(), procs.client(tmp_path, "bob", port).start()])
    _compare(results(tmp_path), uninterrupted)
