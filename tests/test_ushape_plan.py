"""The split mode and J are the server's decision, like the split layer: they travel in the plan (`GetPlan`), a
client that does not pin them takes them, a pin that differs is refused naming it, and a u-shape server
negotiates pipelined steps (--micro-batches) at Join as a standard one does."""
from __future__ import annotations

import json
from pathlib import Path

from common.fingerprint import compute_fingerprint
from common.rpc.splitlora.v1 import split_pb2 as spb
from splitlora_client.cli import main as client_main
from splitlora_server.options import ServeConfig
from tests.support.servers import RPC_TIMEOUT, running_server


def test_the_plan_carries_the_split_mode_and_j(builtin_model_dir: Path, tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path, split_layer=2, split_mode="u-shape", top_blocks=1) as h:
        plan = h.stub.GetPlan(spb.PlanRequest(client_id="alice"), timeout=RPC_TIMEOUT)
    options = json.loads(plan.model_options_json)
    assert (options["split_mode"], options["top_blocks"], options["split_layer"]) == ("u-shape", 1, 2)


def test_a_pinned_split_mode_or_j_that_differs_is_refused_naming_it(builtin_model_dir: Path, tmp_path: Path,
                                                                    capsys) -> None:
    with running_server(builtin_model_dir, tmp_path / "server", split_layer=2, split_mode="u-shape",
                        top_blocks=1) as h:
        for pins, said in ((["--split-mode", "standard"], "--split-mode is u-shape in the server's plan, standard"),
                           (["--top-blocks", "2"], "--top-blocks is 1 in the server's plan, 2 in this client's")):
            rc = client_main(["train", "--server", h.address, "--insecure", "--client-id", "alice", "--output",
                              str(tmp_path / "alice"), "--no-progress", *pins])
            assert rc == 1 and said in capsys.readouterr().err
        assert h.status().clients == []  # refused before joining: no slot taken


def test_u_shape_negotiates_pipelined_steps_at_join_and_in_its_config(builtin_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path, split_layer=2, split_mode="u-shape", top_blocks=1,
                        micro_batches=2) as h:
        fingerprint = compute_fingerprint(builtin_model_dir, 2, h.config.lora_settings(), True, 1)
        asked = h.stub.Join(spb.JoinRequest(client_id="piper", fingerprint=fingerprint, micro_batches=4),
                            timeout=RPC_TIMEOUT)
        default = h.stub.Join(spb.JoinRequest(client_id="paul", fingerprint=fingerprint), timeout=RPC_TIMEOUT)
        assert (asked.micro_batches, default.micro_batches) == (4, 2)
    ServeConfig(split_mode="u-shape", top_blocks=1, micro_batches=2, batch_size=4, insecure=True).validate()
