"""`splitlora-server certs`: a CA and the certificates of a small deployment, made with `cryptography`.

Writes into --output: `ca.pem`/`ca.key`, `server.pem`/`server.key` (subject alternative names: the DNS names
and IP addresses of --server-names), `<client>.pem`/`<client>.key` per client (the client id is the
certificate's common name and its `urn:splitlora:<id>` URI name) and `admin.pem`/`admin.key` (the admin
credential). Private keys are written with mode 0600. An existing CA in the directory is reused, so clients
can be added later without re-issuing everyone's certificates.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config.engine import ConfigError, option
from splitlora_server.auth import ADMIN_ID, identity_uri
from splitlora_server.registry import CLIENT_ID_PATTERN

CA_NAME = "SplitLoRA deployment CA"
SERVER_CN = "splitlora-server"
_RESERVED = {"ca", "server", ADMIN_ID}


@dataclass
class CertsConfig:
    """`splitlora-server certs`: create a CA, a server certificate and per-client certificates."""

    output: str = option(help="Directory to write the certificates and keys to (created if missing).",
                         metavar="DIR")
    server_names: list[str] = option(["localhost", "127.0.0.1"], "DNS names and IP addresses clients use to reach "
                                     "the server and the aggregator (the server certificate's subject alternative "
                                     "names).")
    clients: list[str] = option([], "Client ids to issue certificates for (one <id>.pem/<id>.key each).")
    days: int = option(365, "Validity of the new certificates, in days.")

    def validate(self) -> None:
        """Names a certificate can hold and files that do not collide."""
        if not self.server_names:
            raise ConfigError("server_names: give at least one DNS name or IP address of the server")
        if self.days < 1:
            raise ConfigError(f"days must be at least 1, got {self.days}")
        for name in self.clients:
            if not CLIENT_ID_PATTERN.match(name):
                raise ConfigError(f"clients: {name!r} is not a valid client id (1-64 letters, digits, '.', '_', '-')")
            if name.lower() in _RESERVED:
                raise ConfigError(f"clients: {name!r} is reserved (its files would collide with the CA, server or "
                                  "admin credentials); choose another id")
        if len({c.lower() for c in self.clients}) != len(self.clients):
            raise ConfigError("clients: a client id is given twice")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write a file; private keys are created with mode 0600 and never exist with a wider mode."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class _Issuer:
    """The CA: signs leaf certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, days: int) -> None:
        self.key, self.cert, self.days = key, cert, days

    @classmethod
    def load_or_create(cls, out: Path, days: int) -> tuple["_Issuer", bool]:
        cert_path, key_path = out / "ca.pem", out / "ca.key"
        if cert_path.exists() != key_path.exists():
            raise ConfigError(f"{out} holds only one of ca.pem and ca.key; restore the other or remove both")
        if cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{key_path} is not an EC private key made by this command")
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()), days), False
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write(key_path, _key_pem(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, days), True

    def issue(self, common_name: str, names: list[x509.GeneralName], usage: x509.ObjectIdentifier
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        not_after = min(now + dt.timedelta(days=self.days), self.cert.not_valid_after_utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return key, cert

    def write(self, out: Path, stem: str, common_name: str, names: list[x509.GeneralName],
              usage: x509.ObjectIdentifier) -> None:
        key, cert = self.issue(common_name, names, usage)
        _write(out / f"{stem}.key", _key_pem(key), private=True)
        _write(out / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))


def make_certs(cfg: CertsConfig) -> list[Path]:
    """Create (or reuse) the CA and issue the server, client and admin certificates; return the files written."""
    cfg.validate()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    ca, created = _Issuer.load_or_create(out, cfg.days)
    written = [out / "ca.pem", out / "ca.key"] if created else []
    ca.write(out, "server", SERVER_CN, [_san(n) for n in cfg.server_names], ExtendedKeyUsageOID.SERVER_AUTH)
    written += [out / "server.pem", out / "server.key"]
    for client in [*cfg.clients, ADMIN_ID]:
        ca.write(out, client, client, [x509.UniformResourceIdentifier(identity_uri(client))],
                 ExtendedKeyUsageOID.CLIENT_AUTH)
        written += [out / f"{client}.pem", out / f"{client}.key"]
    return written
