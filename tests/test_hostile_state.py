"""A hostile client cannot poison a round, overflow a shape, smuggle text through its id, and damaged state on disk
is never resumed or served silently (issue 14, items 3, 4, 5, 6 and 9), through real gRPC over mutual TLS.
"""
from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from common.adapter_layout import adapter_layout
from common.aggregation import ClientUpdate, build_strategy
from common.aggregation.guard import guarded_aggregate
from splitlora_client.aggregator import fetch_global, submit_adapter
from common.state import CheckpointFormatError
from common.config.engine import ConfigError
from common.integrity import IntegrityError, digest_path, sha256_hex
from common.lora import ADAPTER_WEIGHTS, adapter_state, write_adapter_file
from common.optim import OptimSettings
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.split.parts import LoraSettings, SplitPart
from common.tls import ClientTlsOptions, open_channel
from splitlora_server.aggregator.service import AggregatorService
from splitlora_server.app import start_server
from splitlora_server.auth import build_authenticator
from splitlora_server.engine.core import ServerEngine
from splitlora_server.ops.certs import CertsConfig, _Issuer, make_certs
from splitlora_server.options import ExportConfig
from splitlora_server.export import export
from tests.support.attacks import Legit, channel_of, joined_metadata, mtls, mtls_server
from tests.support.servers import serve_config, server_fingerprint

Code = grpc.StatusCode
ROUND = {"clients": 2, "rounds": 2, "local_steps": 2}


def rpc_code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code(), err.details()
    return Code.OK, ""


def flip(path: Path, offset: int = -8) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    data[offset + 1] ^= 0xFF
    path.write_bytes(bytes(data))


def train_and_submit(server, certs: Path, model_dir: Path, who: str, state: dict | None = None):
    """`who` trains its round-0 steps and submits (its own adapter unless `state` is given)."""
    legit = Legit(server, certs, model_dir, who)
    legit.steps(server.config.local_steps)
    state = state if state is not None else adapter_state(legit.client.part.peft)
    stub = agrpc.AggregatorStub(legit.channel)
    result = rpc_code(lambda: submit_adapter(stub, who, 0, 4 * server.config.local_steps, state, timeout=30))
    return legit, stub, result


def test_layout_and_dtype_come_from_the_run_and_the_round_stays_finite(builtin_model_dir: Path, deployment_certs: Path,
                                                                        tmp_path: Path) -> None:
    """Items 3 and 4: a first submission with another layout, or float64 values of 1e300, is refused; the round then
    closes with the legitimate adapters and a finite global adapter."""
    c = deployment_certs
    with mtls_server(builtin_model_dir, tmp_path, c, **ROUND) as server:
        alice, alice_stub, result = train_and_submit(server, c, builtin_model_dir, "alice", {"bogus": torch.zeros(3)})
        assert result[0] == Code.INVALID_ARGUMENT and "keys differ from the run's adapter" in result[1]
        good = adapter_state(alice.client.part.peft)
        huge = {k: torch.full(v.shape, 1e300, dtype=torch.float64) for k, v in good.items()}
        code, details = rpc_code(lambda: submit_adapter(alice_stub, "alice", 0, 8, huge, timeout=30))
        assert code == Code.INVALID_ARGUMENT and "dtype" in details and "float32" in details
        bob, bob_stub, result = train_and_submit(server, c, builtin_model_dir, "bob")
        assert result == (Code.OK, "")  # the first submitter did not define the layout
        assert rpc_code(lambda: submit_adapter(alice_stub, "alice", 0, 8, good, timeout=30)) == (Code.OK, "")
        state, clients, _ = fetch_global(bob_stub, "bob", 0, timeout=30)
        assert clients == 2 and all(torch.isfinite(v).all() for v in state.values())
        reasons = {r.reason for r in server.status().refusals if "alice" in r.caller}
        assert "invalid_argument" in reasons
        alice.close()
        bob.close()


def test_a_non_finite_combination_is_never_published() -> None:
    """Item 4: the guard the aggregator and the per-client server adapters close rounds with."""
    ok = ClientUpdate("alice", {"w": torch.ones(2)}, 1)
    bad = ClientUpdate("mallory", {"w": torch.tensor([1.0, math.inf])}, 1)
    previous, fedavg = {"w": torch.zeros(2)}, build_strategy("fedavg")
    result, why = guarded_aggregate(fedavg, 0, [ok, bad], previous)
    assert torch.equal(result["w"], previous["w"]) and "mallory" in why and "alice" not in why.split("blamed")[1]
    result, why = guarded_aggregate(fedavg, 0, [ok, bad], None)
    assert torch.equal(result["w"], ok.state["w"]) and "combined without them" in why
    result, why = guarded_aggregate(build_strategy("median"), 0, [ok], previous)
    assert why is None and torch.equal(result["w"], ok.state["w"])
    assert guarded_aggregate(fedavg, 0, [bad], None)[0] is None  # nothing finite: the round cannot close


