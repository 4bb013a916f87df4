"""Operator connections (`status`, `health`, `shutdown`): where the server is, how to reach it, admin calls.

Kept free of torch and the model code so that health probes start in a fraction of a second. Status and
Shutdown need the admin credential when the server checks identities: the `admin.pem`/`admin.key`
certificate made by `splitlora-server certs`, or the token of identity `admin` in the server's tokens file.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.config.engine import ConfigError, option
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.tls import ClientTlsOptions
from common.tls import open_channel as open_tls_channel


@dataclass
class ConnectOptions(ClientTlsOptions):
    """Where the server is and how to reach it: TLS (with the admin certificate for mutual TLS) or plaintext."""

    HELP_GROUPS = {"server": "essentials"}

    server: str = option("127.0.0.1:50051", "Address host:port of the split server (or aggregator for health).")
    timeout: float = option(10.0, "Seconds to wait for the answer.")

    def validate(self) -> None:
        """TLS files or --insecure, an address with a port, a positive timeout."""
        if ":" not in self.server:
            raise ConfigError(f"server: {self.server!r} is not host:port")
        if self.timeout <= 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout}")
        self.validate_tls()


def open_channel(opts: ConnectOptions) -> grpc.Channel:
    """A channel to `opts.server` with the operator's TLS settings (or plaintext with --insecure)."""
    return open_tls_channel(opts.server, opts, role="admin command")


@dataclass
class ShutdownConfig(ConnectOptions):
    """`splitlora-server shutdown`: stop a running split server (steps in flight finish first)."""

    reason: str = option("", "Why; the server logs it.")


def shutdown(cfg: ShutdownConfig) -> None:
    """Ask the server to stop."""
    sgrpc.SplitTrainingStub(open_channel(cfg)).Shutdown(spb.ShutdownRequest(reason=cfg.reason), timeout=cfg.timeout)
