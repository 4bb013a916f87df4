"""Secure by default, as a user meets it: refusals to start without TLS or --insecure, the certs and tokens
commands, their files, and no unsafe deserialization anywhere in the code."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config.engine import ConfigError
from common.tls import ClientTlsOptions, ServerTlsOptions, add_port, open_channel, server_credentials
from splitlora_client.cli import main as client_main
from splitlora_server.cli import main as server_main
from splitlora_server.ops.tokens import TokenStore, hash_token
from tests.support.servers import running_server

ROOT = Path(__file__).resolve().parent.parent


def config_error(main, argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run a CLI that must refuse its configuration; return its message."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


# -- refusing to start ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("main, argv", [
    (server_main, ["serve"]), (server_main, ["aggregate"]), (server_main, ["status"]),
    (client_main, ["train"]),
], ids=["serve", "aggregate", "status", "train"])
def test_every_role_refuses_to_start_without_tls_or_insecure(main, argv, capsys) -> None:
    err = config_error(main, argv, capsys)
    assert "config error: no transport security configured" in err
    assert "--insecure" in err and ("--tls-cert FILE --tls-key FILE" in err or "--tls-ca FILE" in err)


@pytest.mark.parametrize("argv, phrase", [
    (["serve", "--insecure", "--tls-cert", "x.pem"], "--insecure cannot be combined with --tls-cert"),
    (["serve", "--tls-cert", "x.pem"], "TLS needs both --tls-cert FILE and --tls-key FILE"),
    (["serve", "--tls-cert", "x.pem", "--tls-key", "x.key", "--require-client-cert"],
     "--require-client-cert and --tls-ca go together"),
    (["serve", "--tls-cert", "/nonexistent.pem", "--tls-key", "x.key"], "--tls-cert: file /nonexistent.pem does not"),
    (["aggregate", "--insecure", "--tokens-file", "/nonexistent.yaml"], "tokens_file: /nonexistent.yaml does not"),
    (["serve", "--insecure", "--aggregation", "trimmed-mean", "--clients", "3"],
     "trims no client; raise --trim-fraction to at least 0.334"),
    (["serve", "--insecure", "--aggregation", "trimmed-mean", "--clients", "2"],
     "trimmed-mean needs at least 3 clients (it drops one at each end of every coordinate); with 2 use "
     "--aggregation median or fedavg"),
    (["certs", "--output", "x", "--clients", "alice,admin"], "'admin' is reserved"),
    (["certs", "--output", "x", "--clients", "a b"], "not a valid client id"),
])
def test_incomplete_or_contradictory_security_settings_are_named(argv, phrase, capsys) -> None:
    assert phrase in config_error(server_main, argv, capsys)


@pytest.mark.parametrize("clients", [3, 4, 5, 6, 7, 9, 11])
def test_the_advised_trim_fraction_is_accepted(clients: int) -> None:
    from common.config.engine import ConfigError
    from splitlora_server.options import AggregationOptions

    options = AggregationOptions(aggregation="trimmed-mean", trim_fraction=0.0)
    with pytest.raises(ConfigError, match="raise --trim-fraction to at least") as refused:
        options.validate_aggregation(clients)
    options.trim_fraction = float(str(refused.value).rsplit(" ", 1)[-1])
    options.validate_aggregation(clients)  # the value the message advises is one that works


def test_client_contradictions_are_named(capsys) -> None:
    err = config_error(client_main, ["train", "--insecure", "--tls-ca", "ca.pem"], capsys)
    assert "--insecure cannot be combined with --tls-ca" in err
    err = config_error(client_main, ["train", "--tls-ca", __file__, "--tls-cert", __file__], capsys)
    assert "needs both --tls-cert FILE and --tls-key FILE" in err


def test_plaintext_is_allowed_only_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
    with caplog.at_level(logging.WARNING, logger="splitlora.tls"):
        port = add_port(server, "127.0.0.1:0", ServerTlsOptions(insecure=True), "test role")
        open_channel(f"127.0.0.1:{port}", ClientTlsOptions(insecure=True)).close()
    server.stop(None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("test role serves PLAINTEXT gRPC" in w for w in warnings)
    assert any("connects to 127.0.0.1" in w and "PLAINTEXT" in w for w in warnings)


def test_files_that_are_not_pem_are_refused_by_name(tmp_path: Path) -> None:
    bogus = tmp_path / "server.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(ConfigError, match="--tls-cert: .* is not a PEM file"):
        server_credentials(ServerTlsOptions(tls_cert=str(bogus), tls_key=str(bogus)))


# -- certs ----------------------------------------------------------------------------------------------------
def test_certs_command_makes_a_deployment(tmp_path: Path, capsys) -> None:
    out = tmp_path / "certs"
    assert server_main(["certs", "--output", str(out), "--server-names", "server,localhost,127.0.0.1,::1",
                        "--clients", "alice,bob,carol", "--days", "30"]) == 0
    listed = capsys.readouterr().out.split()
    assert {Path(p).name for p in listed} == {f"{n}.{e}" for n in ("ca", "server", "alice", "bob", "carol", "admin")
                                               for e in ("pem", "key")}
    for path in out.glob("*.key"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    load = lambda name: x509.load_pem_x509_certificate((out / f"{name}.pem").read_bytes())  # noqa: E731
    ca, server = load("ca"), load("server")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    for name in ("alice", "bob", "carol", "admin"):
        cert = load(name)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:splitlora:{name}"]
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
    # a second run reuses the CA: earlier certificates stay valid, new clients are added
    ca_before = (out / "ca.pem").read_bytes()
    assert server_main(["certs", "--output", str(out), "--clients", "dave"]) == 0
    assert (out / "ca.pem").read_bytes() == ca_before
    load("dave").verify_directly_issued_by(ca)
    load("alice").verify_directly_issued_by(ca)


# -- tokens ---------------------------------------------------------------------------------------------------
def test_tokens_are_printed_once_and_stored_as_hashes(tmp_path: Path, capsys) -> None:
    path = tmp_path / "tokens.yaml"
    assert server_main(["tokens", "add", "alice", "--tokens-file", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 40 and token not in path.read_text() and hash_token(token) in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert TokenStore.load(path).identity_of(token) == "alice"
    assert server_main(["tokens", "add", "alice", "--tokens-file", str(path)]) == 1
    assert "already holds a token for 'alice'; give --replace" in capsys.readouterr().err
    assert server_main(["tokens", "add", "alice", "--tokens-file", str(path), "--replace"]) == 0
    new = capsys.readouterr().out.strip()
    store = TokenStore.load(path)
    assert store.identity_of(new) == "alice" and store.identity_of(token) is None
    assert server_main(["tokens", "remove", "alice", "--tokens-file", str(path)]) == 0
    assert TokenStore.load(path).identity_of(new) is None


@pytest.mark.parametrize("text, phrase", [
    ("- a\n- b\n", "expected a mapping"),
    ("alice: 1234\n", "is not a token hash"),
    ("'a b': sha256:" + "0" * 64 + "\n", "not a valid identity"),
    ("a: sha256:" + "ab" * 32 + "\nb: '" + "AB" * 32 + "'\n", "share one token"),  # a bare hex is read too
])
def test_malformed_tokens_files_are_refused(tmp_path: Path, text: str, phrase: str) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=phrase):
        TokenStore.load(path)


# -- wiring ---------------------------------------------------------------------------------------------------
def test_aggregation_settings_reach_the_in_process_aggregator(builtin_model_dir: Path, tmp_path: Path) -> None:
    with running_server(builtin_model_dir, tmp_path, aggregation="median", clip_norm=0.5) as harness:
        aggregator = harness.running.aggregator
        assert aggregator.strategy.describe() == "median, updates clipped to norm 0.5"


# -- nothing is unpickled -------------------------------------------------------------------------------------
UNSAFE = re.compile(r"\bimport pickle\b|\bpickle\.|\bcPickle\b|\bdill\b|torch\.load\(|allow_pickle\s*=\s*True|"
                    r"yaml\.load\(|yaml\.unsafe_load|\bmarshal\.loads|weights_only\s*=\s*False|"
                    r"use_safetensors\s*=\s*False")


def test_no_unsafe_deserialization_in_the_code() -> None:
    files = [p for d in ("common", "splitlora_server", "splitlora_client", "scripts") for p in (ROOT / d).rglob("*.py")
             if "/rpc/" not in str(p)]
    assert len(files) > 20
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
                 if UNSAFE.search(line)]
    assert offenders == []
