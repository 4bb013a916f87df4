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

from splitlora_bench import assets, procs, report
from splitlora_bench.options import BenchConfig, parse_shape
from common.fingerprint import compute_fingerprint
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.split.parts import load_config
from splitlora_client.session import SplitSession


class LoadClient:
    """One client id that sends steps in a loop; every measured point joins again and starts where the server says."""

    def __init__(self, client_id: str, fingerprint, hidden_size: int, vocab: int) -> None:
        self.client_id, self.fingerprint, self.next_step = client_id, fingerprint, 0
        self.hidden_size, self.vocab = hidden_size, vocab
        self.stamps: list[tuple[float, float]] = []  # (sent, answered)
        self.error: BaseException | None = None

    def shape(self, batch: int, seq: int) -> "LoadClient":
        """Send steps of `batch` x `seq` tokens from now on."""
        g = torch.Generator().manual_seed(sum(map(ord, self.client_id)))
        self.hidden = torch.randn(batch, seq, self.hidden_size, generator=g)
        self.mask = torch.ones(batch, seq, dtype=torch.long)
        self.positions = (self.mask.cumsum(-1) - 1)
        self.labels = torch.randint(0, self.vocab, (batch, seq), generator=g)
        self.labels[:, : seq // 2] = -100  # the context is not a target
        return self

    def run(self, address: str, stop: threading.Event) -> None:
        """Step until `stop` is set; a failure is kept in `error` (and stops every client)."""
        try:
            self._run(address, stop)
        except BaseException as err:  # noqa: BLE001 - handed to the measuring thread
            self.error = err
            stop.set()

    def _run(self, address: str, stop: threading.Event) -> None:
        channel = grpc.insecure_channel(address)
        session = SplitSession(channel, self.client_id)
        reply = session.join(self.fingerprint, [tpb.CODEC_RAW], timeout=300)
        self.next_step = reply.start_round * reply.schedule.local_steps  # a rejoining client redoes its open round
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
    """Throughput of `clients` stepping together for `seconds` after `warmup` seconds.

    The clients never pause, so by Little's law throughput = clients / mean step latency; the latency is averaged
    over every step that ends after the warm-up (a step still in flight at the end is waited for), which stays
    exact when single steps (big batches) take longer than the measurement itself."""
    for c in clients:
        c.stamps.clear()
        c.error = None
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
        t.join(timeout=3600)
    failed = [c for c in clients if c.error is not None]
    if failed:
        raise RuntimeError(f"load client {failed[0].client_id} failed: {failed[0].error}") from failed[0].error
    latency = [e - s for c in clients for s, e in c.stamps if e > t0]
    counted = sum(1 for c in clients for _, e in c.stamps if t0 <= e <= t1)
    mean = statistics.mean(latency) if latency else float("nan")
    return {"steps_per_s": len(clients) / mean, "steps_ended_in_window": counted, "counted_steps_per_s":
            counted / (t1 - t0), "latency_s_mean": mean}


def run(cfg: BenchConfig) -> Path:
    """Measure every client count with batching off and on; write scaling.{json,md,png}."""
    model = assets.model_dir(cfg)
    config = load_config(model)
    fingerprint = compute_fingerprint(model, cfg.split_layer, cfg.lora())
    most = max(cfg.scaling_clients)
    work = cfg.out_dir / "work" / "scaling"
    common = ["--model", str(model), "--clients", str(most), "--rounds", "1", "--local-steps", "100000000",
              "--batch-size", str(cfg.batch_size), "--split-layer", str(cfg.split_layer), "--max-seq-len",
              str(cfg.max_seq_len), "--seed", str(cfg.seed), "--output", str(work / "out"), *cfg.lora_flags(),
              *procs.PLAINTEXT_FLAGS]
    modes = {"off": ["--max-batch-clients", "1"],
             "on": ["--max-batch-clients", str(most), "--batch-window-ms", str(cfg.batch_window_ms)]}
    servers = {m: procs.start_server(common + flags, work / f"server-{m}.log", cfg.threads, port=procs.free_port())
               for m, flags in modes.items()}
    load = {m: [LoadClient(f"load-{i}", fingerprint, int(config.hidden_size), int(config.vocab_size))
                for i in range(most)] for m in modes}
    results = []
    try:
        for m, (_, port) in servers.items():  # loaded, and past its first (slowest) steps, before any point
            batch, seq = parse_shape(cfg.scaling_shapes[0])
            measure([load[m][0].shape(batch, seq)], f"127.0.0.1:{port}", 0.0, cfg.scaling_warmup_s)
        for shape in cfg.scaling_shapes:
            batch, seq = parse_shape(shape)
            for i, n in enumerate(cfg.scaling_clients):
                for rep in range(cfg.scaling_repeats):  # off and on alternate, so drifting load hits both alike
                    for m in (("off", "on") if (i + rep) % 2 == 0 else ("on", "off")):
                        clients = [c.shape(batch, seq) for c in load[m][:n]]
                        point = measure(clients, f"127.0.0.1:{servers[m][1]}", cfg.scaling_seconds,
                                        cfg.scaling_warmup_s)
                        results.append({"shape": shape, "clients": n, "batching": m, "repeat": rep, **point})
    finally:
        procs.stop([proc for proc, _ in servers.values()])
    rows = []
    for shape in cfg.scaling_shapes:
        for n in cfg.scaling_clients:
            point = {m: [r for r in results if (r["shape"], r["clients"], r["batching"]) == (shape, n, m)]
                     for m in modes}
            rate = {m: statistics.median(r["steps_per_s"] for r in rs) for m, rs in point.items()}
            for m, rs in point.items():
                rows.append({"step_shape": shape, "clients": n, "batching": m, "steps_per_s": rate[m],
                             "samples_per_s": rate[m] * parse_shape(shape)[0],
                             "vs_batching_off": rate[m] / rate["off"] if rate["off"] else float("nan"),
                             "latency_s_mean": statistics.median(r["latency_s_mean"] for r in rs)})
    series = {}
    for shape in cfg.scaling_shapes:
        for m in modes:
            line = [r for r in rows if (r["step_shape"], r["batching"]) == (shape, m)]
            series[f"{shape}, batching {m}"] = ([r["clients"] for r in line], [r["steps_per_s"] for r in line])
    plots = [p for p in [report.plot(cfg.out_dir / "scaling.png", series, "concurrent clients", "server steps/s",
                                     "Server throughput (steps of B x T tokens)", logy=True)] if p]
    notes = [f"{model.name}, server part = blocks {cfg.split_layer}.. + head; steps of B x T tokens "
             f"({', '.join(cfg.scaling_shapes)}); median of {cfg.scaling_repeats} measurements of "
             f"{cfg.scaling_seconds:g} s per point, each after {cfg.scaling_warmup_s:g} s",
             f"batching on: --max-batch-clients {most} --batch-window-ms {cfg.batch_window_ms:g}; the server runs "
             f"with {cfg.threads} torch threads",
             "the load generators send ready-made activations with no client compute in between; steps_per_s = "
             "clients / mean step latency (Little's law for clients that never pause)"]
    return report.write(cfg.out_dir, "scaling", "Server scaling: steps/s with concurrent clients",
                        {"results": results}, rows, notes, plots)
