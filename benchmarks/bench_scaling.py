"""Server scaling: steps/s of one split server with 1..8 concurrent clients, cross-client batching off and on.

The clients are load generators (threads of this process) that send ready-made cut activations of E2E-like shape
as fast as the server answers, so the server is the bottleneck being measured. Two servers (batching off / on)
run side by side and the points are measured alternately, so background load hits both alike.
"""
from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import grpc
import torch

from benchmarks import assets, procs, report
from benchmarks.config import BenchConfig
from common.fingerprint import compute_fingerprint
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.split.parts import load_config
from splitlora_client.session import SplitSession



class LoadClient:
    """One client id that sends steps in a loop; its step counter survives between measured points."""

    def __init__(self, client_id: str, fingerprint, batch: int, seq: int, hidden_size: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(hash(client_id) % 2**31)
        self.client_id, self.fingerprint, self.next_step = client_id, fingerprint, 0
        self.hidden = torch.randn(batch, seq, hidden_size, generator=g)
        self.mask = torch.ones(batch, seq, dtype=torch.long)
        self.positions = (self.mask.cumsum(-1) - 1)
        self.labels = torch.randint(0, vocab, (batch, seq), generator=g)
        self.labels[:, : seq // 2] = -100  # the context is not a target
        self.stamps: list[tuple[float, float]] = []  # (sent, answered)

    def run(self, address: str, stop: threading.Event) -> None:
        """Step until `stop` is set."""
        channel = grpc.insecure_channel(address)
        session = SplitSession(channel, self.client_id)
        session.join(self.fingerprint, [tpb.CODEC_RAW], timeout=300)
        try:
            while not stop.is_set():
                sent = time.perf_counter()
                session.step(self.next_step, 0, self.hidden, self.mask, self.labels, self.positions)
                self.stamps.append((sent, time.perf_counter()))
                self.next_step += 1
        finally:
            session.close()
            channel.close()


def measure(clients: list[LoadClient], address: str, seconds: float, warmup: float) -> dict:
    """Steps/s of `clients` stepping together for `seconds` after `warmup` seconds."""
    for c in clients:
        c.stamps.clear()
    stop = threading.Event()
    threads = [threading.Thread(target=c.run, args=(address, stop), daemon=True) for c in clients]
    for t in threads:
        t.start()
    time.sleep(warmup)
    t0 = time.perf_counter()
    time.sleep(seconds)
    t1 = time.perf_counter()
    stop.set()
    for t in threads:
        t.join(timeout=600)
    done = [(s, e) for c in clients for s, e in c.stamps if t0 <= e <= t1]
    latency = [e - s for s, e in done]
    return {"steps_per_s": len(done) / (t1 - t0), "steps": len(done),
            "latency_s_median": statistics.median(latency) if latency else float("nan")}


def run(cfg: BenchConfig) -> Path:
    """Measure every client count with batching off and on; write scaling.{json,md,png}."""
    model = assets.model_dir(cfg)
    config = load_config(model)
    fingerprint = compute_fingerprint(model, cfg.split_layer, cfg.lora())
    most = max(cfg.scaling_clients)
    work = cfg.out_dir / "work" / "scaling"
    common = ["--model", str(model), "--clients", str(most), "--rounds", "1", "--local-steps", "100000000",
              "--batch-size", str(cfg.batch_size), "--split-layer", str(cfg.split_layer), "--max-seq-len",
              str(cfg.max_seq_len), "--seed", str(cfg.seed), "--output", str(work / "out"), *cfg.lora_flags()]
    modes = {"off": ["--max-batch-clients", "1"],
             "on": ["--max-batch-clients", str(most), "--batch-window-ms", str(cfg.batch_window_ms)]}
    servers = {m: procs.start_server(common + flags, work / f"server-{m}.log", cfg.threads, port=procs.free_port())
               for m, flags in modes.items()}
    load = {m: [LoadClient(f"load-{i}", fingerprint, cfg.batch_size, cfg.scaling_seq_len, int(config.hidden_size),
                           int(config.vocab_size)) for i in range(most)] for m in modes}
    results = []
    try:
        for i, n in enumerate(cfg.scaling_clients):
            for m in (("off", "on") if i % 2 == 0 else ("on", "off")):
                point = measure(load[m][:n], f"127.0.0.1:{servers[m][1]}", cfg.scaling_seconds,
                                cfg.scaling_warmup_s)
                results.append({"clients": n, "batching": m, **point})
    finally:
        procs.stop([proc for proc, _ in servers.values()])
    results.sort(key=lambda r: (r["clients"], r["batching"] != "off"))
    off = {r["clients"]: r["steps_per_s"] for r in results if r["batching"] == "off"}
    rows = [{"clients": r["clients"], "batching": r["batching"], "steps_per_s": r["steps_per_s"],
             "samples_per_s": r["steps_per_s"] * cfg.batch_size,
             "vs_batching_off": r["steps_per_s"] / off[r["clients"]] if off.get(r["clients"]) else float("nan"),
             "latency_s_median": r["latency_s_median"]} for r in results]
    series = {m: ([r["clients"] for r in results if r["batching"] == m],
                  [r["steps_per_s"] for r in results if r["batching"] == m]) for m in modes}
    plots = [p for p in [report.plot(cfg.out_dir / "scaling.png", {f"batching {m}": s for m, s in series.items()},
                                     "concurrent clients", "server steps/s", "Server throughput")] if p]
    notes = [f"{model.name}, server part = blocks {cfg.split_layer}.. + head; each step {cfg.batch_size} x "
             f"{cfg.scaling_seq_len} tokens; {cfg.scaling_seconds:g} s measured per point after "
             f"{cfg.scaling_warmup_s:g} s",
             f"batching on: --max-batch-clients {most} --batch-window-ms {cfg.batch_window_ms:g}; the server runs "
             f"with {cfg.threads} torch threads",
             "the load generators send ready-made activations with no client compute in between"]
    return report.write(cfg.out_dir, "scaling", "Server scaling: steps/s with concurrent clients",
                        {"results": results}, rows, notes, plots)
