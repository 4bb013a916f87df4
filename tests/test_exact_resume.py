"""fedex over kills: a server killed during the close of round 1 and a client killed after submitting round 1
restart from their checkpoints, and the run ends bit-identical to an uninterrupted fedex run: the folded
residuals travel in the global adapters, the server's checkpoint and the clients' adapters, and folding the
cumulative residual again after a restart is idempotent."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from common.residuals import split_residuals
from tests.support import procs
from tests.support.procs import CLIENTS, assert_identical, free_port, results, run_all

FEDEX = ("--aggregation", "fedex")


def test_fedex_kill_and_resume_is_bit_identical(tmp_path: Path, builtin_model_dir: Path) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir(), killed.mkdir()
    port = free_port()
    run_all([procs.server(clean, port, *FEDEX).start(), *(procs.client(clean, n, port).start() for n in CLIENTS)])
    reference = results(clean)
    assert split_residuals(reference["server adapter"])[1] and split_residuals(reference["global adapter"])[1]

    port = free_port()
    server = procs.server(killed, port, *FEDEX, faults=["server:round-end=1"])
    alice = procs.client(killed, "alice", port, faults=["client:submit=1"])
    run_all([server.start(), alice.start(), procs.client(killed, "bob", port).start()])
    for what, tensors in reference.items():
        assert_identical(results(killed)[what], tensors, what)
    assert split_residuals(load_file(str(killed / "alice" / "client_adapter.safetensors")))[1]
