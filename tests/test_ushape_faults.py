"""Kill and resume in u-shape mode: the server killed inside a step (after its top-cut gradient arrived; with
pipelined steps, between two micro-batches' answers) and a client killed mid-step and after submitting; the run
ends bit-identical to an uninterrupted one (per-client server adapters)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import procs
from tests.support.procs import CLIENTS, assert_identical, free_port, results, run_all

U_SHAPE = ("--split-mode", "u-shape", "--top-blocks", "1")


def _run(tmp: Path, serve: tuple[str, ...], server_faults: list[str] | None = None,
         alice_faults: list[str] | None = None) -> dict:
    port = free_port()
    tmp.mkdir(parents=True)
    roles = [procs.server(tmp, port, *U_SHAPE, *serve, faults=server_faults),
             procs.client(tmp, "alice", port, *U_SHAPE, faults=alice_faults),
             procs.client(tmp, "bob", port, *U_SHAPE)]
    run_all([role.start() for role in roles], timeout=900.0)  # restarts are slow on a loaded machine
    return results(tmp)


# whole steps: the server dies at its 3rd update; two micro-batches: at its 7th answer (each step of two
# micro-batches takes four answers, top, top, backward, backward: the 7th falls inside a client's step)
@pytest.mark.parametrize(("serve", "server_fault"), [((), "server:step=3"),
                                                     (("--micro-batches", "2"), "server:reply=7")],
                         ids=["whole", "micro-batches-2"])
def test_u_shape_kill_and_resume_is_bit_identical(tmp_path: Path, builtin_model_dir: Path, serve: tuple[str, ...],
                                                  server_fault: str) -> None:
    reference = _run(tmp_path / "uninterrupted", serve)
    faulty = _run(tmp_path / "faults", serve, server_faults=[server_fault],
                  alice_faults=["client:step=3", "client:submit=1"])
    assert set(reference) == {"server adapter", "global adapter", *(f"{c}'s adapter" for c in CLIENTS)}
    for what, tensors in reference.items():
        assert_identical(faulty[what], tensors, what)
    assert any(".h.5." in k for k in reference["alice's adapter"])  # the client's top block is in what is compared
