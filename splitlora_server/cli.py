"""`splitlora-server`: serve, aggregate, export, status, health."""
from __future__ import annotations

import argparse

from common.cli import add_command, run_main
from splitlora_server.config import AggregateConfig, ExportConfig, ServeConfig
from splitlora_server import healthcheck, status


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


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface of the server."""
    parser = argparse.ArgumentParser(prog="splitlora-server",
                                     description="SplitLoRA server: split federated LoRA fine-tuning over gRPC.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command(sub, "serve", ServeConfig, _serve, "run the split-training server (with the aggregator by default)")
    add_command(sub, "aggregate", AggregateConfig, _aggregate, "run the aggregator alone")
    add_command(sub, "export", ExportConfig, _export, "merge client and server adapters into one PEFT adapter")
    add_command(sub, "status", status.StatusConfig, status.run,
                "show a running server's clients, round, steps/s, bytes and errors", log_level="WARNING")
    add_command(sub, "health", healthcheck.HealthConfig, healthcheck.run,
                "exit 0 if a server or aggregator reports SERVING, else 1", log_level="WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `splitlora-server` console script."""
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
