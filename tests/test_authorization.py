"""Who may do what, through real gRPC over TLS on loopback, while a legitimate client trains.

Two deployments of the split server (with its in-process aggregator), certificates from the certs helper:
- mutual TLS: the client certificate is the identity; a caller without a certificate signed by the
  deployment's CA is refused during the TLS handshake (UNAVAILABLE: the server never sees the call);
- server TLS + bearer tokens held as hashes: no token or a wrong one is UNAUTHENTICATED.
On both, acting as another client and non-admin administrative calls are PERMISSION_DENIED.
"""
from __future__ import annotations

import math
import re
import subprocess
import threading
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
import torch

from splitlora_bench.procs import BIN
from common.adapter_layout import adapter_layout
from common.builtin import ensure_builtin_model
from common.lora import adapter_state, to_bytes
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.split.parts import LoraSettings
from common.tls import ClientTlsOptions, bearer_metadata, open_channel
from splitlora_client.aggregator import submit_adapter
from splitlora_client.session import SplitSession
from splitlora_server.cli import main as server_main
from splitlora_server.ops.tokens import TokenAddConfig, add_token
from tests.support.servers import (RPC_TIMEOUT, ClientSide, Harness, metadata, running_server, server_fingerprint,
                                   train_steps)

Code = grpc.StatusCode
OK = "OK"
CALLS = ("Join", "Train", "Submit", "FetchGlobal", "Status", "Shutdown")
ADAPTER = to_bytes({"m.lora_A.weight": torch.zeros(2, 3)})


def mtls(certs: Path, who: str | None) -> ClientTlsOptions:
    """Client TLS options trusting `certs`' CA, with `who`'s certificate (None: no client certificate)."""
    if who is None:
        return ClientTlsOptions(tls_ca=str(certs / "ca.pem"))
    return ClientTlsOptions(tls_ca=str(certs / "ca.pem"), tls_cert=str(certs / f"{who}.pem"),
                            tls_key=str(certs / f"{who}.key"))


class Caller:
    """Makes each SplitLoRA call over one channel as a given client id, with optional extra metadata."""

    def __init__(self, harness: Harness, tls: ClientTlsOptions, md: list[tuple[str, str]] | None = None) -> None:
        self.harness, self.md = harness, md or []
        self.channel = open_channel(f"localhost:{harness.running.port}", tls)
        self.split, self.agg = sgrpc.SplitTrainingStub(self.channel), agrpc.AggregatorStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, name: str, acting_as: str) -> str | grpc.StatusCode:
        """Make call `name` claiming to be `acting_as`; OK or the status code it ended with."""
        t = 5.0
        calls: dict[str, Callable[[], object]] = {
            "Join": lambda: self.split.Join(spb.JoinRequest(client_id=acting_as, fingerprint=server_fingerprint(
                self.harness)), metadata=self.md, timeout=t),
            "Train": lambda: list(self.split.Train(iter([spb.ClientFrame()]), timeout=t,
                                                   metadata=self.md + metadata(acting_as, "0" * 32))),
            "Submit": lambda: self.agg.Submit(iter([apb.AdapterUpload(client_id=acting_as, num_samples=1,
                                                                      safetensors_chunk=ADAPTER)]),
                                              metadata=self.md, timeout=t),
            "FetchGlobal": lambda: list(self.agg.FetchGlobal(apb.FetchRequest(client_id=acting_as, round=0),
                                                             metadata=self.md, timeout=0.5)),
            "Status": lambda: self.split.Status(spb.StatusRequest(), metadata=self.md, timeout=t),
            "Shutdown": lambda: self.split.Shutdown(spb.ShutdownRequest(reason="test"), metadata=self.md, timeout=t),
        }
        try:
            calls[name]()
        except grpc.RpcError as err:
            return err.code()
        return OK

    def matrix(self, acting_as: str, names: tuple[str, ...] = CALLS) -> dict[str, str | grpc.StatusCode]:
        return {name: self.call(name, acting_as) for name in names}


