"""A client's first contact: it takes the server's plan (pins that differ are refused, naming them), a client that
leaves before its first step frees its slot, and failures to connect say what was tried and why."""
from __future__ import annotations

import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from splitlora_bench.procs import free_port
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.tls import ClientTlsOptions
from tests.support.servers import RPC_TIMEOUT, exchange, join, running_server
from splitlora_client.cli import main as client_main
from splitlora_server.aggregator.service import AggregatorService
from splitlora_server.cli import main as server_main


def _tls(certs: Path, name: str = "") -> list[str]:
    own = ["--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}.key")] if name else []
    return ["--tls-ca", str(certs / "ca.pem"), *own]


def _server_tls(certs: Path) -> dict[str, object]:
    return {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key"),
            "tls_ca": str(certs / "ca.pem"), "require_client_cert": True}


def test_the_plan_carries_every_model_option(builtin_model_dir: Path, tmp_path: Path) -> None:
    import json

    with running_server(builtin_model_dir, tmp_path, split_layer=2, lora_r=8, lora_targets=["c_attn", "c_fc"]) as h:
        plan = h.stub.GetPlan(spb.PlanRequest(client_id="alice"), timeout=RPC_TIMEOUT)
    options = json.loads(plan.model_options_json)
    assert options["split_layer"] == 2 and options["lora_r"] == 8 and options["lora_targets"] == ["c_attn", "c_fc"]
    assert {"lora_alpha", "lora_dropout"} <= set(options) and "model" not in options and "dtype" not in options
    assert plan.schedule.local_steps == 3 and plan.family == "gpt2" and plan.send_final_adapter


def test_a_pinned_option_that_differs_is_refused_naming_it(builtin_model_dir: Path, tmp_path: Path, capsys) -> None:
    with running_server(builtin_model_dir, tmp_path / "server", split_layer=2, lora_r=8) as h:
        rc = client_main(["train", "--server", h.address, "--insecure", "--client-id", "alice", "--output",
                          str(tmp_path / "alice"), "--split-layer", "3", "--lora-r", "8", "--lora-alpha", "16",
                          "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1
        assert "--split-layer is 2 in the server's plan, 3 in this client's options" in err
        assert "--lora-alpha is 32 in the server's plan, 16 in this client's options" in err
        assert "--lora-r" not in err  # a pin that agrees is fine
        assert h.status().clients == []  # refused before joining: no slot taken


def test_a_client_that_left_before_its_first_step_gives_its_slot_away(builtin_model_dir: Path,
                                                                      tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path, clients=1) as h:
        alice = join(h, "alice")
        requests: queue.Queue = queue.Queue()
        stream = h.stub.Train(iter(requests.get, None), metadata=alice.metadata)  # as a client opens it at Join
        while not h.client_status("alice").connected:
            time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as full:  # alice may still train: her slot is hers
            join(h, "bob")
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        requests.put(None)  # alice's stream ends without a step: she failed on her own side
        assert list(stream) == []
        bob = join(h, "bob")  # her slot goes to the next client
        assert bob.reply.session and [c.client_id for c in h.status().clients] == ["bob"]


def test_plaintext_client_against_a_tls_server_says_why(builtin_model_dir: Path, tmp_path: Path,
                                                        deployment_certs: Path, capsys) -> None:
    client_tls = ClientTlsOptions(tls_ca=str(deployment_certs / "ca.pem"), tls_cert=str(deployment_certs / "alice.pem"),
                                  tls_key=str(deployment_certs / "alice.key"))
    with running_server(builtin_model_dir, tmp_path / "server", client_tls, **_server_tls(deployment_certs)) as h:
        port = h.running.port
        rc = client_main(["train", "--server", f"127.0.0.1:{port}", "--insecure", "--client-id", "alice",
                          "--output", str(tmp_path / "alice"), "--join-timeout", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1
        assert f"could not reach the split server at 127.0.0.1:{port} over plaintext (--insecure) within 1 s" in err
        assert "the server speaks TLS and this end plaintext" in err and "DEADLINE_EXCEEDED" not in err[:40]

        assert server_main(["status", "--server", f"127.0.0.1:{port}", *_tls(deployment_certs)]) == 1
        err = capsys.readouterr().err
        assert f"could not reach the split server at 127.0.0.1:{port} over TLS (CA {deployment_certs / 'ca.pem'})" \
            in err
        assert "the server requires client certificates (--require-client-cert) and this end gave none" in err

        assert server_main(["status", "--server", f"127.0.0.1:{port}", *_tls(deployment_certs, "alice")]) == 1
        assert "PERMISSION_DENIED" in (err := capsys.readouterr().err) and "needs the admin credential" in err


def test_nothing_listening_says_so(tmp_path: Path, capsys) -> None:
    port = free_port()
    rc = client_main(["train", "--server", f"127.0.0.1:{port}", "--insecure", "--client-id", "alice", "--output",
                      str(tmp_path / "alice"), "--join-timeout", "1", "--no-progress"])
    assert rc == 1 and f"nothing listens at 127.0.0.1:{port}" in capsys.readouterr().err


def test_status_against_the_aggregator_says_what_it_is(tmp_path: Path, capsys) -> None:
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    agrpc.add_AggregatorServicer_to_server(AggregatorService(2, 1, tmp_path / "aggregator"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert server_main(["status", "--server", f"127.0.0.1:{port}", "--insecure"]) == 1
    finally:
        server.stop(None)
    err = capsys.readouterr().err
    assert "it is not a split server; is it the aggregator (`splitlora-server aggregate`)?" in err
    assert "Method not found" in err  # what gRPC said, kept after the explanation
