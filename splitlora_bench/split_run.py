"""Flags of a real SplitLoRA run (server and clients through the console scripts) and what its clients report."""
from __future__ import annotations

import statistics
from pathlib import Path

from splitlora_bench import assets, procs
from splitlora_bench.options import BenchConfig


def server_flags(cfg: BenchConfig, model: Path, clients: int, rounds: int, local_steps: int, codec: str,
                 out: Path) -> list[str]:
    """`splitlora-server serve` flags of a benchmark run (the port is added by procs.start_server)."""
    return ["--model", str(model), "--clients", str(clients), "--rounds", str(rounds), "--local-steps",
            str(local_steps), "--batch-size", str(cfg.batch_size), "--split-layer", str(cfg.split_layer),
            "--learning-rate", str(cfg.learning_rate), "--warmup-steps", str(cfg.warmup_steps), "--max-seq-len",
            str(cfg.max_seq_len), "--seed", str(cfg.seed), "--codecs", codec, "--output", str(out),
            "--finish-grace-seconds", "30", *cfg.lora_flags(), *procs.PLAINTEXT_FLAGS]


def client_flags(cfg: BenchConfig, model: Path, address: str, index: int, clients: int, codec: str,
                 out: Path) -> list[str]:
    """`splitlora-client train` flags of client `index` of `clients` (an IID shard of the training data)."""
    return ["--server", address, "--model", str(model), "--split-layer", str(cfg.split_layer), "--data",
            str(assets.train_file(cfg)), "--shard-index", str(index), "--shard-count", str(clients),
            "--client-id", f"client-{index}", "--seed", str(cfg.seed + index), "--codecs", codec,
            "--output", str(out), "--join-timeout", "300", *cfg.lora_flags(), *procs.PLAINTEXT_FLAGS]


def summarize(metrics: list[Path]) -> dict:
    """Wall time of the training steps (first step start to last step end, all clients), median step time, bytes
    per step each way, and the losses, from the clients' metrics.jsonl."""
    records = [procs.steps(m) for m in metrics]
    flat = [r for rs in records for r in rs]
    start = min(r["time"] - r["seconds"] for r in flat)
    return {"wall_s": max(r["time"] for r in flat) - start,
            "step_s_median": statistics.median(r["seconds"] for r in flat),
            "steps": len(flat),
            "bytes_up_per_step": statistics.mean(r["bytes_sent"] for r in flat),
            "bytes_down_per_step": statistics.mean(r["bytes_received"] for r in flat),
            "losses": [[r["loss"] for r in rs] for rs in records],
            "round_end_s": _round_ends(flat, start)}


def _round_ends(flat: list[dict], start: float) -> list[float]:
    """Seconds from the start at which the last client finished each round's steps."""
    ends: dict[int, float] = {}
    for r in flat:
        ends[r["round"]] = max(ends.get(r["round"], 0.0), r["time"] - start)
    return [ends[k] for k in sorted(ends)]


def console_steps(cfg: BenchConfig, model: Path, data: Path, steps: int, work: Path, threads: int,
                  micro_batches: int = 1, cores: tuple[int, int] | None = None) -> list[dict]:
    """One client's `steps` steps through what users run, `splitlora-server serve` and `splitlora-client train` as
    separate processes (pinned to `cores` (client, server) with `taskset` when given), on the lines of `data` in
    the client's order; return the step records of its metrics.jsonl (seconds, cpu_s and the phases)."""
    procs.fresh(work)
    split = ["--split-layer", str(cfg.split_layer), "--torch-threads", str(threads), *cfg.lora_flags(),
             *procs.PLAINTEXT_FLAGS]
    pin = (["taskset", "-c", str(cores[0])], ["taskset", "-c", str(cores[1])]) if cores else ([], [])
    server, port = procs.start_server(
        ["--model", str(model), "--clients", "1", "--rounds", "1", "--local-steps", str(steps), "--batch-size",
         str(cfg.batch_size), "--warmup-steps", "0", "--learning-rate", str(cfg.learning_rate), "--max-seq-len",
         str(cfg.max_seq_len), "--codecs", "float32", "--seed", str(cfg.seed), "--output", str(work / "server"),
         "--micro-batches", str(micro_batches), "--finish-grace-seconds", "0", *split],
        work / "server.log", threads, prefix=pin[1], port=procs.free_port())
    client = procs.start_client(
        ["--server", f"127.0.0.1:{port}", "--model", str(model), "--client-id", "bench", "--data", str(data),
         "--seed", str(cfg.seed), "--output", str(work / "client"), "--join-timeout", "300", *split],
        work / "client.log", threads, prefix=pin[0])
    procs.wait_all([client, server], timeout=3600, logs=[work / "client.log", work / "server.log"])
    return with_server_phases(procs.steps(work / "client" / "metrics.jsonl"),
                              procs.steps(work / "server" / "metrics.jsonl"))


SERVER_PHASES = ("decode_s", "server_s", "encode_s", "cpu_s")


def with_server_phases(client: list[dict], server: list[dict]) -> list[dict]:
    """The client's step records, each with the server's phases of the same step (its micro-batches summed) as
    `server_decode_s`, `server_s` (queue, forward, backward, update), `server_encode_s` and `server_cpu_s`, and
    `wire_s`: the client's wait (and the preparation of its next batch, which overlaps the server's work) minus
    the server's decode, engine and encode time: the transfers both ways and the hand-overs between threads and
    processes (meaningful for whole steps; with micro-batches the server's work overlaps the client's)."""
    by_step: dict[int, dict[str, float]] = {}
    for r in server:
        acc = by_step.setdefault(r["step"], dict.fromkeys(SERVER_PHASES, 0.0))
        for key in SERVER_PHASES:
            acc[key] += r.get(key, 0.0)
    out = []
    for r in client:
        s = by_step.get(r["step"], dict.fromkeys(SERVER_PHASES, 0.0))
        merged = {**r, "server_decode_s": s["decode_s"], "server_s": s["server_s"], "server_encode_s": s["encode_s"],
                  "server_cpu_s": s["cpu_s"]}
        waited = r.get("wait_s", 0.0) + r.get("prepare_s", 0.0)
        merged["wire_s"] = waited - s["decode_s"] - s["server_s"] - s["encode_s"]
        out.append(merged)
    return out


def same_batches(cfg: BenchConfig, model: Path, data: Path):
    """The batches the client of `console_steps` trains on, in its order (same file, tokenizer, seed)."""
    from common.data import BatchStream, encode, load_examples

    tokenizer = assets.tokenizer_of(model)
    return BatchStream([encode(tokenizer, ex, cfg.max_seq_len) for ex in load_examples(data)], cfg.batch_size,
                       tokenizer.pad_token_id, seed=cfg.seed)
