"""Overhead: one client's step over real loopback gRPC (server in its own process) against the same model and
batch fine-tuned in one process without any split, and against both parts in one process without the network.
The kinds of step take turns on the same batches, so drifting load on the machine hits each alike."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import grpc

from splitlora_bench import assets, procs, report
from splitlora_bench.baselines import WholeModelTrainer
from splitlora_bench.evaluate import full_model
from splitlora_bench.options import BenchConfig, parse_shape
from common.data import BatchStream
from common.fingerprint import compute_fingerprint
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.split.parts import SplitPart
from common.wire import codec_from_name
from splitlora_client.session import SplitSession


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _SplitStep:
    """The client's side of a split step, as the trainer runs it (without the round's aggregation)."""

    def __init__(self, cfg: BenchConfig, model: Path, address: str, optim: OptimSettings) -> None:
        self.channel = grpc.insecure_channel(address)
        self.session = SplitSession(self.channel, "overhead")
        self.session.join(compute_fingerprint(model, cfg.split_layer, cfg.lora()), [codec_from_name("float32")],
                          timeout=300)
        self.part = SplitPart(model, "client", cfg.split_layer, cfg.lora(), lora_seed=cfg.seed).train()
        self.params = [p for p in self.part.parameters() if p.requires_grad]
        self.opt, self.sched = build_optimizer(self.params, optim)
        self.optim, self.step_no, self.bytes = optim, 0, 0

    def __call__(self, batch: dict) -> None:
        hidden = self.part(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        result = self.session.step(self.step_no, 0, hidden.detach(), batch["attention_mask"], batch["labels"],
                                   batch["position_ids"])
        hidden.backward(result.grad)
        optimizer_step(self.params, self.opt, self.sched, self.optim.max_grad_norm)
        self.step_no += 1
        self.bytes = result.bytes_sent + result.bytes_received

    def close(self) -> None:
        self.session.close()
        self.channel.close()


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


def measure(cfg: BenchConfig, shape: tuple[int, int], work: Path) -> dict:
    """Median split and local step times of one model shape, and their ratio."""
    model = assets.model_dir(cfg, shape)
    tokenizer = assets.tokenizer_of(model)
    train, _ = assets.examples(cfg)
    n = cfg.overhead_warmup + cfg.overhead_steps
    batches = BatchStream(assets.encoded(tokenizer, train[:n * cfg.batch_size * 2], cfg.max_seq_len),
                          cfg.batch_size, tokenizer.pad_token_id, seed=cfg.seed)
    optim = OptimSettings(cfg.learning_rate, 0.01, 0, n)
    procs.fresh(work)
    server, port = procs.start_server(
        ["--model", str(model), "--clients", "1", "--rounds", "1", "--local-steps", str(n), "--batch-size",
         str(cfg.batch_size), "--split-layer", str(cfg.split_layer), "--warmup-steps", "0", "--learning-rate",
         str(cfg.learning_rate), "--max-seq-len", str(cfg.max_seq_len), "--codecs", "float32",
         "--seed", str(cfg.seed), "--output", str(work / "server"), *cfg.lora_flags(),
         *procs.PLAINTEXT_FLAGS],
        work / "server.log", cfg.threads, port=procs.free_port())
    split = None
    try:  # the local model loads while the server starts; the client's Join waits for the server
        local, inproc = _LocalStep(cfg, model, optim), _InProcessSplitStep(cfg, model, optim)
        split = _SplitStep(cfg, model, f"127.0.0.1:{port}", optim)
        steps = {"split": split, "local": local, "inproc": inproc}
        times: dict[str, list[float]] = {mode: [] for mode in steps}
        cpu: dict[str, list[float]] = {mode: [] for mode in steps}
        for i in range(n):
            batch = batches.next_batch()
            order = list(steps)[i % 3:] + list(steps)[:i % 3]  # rotate, so drifting load hits every mode alike
            for mode in order:
                started, used = time.perf_counter(), time.process_time() + cpu_seconds(server.pid)
                steps[mode](batch)
                if i >= cfg.overhead_warmup:
                    times[mode].append(time.perf_counter() - started)
                    cpu[mode].append(time.process_time() + cpu_seconds(server.pid) - used)
    finally:
        if split is not None:
            split.close()
        procs.stop([server])
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    med_cpu = {mode: statistics.median(ts) for mode, ts in cpu.items()}
    pairs = statistics.median(s / loc for s, loc in zip(times["split"], times["local"]))
    params = sum(p.numel() for p in local.model.base_model.model.parameters())
    return {"model": model.name, "params_M": round(params / 1e6, 1), "split_step_s": med["split"],
            "local_step_s": med["local"], "inproc_split_step_s": med["inproc"], "ratio": med["split"] / med["local"],
            "ratio_of_pairs": pairs,
            "ratio_of_minima": min(times["split"]) / min(times["local"]),
            "split_cpu_s": med_cpu["split"], "local_cpu_s": med_cpu["local"], "inproc_cpu_s": med_cpu["inproc"],
            "cpu_ratio": med_cpu["split"] / med_cpu["local"], "wire_MB_per_step": split.bytes / 1e6,
            "times": times, "cpu": cpu}


def run(cfg: BenchConfig) -> Path:
    """Measure every shape of --overhead-shapes (or --model alone); write overhead.{json,md}."""
    shapes = [parse_shape(s) for s in cfg.overhead_shapes] if not cfg.model else [(0, 0)]
    results = [measure(cfg, shape, cfg.out_dir / "work" / f"overhead-{i}") for i, shape in enumerate(shapes)]
    rows = [{k: r[k] for k in ("model", "params_M", "split_step_s", "local_step_s", "inproc_split_step_s", "ratio",
                               "ratio_of_minima", "split_cpu_s", "local_cpu_s", "inproc_cpu_s", "cpu_ratio",
                               "wire_MB_per_step")}
            for r in results]
    notes = [f"median of {cfg.overhead_steps} steps after {cfg.overhead_warmup} warm-up steps, batch "
             f"{cfg.batch_size} of E2E examples, split after block {cfg.split_layer}, float32 on the wire; "
             "the three kinds of step take turns on the same batches",
             "split step: client forward, activations to the server (its own process) over loopback gRPC, server "
             "forward/backward/AdamW, gradient back, client backward/AdamW; local step: the same model and batch "
             "with LoRA in one process; inproc_split_step_s: both parts in one process, the cut tensor handed over "
             "directly (the split without network or second process)",
             "ratio: median split step / median local step (wall time); ratio_of_minima: fastest split step / fastest "
             "local step (the least disturbed by other load); *_cpu_s: CPU seconds of the step in every process "
             "involved (client and server for the split), median; cpu_ratio: split / local CPU time, which other "
             "load on a shared machine disturbs far less than wall time"]
    return report.write(cfg.out_dir, "overhead", "Overhead of the split (loopback gRPC) against one process",
                        {"results": results}, rows, notes)
