"""Overhead: one client's step over real loopback gRPC (server in its own process) against the same model and
batch fine-tuned in one process without any split. Split and local steps alternate, so load affects both alike."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import grpc

from benchmarks import assets, procs, report
from benchmarks.config import BenchConfig, parse_shape
from benchmarks.evaluate import full_model
from common.data import BatchStream
from common.fingerprint import compute_fingerprint
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.split.parts import SplitPart
from common.wire import codec_from_name
from splitlora_client.session import SplitSession


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


class _LocalStep:
    """The same fine-tuning without a split: the whole model with LoRA, in this process."""

    def __init__(self, cfg: BenchConfig, model: Path, optim: OptimSettings) -> None:
        self.model = full_model(model, cfg.lora()).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt, self.sched = build_optimizer(self.params, optim)
        self.optim = optim

    def __call__(self, batch: dict) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits
        causal_lm_loss(logits, batch["labels"], 0.1)[0].backward()
        optimizer_step(self.params, self.opt, self.sched, self.optim.max_grad_norm)


def measure(cfg: BenchConfig, shape: tuple[int, int], work: Path) -> dict:
    """Median split and local step times of one model shape, and their ratio."""
    model = assets.model_dir(cfg, shape)
    tokenizer = assets.tokenizer_of(model)
    train, _ = assets.examples(cfg)
    n = cfg.overhead_warmup + cfg.overhead_steps
    batches = BatchStream(assets.encoded(tokenizer, train[:n * cfg.batch_size * 2], cfg.max_seq_len),
                          cfg.batch_size, tokenizer.pad_token_id, seed=cfg.seed)
    optim = OptimSettings(cfg.learning_rate, 0.01, 0, n)
    server, port = procs.start_server(
        ["--model", str(model), "--clients", "1", "--rounds", "1", "--local-steps", str(n), "--batch-size",
         str(cfg.batch_size), "--split-layer", str(cfg.split_layer), "--warmup-steps", "0", "--learning-rate",
         str(cfg.learning_rate), "--max-seq-len", str(cfg.max_seq_len), "--codecs", "float32",
         "--seed", str(cfg.seed), "--output", str(work / "server"), *cfg.lora_flags()],
        work / "server.log", cfg.threads, port=procs.free_port())
    split = None
    try:  # the local model loads while the server starts; the client's Join waits for the server
        local = _LocalStep(cfg, model, optim)
        split = _SplitStep(cfg, model, f"127.0.0.1:{port}", optim)
        times: dict[str, list[float]] = {"split": [], "local": []}
        for i in range(n):
            batch = batches.next_batch()
            for mode in (("split", "local") if i % 2 == 0 else ("local", "split")):
                started = time.perf_counter()
                (split if mode == "split" else local)(batch)
                if i >= cfg.overhead_warmup:
                    times[mode].append(time.perf_counter() - started)
    finally:
        if split is not None:
            split.close()
        procs.stop([server])
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    params = sum(p.numel() for p in local.model.base_model.model.parameters())
    return {"model": model.name, "params_M": round(params / 1e6, 1), "split_step_s": med["split"],
            "local_step_s": med["local"], "ratio": med["split"] / med["local"], "wire_MB_per_step": split.bytes / 1e6,
            "split_times": times["split"], "local_times": times["local"]}


def run(cfg: BenchConfig) -> Path:
    """Measure every shape of --overhead-shapes (or --model alone); write overhead.{json,md}."""
    shapes = [parse_shape(s) for s in cfg.overhead_shapes] if not cfg.model else [(0, 0)]
    results = [measure(cfg, shape, cfg.out_dir / "work" / f"overhead-{i}") for i, shape in enumerate(shapes)]
    rows = [{k: r[k] for k in ("model", "params_M", "split_step_s", "local_step_s", "ratio", "wire_MB_per_step")}
            for r in results]
    notes = [f"median of {cfg.overhead_steps} steps after {cfg.overhead_warmup} warm-up steps, batch "
             f"{cfg.batch_size} of E2E examples, split after block {cfg.split_layer}, float32 on the wire; "
             "split and local steps alternate",
             "split step: client forward, activations to the server (its own process) over loopback gRPC, server "
             "forward/backward/AdamW, gradient back, client backward/AdamW; local step: the same model and batch "
             "with LoRA in one process"]
    return report.write(cfg.out_dir, "overhead", "Overhead of the split (loopback gRPC) against one process",
                        {"results": results}, rows, notes)
