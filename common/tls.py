"""Transport security for every role: TLS / mutual TLS options, server ports and client channels.

Secure by default: a role with neither certificates nor `--insecure` refuses to start and says which flags
to give. Plaintext happens only when asked for, with a warning. Bearer tokens (for deployments without
client certificates) travel as `authorization: Bearer <token>` call metadata on every call of a channel.
"""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc

from common.config.engine import ConfigError, option

log = logging.getLogger("splitlora.tls")
AUTHORIZATION_KEY = "authorization"
BEARER = "Bearer "
_CERTS_HINT = "`splitlora-server certs` makes a CA, a server certificate and client certificates"


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path}: {err.strerror or err}") from None


def _read_pem(path: str, flag: str) -> bytes:
    data = _read(path, flag)
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{flag}: {path} is not a PEM file (expected '-----BEGIN ...' blocks)")
    return data


def _check_file(path: str, flag: str) -> None:
    if path and not Path(path).is_file():
        raise ConfigError(f"{flag}: file {path} does not exist")


def _tls_flags_given(insecure: bool, flags: Sequence[tuple[str, object]]) -> list[str]:
    """The TLS flags that are set; ConfigError when --insecure is combined with any of them."""
    given = [flag for flag, value in flags if value]
    if insecure and given:
        raise ConfigError(f"--insecure cannot be combined with {', '.join(given)}: choose TLS or plaintext")
    return given


def _warn_if_readable_by_others(key_path: str) -> None:
    try:
        mode = os.stat(key_path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("private key %s is readable by other users (mode %o); chmod 600 it", key_path, mode & 0o777)


@dataclass
class ServerTlsOptions:
    """TLS of a serving role (split server, aggregator)."""

    HELP_GROUP = "transport security"

    tls_cert: str = option("", "PEM certificate (chain) this server presents.", metavar="FILE")
    tls_key: str = option("", "PEM private key of --tls-cert.", metavar="FILE")
    tls_ca: str = option("", "PEM CA certificate(s) that sign client certificates (with --require-client-cert).",
                         metavar="FILE")
    require_client_cert: bool = option(False, "Mutual TLS: refuse clients without a certificate signed by "
                                              "--tls-ca; the certificate is the client's identity.")
    insecure: bool = option(False, "Serve plaintext gRPC without TLS (logs a warning): only on a trusted network.")

    def validate_tls(self) -> None:
        """Exactly one of TLS files and --insecure; TLS settings complete and readable."""
        given = _tls_flags_given(self.insecure, (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                                                 ("--tls-ca", self.tls_ca),
                                                 ("--require-client-cert", self.require_client_cert)))
        if self.insecure:
            return
        if not given:
            raise ConfigError("no transport security configured: give --tls-cert FILE --tls-key FILE (and "
                              "--tls-ca FILE --require-client-cert for mutual TLS; " + _CERTS_HINT +
                              "), or --insecure to serve plaintext on a trusted network")
        if not (self.tls_cert and self.tls_key):
            raise ConfigError("TLS needs both --tls-cert FILE and --tls-key FILE")
        if self.require_client_cert != bool(self.tls_ca):
            raise ConfigError("--require-client-cert and --tls-ca go together: the CA verifies the client "
                              "certificates that mutual TLS requires")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tls-ca", self.tls_ca)):
            _check_file(path, flag)


@dataclass
class ClientTlsOptions:
    """TLS of a connecting role (client, admin commands)."""

    HELP_GROUP = "transport security"

    tls_ca: str = option("", "PEM CA certificate(s) that signed the server's certificate.", metavar="FILE")
    tls_cert: str = option("", "PEM client certificate for mutual TLS (its identity).", metavar="FILE")
    tls_key: str = option("", "PEM private key of --tls-cert.", metavar="FILE")
    tls_server_name: str = option("", "Expect this name in the server's certificate instead of the host of the "
                                      "address (e.g. when connecting by IP through a tunnel).")
    token_file: str = option("", "File holding a bearer token (from `splitlora-server tokens add`), sent with "
                                 "every call.", metavar="FILE")
    insecure: bool = option(False, "Connect with plaintext gRPC without TLS (logs a warning): only on a trusted "
                                   "network.")

    def validate_tls(self) -> None:
        """Exactly one of TLS files and --insecure; TLS settings complete and readable."""
        _tls_flags_given(self.insecure, (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert),
                                         ("--tls-key", self.tls_key), ("--tls-server-name", self.tls_server_name)))
        if not self.insecure and not self.tls_ca:
            raise ConfigError("no transport security configured: give --tls-ca FILE (the CA that signed the "
                              "server's certificate) and, for mutual TLS, --tls-cert FILE --tls-key FILE; or "
                              "--insecure to connect in plaintext on a trusted network")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("a client certificate needs both --tls-cert FILE and --tls-key FILE")
        for flag, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--token-file", self.token_file)):
            _check_file(path, flag)


