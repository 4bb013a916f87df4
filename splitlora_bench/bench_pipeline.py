"""Pipeline: client and server as two devices. Each is started by its console script and pinned to a core of
its own (`taskset`, `--torch-threads 1`); the split step with 1, 2, 4 micro-batches (pipelined steps) against
the single-process step on one core (this process, pinned likewise), on the same batches, loss and clipping.
Two devices working at once can beat one: the goal is a pipelined split step below the single-process step."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from splitlora_bench import assets, procs, report, split_run
from splitlora_bench.baselines import WholeModelTrainer
from splitlora_bench.evaluate import full_model
from splitlora_bench.options import BenchConfig
from common.data import write_examples
from common.optim import OptimSettings
from common.threads import usable_cores


def _single_process(cfg: BenchConfig, model: Path, data: Path, core: int, steps: int) -> list[float]:
    """Step times of the whole model with LoRA in this process on one core, on the client's batches."""
    batches = split_run.same_batches(cfg, model, data)
    trainer = WholeModelTrainer(full_model(model, cfg.lora()).train(), OptimSettings(cfg.learning_rate, 0.01, 0, steps),
                                0.1, cfg.seed, "pipeline-local")
    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(steps):
            batch = batches.next_batch()
            started = time.perf_counter()
            trainer.step(batch)
            times.append(time.perf_counter() - started)
        return times
    finally:
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)


def _spread(times: list[float]) -> dict[str, float]:
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {"median_step_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(times), "max_s": max(times)}


def run(cfg: BenchConfig) -> Path:
    """Measure the single-process step and the split step for each of --pipeline-micro-batches."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit(f"pipeline needs two usable cores (client and server pinned apart); {usable_cores()} here")
    model, work = assets.model_dir(cfg), cfg.out_dir / "work" / "pipeline"
    train, _ = assets.examples(cfg)
    n, warm = cfg.overhead_warmup + cfg.overhead_steps, cfg.overhead_warmup
    data = procs.fresh(work) / "train.txt"
    write_examples(data, train[:n * cfg.batch_size])  # one pass: both sides see the same batches in one order
    load, stat = os.getloadavg(), procs.cpu_stat()
    single = _single_process(cfg, model, data, cores[0], n)[warm:]
    records = {m: split_run.console_steps(cfg, model, data, n, work / f"micro-{m}", 1, m, (cores[0], cores[1]))[warm:]
               for m in cfg.pipeline_micro_batches}
    split = {m: [r["seconds"] for r in rs] for m, rs in records.items()}
    single += _single_process(cfg, model, data, cores[0], n)[warm:]  # again after the splits: drift hits both
    base = statistics.median(single)
    rows = [{"step": "single process, 1 core", "micro_batches": 0, **_spread(single), "ratio": 1.0}]
    rows += [{"step": "split, client and server on a core each", "micro_batches": m, **_spread(ts),
              "ratio": statistics.median(ts) / base,
              **{f"{k.removesuffix('_s')}_ms": 1e3 * statistics.median(r.get(k, 0.0) for r in records[m])
                 for k in ("forward_s", "wait_s", "backward_s", "server_s")}} for m, ts in split.items()]
    notes = [f"median of {cfg.overhead_steps} steps after {warm} warm-up steps, batch {cfg.batch_size}, split after "
             f"block {cfg.split_layer}, float32 on the wire; client on core {cores[0]}, server on core {cores[1]}, "
             "one torch thread each; the single-process step on the client's core, measured before and after the "
             "split runs (both sets pooled)",
             "split step: as the client reports it in metrics.jsonl (forward, wire, server, backward, AdamW); "
             "median_step_s (q1, q3, min, max) over the timed steps; ratio: median split step / median "
             "single-process step; forward/wait/backward_ms: the client's phases summed over a step's micro-batches "
             "(median), server_ms: the server's engine time summed likewise (from its metrics.jsonl)",
             f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min); at the end: "
             f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; niced processes (nice > 0) took "
             f"{100 * procs.niced_share(stat):.1f} % of all CPU time during the run"]
    return report.write(cfg.out_dir, "pipeline", "Pipelined split steps on two pinned cores against one process",
                        {"single": single, "split": {str(m): ts for m, ts in split.items()}, "load": load,
                         "load_at_end": os.getloadavg(), "records": {str(m): rs for m, rs in records.items()}}, rows,
                        notes)
