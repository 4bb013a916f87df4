"""The client's training loop: embed and run the first blocks, let the server do the rest, average every round."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.aggregation import freezes_lora_a
from common.data import BatchStream, encode, load_examples
from common.faults import fault_point
from common.fingerprint import compute_fingerprint
from common.logs import ContextLogger
from common.lora import write_adapter_file
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.plan import options_json
from common.provenance import provenance
from common.residuals import ResidualFolder
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.defenses import ActivationDefense
from common.split.parts import SplitPart
from common.split.quantize import weight_bytes
from common.split.ushape import u_shape_parts
from common.threads import apply_threads
from common.tls import open_channel
from common.wire import codec_from_name, codec_name
from splitlora_client.final import receive_whole_adapter
from splitlora_client.generation.options import CLIENT_ADAPTER_FILE
from splitlora_client.generation.scoring import RoundValidator
from splitlora_client.local import load_local
from splitlora_client.options import TrainConfig
from splitlora_client.pipeline import pipelined_step
from splitlora_client.plan import take_plan
from splitlora_client.prefetch import StepPreparer
from splitlora_client.resume import RoundSync
from splitlora_client.retry import Backoff, Reconnect, channel_options
from splitlora_client.scalars import TensorBoardScalars
from splitlora_client.session import SplitSession
from splitlora_client.ushape import TopHead
from splitlora_client.state import ClientCheckpoints, ClientState



class MetricsLog:
    """Metrics as JSON lines, one object per step or round event (and TensorBoard scalars if asked)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)
        self._scalars = TensorBoardScalars(tensorboard_dir) if tensorboard_dir is not None else None

    def write(self, **record) -> None:
        """Append one record with a timestamp."""
        self._file.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self._scalars is not None:
            self._scalars.write(record)

    def close(self) -> None:
        """Flush and close the file."""
        self._file.close()
        if self._scalars is not None:
            self._scalars.close()


def run_identity(cfg: TrainConfig, sched, fingerprint) -> dict:
    """What a resumed client must share with its checkpoints."""
    return {"client_id": cfg.client_id, "seed": cfg.seed, "data": cfg.data, "shard": [cfg.shard_index, cfg.shard_count],
            "builtin_examples": cfg.builtin_examples, "rounds": sched.rounds, "local_steps": sched.local_steps,
            "batch_size": sched.batch_size, "learning_rate": sched.learning_rate, "schedule_seed": sched.seed,
            "model_config": fingerprint.config_sha256, "lora": fingerprint.lora_sha256,
            "split_layer": fingerprint.split_layer}


@dataclass
class _Loop:
    """What the local steps of a round need: the part, its optimizer, the data and the round boundaries."""

    cfg: TrainConfig
    sched: Any  # the server's spb.Schedule
    part: SplitPart
    params: list[torch.nn.Parameter]
    optim: OptimSettings
    opt: torch.optim.Optimizer
    lr_sched: torch.optim.lr_scheduler.LRScheduler
    prep: StepPreparer
    rounds: RoundSync
    metrics: MetricsLog
    bar: tqdm
    validator: RoundValidator | None = None  # --eval-data
    top: TopHead | None = None  # u-shape mode: the client's top part (the loss is computed here)
    defense: ActivationDefense = ActivationDefense()

    def local_steps(self, rnd: int) -> int:
        """Train the local steps of round `rnd` through the server; return the samples they used."""
        cfg, sched, prep, params = self.cfg, self.sched, self.prep, self.params
        samples, ahead = 0, []  # ahead: the next step, prepared while the server works (--overlap)
        for local in range(sched.local_steps):
            step = rnd * sched.local_steps + local
            started, cpu = time.perf_counter(), time.process_time()
            prepared = ahead.pop() if ahead else prep.prepare(step)
            batch = prepared.batch
            # within the round only: a checkpoint at the boundary must not have drawn the next batch
            prepare_next = (lambda s=step: ahead.append(prep.prepare(s + 1))) \
                if cfg.overlap and local + 1 < sched.local_steps else None
            self.opt.zero_grad(set_to_none=True)  # nothing left from a step a lost connection cut short
            result = self.rounds.step(step, lambda session: pipelined_step(
                session, prep, prepared, rnd, session.reply.micro_batches or 1, prepare_next, part=self.part,
                defense=self.defense, top=self.top))
            fault_point("client", "step", step)
            updating = time.perf_counter()
            optimizer_step(params, self.opt, self.lr_sched, self.optim.max_grad_norm)
            result.phases["optimizer"] = time.perf_counter() - updating
            samples += int(batch["input_ids"].shape[0])
            seconds = time.perf_counter() - started
            tokens_per_s = int(batch["attention_mask"].sum()) / max(seconds, 1e-9)
            self.metrics.write(event="step", client=cfg.client_id, round=rnd, step=step, loss=result.loss,
                               tokens=result.tokens, seconds=round(seconds, 4), bytes_sent=result.bytes_sent,
                               bytes_received=result.bytes_received, lr=self.lr_sched.get_last_lr()[0],
                               cpu_s=round(time.process_time() - cpu, 4),  # this process, every thread
                               **{f"{k}_s": round(v, 4) for k, v in result.phases.items()})
            self.bar.set_postfix(round=f"{rnd} of 0-{sched.rounds - 1}", loss=f"{result.loss:.3f}",
                                 tok_s=f"{tokens_per_s:.0f}")
            self.bar.update(1)
        return samples

    def validate(self, closed_round: int) -> None:
        """--eval-data: the validation loss of the global model of `closed_round`, when due."""
        if self.validator is None or not self.validator.due(closed_round):
            return
        val = self.validator.run(closed_round)
        self.metrics.write(event="validation", client=self.cfg.client_id, round=closed_round, loss=val.loss,
                           perplexity=val.perplexity, tokens=val.tokens)
        self.bar.write(f"{self.cfg.client_id}: round {closed_round} of 0-{self.sched.rounds - 1} validation loss "
                       f"{val.loss:.4f} (perplexity {val.perplexity:.2f})")

    def run(self, rnd: int) -> None:
        """Every round from `rnd` on, rejoining the server whenever the connection is lost."""
        cfg, sched = self.cfg, self.sched
        while True:
            try:
                merged = self.rounds.enter(rnd)  # from the checkpoint of its start + the global adapter of rnd-1
                if merged is not None:
                    self.metrics.write(event="round", client=cfg.client_id, round=rnd - 1, clients=merged[0],
                                       samples=merged[1])
                    self.validate(rnd - 1)
                if rnd >= sched.rounds:
                    return
                self.bar.n = rnd * sched.local_steps
                samples = self.local_steps(rnd)
                self.rounds.save(rnd + 1, samples)  # before submitting: a restart resubmits this adapter
                rnd += 1
            except Reconnect as why:
                rnd = self.rounds.rejoin(why)
                self.metrics.write(event="rejoin", client=cfg.client_id, round=rnd, reason=str(why))


