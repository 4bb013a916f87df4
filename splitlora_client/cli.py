"""`splitlora-client`: train."""
from __future__ import annotations

import argparse

from common.cli import add_command, run_main
from splitlora_client.options import TrainConfig


def _train(cfg: TrainConfig) -> int:
    import grpc

    from splitlora_client.trainer import train
    try:
        print(train(cfg))
    except grpc.RpcError as err:
        print(f"splitlora-client: the server refused: {err.code().name}: {err.details()}", flush=True)
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not cfg.insecure:
            print("splitlora-client: if the server is up, check TLS: --tls-ca must be the CA that signed the "
                  "server's certificate, the address's host (or --tls-server-name) must be one of its names, and "
                  "a server that requires client certificates needs --tls-cert/--tls-key signed by its CA", flush=True)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface of the client."""
    parser = argparse.ArgumentParser(prog="splitlora-client",
                                     description="SplitLoRA client: train the first blocks on private data.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command(sub, "train", TrainConfig, _train, "train with a split server")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `splitlora-client` console script."""
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