def train_one_round(harness: Harness, client: ClientSide, tls: ClientTlsOptions, client_id: str) -> list[float]:
    """A legitimate client: join, train round 0 step by step, submit its adapter; return its losses."""
    channel = open_channel(f"localhost:{harness.running.port}", tls)
    session = SplitSession(channel, client_id)
    reply = session.join(server_fingerprint(harness), [tpb.CODEC_RAW], timeout=30)
    losses = list(train_steps(session, client, reply.schedule.local_steps, lr=1e-2, batch_size=4))
    session.close()
    reply = submit_adapter(agrpc.AggregatorStub(channel), client_id, 0, 4 * len(losses),
                           adapter_state(client.part.peft), timeout=RPC_TIMEOUT)
    assert (reply.round, reply.submitted) == (0, 1)
    channel.close()
    return losses


def hammer(callers: list[tuple[Caller, str, dict]], stop: threading.Event, wrong: list, rounds: list) -> None:
    """Repeat every (caller, acting_as, expected matrix) until `stop`; record any unexpected answer."""
    while not stop.is_set():
        rounds.append(1)
        for caller, acting_as, expected in callers:
            got = caller.matrix(acting_as, tuple(expected))
            if got != expected:
                wrong.append((acting_as, got, expected))


def run_with_legitimate_client(harness: Harness, attacks: list[tuple[Caller, str, dict]],
                               legit: Callable[[], list[float]]) -> list[float]:
    """Check every attack once, then again in a loop while the legitimate client trains a round."""
    for caller, acting_as, expected in attacks:
        assert caller.matrix(acting_as, tuple(expected)) == expected, acting_as
    stop, wrong, rounds = threading.Event(), [], []
    thread = threading.Thread(target=hammer, args=(attacks, stop, wrong, rounds), daemon=True)
    thread.start()
    try:
        losses = legit()
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not wrong, wrong[:2]
    assert len(rounds) >= 2, "the attacks did not run while the client trained"
    assert len(losses) == harness.config.local_steps and all(math.isfinite(x) for x in losses)
    return losses


# -- mutual TLS -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mtls_server(builtin_model_dir: Path, deployment_certs: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    c = deployment_certs
    with running_server(builtin_model_dir, tmp_path_factory.mktemp("mtls"), client_tls=mtls(c, "admin"), clients=3,
                        tls_cert=str(c / "server.pem"), tls_key=str(c / "server.key"), tls_ca=str(c / "ca.pem"),
                        require_client_cert=True) as harness:
        yield harness


def test_mutual_tls_authorization_matrix(mtls_server: Harness, deployment_certs: Path, rogue_certs: Path,
                                         builtin_model_dir: Path) -> None:
    c = deployment_certs
    refused_at_handshake = {name: Code.UNAVAILABLE for name in CALLS}
    denied = {name: Code.PERMISSION_DENIED for name in CALLS}
    no_cert, impostor = Caller(mtls_server, mtls(c, None)), Caller(mtls_server, mtls(rogue_certs, "alice"))
    rogue_ca_trusting = Caller(mtls_server, ClientTlsOptions(tls_ca=str(c / "ca.pem"),
                                                             tls_cert=str(rogue_certs / "alice.pem"),
                                                             tls_key=str(rogue_certs / "alice.key")))
    alice, admin = Caller(mtls_server, mtls(c, "alice")), Caller(mtls_server, mtls(c, "admin"))
    attacks = [
        (no_cert, "alice", refused_at_handshake),             # no credential
        (impostor, "alice", refused_at_handshake),            # a certificate from another CA (trusting it too)
        (rogue_ca_trusting, "alice", refused_at_handshake),   # ... or trusting ours
        (alice, "bob", denied),                               # another client's id
        (alice, "carol", {**denied, "Status": Code.PERMISSION_DENIED}),
        (admin, "admin", {"Join": Code.PERMISSION_DENIED, "Train": Code.PERMISSION_DENIED,
                          "Submit": Code.PERMISSION_DENIED, "FetchGlobal": Code.PERMISSION_DENIED}),  # not a client
    ]
    losses = run_with_legitimate_client(
        mtls_server, attacks, lambda: train_one_round(mtls_server, ClientSide(builtin_model_dir), mtls(c, "carol"),
                                                      "carol"))
    status = mtls_server.client_status("carol")
    assert (status.steps, status.last_error) == (mtls_server.config.local_steps, "")
    assert {cl.client_id for cl in mtls_server.status().clients} == {"carol"}  # no attacker took a slot
    # acting as itself works; the round it claims must have been trained (bob trained nothing)
    assert alice.call("Join", "alice") == OK
    bob = Caller(mtls_server, mtls(c, "bob"))
    assert bob.call("Join", "bob") == OK and bob.call("Submit", "bob") == Code.FAILED_PRECONDITION
    assert admin.call("Status", "admin") == OK and not mtls_server.running.stop_requested.is_set()
    assert admin.call("Shutdown", "admin") == OK and mtls_server.running.stop_requested.is_set()
    assert losses


