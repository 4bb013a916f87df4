"""`splitlora-server`: serve, aggregate, export, status."""
from __future__ import annotations

import argparse

from common.cli import add_command, run_main
from splitlora_server.config import AggregateConfig, ExportConfig, ServeConfig


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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `splitlora-server` console script."""
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
