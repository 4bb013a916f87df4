"""`splitlora-server status` and `splitlora-server shutdown`: administrative calls to a running split server.

Both need the admin credential when the server checks identities: the `admin.pem`/`admin.key` certificate
made by `splitlora-server certs`, or the token of identity `admin` in the server's tokens file.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.configuration import option
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.tls import ClientTlsOptions, open_channel


@dataclass
class StatusConfig(ClientTlsOptions):
    """`splitlora-server status`: training progress and the clients of a running split server."""

    server: str = option("127.0.0.1:50051", "Split server address host:port.")
    timeout: float = option(10.0, "Seconds to wait for the answer.")

    def validate(self) -> None:
        """TLS settings complete."""
        self.validate_tls()


@dataclass
class ShutdownConfig(StatusConfig):
    """`splitlora-server shutdown`: stop a running split server (steps in flight finish first)."""

    reason: str = option("", "Why; the server logs it.")


def _stub(cfg: StatusConfig) -> sgrpc.SplitTrainingStub:
    return sgrpc.SplitTrainingStub(open_channel(cfg.server, cfg, role="admin command"))


def format_status(reply: spb.StatusReply) -> str:
    """A short human-readable report of a StatusReply."""
    state = "finished" if reply.finished else f"round {min(reply.round + 1, reply.rounds)}/{reply.rounds}"
    lines = [f"{state}, {reply.steps} steps, {reply.steps_per_second:.2f} steps/s, server adapter "
             f"{reply.server_adapter_mode}"]
    for c in reply.clients:
        lines.append(f"  {c.client_id}: {'connected' if c.connected else 'idle'}, round {c.round + 1}, "
                     f"{c.steps} steps, loss {c.last_loss:.4f}, {c.bytes_in} B in, {c.bytes_out} B out"
                     + (f", last error: {c.last_error}" if c.last_error else ""))
    return "\n".join(lines)


def status(cfg: StatusConfig) -> str:
    """Ask the server for its status."""
    return format_status(_stub(cfg).Status(spb.StatusRequest(), timeout=cfg.timeout))


def shutdown(cfg: ShutdownConfig) -> None:
    """Ask the server to stop."""
    _stub(cfg).Shutdown(spb.ShutdownRequest(reason=cfg.reason), timeout=cfg.timeout)
