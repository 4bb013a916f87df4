"""The client's training loop: embed and run the first blocks, let the server do the rest, average every round."""
from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path

import grpc
from tqdm import tqdm
from transformers import AutoTokenizer

from common.aggregator_client import fetch_global, submit_adapter
from common.builtin import ensure_builtin_model
from common.data import BatchStream, encode, load_examples, shard, synthetic_e2e
from common.fingerprint import compute_fingerprint
from common.lora import adapter_state, load_adapter_state, write_adapter_file
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.split.parts import SplitPart
from common.wire import codec_from_name, codec_name
from splitlora_client.config import TrainConfig
from splitlora_client.prefetch import StepPreparer
from splitlora_client.session import SplitSession

log = logging.getLogger("splitlora.client")
CLIENT_ADAPTER_FILE = "client_adapter.safetensors"


def load_private_data(cfg: TrainConfig, tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """This client's examples, tokenized: its data file (or shard of it), else built-in synthetic data."""
    if cfg.data:
        examples = shard(load_examples(cfg.data), cfg.shard_index, cfg.shard_count)
    else:
        examples = synthetic_e2e(cfg.builtin_examples, seed=zlib.crc32(cfg.client_id.encode()))
    if not examples:
        raise ValueError(f"client {cfg.client_id} has no training examples")
    return [encode(tokenizer, ex, max_len) for ex in examples]


class MetricsLog:
    """Metrics as JSON lines, one object per step or round event."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)

    def write(self, **record) -> None:
        """Append one record with a timestamp."""
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()


def train(cfg: TrainConfig) -> Path:
    """Run every round of split training for this client; return the path of its final adapter."""
    model_dir = Path(cfg.model) if cfg.model else ensure_builtin_model()
    lora = cfg.lora_settings()
    fingerprint = compute_fingerprint(model_dir, cfg.split_layer, lora)
    channel = grpc.insecure_channel(cfg.server, options=cfg.grpc_options())
    session = SplitSession(channel, cfg.client_id)
    reply = session.join(fingerprint, [codec_from_name(c) for c in cfg.codecs], timeout=cfg.join_timeout)
    sched = reply.schedule
    log.info("joined %s as %s: %d rounds x %d steps, batch %d, codec %s", cfg.server, cfg.client_id, sched.rounds,
             sched.local_steps, sched.batch_size, codec_name(reply.codec))
    agg_address = cfg.aggregator or reply.aggregator_address or cfg.server
    agg_channel = channel if agg_address == cfg.server else grpc.insecure_channel(agg_address,
                                                                                   options=cfg.grpc_options())
    aggregator = agrpc.AggregatorStub(agg_channel)

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or str(model_dir), local_files_only=True)
    part = SplitPart(model_dir, "client", cfg.split_layer, lora, cfg.dtype, lora_seed=sched.seed)
    part.train()
    batches = BatchStream(load_private_data(cfg, tokenizer, sched.max_seq_len), sched.batch_size,
                          tokenizer.pad_token_id, seed=cfg.seed)
    params = [p for p in part.parameters() if p.requires_grad]
    optim = OptimSettings(sched.learning_rate, sched.weight_decay, sched.warmup_steps,
                          sched.rounds * sched.local_steps, sched.max_grad_norm)
    opt, lr_sched = build_optimizer(params, optim)
    out_dir = cfg.output_dir
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    prep, pending, total = StepPreparer(part, batches, cfg.seed, cfg.client_id), None, sched.rounds * sched.local_steps
    bar = tqdm(total=total, disable=not cfg.progress, desc=cfg.client_id, unit="step", dynamic_ncols=True)
    try:
        for rnd in range(reply.start_round, sched.rounds):
            samples = 0
            for local in range(sched.local_steps):
                step = rnd * sched.local_steps + local
                started = time.perf_counter()
                prepared = pending or prep.prepare(step)
                batch = prepared.batch
                hidden = prep.forward(prepared)
                sent = session.send(step, rnd, hidden.detach(), batch["attention_mask"], batch["labels"],
                                    batch["position_ids"])
                pending = prep.prepare(step + 1) if cfg.overlap and step + 1 < total else None  # while the server works
                result = session.receive(step, sent)
                hidden.backward(result.grad.to(hidden.dtype))
                optimizer_step(params, opt, lr_sched, optim.max_grad_norm)
                samples += int(batch["input_ids"].shape[0])
                seconds = time.perf_counter() - started
                tokens_per_s = int(batch["attention_mask"].sum()) / max(seconds, 1e-9)
                metrics.write(event="step", client=cfg.client_id, round=rnd, step=step, loss=result.loss,
                              tokens=result.tokens, seconds=round(seconds, 4), bytes_sent=result.bytes_sent,
                              bytes_received=result.bytes_received, lr=lr_sched.get_last_lr()[0])
                bar.set_postfix(round=f"{rnd + 1}/{sched.rounds}", loss=f"{result.loss:.3f}",
                                tok_s=f"{tokens_per_s:.0f}")
                bar.update(1)
            submit_adapter(aggregator, cfg.client_id, rnd, samples, adapter_state(part.peft),
                           chunk_bytes=cfg.chunk_bytes)
            state, num_clients, total = fetch_global(aggregator, cfg.client_id, rnd, timeout=cfg.round_timeout)
            load_adapter_state(part.peft, state)
            metrics.write(event="round", client=cfg.client_id, round=rnd, clients=num_clients, samples=total)
            log.info("round %d/%d closed: global adapter of %d clients (%d samples) loaded", rnd + 1, sched.rounds,
                     num_clients, total)
    finally:
        bar.close()
        metrics.close()
        session.close()
    path = out_dir / CLIENT_ADAPTER_FILE
    write_adapter_file(path, adapter_state(part.peft))
    log.info("client adapter written to %s", path)
    return path
