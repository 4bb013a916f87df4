"""Generation: per-token decode latency through the split (server in its own process, loopback gRPC, KV caches on
both sides) against transformers' `generate` of the unsplit model in one process; prefill time; bytes per
generated token; and the server's tokens/s with several concurrent sessions, cross-session batching off and on.

Latency: greedy generation of one prompt, `max_new_tokens` 1 (prefill only) and N; the decode time per token is
(time(N) - time(1)) / (N - 1). Split and local runs take turns on the same prompts, so drifting load hits both.
Throughput: S threads of this process each run their own sessions for a fixed time (their client parts share
this process's cores); the server runs every session's steps on its one engine.
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path

import grpc
import torch

from splitlora_bench import assets, procs, report
from splitlora_bench.evaluate import full_model
from splitlora_bench.options import BenchConfig, parse_shape
from common.fingerprint import compute_fingerprint
from common.split.parts import SplitPart
from splitlora_client.generation.model import SplitCausalLM
from splitlora_client.generation.remote import RemoteSession


def _server(cfg: BenchConfig, model: Path, work: Path, batching: bool) -> tuple:
    """A split server that serves generation (its training schedule is never used)."""
    return procs.start_server(
        ["--model", str(model), "--clients", "1", "--rounds", "1", "--local-steps", "1", "--split-layer",
         str(cfg.split_layer), "--max-seq-len", str(cfg.max_seq_len), "--seed", str(cfg.seed), "--output",
         str(work / "server"), "--generation-max-sessions", "256", "--generation-max-batch", "64",
         "--generation-batching" if batching else "--no-generation-batching", *cfg.lora_flags(),
         *procs.PLAINTEXT_FLAGS], work / f"server-{'on' if batching else 'off'}.log", cfg.threads)


class _Split:
    """The client's part and a channel: a SplitCausalLM per caller."""

    def __init__(self, cfg: BenchConfig, model: Path, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(self.channel).result(timeout=300)
        self.part = SplitPart(model, "client", cfg.split_layer, cfg.lora(), lora_seed=cfg.seed).eval()
        self.fingerprint = compute_fingerprint(model, cfg.split_layer, cfg.lora())

    def model(self, name: str) -> SplitCausalLM:
        return SplitCausalLM(self.part, lambda: RemoteSession(self.channel, name, vocab_size=self.part.vocab_size,
                                                              fingerprint=self.fingerprint))


def _timed(model, ids: torch.Tensor, new: int, pad: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                       pad_token_id=pad, eos_token_id=None)
    return time.perf_counter() - started


def latency(cfg: BenchConfig, model: Path, split: _Split, prompts: list[torch.Tensor], pad: int) -> dict:
    """Median prefill and per-token decode times, split and local; bytes per generated token."""
    local = full_model(model, cfg.lora()).eval()
    runner = split.model("latency")
    new = cfg.generate_tokens
    times: dict[str, list[float]] = {"split_1": [], "split_n": [], "local_1": [], "local_n": []}
    for i, ids in enumerate(prompts):
        runs = [("split", runner), ("local", local)]
        for name, m in runs if i % 2 else runs[::-1]:
            times[f"{name}_1"].append(_timed(m, ids, 1, pad))
            times[f"{name}_n"].append(_timed(m, ids, new, pad))
    wire = []
    for tokens in (1, new):  # the bytes of the decode steps alone: N tokens minus the prefill-only run
        runner.bytes_sent = runner.bytes_received = 0
        _timed(runner, prompts[0], tokens, pad)
        wire.append(runner.bytes_sent + runner.bytes_received)
    per_token = {k: statistics.median((n - one) / (new - 1) for one, n in zip(times[f"{k}_1"], times[f"{k}_n"]))
                 for k in ("split", "local")}
    return {"prefill_split_s": statistics.median(times["split_1"]), "prefill_local_s": statistics.median(times["local_1"]),
            "decode_split_ms": per_token["split"] * 1e3, "decode_local_ms": per_token["local"] * 1e3,
            "ratio": per_token["split"] / per_token["local"],
            "bytes_per_token": (wire[1] - wire[0]) / (new - 1), "times": times}


def throughput(cfg: BenchConfig, split: _Split, sessions: int, prompt: torch.Tensor, pad: int) -> float:
    """Generated tokens per second of `sessions` concurrent callers, each generating `generate_tokens` at a time.
    Tokens are counted as they are generated (one per forward of a batch-1 session), not when a whole generation
    ends: with many sessions one generation can take longer than the measuring window."""
    models = [split.model(f"bench-{i}") for i in range(sessions)]
    stop = threading.Event()

    def caller(m: SplitCausalLM) -> None:
        while not stop.is_set():
            _timed(m, prompt, cfg.generate_tokens, pad)

    threads = [threading.Thread(target=caller, args=(m,), daemon=True) for m in models]
    for t in threads:
        t.start()
    time.sleep(cfg.scaling_warmup_s)
    start_count, started = sum(m.steps for m in models), time.perf_counter()
    time.sleep(cfg.scaling_seconds)
    rate = (sum(m.steps for m in models) - start_count) / (time.perf_counter() - started)
    stop.set()
    for t in threads:
        t.join(timeout=600)
    return rate


def measure(cfg: BenchConfig, shape: tuple[int, int] | None, work: Path) -> tuple[dict, list[dict], dict]:
    """Latency (batching on) and throughput rows (batching off and on) of one model shape."""
    model = assets.model_dir(cfg, shape)
    tokenizer = assets.tokenizer_of(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    contexts = [ex.context or ex.completion for ex in assets.examples(cfg)[1]][:cfg.generate_prompts]
    prompts = [torch.tensor([tokenizer.encode(c, add_special_tokens=False)[:cfg.max_seq_len // 2]]) for c in contexts]
    rows, lat = [], {}
    for batching in (False, True):
        procs.fresh(work)
        server, port = _server(cfg, model, work, batching)
        split = None
        try:
            split = _Split(cfg, model, port)
            if batching:
                lat = latency(cfg, model, split, prompts, pad)
            for sessions in cfg.generate_sessions:
                rows.append({"model": model.name, "batching": "on" if batching else "off", "sessions": sessions,
                             "tokens_per_s": throughput(cfg, split, sessions, prompts[0], pad)})
        finally:
            if split is not None:
                split.channel.close()
            procs.stop([server])
    times = lat.pop("times")
    return {"model": model.name, **lat}, rows, times


def run(cfg: BenchConfig) -> Path:
    """Measure every shape of --generate-shapes (or --model alone); write generate.{json,md}."""
    shapes = [parse_shape(s) for s in cfg.generate_shapes] if not cfg.model else [None]
    load_before, stat = os.getloadavg(), procs.cpu_stat()
    results = [measure(cfg, shape, cfg.out_dir / "work" / f"generate-{i}") for i, shape in enumerate(shapes)]
    latency_rows = [r[0] for r in results]
    scaling_rows = [row for r in results for row in r[1]]
    notes = [f"greedy, batch 1, {cfg.generate_tokens} new tokens, median over {cfg.generate_prompts} held-out "
             f"contexts; split after block {cfg.split_layer}, float32 on the wire, server in its own process on "
             "loopback; local: transformers' generate of the same model with LoRA in one process",
             "decode_*_ms: per generated token after the prefill; ratio: split / local; bytes_per_token: request + "
             "answer bytes of one decode step (the answer is the last position's logits)",
             f"throughput: {cfg.scaling_seconds:g} s after {cfg.scaling_warmup_s:g} s warm-up, each session a thread "
             "of the benchmark process; batching on: the decode steps of waiting sessions run as one forward",
             f"load average before / after: {load_before} / {os.getloadavg()}; niced processes (nice > 0) took "
             f"{100 * procs.niced_share(stat):.1f} % of all CPU time during the run; CPU only (no GPU was available)"]
    return report.write(cfg.out_dir, "generate", "Split generation: decode latency, prefill, bytes, throughput",
                        {"results": [{"latency": r[0], "throughput": r[1], "times": r[2]} for r in results]},
                        latency_rows, notes,
                        tables=[("Server tokens/s by concurrent sessions:", scaling_rows)])