def client_parts(cfg: TrainConfig, model_dir: Path, lora, seed: int) -> tuple[SplitPart, SplitPart | None]:
    """The client's bottom part (embeddings, blocks [0, K)) and, in u-shape mode, its top part (blocks [L-J, L),
    final norm, head), not yet in training mode."""
    low, high = cfg.split_bounds()  # per-client split points: LoRA drawn per module, as on the server
    each = {"lora_seed": seed, "per_module_init": high > low,
            "quantization": cfg.client_quantization}  # quantized as it is read: never all in float32
    if not cfg.u_shape:
        return SplitPart(model_dir, "client", cfg.split_layer, lora, cfg.dtype, **each), None
    bottom, _, top = u_shape_parts(model_dir, cfg.split_layer, cfg.top_blocks)
    return (SplitPart(model_dir, bottom, None, lora, cfg.dtype, **each),
            SplitPart(model_dir, top, None, lora, cfg.dtype, **each))


def _ready_to_train(parts: list[SplitPart], cfg: TrainConfig, reply: Any, log: ContextLogger) -> None:
    """Put the parts (their frozen base quantized as it was read, --client-quantization) in training mode and,
    with ffa, freeze LoRA A (only B trains, A stays as initialised)."""
    for part in parts:
        if cfg.client_quantization != "none":
            log.info("frozen base in %s: %.1f MB held", cfg.client_quantization, weight_bytes(part) / 1e6)
        part.train()
        if reply.aggregation and freezes_lora_a(reply.aggregation):
            for name, param in part.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)


def _join(cfg: TrainConfig, session: SplitSession, channel: Any, options: list, fingerprint: Any,
          log: ContextLogger) -> tuple[Any, tuple, agrpc.AggregatorStub, bool]:
    """Join the server on `session`; return the Join reply, the join arguments (for rejoining), the aggregator's
    stub and whether the aggregator shares the server's channel."""
    codecs = [codec_from_name(c) for c in cfg.codecs]
    first_join = Backoff(cap=5.0, budget=cfg.join_timeout)
    reply = session.join(fingerprint, codecs, timeout=cfg.join_timeout, backoff=first_join)
    sched = reply.schedule
    log.info("joined %s as %s: %d rounds x %d steps, batch %d in %d micro-batches, split layer %d, codec %s, "
             "aggregation %s", cfg.server, cfg.client_id, sched.rounds, sched.local_steps, sched.batch_size,
             reply.micro_batches or 1, cfg.split_layer, codec_name(reply.codec), reply.aggregation or "fedavg")
    agg_address = cfg.aggregator or reply.aggregator_address or cfg.server
    agg_channel = channel if agg_address == cfg.server else open_channel(agg_address, cfg, options)
    return reply, (fingerprint, codecs), agrpc.AggregatorStub(agg_channel), agg_channel is channel


