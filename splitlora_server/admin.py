"""Operator connections: the options of `status` and `health` and the gRPC channel they open.

Kept free of torch and the model code so that health probes start in a fraction of a second.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from common.configuration import ConfigError, option


@dataclass
class ConnectOptions:
    """Where the server is and how to reach it: TLS (with an admin certificate for mutual TLS) or plaintext."""

    server: str = option("127.0.0.1:50051", "Address host:port of the split server (or aggregator for health).")
    tls_ca: str = option("", "CA certificate (PEM) that signed the server's certificate.")
    tls_cert: str = option("", "Certificate (PEM) to present for mutual TLS, e.g. admin.pem.")
    tls_key: str = option("", "Private key (PEM) of --tls-cert.")
    tls_server_name: str = option("", "Name to verify the server's certificate against (default: the host).")
    insecure: bool = option(False, "Plaintext gRPC, no TLS: only inside a trusted network.")
    timeout: float = option(5.0, "Seconds to wait for the answer.")

    def validate(self) -> None:
        """TLS files or --insecure, never both; a certificate comes with its key."""
        if ":" not in self.server:
            raise ConfigError(f"server: {self.server!r} is not host:port")
        if self.insecure and (self.tls_ca or self.tls_cert or self.tls_key):
            raise ConfigError("give either --insecure or TLS files (--tls-ca, --tls-cert, --tls-key), not both")
        if not self.insecure and not self.tls_ca:
            raise ConfigError("no TLS CA given: pass --tls-ca CA.pem (and --tls-cert/--tls-key for mutual TLS), "
                              "or --insecure for a plaintext server")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        for name in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"{name}: file {path} does not exist")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")


def open_channel(opts: ConnectOptions) -> grpc.Channel:
    """A channel to `opts.server`: TLS with the given CA (and client certificate), or plaintext if --insecure."""
    if opts.insecure:
        return grpc.insecure_channel(opts.server)
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(opts.tls_ca).read_bytes(),
        private_key=Path(opts.tls_key).read_bytes() if opts.tls_key else None,
        certificate_chain=Path(opts.tls_cert).read_bytes() if opts.tls_cert else None)
    options = [("grpc.ssl_target_name_override", opts.tls_server_name)] if opts.tls_server_name else []
    return grpc.secure_channel(opts.server, creds, options=options)