def test_shapes_that_overflow_are_invalid_argument(builtin_model_dir: Path, deployment_certs: Path,
                                                   tmp_path: Path) -> None:
    """Item 5: element counts are checked before any tensor is built."""
    c = deployment_certs
    with mtls_server(builtin_model_dir, tmp_path, c, **ROUND) as server:
        alice = channel_of(server, c, "alice")
        md = joined_metadata(alice, server, "alice")
        hidden = tpb.Tensor(shape=[0, 2**62, 128], dtype=tpb.DTYPE_FLOAT32, codec=tpb.CODEC_RAW, data=b"")
        frame = spb.ClientFrame(forward=spb.StepForward(step=0, round=0, hidden=hidden))
        calls = []
        call = sgrpc.SplitTrainingStub(alice).Train(iter([frame]), metadata=md, timeout=30)
        code, details = rpc_code(lambda: calls.extend(call))
        assert code == Code.INVALID_ARGUMENT and "the limit is" in details, details
        key = next(iter(server.running.aggregator._layout))
        header = json.dumps({key: {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}}).encode()
        upload = apb.AdapterUpload(client_id="alice", round=0, num_samples=1,
                                   safetensors_chunk=len(header).to_bytes(8, "little") + header)
        code, details = rpc_code(lambda: agrpc.AggregatorStub(alice).Submit(iter([upload]), timeout=30))
        assert code in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION), details


def test_client_ids_are_a_character_set_and_never_echoed_whole(builtin_model_dir: Path, deployment_certs: Path,
                                                               tmp_path: Path, caplog) -> None:
    """Item 6: 'alice\\n' is no id (not in certificates, not as a name), and a 1 MiB id is never echoed whole."""
    with pytest.raises(ConfigError, match="not a valid client id"):
        make_certs(CertsConfig(output=str(tmp_path / "c"), clients=["alice\n"], days=1))
    c = deployment_certs
    ca, _ = _Issuer.load_or_create(c, 1)  # a certificate the certs command would not issue, signed by the CA
    ca.write(tmp_path, "evil", "evil\n", [x509.UniformResourceIdentifier("urn:splitlora:evil\n")],
             ExtendedKeyUsageOID.CLIENT_AUTH)
    caplog.set_level(logging.INFO)
    with mtls_server(builtin_model_dir, tmp_path / "out", c, **ROUND) as server:
        evil = open_channel(f"localhost:{server.running.port}", ClientTlsOptions(
            tls_ca=str(c / "ca.pem"), tls_cert=str(tmp_path / "evil.pem"), tls_key=str(tmp_path / "evil.key")))
        join = sgrpc.SplitTrainingStub(evil).Join
        code, details = rpc_code(lambda: join(spb.JoinRequest(client_id="evil\n", fingerprint=server_fingerprint(
            server)), timeout=30))
        assert code == Code.UNAUTHENTICATED and "not a valid client id" in details
        alice = sgrpc.SplitTrainingStub(channel_of(server, c, "alice"))
        huge = spb.JoinRequest(client_id="a" * (1 << 20), fingerprint=server_fingerprint(server))
        code, details = rpc_code(lambda: alice.Join(huge, timeout=30))
        assert code == Code.PERMISSION_DENIED and len(details) < 300
        assert {cl.client_id for cl in server.status().clients} == set()
        assert all(len(r.caller) < 100 for r in server.status().refusals)
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


def _trained_run(model_dir: Path, certs: Path, output: Path) -> None:
    """A run whose round 0 closed: checkpoint of round 1, global adapter of round 0, server adapter."""
    with mtls_server(model_dir, output, certs, **ROUND) as server:
        alice, _, a = train_and_submit(server, certs, model_dir, "alice")
        bob, _, b = train_and_submit(server, certs, model_dir, "bob")
        assert a == b == (Code.OK, "") and server.running.aggregator.wait_until_closed(0, timeout=30)
        write_adapter_file(output / "server_adapter.safetensors", server.running.engine.server_adapter())
        alice.close()
        bob.close()