def _validator(cfg: TrainConfig, part: SplitPart, tokenizer, sched, fingerprint,
               top: SplitPart | None = None) -> RoundValidator | None:
    """The --eval-data validator of this run (on a channel of its own), or None without held-out data."""
    if not cfg.eval_data:
        return None
    encoded = [encode(tokenizer, ex, sched.max_seq_len) for ex in load_examples(cfg.eval_data)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    channel = open_channel(cfg.server, cfg, cfg.grpc_options())
    return RoundValidator(part, channel, cfg.client_id, encoded, sched.batch_size, pad_id, fingerprint,
                          cfg.eval_every, sched.rounds, top)


def train(cfg: TrainConfig, observe: Callable | None = None) -> Path:
    """Run every round of split training for this client; return the path of its client adapter (the whole-model
    adapter, when the server hands out its part, is in `--output/adapter/`).

    Losing the server (or the aggregator) is not an error: the client backs off, joins again and resumes from
    its checkpoint of the round the server restarts it at; a restarted client does the same from its --output.
    `observe(channel)` may wrap the server channel (e.g. `grpc.intercept_channel`: the privacy benchmark records
    what the server receives)."""
    log = ContextLogger(logging.getLogger("splitlora.client"), {"client": cfg.client_id})
    log = ContextLogger(logging.getLogger("splitlora.client"), {"client": cfg.client_id})
    apply_threads(f"client {cfg.client_id}", cfg.torch_threads)
    local = load_local(cfg)  # before any contact: a client that fails on its own files takes no slot
    options = cfg.grpc_options() + channel_options(cfg.reconnect_backoff_max)
    channel = open_channel(cfg.server, cfg, options)
    channel = observe(channel) if observe is not None else channel
    session = SplitSession(channel, cfg.client_id, cfg.max_message_bytes, cfg.micro_batches, address=cfg.server)
    plan = take_plan(cfg, session)  # the split layer, split mode and LoRA options from the server, unless pinned
    model_dir, lora, tokenizer = local.model_dir, cfg.lora_settings(), local.tokenizer
    fingerprint = compute_fingerprint(model_dir, cfg.split_layer, lora, cfg.u_shape, cfg.top_blocks)
    part, top_part = client_parts(cfg, model_dir, lora, plan.schedule.seed)
    plan.load_initial_adapter(part)
    reply, join_args, aggregator, shared_channel = _join(cfg, session, channel, options, fingerprint, log)
    sched = reply.schedule
    _ready_to_train([part] + ([top_part] if top_part is not None else []), cfg, reply, log)
    batches = BatchStream(local.encoded(sched.max_seq_len), sched.batch_size, tokenizer.pad_token_id, seed=cfg.seed)
    optim = OptimSettings(sched.learning_rate, sched.weight_decay, sched.warmup_steps,
                          sched.rounds * sched.local_steps, sched.max_grad_norm)
    top = TopHead(top_part, sched.label_smoothing) if top_part is not None else None
    params = [p for p in part.parameters() if p.requires_grad] + (top.params if top is not None else [])
    opt, lr_sched = build_optimizer(params, optim)
    state = ClientState(part.peft, opt, lr_sched, batches, ResidualFolder(part.peft),
                        top_part.peft if top_part is not None else None)
    out_dir = cfg.output_dir
    checkpoints = ClientCheckpoints(out_dir / "checkpoints", run_identity(cfg, sched, join_args[0]), state.capture())
    backoff = Backoff(cap=cfg.reconnect_backoff_max, budget=cfg.reconnect_timeout)
    rounds = RoundSync(session, join_args, aggregator, shared_channel, state, checkpoints, backoff, cfg.chunk_bytes,
                       cfg.round_timeout)
    checkpoints.drop_after(reply.start_round)
    metrics = MetricsLog(out_dir / "metrics.jsonl", out_dir / "tensorboard" if cfg.tensorboard else None)
    bar = tqdm(total=sched.rounds * sched.local_steps, disable=not cfg.progress, desc=cfg.client_id,
               unit="step", dynamic_ncols=True)
    loop = _Loop(cfg, sched, part, params, optim, opt, lr_sched, StepPreparer(part, batches, cfg.seed, cfg.client_id),
                 rounds, metrics, bar, _validator(cfg, part, tokenizer, sched, join_args[0], top_part), top,
                 ActivationDefense(cfg.defense_settings()))
    try:
        with logging_redirect_tqdm():  # log lines go above the progress bar instead of through it
            loop.run(reply.start_round)
    finally:
        bar.close()
        metrics.close()
        session.close()
    path = out_dir / CLIENT_ADAPTER_FILE
    made = provenance("client", fingerprint, options_json(cfg), str(model_dir))
    client_state = {**state.local_adapter(), **state.folder.residuals}  # fedex: residuals too
    write_adapter_file(path, client_state, made.to_metadata())
    log.info("client adapter written to %s", path)
    receive_whole_adapter(session, plan.message, part, client_state, out_dir / "adapter", made, cfg.round_timeout)
    return path
