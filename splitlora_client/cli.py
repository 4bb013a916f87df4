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
        print(f"splitlora-client: {_explain(cfg, err)}", flush=True)
        return 1
    return 0


def _explain(cfg: TrainConfig, err) -> str:
    import grpc

    from common.reach import unreachable
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        return unreachable("the split server or the aggregator", cfg.server, cfg, err, cfg.reconnect_timeout)
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (f"no answer in time ({err.details()}): a round did not close within --round-timeout "
                f"{cfg.round_timeout:g} s (other clients missing?), or the connection stalls")
    return f"the server refused: {err.code().name}: {err.details()}"


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
