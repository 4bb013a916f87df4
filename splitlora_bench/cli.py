"""`splitlora-bench overhead|wire|scaling|time-to-target|edge-link|aggregation|generate|privacy|all --out DIR`."""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Callable

from splitlora_bench.options import BenchConfig
from common.cli import add_command, run_main

BENCHMARKS: dict[str, tuple[str, str]] = {
    "overhead": ("splitlora_bench.bench_overhead", "a split step over loopback gRPC against one process"),
    "pipeline": ("splitlora_bench.bench_pipeline", "pipelined split steps, client and server pinned to a core each"),
    "wire": ("splitlora_bench.bench_wire", "bytes per step and final loss of each activation/gradient codec"),
    "scaling": ("splitlora_bench.bench_scaling", "server steps/s with 1..8 concurrent clients, batching on and off"),
    "time-to-target": ("splitlora_bench.bench_time_to_target", "CenLoRA, FedLoRA and SplitLoRA to a validation loss"),
    "edge-link": ("splitlora_bench.bench_edge_link", "SplitLoRA with clients behind rate-limited links (netns + tbf)"),
    "aggregation": ("splitlora_bench.bench_aggregation", "FedAvg, ffa and fedex on IID and non-IID partitions"),
    "generate": ("splitlora_bench.bench_generate", "split generation: decode latency against one process, prefill, "
                 "bytes per token, server tokens/s with concurrent sessions, batching off and on"),
    "privacy": ("splitlora_bench.bench_privacy", "inversion and label attacks on the real wire, defenses and their cost"),
}
REMODEL = ("splitlora_bench.bench_time_to_target", "redo time-to-target's modeled times from its JSON with --profiles")


def run_benchmarks(cfg: BenchConfig, names: list[str]) -> list[Path]:
    """Run the named benchmarks in order; return their Markdown reports (and write OUT/summary.md)."""
    import torch

    torch.set_num_threads(cfg.threads)
    paths = [importlib.import_module(REMODEL[0]).remodel(cfg) if name == "remodel" else
             importlib.import_module(BENCHMARKS[name][0]).run(cfg) for name in names]
    if len(paths) > 1:
        summary = cfg.out_dir / "summary.md"
        summary.write_text("\n".join(p.read_text() for p in paths))
        paths.append(summary)
    return paths


def _command(names: list[str]) -> Callable[[BenchConfig], int]:
    def run(cfg: BenchConfig) -> int:
        for path in run_benchmarks(cfg, names):
            print(path, flush=True)
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    """The command line of `splitlora-bench`."""
    parser = argparse.ArgumentParser(prog="splitlora-bench", description="SplitLoRA benchmarks: JSON, Markdown "
                                     "tables and PNG plots under --out.")
    sub = parser.add_subparsers(dest="command", metavar="BENCHMARK")
    for name, (_, help_text) in BENCHMARKS.items():
        add_command(sub, name, BenchConfig, _command([name]), help_text)
    add_command(sub, "all", BenchConfig, _command(list(BENCHMARKS)), "every benchmark, one after the other")
    add_command(sub, "remodel", BenchConfig, _command(["remodel"]), REMODEL[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `splitlora-bench` console script."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # models load many times; their progress bars drown the results
    warnings.filterwarnings("ignore", category=FutureWarning)
    return run_main(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
