"""Load test: many concurrent clients against one split server, on loopback with the built-in tiny model.

The server (with its aggregator) runs as its own process through `splitlora-server serve`; the clients are
threads of this process, each running the real `splitlora_client.trainer.train`. The test passes when every
client finishes with no error and the server's resident memory does not grow round over round: it is sampled
(from /proc) each time a round closes, and the growth from the end of the warm-up (round max(1, rounds/4): the
gRPC thread pool and the allocator settle during the first rounds) to the end of the last round must stay under
--max-growth-mb. Prints a summary and writes it as JSON with --json.

    python scripts/load_test.py --clients 32 --rounds 8 --local-steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import torch  # noqa: E402

from splitlora_bench.procs import BIN, free_port  # noqa: E402
from common.rpc.splitlora.v1 import split_pb2 as spb  # noqa: E402
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc  # noqa: E402
from splitlora_client import trainer  # noqa: E402
from splitlora_client.options import TrainConfig  # noqa: E402

# plaintext on loopback (where TLS is the default, it must be turned off explicitly)
PLAINTEXT = {"insecure": True} if "insecure" in TrainConfig.__dataclass_fields__ else {}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _slope(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)


def _serialize_model_building() -> None:
    """The clients share this process, and building a model skeleton (for the part, and for the fingerprint)
    uses accelerate's meta-device context, which patches torch process-wide: one at a time (each client's
    process does this alone in a real deployment)."""
    lock = threading.Lock()

    def serialized(fn):
        def call(*args, **kwargs):
            with lock:
                return fn(*args, **kwargs)
        return call

    trainer.SplitPart = serialized(trainer.SplitPart)
    trainer.compute_fingerprint = serialized(trainer.compute_fingerprint)


def _sample_memory(address: str, pid: int, samples: list[dict], done: threading.Event, started: float) -> None:
    """Record the server's RSS each time its open round moves on."""
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    with grpc.insecure_channel(address, options=options) as channel:
        stub, last = sgrpc.SplitTrainingStub(channel), None
        while not done.is_set():
            try:
                status = stub.Status(spb.StatusRequest(), timeout=5, wait_for_ready=True)
            except grpc.RpcError:
                time.sleep(0.1)
                continue
            if status.round != last:
                last = status.round
                samples.append({"round_closed": int(status.round) - 1, "rss_mb": round(_rss_mb(pid), 1),
                                "seconds": round(time.monotonic() - started, 2), "steps": int(status.steps)})
            if status.finished:
                return
            time.sleep(0.05)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--server-adapter-mode", default="per-client", choices=["per-client", "shared"])
    parser.add_argument("--max-growth-mb", type=float, default=16.0,
                        help="largest allowed RSS growth of the server from the end of the warm-up to the last round")
    parser.add_argument("--output", default="runs/load", help="directory for the server's and clients' files")
    parser.add_argument("--json", default="", help="write the summary here")
    return parser.parse_args()


def _report(args: argparse.Namespace, samples: list[dict], errors: list[str], server_rc: int,
            seconds: float) -> bool:
    """Print (and write with --json) the summary; True if the run passed."""
    rss = {s["round_closed"]: s["rss_mb"] for s in samples if s["round_closed"] >= 0}
    after_warmup = [r for r in sorted(rss) if r >= max(1, args.rounds // 4)]
    growth = rss[after_warmup[-1]] - rss[after_warmup[0]] if len(after_warmup) >= 2 else float("nan")
    half = after_warmup[len(after_warmup) // 2:]
    slope = _slope(half, [rss[r] for r in half]) if len(half) >= 2 else float("nan")
    summary = {"clients": args.clients, "rounds": args.rounds, "local_steps": args.local_steps,
               "batch_size": args.batch_size, "server_adapter_mode": args.server_adapter_mode,
               "errors": errors, "server_exit_code": server_rc, "seconds": round(seconds, 1),
               "client_steps": args.clients * args.rounds * args.local_steps,
               "steps_per_second": round(args.clients * args.rounds * args.local_steps / seconds, 1),
               "rss_mb_after_round": {str(r): v for r, v in sorted(rss.items())},
               "warmup_rounds": max(1, args.rounds // 4), "rss_growth_mb_after_warmup": round(growth, 1),
               "rss_slope_mb_per_round_second_half": round(slope, 2), "samples": samples}
    print(f"{args.clients} clients x {args.rounds} rounds x {args.local_steps} steps: {len(errors)} errors, "
          f"server exit {server_rc}, {seconds:.1f}s, {summary['steps_per_second']} client steps/s")
    print("server RSS (MiB) after round: " + ", ".join(f"{r}: {v:.0f}" for r, v in sorted(rss.items())))
    print(f"growth from round {max(1, args.rounds // 4)} to the last: {growth:+.1f} MiB "
          f"(limit {args.max_growth_mb:g}); "
          f"trend over the second half: {slope:+.2f} MiB/round")
    for error in errors[:5]:
        print("  error:", error)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return not errors and server_rc == 0 and args.rounds - 1 in rss and growth <= args.max_growth_mb


def main() -> int:
    args = _arguments()
    torch.set_num_threads(1)
    _serialize_model_building()
    out, port = Path(args.output).resolve(), free_port()
    address = f"127.0.0.1:{port}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        [str(BIN / "splitlora-server"), "serve", "--port", str(port), "--clients", str(args.clients),
         "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size),
         "--server-adapter-mode", args.server_adapter_mode, "--learning-rate", "1e-3", "--warmup-steps", "1",
         "--max-workers", str(4 * args.clients + 16), "--finish-grace-seconds", "60", "--output", str(out / "server"),
         *(["--insecure"] if PLAINTEXT else [])],
        stdout=subprocess.DEVNULL, stderr=(out / "logs" / "server.log").open("w"), env=os.environ)
    started = time.monotonic()
    samples: list[dict] = []
    done = threading.Event()
    sampler = threading.Thread(target=_sample_memory, args=(address, server.pid, samples, done, started), daemon=True)
    sampler.start()

    def client(i: int) -> str:
        cfg = TrainConfig(server=address, client_id=f"load-{i:02d}", seed=i, output=str(out / f"load-{i:02d}"),
                          progress=False, builtin_examples=16, join_timeout=300, **PLAINTEXT)
        try:
            trainer.train(cfg)
            return ""
        except Exception as err:  # noqa: BLE001 - every failure is counted and reported
            return f"load-{i:02d}: {type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=args.clients) as pool:
        errors = [e for e in pool.map(client, range(args.clients)) if e]
    seconds = time.monotonic() - started
    try:
        server_rc = server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()
        server_rc = -9
    done.set()
    sampler.join(timeout=10)
    ok = _report(args, samples, errors, server_rc, seconds)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
