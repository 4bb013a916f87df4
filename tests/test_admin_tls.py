"""The operator tools over mutual TLS: the health probe presents the admin certificate and checks the server's."""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitlora_server import healthcheck

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(cwd: Path, name: str, ca: str, san: str | None = None) -> None:
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    extra = []
    if san:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", *extra, cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1, an admin certificate, and a stranger CA's certificate."""
    d = tmp_path_factory.mktemp("certs")
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *_EC, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1",
                 "-subj", f"/CN={ca}", cwd=d)
    _issue(d, "server", "ca", "DNS:localhost,IP:127.0.0.1")
    _issue(d, "admin", "ca")
    _issue(d, "stranger", "other-ca")
    return d


@pytest.fixture(scope="module")
def mtls_server(certs: Path):
    """A gRPC server with the standard health service that requires a client certificate signed by the CA."""
    creds = grpc.ssl_server_credentials([((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())],
                                        root_certificates=(certs / "ca.pem").read_bytes(), require_client_auth=True)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield f"localhost:{port}"
    finally:
        server.stop(0).wait()


def _probe(address: str, certs: Path, name: str | None, *extra: str) -> int:
    argv = ["--server", address, "--tls-ca", str(certs / "ca.pem"), "--timeout", "5", *extra]
    if name:
        argv += ["--tls-cert", str(certs / f"{name}.pem"), "--tls-key", str(certs / f"{name}.key")]
    return healthcheck.main(argv)


def test_admin_certificate_passes_mutual_tls(mtls_server: str, certs: Path) -> None:
    assert _probe(mtls_server, certs, "admin") == 0


def test_without_or_with_a_foreign_client_certificate_the_server_refuses(mtls_server: str, certs: Path) -> None:
    assert _probe(mtls_server, certs, None) == 1
    assert _probe(mtls_server, certs, "stranger") == 1


def test_the_servers_name_is_verified(mtls_server: str, certs: Path) -> None:
    assert _probe(mtls_server, certs, "admin", "--tls-server-name", "not-the-server") == 1
    address = mtls_server.replace("localhost", "127.0.0.1")  # an IP SAN of the certificate
    assert _probe(address, certs, "admin") == 0