def _restart(model_dir: Path, certs: Path, output: Path):
    cfg = serve_config(model_dir, output, **ROUND, tls_cert=str(certs / "server.pem"),
                       tls_key=str(certs / "server.key"), tls_ca=str(certs / "ca.pem"), require_client_cert=True)
    running = start_server(cfg)
    running.stop(grace=0.5)


def test_damaged_state_is_refused_naming_the_file(builtin_model_dir: Path, deployment_certs: Path,
                                                  tmp_path: Path) -> None:
    """Item 9: round checkpoints (manifest included), global adapters and exported adapters are verified."""
    c, out = deployment_certs, tmp_path / "run"
    _trained_run(builtin_model_dir, c, out)
    _restart(builtin_model_dir, c, out)  # intact: resumes
    manifest = out / "checkpoints" / "round-0001" / "manifest.json"
    original = manifest.read_text()
    edited = json.loads(original)
    edited["meta"]["clients"].append("mallory")
    manifest.write_text(json.dumps(edited))
    with pytest.raises(CheckpointFormatError, match=r"round-0001: manifest.json does not match its recorded SHA-256"):
        _restart(builtin_model_dir, c, out)
    manifest.write_text(original)
    glob = out / "aggregator" / "global" / "round-0000.safetensors"
    export_cfg = ExportConfig(client_adapter=str(glob), server_adapter=str(out / "server_adapter.safetensors"),
                              output=str(tmp_path / "export"))
    exported = export(export_cfg) / ADAPTER_WEIGHTS
    assert digest_path(exported).read_text().split() == [sha256_hex(exported.read_bytes()), ADAPTER_WEIGHTS]
    flip(glob)
    with pytest.raises(IntegrityError, match=r"round-0000.safetensors does not match its recorded SHA-256"):
        _restart(builtin_model_dir, c, out)
    with pytest.raises(IntegrityError, match="round-0000.safetensors"):
        export(export_cfg)


def test_a_damaged_stored_submission_stops_the_aggregator(builtin_model_dir: Path, deployment_certs: Path,
                                                          tmp_path: Path) -> None:
    """Item 9: the standalone aggregator's stored submissions are verified when it restarts."""
    c = deployment_certs
    layout = adapter_layout(builtin_model_dir, "client", 3, LoraSettings())
    auth = build_authenticator("", True, "the aggregator")
    service = AggregatorService(2, 1, tmp_path / "agg", auth=auth, layout=layout)
    server = grpc.server(ThreadPoolExecutor(4))
    agrpc.add_AggregatorServicer_to_server(service, server)
    creds = grpc.ssl_server_credentials([((c / "server.key").read_bytes(), (c / "server.pem").read_bytes())],
                                        root_certificates=(c / "ca.pem").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        channel = open_channel(f"localhost:{port}", mtls(c, "alice"))
        state = {k: torch.ones(shape) for k, shape in layout.items()}
        assert submit_adapter(agrpc.AggregatorStub(channel), "alice", 0, 4, state, timeout=30).submitted == 1
        channel.close()
    finally:
        server.stop(None)
    (stored,) = (tmp_path / "agg" / "pending" / "round-0000").glob("*.safetensors")
    assert AggregatorService(2, 1, tmp_path / "agg", layout=layout).restore() == 0  # intact: restored
    flip(stored)
    with pytest.raises(IntegrityError, match=stored.name):
        AggregatorService(2, 1, tmp_path / "agg", layout=layout).restore()


def test_a_non_finite_per_client_server_adapter_is_not_averaged_in(tiny_gpt2_dir: Path) -> None:
    """Item 4, the server's per-client copies: a copy that is not finite is left out of the round average and
    named in status; no copy is ever loaded with NaN or Inf."""
    engine = ServerEngine(SplitPart(tiny_gpt2_dir, "server", 2, LoraSettings(r=2, alpha=4, dropout=0.0)), "per-client",
                          OptimSettings(learning_rate=1e-2, warmup_steps=1, total_steps=10)).start()
    try:
        for client in ("alice", "mallory"):
            engine.add_client(client).result()
        before = engine.adapter_of("alice")
        poisoned = engine.slots["mallory"].name
        for name, param in engine.part.peft.named_parameters():
            if f".{poisoned}." in name:
                param.data.fill_(math.inf)
        engine.end_round(0, {"alice": 4.0, "mallory": 4.0}).result()
        for client in ("alice", "mallory"):
            assert all(torch.isfinite(v).all() for v in engine.adapter_of(client).values())
        assert all(torch.equal(engine.adapter_of("alice")[k], v) for k, v in before.items())
        assert any("mallory" in text for text in engine.incidents)
    finally:
        engine.stop()