# -- serving ---------------------------------------------------------------------------------------------------
def server_credentials(opts: ServerTlsOptions) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None when plaintext was asked for."""
    opts.validate_tls()
    if opts.insecure:
        return None
    _warn_if_readable_by_others(opts.tls_key)
    cert = _read_pem(opts.tls_cert, "--tls-cert")
    pair = (_read_pem(opts.tls_key, "--tls-key"), cert)
    ca = _read_pem(opts.tls_ca, "--tls-ca") if opts.tls_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=opts.require_client_cert)


def add_port(server: grpc.Server, address: str, opts: ServerTlsOptions, role: str) -> int:
    """Listen on `address` with TLS (or plaintext when --insecure); return the bound port."""
    credentials = server_credentials(opts)
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:  # grpcio raises on a failed bind (older versions return 0)
        port = 0
    if port == 0:  # the server must be built without SO_REUSEPORT, or a taken port would be shared silently
        raise ConfigError(f"{role} cannot listen on {address}: the port is taken (another server is running there?) "
                          "or the address is not one of this machine's; choose another --port or --host")
    if credentials is None:
        log.warning("%s serves PLAINTEXT gRPC on %s (--insecure): anyone on the network can read and change "
                    "the traffic; use --tls-cert/--tls-key outside a trusted network", role, address)
    else:
        log.info("%s serves TLS on %s%s", role, address, " (client certificates required)"
                 if opts.require_client_cert else "")
    return port


# -- connecting ------------------------------------------------------------------------------------------------
def read_token(path: str) -> str:
    """The bearer token in a file (surrounding whitespace ignored)."""
    token = _read(path, "--token-file").decode("utf-8", "replace").strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"--token-file: {path} must hold one token (printable, no spaces)")
    return token


def bearer_metadata(token: str) -> tuple[str, str]:
    """The call metadata entry that carries a bearer token."""
    return (AUTHORIZATION_KEY, BEARER + token)


class _AddMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds fixed metadata (the bearer token) to every call of a channel."""

    def __init__(self, extra: Sequence[tuple[str, str]]) -> None:
        self._extra = list(extra)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), *self._extra],
                            details.credentials, details.wait_for_ready, details.compression)

    def _call(self, continuation: Callable, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(details), request)

    intercept_unary_unary = intercept_unary_stream = _call
    intercept_stream_unary = intercept_stream_stream = _call


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def open_channel(address: str, opts: ClientTlsOptions, options: Sequence[tuple[str, Any]] = (),
                 role: str = "client") -> grpc.Channel:
    """A channel to `address`: TLS (mutual with a client certificate), or plaintext when --insecure."""
    opts.validate_tls()
    options = list(options)
    if opts.insecure:
        log.warning("%s connects to %s in PLAINTEXT (--insecure): activations, labels, adapters%s can be read "
                    "and changed on the network", role, address, " and the bearer token" if opts.token_file else "")
        channel = grpc.insecure_channel(address, options=options)
    else:
        key = _read_pem(opts.tls_key, "--tls-key") if opts.tls_key else None
        cert = _read_pem(opts.tls_cert, "--tls-cert") if opts.tls_cert else None
        credentials = grpc.ssl_channel_credentials(_read_pem(opts.tls_ca, "--tls-ca"), key, cert)
        if opts.tls_server_name:
            options.append(("grpc.ssl_target_name_override", opts.tls_server_name))
        channel = grpc.secure_channel(address, credentials, options=options)
    if opts.token_file:
        channel = grpc.intercept_channel(channel, _AddMetadata([bearer_metadata(read_token(opts.token_file))]))
    return channel
