"""Overhead: one client's step through what users run (`splitlora-server serve` and `splitlora-client train` as
separate processes over loopback gRPC) against the same model and batches fine-tuned in one process without any
split, and against both parts in one process without the network; the split step broken down into its phases
from the client's and the server's metrics."""
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
from common.loss import causal_lm_loss, target_tokens
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


PHASES = ("forward_s", "send_s", "prepare_s", "wire_s", "server_decode_s", "server_s", "server_encode_s", "decode_s",
          "backward_s", "optimizer_s")  # in the order a step goes through them; send_s: the client's encoding


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max."""
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {"median": med, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def _baselines(cfg: BenchConfig, steps: dict, batches, n: int, warm: int) -> tuple[dict, dict, list[int]]:
    """Step times and CPU seconds of each baseline on the n batches (after `warm`), and their target tokens."""
    times: dict[str, list[float]] = {mode: [] for mode in steps}
    cpu: dict[str, list[float]] = {mode: [] for mode in steps}
    tokens: list[int] = []
    for i in range(n):
        batch = batches.next_batch()
        for mode in list(steps)[i % 2:] + list(steps)[:i % 2]:  # alternate, so drifting load hits both alike
            started, used = time.perf_counter(), time.process_time()
            steps[mode](batch)
            if i >= warm:
                times[mode].append(time.perf_counter() - started)
                cpu[mode].append(time.process_time() - used)
        if i >= warm:
            tokens.append(target_tokens(batch["labels"]))
    return times, cpu, tokens


def measure(cfg: BenchConfig, shape: tuple[int, int], work: Path) -> dict:
    """Step times of one model shape, --overhead-repeats times in turn: the split through the console scripts
    (server and client processes), then the single-process and in-process-split steps on the same batches; their
    ratios (of medians, and per batch), CPU time of both roles, the split step's phases as the client and the
    server report them, and the share of the CPUs that niced (other) processes took meanwhile."""
    model = assets.model_dir(cfg, shape)
    train, _ = assets.examples(cfg)
    n, warm = cfg.overhead_warmup + cfg.overhead_steps, cfg.overhead_warmup
    data = procs.fresh(work) / "train.txt"
    write_examples(data, train[:n * cfg.batch_size])  # one pass: every kind of step sees the same batches
    load_before = os.getloadavg()
    optim = OptimSettings(cfg.learning_rate, 0.01, 0, n * cfg.overhead_repeats)
    steps = {"local": _LocalStep(cfg, model, optim), "inproc": _InProcessSplitStep(cfg, model, optim)}
    times: dict[str, list[float]] = {"split": [], "local": [], "inproc": []}
    cpu: dict[str, list[float]] = {"split": [], "local": [], "inproc": []}
    records, pairs, same, niced = [], [], True, {"split": [], "baselines": []}
    for rep in range(cfg.overhead_repeats):  # split and baselines take turns: drifting load hits both
        stat = procs.cpu_stat()
        run = split_run.console_steps(cfg, model, data, n, work / f"split-{rep}", cfg.threads)[warm:]
        niced["split"].append(procs.niced_share(stat))
        stat = procs.cpu_stat()
        base_t, base_cpu, tokens = _baselines(cfg, steps, split_run.same_batches(cfg, model, data), n, warm)
        niced["baselines"].append(procs.niced_share(stat))
        same = same and tokens == [r["tokens"] for r in run]  # the split saw the same batches in the same order
        pairs += [r["seconds"] / t for r, t in zip(run, base_t["local"])]
        records += run
        times["split"] += [r["seconds"] for r in run]
        cpu["split"] += [r["cpu_s"] + r["server_cpu_s"] for r in run]  # both processes, every thread
        for mode in steps:
            times[mode] += base_t[mode]
            cpu[mode] += base_cpu[mode]
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    params = sum(p.numel() for p in steps["local"].model.base_model.model.parameters())
    return {"model": model.name, "params_M": round(params / 1e6, 1), "split_step_s": med["split"],
            "local_step_s": med["local"], "inproc_split_step_s": med["inproc"], "ratio": med["split"] / med["local"],
            "paired_ratio": spread(pairs) if same else {}, "same_batches": same,
            "spread": {mode: spread(ts) for mode, ts in times.items()},
            "ratio_of_minima": min(times["split"]) / min(times["local"]),
            "client_cpu_s": statistics.median(r["cpu_s"] for r in records),
            "server_cpu_s": statistics.median(r["server_cpu_s"] for r in records),
            "split_cpu_s": statistics.median(cpu["split"]), "local_cpu_s": statistics.median(cpu["local"]),
            "inproc_cpu_s": statistics.median(cpu["inproc"]),
            **{p: statistics.median(r.get(p, 0.0) for r in records) for p in PHASES},
            "wire_MB_per_step": statistics.mean(r["bytes_sent"] + r["bytes_received"] for r in records) / 1e6,
            "niced_cpu_share": niced, "load_average_before": load_before, "load_average": os.getloadavg(),
            "times": times, "cpu": cpu, "records": records}


def _row(r: dict) -> dict:
    p = r["paired_ratio"]
    return {"model": r["model"], "params_M": r["params_M"], "split_step_s": r["split_step_s"],
            "local_step_s": r["local_step_s"], "inproc_split_step_s": r["inproc_split_step_s"], "ratio": r["ratio"],
            "per_batch_ratio": f"{p['median']:.3f} (IQR {p['q1']:.3f}-{p['q3']:.3f}, {p['min']:.3f}-{p['max']:.3f})"
            if p else "n/a (batches differ)",
            "split_cpu_s": r["split_cpu_s"], "local_cpu_s": r["local_cpu_s"],
            "cpu_ratio": r["split_cpu_s"] / r["local_cpu_s"], "wire_MB_per_step": r["wire_MB_per_step"],
            "niced_cpu_%": "/".join(f"{100 * max(v):.1f}" for v in r["niced_cpu_share"].values())}


def run(cfg: BenchConfig) -> Path:
    """Measure every shape of --overhead-shapes (or --model alone); write overhead.{json,md}."""
    shapes = [parse_shape(s) for s in cfg.overhead_shapes] if not cfg.model else [(0, 0)]
    results = [measure(cfg, shape, cfg.out_dir / "work" / f"overhead-{i}") for i, shape in enumerate(shapes)]
    rows = [_row(r) for r in results]
    phases = [{"model": r["model"], **{p.removesuffix("_s") + "_ms": 1e3 * r[p] for p in PHASES},
               "client_cpu_s": r["client_cpu_s"], "server_cpu_s": r["server_cpu_s"]} for r in results]
    load = os.getloadavg()
    notes = [f"{cfg.overhead_repeats} repeats of {cfg.overhead_steps} steps each after {cfg.overhead_warmup} warm-up "
             f"steps (split, then the baselines, in turn), pooled; batch "
             f"{cfg.batch_size} of E2E examples, split after block {cfg.split_layer}, LoRA r={cfg.lora_r} alpha "
             f"{cfg.lora_alpha} dropout {cfg.lora_dropout} on {','.join(cfg.lora_targets)}, max_seq_len "
             f"{cfg.max_seq_len}, float32 on the wire, {cfg.threads} torch threads per process; every kind of step "
             "on the same batches, the same loss (label smoothing 0.1) and clipping",
             "split step: what users run, `splitlora-server serve` and `splitlora-client train` as separate "
             "processes over loopback gRPC, timed by the client (its metrics.jsonl): client forward, activations "
             "to the server, server forward/backward/AdamW, gradient back, client backward/AdamW; local step: the "
             "same model and batch with LoRA in this process (same loss and clipping); inproc_split_step_s: both "
             "parts in this process, the cut tensor handed over directly",
             "ratio: median split step / median local step (wall time); per_batch_ratio: split / local step of the "
             "same batch, median (IQR, min-max) over the timed steps; split_cpu_s: CPU seconds per step of client and "
             "server processes together (every thread); local_cpu_s: of the local step (this process); niced_cpu_%: "
             "the most CPU time (of all cores) that processes with a positive nice value took during a split run / "
             "a baseline run (/proc/stat), i.e. what other work took from the benchmark",
             "phases (median ms): forward, send (client encodes and serializes), prepare (the client's next batch, "
             "while the server works), wire (client wait and prepare minus the server's decode, engine and encode: "
             "transfers and hand-overs), server_decode, server (engine: queue, "
             "forward, backward, AdamW), server_encode, decode (client), backward, optimizer (client); from the "
             "client's and the server's metrics.jsonl",
             f"load average before / at the end: {[r['load_average_before'] for r in results]} / "
             f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min)"]
    return report.write(cfg.out_dir, "overhead", "Overhead of the split (loopback gRPC) against one process",
                        {"results": results}, rows, notes,
                        tables=[("The split step's phases (median ms) and CPU seconds per step:", phases)])
