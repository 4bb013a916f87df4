"""Overhead: one client's step through what users run (`splitlora-server serve` and `splitlora-client train` as
separate processes over loopback gRPC) against the same model and batches fine-tuned in one process without any
split, and against both parts in one process without the network; the split step broken down into its phases
from the client's metrics."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import grpc

from splitlora_bench import assets, procs, report, split_run
from splitlora_bench.baselines import WholeModelTrainer
from splitlora_bench.evaluate import full_model
from splitlora_bench.options import BenchConfig, parse_shape
from common.data import BatchStream, write_examples
from common.fingerprint import compute_fingerprint
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.split.parts import SplitPart


class _InProcessSplitStep:
    """Both parts in this process, the cut tensor handed over directly: the split without the network."""

    def __init__(self, cfg: BenchConfig, model: Path, optim: OptimSettings) -> None:
        self.client = SplitPart(model, "client", cfg.split_layer, cfg.lora(), lora_seed=cfg.seed).train()
        self.server = SplitPart(model, "server", cfg.split_layer, cfg.lora(), lora_seed=cfg.seed).train()
        self.params = [p for part in (self.client, self.server) for p in part.parameters() if p.requires_grad]
        self.opt, self.sched = build_optimizer(self.params, optim)
        self.optim = optim

    def __call__(self, batch: dict) -> None:
        mask, pos = batch["attention_mask"], batch["position_ids"]
        hidden = self.client(batch["input_ids"], mask, pos)
        cut = hidden.detach().requires_grad_(True)
        causal_lm_loss(self.server(cut, mask, pos), batch["labels"], 0.1)[0].backward()
        hidden.backward(cut.grad)
        optimizer_step(self.params, self.opt, self.sched, self.optim.max_grad_norm)


class _LocalStep(WholeModelTrainer):
    """The same fine-tuning without a split: the whole model with LoRA, in this process (CenLoRA's step)."""

    def __init__(self, cfg: BenchConfig, model: Path, optim: OptimSettings) -> None:
        super().__init__(full_model(model, cfg.lora()).train(), optim, 0.1, cfg.seed, "overhead-local")

    def __call__(self, batch: dict) -> None:
        self.step(batch)


PHASES = ("forward_s", "send_s", "wait_s", "backward_s", "optimizer_s")


def measure(cfg: BenchConfig, shape: tuple[int, int], work: Path) -> dict:
    """Median step times of one model shape: the split through the console scripts (server and client processes),
    then the single-process and in-process-split steps on the same batches; their ratios and the split step's
    phases and CPU time as the client reports them."""
    model = assets.model_dir(cfg, shape)
    train, _ = assets.examples(cfg)
    n, warm = cfg.overhead_warmup + cfg.overhead_steps, cfg.overhead_warmup
    data = procs.fresh(work) / "train.txt"
    write_examples(data, train[:n * cfg.batch_size])  # one pass: every kind of step sees the same batches
    records = split_run.console_steps(cfg, model, data, n, work / "split", cfg.threads)[warm:]
    optim = OptimSettings(cfg.learning_rate, 0.01, 0, n)
    steps = {"local": _LocalStep(cfg, model, optim), "inproc": _InProcessSplitStep(cfg, model, optim)}
    batches = split_run.same_batches(cfg, model, data)
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    cpu: dict[str, list[float]] = {mode: [] for mode in steps}
    for i in range(n):
        batch = batches.next_batch()
        for mode in list(steps)[i % 2:] + list(steps)[:i % 2]:  # alternate, so drifting load hits both alike
            started, used = time.perf_counter(), time.process_time()
            steps[mode](batch)
            if i >= warm:
                times[mode].append(time.perf_counter() - started)
                cpu[mode].append(time.process_time() - used)
    times["split"] = [r["seconds"] for r in records]
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    local_cpu = statistics.median(cpu["local"])
    params = sum(p.numel() for p in steps["local"].model.base_model.model.parameters())
    return {"model": model.name, "params_M": round(params / 1e6, 1), "split_step_s": med["split"],
            "local_step_s": med["local"], "inproc_split_step_s": med["inproc"], "ratio": med["split"] / med["local"],
            "ratio_of_minima": min(times["split"]) / min(times["local"]),
            "client_cpu_s": statistics.median(r["cpu_s"] for r in records), "local_cpu_s": local_cpu,
            "inproc_cpu_s": statistics.median(cpu["inproc"]),
            **{p: statistics.median(r[p] for r in records) for p in PHASES},
            "wire_MB_per_step": statistics.mean(r["bytes_sent"] + r["bytes_received"] for r in records) / 1e6,
            "load_average": os.getloadavg(), "times": times, "cpu": cpu}


def run(cfg: BenchConfig) -> Path:
    """Measure every shape of --overhead-shapes (or --model alone); write overhead.{json,md}."""
    shapes = [parse_shape(s) for s in cfg.overhead_shapes] if not cfg.model else [(0, 0)]
    results = [measure(cfg, shape, cfg.out_dir / "work" / f"overhead-{i}") for i, shape in enumerate(shapes)]
    rows = [{k: r[k] for k in ("model", "params_M", "split_step_s", "local_step_s", "inproc_split_step_s", "ratio",
                               "ratio_of_minima", "client_cpu_s", "local_cpu_s", *PHASES, "wire_MB_per_step")}
            for r in results]
    load = os.getloadavg()
    notes = [f"median of {cfg.overhead_steps} steps after {cfg.overhead_warmup} warm-up steps, batch "
             f"{cfg.batch_size} of E2E examples, split after block {cfg.split_layer}, float32 on the wire, "
             f"{cfg.threads} torch threads per process; every kind of step on the same batches",
             "split step: what users run, `splitlora-server serve` and `splitlora-client train` as separate "
             "processes over loopback gRPC, timed by the client (its metrics.jsonl): client forward, activations "
             "to the server, server forward/backward/AdamW, gradient back, client backward/AdamW; local step: the "
             "same model and batch with LoRA in this process (same loss and clipping); inproc_split_step_s: both "
             "parts in this process, the cut tensor handed over directly",
             "ratio: median split step / median local step (wall time); ratio_of_minima: fastest / fastest; "
             "client_cpu_s: CPU seconds of the client process per step (every thread; the server's are not "
             "included); local_cpu_s: of the local step; forward_s .. optimizer_s: the split step's phases as the "
             "client reports them (wait_s: the wire, the server and decoding, as far as not overlapped)",
             f"load average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min)"]
    return report.write(cfg.out_dir, "overhead", "Overhead of the split (loopback gRPC) against one process",
                        {"results": results}, rows, notes)
