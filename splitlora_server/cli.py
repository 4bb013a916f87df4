"""`splitlora-server`: serve, aggregate, export, and the security and operator commands (certs, tokens, status,
health, shutdown)."""
from __future__ import annotations

import argparse
import sys

import grpc

from common.cli import add_command, run_main
from common.reach import explain_admin_error
from splitlora_server import healthcheck
from splitlora_server.ops import status
from splitlora_server.ops.admin import ShutdownConfig, shutdown
from splitlora_server.ops.certs import CertsConfig, make_certs
from splitlora_server.ops.tokens import TokenAddConfig, TokenRemoveConfig, add_token, remove_token
from splitlora_server.options import AggregateConfig, ExportConfig, ServeConfig


def _serve(cfg: ServeConfig) -> int:
    from splitlora_server.app import serve
    return serve(cfg)


def _aggregate(cfg: AggregateConfig) -> int:
    from splitlora_server.app import aggregate
    return aggregate(cfg)


def _export(cfg: ExportConfig) -> int:
    from splitlora_server.export import export
    print(export(cfg))
    return 0


def _certs(cfg: CertsConfig) -> int:
    for path in make_certs(cfg):
        print(path)
    return 0


def _token_add(cfg: TokenAddConfig) -> int:
    token = add_token(cfg)
    print(f"token of {cfg.identity!r} (shown once; its hash is in {cfg.tokens_file}):", file=sys.stderr)
    print(token)
    return 0


def _token_remove(cfg: TokenRemoveConfig) -> int:
    remove_token(cfg)
    print(f"revoked the token of {cfg.identity!r}; restart the servers that read {cfg.tokens_file}", file=sys.stderr)
    return 0


def _shutdown(cfg: ShutdownConfig) -> int:
    try:
        shutdown(cfg)
    except grpc.RpcError as err:
        print(f"splitlora-server shutdown: {explain_admin_error(err, 'shutdown', cfg.server, cfg, cfg.timeout)}",
              file=sys.stderr)
        return 1
    print("shutdown requested")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface of the server."""
    parser = argparse.ArgumentParser(prog="splitlora-server",
                                     description="SplitLoRA server: split federated LoRA fine-tuning over gRPC.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command(sub, "serve", ServeConfig, _serve, "run the split-training server (with the aggregator by default)")
    add_command(sub, "aggregate", AggregateConfig, _aggregate, "run the aggregator alone")
    add_command(sub, "export", ExportConfig, _export, "merge client and server adapters into one PEFT adapter")
    add_command(sub, "certs", CertsConfig, _certs, "create a CA, a server certificate and client certificates")
    tokens = sub.add_parser("tokens", help="manage bearer tokens (the server keeps only their hashes)",
                            description="Manage the bearer tokens file a server checks tokens against.")
    token_sub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION")
    add_command(token_sub, "add", TokenAddConfig, _token_add, "create a token for ID and print it once")
    add_command(token_sub, "remove", TokenRemoveConfig, _token_remove, "revoke the token of ID")
    add_command(sub, "status", status.StatusConfig, status.run,
                "show a running server's clients, round, steps/s, bytes and errors (admin)", log_level="WARNING")
    add_command(sub, "health", healthcheck.HealthConfig, healthcheck.run,
                "exit 0 if a server or aggregator reports SERVING, else 1", log_level="WARNING")
    add_command(sub, "shutdown", ShutdownConfig, _shutdown, "stop a running server (admin)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `splitlora-server` console script."""
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
