"""`splitlora-client`: train, generate, evaluate."""
from __future__ import annotations

import argparse
from typing import Callable

from common.cli import add_command, run_main
from splitlora_client.generation.options import EvaluateConfig, GenerateConfig
from splitlora_client.options import TrainConfig


def _refused(run: Callable[[], int], cfg: TrainConfig | GenerateConfig | EvaluateConfig) -> int:
    """`run()`, with a server's refusal (or its absence) printed as one line naming the likely cause."""
    import grpc
    try:
        return run()
    except grpc.RpcError as err:
        print(f"splitlora-client: {_explain(cfg, err)}", flush=True)
        return 1


def _train(cfg: TrainConfig) -> int:
    from splitlora_client.trainer import train
    return _refused(lambda: print(train(cfg)) or 0, cfg)


def _generate(cfg: GenerateConfig) -> int:
    from splitlora_client.generation.commands import generate
    return _refused(lambda: generate(cfg), cfg)


def _evaluate(cfg: EvaluateConfig) -> int:
    from splitlora_client.generation.commands import evaluate
    return _refused(lambda: evaluate(cfg), cfg)


def _explain(cfg: TrainConfig | GenerateConfig | EvaluateConfig, err) -> str:
    import grpc

    from common.reach import unreachable
    training = isinstance(cfg, TrainConfig)  # train retries for --reconnect-timeout; generate/evaluate call once
    if err.code() == grpc.StatusCode.UNAVAILABLE:
        what = "the split server or the aggregator" if training else "the split server"
        return unreachable(what, cfg.server, cfg, err, cfg.reconnect_timeout if training else 0.0)
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and training:
        return (f"no answer in time ({err.details()}): a round did not close within --round-timeout "
                f"{cfg.round_timeout:g} s (other clients missing?), or the connection stalls")
    return f"the server refused: {err.code().name}: {err.details()}"


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface of the client."""
    parser = argparse.ArgumentParser(prog="splitlora-client",
                                     description="SplitLoRA client: train the first blocks on private data.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_command(sub, "train", TrainConfig, _train, "train with a split server")
    add_command(sub, "generate", GenerateConfig, _generate, "complete prompts through the split", "WARNING")
    add_command(sub, "evaluate", EvaluateConfig, _evaluate, "loss, perplexity and E2E metrics of held-out data "
                "through the split (nothing learns)", "WARNING")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `splitlora-client` console script."""
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