# -- TLS + bearer tokens ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A tokens file with alice, bob, carol and admin; each token also in `<dir>/<who>.token` for --token-file."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.yaml"
    issued = {who: add_token(TokenAddConfig(identity=who, tokens_file=str(path)))
              for who in ("alice", "bob", "carol", "admin")}
    assert not any(token in path.read_text() for token in issued.values())  # only hashes are stored
    for who, token in issued.items():
        (path.parent / f"{who}.token").write_text(token + "\n")
    return path, issued


@pytest.fixture(scope="module")
def token_server(builtin_model_dir: Path, deployment_certs: Path, tokens: tuple[Path, dict[str, str]],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    c, path = deployment_certs, tokens[0]
    tls = ClientTlsOptions(tls_ca=str(c / "ca.pem"), token_file=str(path.parent / "admin.token"))
    with running_server(builtin_model_dir, tmp_path_factory.mktemp("tokens-server"), client_tls=tls, clients=3,
                        tls_cert=str(c / "server.pem"), tls_key=str(c / "server.key"),
                        tokens_file=str(path)) as harness:
        yield harness


def test_bearer_token_authorization_matrix(token_server: Harness, deployment_certs: Path,
                                           tokens: tuple[Path, dict[str, str]], builtin_model_dir: Path) -> None:
    tls, issued = mtls(deployment_certs, None), tokens[1]
    unauthenticated = {name: Code.UNAUTHENTICATED for name in CALLS}
    denied = {name: Code.PERMISSION_DENIED for name in CALLS}

    def caller(md: list[tuple[str, str]] | None) -> Caller:
        return Caller(token_server, tls, md)

    attacks = [
        (caller(None), "alice", unauthenticated),                                      # no credential
        (caller([bearer_metadata("not-a-token")]), "alice", unauthenticated),          # wrong credential
        (caller([bearer_metadata(issued["alice"] + "x")]), "alice", unauthenticated),
        (caller([("authorization", "Basic " + issued["alice"])]), "alice", unauthenticated),
        (caller([bearer_metadata(issued["alice"])]), "bob", denied),                   # another client's id
        (caller([bearer_metadata(issued["admin"])]), "admin",                          # admin is not a client
         {"Join": Code.PERMISSION_DENIED, "Train": Code.PERMISSION_DENIED, "Submit": Code.PERMISSION_DENIED,
          "FetchGlobal": Code.PERMISSION_DENIED}),
    ]
    carol = ClientTlsOptions(tls_ca=tls.tls_ca, token_file=str(tokens[0].parent / "carol.token"))
    run_with_legitimate_client(token_server, attacks, lambda: train_one_round(
        token_server, ClientSide(builtin_model_dir), carol, "carol"))
    status = token_server.client_status("carol")
    assert (status.steps, status.last_error) == (token_server.config.local_steps, "")
    assert {cl.client_id for cl in token_server.status().clients} == {"carol"}
    alice = caller([bearer_metadata(issued["alice"])])
    assert alice.call("Join", "alice") == OK and alice.call("Status", "alice") == Code.PERMISSION_DENIED
    admin = caller([bearer_metadata(issued["admin"])])
    assert admin.call("Status", "admin") == OK


def test_refusals_say_why(token_server: Harness, deployment_certs: Path, tokens: tuple[Path, dict[str, str]]) -> None:
    channel = open_channel(f"localhost:{token_server.running.port}", mtls(deployment_certs, None))
    stub, issued = sgrpc.SplitTrainingStub(channel), tokens[1]
    cases = [(None, "bob", "no credential: this server needs a bearer token (--token-file)"),
             ([bearer_metadata("nope")], "bob", "the bearer token is not valid here"),
             ([("authorization", "Token abc")], "bob", "must be 'Bearer <token>'"),
             ([bearer_metadata(issued["alice"])], "bob", "authenticated as 'alice' (by token) but acting as "
                                                         "client 'bob'")]
    for md, acting_as, phrase in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Join(spb.JoinRequest(client_id=acting_as), metadata=md, timeout=5)
        assert phrase in info.value.details(), info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Status(spb.StatusRequest(), metadata=[bearer_metadata(issued["bob"])], timeout=5)
    assert "'bob' may not make administrative calls; use the admin credential" in info.value.details()
    channel.close()


def test_admin_commands_need_the_admin_credential(mtls_server: Harness, deployment_certs: Path, capsys) -> None:
    c, address = deployment_certs, f"localhost:{mtls_server.running.port}"

    def status(who: str) -> int:
        return server_main(["status", "--server", address, "--tls-ca", str(c / "ca.pem"), "--tls-cert",
                            str(c / f"{who}.pem"), "--tls-key", str(c / f"{who}.key"), "--log-level", "WARNING"])

    assert status("admin") == 0
    assert re.search(r"round \d of 0-1, \d+ steps", capsys.readouterr().out)
    assert status("bob") == 1
    assert "PERMISSION_DENIED: 'bob' may not make administrative calls" in capsys.readouterr().err


def test_standalone_aggregator_process_checks_tokens(deployment_certs: Path, tokens: tuple[Path, dict[str, str]],
                                                     tmp_path: Path) -> None:
    c, (path, issued) = deployment_certs, tokens
    proc = subprocess.Popen([str(BIN / "splitlora-server"), "aggregate", "--port", "0", "--clients", "1", "--rounds",
                             "1", "--output", str(tmp_path / "agg"), "--tls-cert", str(c / "server.pem"), "--tls-key",
                             str(c / "server.key"), "--tokens-file", str(path), "--finish-grace-seconds", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.search(r"listening on [\d.]+:(\d+)", proc.stdout.readline()).group(1))
        state = {k: torch.ones(shape) for k, shape in  # the layout of the run's (built-in model's) client adapter
                 adapter_layout(ensure_builtin_model(), "client", 3, LoraSettings()).items()}

        def submit(token: str | None, client_id: str) -> str | grpc.StatusCode:
            tls = ClientTlsOptions(tls_ca=str(c / "ca.pem"))
            channel = open_channel(f"127.0.0.1:{port}", tls)
            md = [bearer_metadata(token)] if token else None
            try:
                submit_adapter(agrpc.AggregatorStub(channel), client_id, 0, 1, state, timeout=10, metadata=md)
                return OK
            except grpc.RpcError as err:
                return err.code()
            finally:
                channel.close()

        assert submit(None, "alice") == Code.UNAUTHENTICATED
        assert submit("wrong", "alice") == Code.UNAUTHENTICATED
        assert submit(issued["bob"], "alice") == Code.PERMISSION_DENIED
        assert submit(issued["admin"], "admin") == Code.PERMISSION_DENIED
        assert submit(issued["alice"], "alice") == OK
        assert proc.wait(timeout=30) == 0  # its one round closed
    finally:
        if proc.poll() is None:
            proc.kill()
