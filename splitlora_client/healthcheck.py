"""Client health for container HEALTHCHECKs: healthy while the client keeps writing metrics records.

`python -m splitlora_client.healthcheck --metrics /out/metrics.jsonl --max-age 900` exits 0 if the file was
written within the last `max-age` seconds (or training finished: the client adapter exists), 1 otherwise.
A client waits for the slowest one at every round end, so `max-age` must exceed the longest round.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

ADAPTER_FILE = "client_adapter.safetensors"  # as splitlora_client.trainer writes it


def check(metrics: Path, max_age: float, now: float | None = None) -> tuple[bool, str]:
    """(healthy, why) for the metrics file `metrics`."""
    if (metrics.parent / ADAPTER_FILE).is_file():
        return True, f"finished: {metrics.parent / ADAPTER_FILE} written"
    if not metrics.is_file():
        return False, f"no metrics yet at {metrics} (joining, or stuck before the first step)"
    age = (time.time() if now is None else now) - metrics.stat().st_mtime
    if age > max_age:
        return False, f"no progress for {age:.0f} s (last record in {metrics}; limit {max_age:.0f} s)"
    return True, f"last record {age:.0f} s ago"


def build_parser() -> argparse.ArgumentParser:
    """The options of `python -m splitlora_client.healthcheck`."""
    parser = argparse.ArgumentParser(prog="python -m splitlora_client.healthcheck", description=__doc__)
    parser.add_argument("--metrics", type=Path, default=Path("/out/metrics.jsonl"), help="the client's metrics file")
    parser.add_argument("--max-age", type=float, default=900.0, help="seconds without a record before unhealthy")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print why; exit 0 healthy, 1 not."""
    args = build_parser().parse_args(argv)
    healthy, why = check(args.metrics, args.max_age)
    print(why, flush=True)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
