"""Kill and resume in u-shape mode: the server killed inside a step (after its top-cut gradient arrived) and a
client killed mid-step and after submitting; the run ends bit-identical to an uninterrupted one
(per-client server adapters)."""
from __future__ import annotations

from pathlib import Path

from tests.support import procs
from tests.support.procs import CLIENTS, assert_identical, free_port, results, run_all

U_SHAPE = ("--split-mode", "u-shape", "--top-blocks", "1")


def _run(tmp: Path, server_faults: list[str] | None = None, alice_faults: list[str] | None = None) -> dict:
    port = free_port()
    tmp.mkdir(parents=True)
    roles = [procs.server(tmp, port, *U_SHAPE, faults=server_faults),
             procs.client(tmp, "alice", port, *U_SHAPE, faults=alice_faults),
             procs.client(tmp, "bob", port, *U_SHAPE)]
    run_all([role.start() for role in roles], timeout=900.0)  # restarts are slow on a loaded machine
    return results(tmp)


def test_u_shape_kill_and_resume_is_bit_identical(tmp_path: Path, builtin_model_dir: Path) -> None:
    reference = _run(tmp_path / "uninterrupted")
    faulty = _run(tmp_path / "faults", server_faults=["server:step=3"],
                  alice_faults=["client:step=3", "client:submit=1"])
    assert set(reference) == {"server adapter", "global adapter", *(f"{c}'s adapter" for c in CLIENTS)}
    for what, tensors in reference.items():
        assert_identical(faulty[what], tensors, what)
    assert any(".h.5." in k for k in reference["alice's adapter"])  # the client's top block is in what is compared
