"""The client's training loop: embed and run the first blocks, let the server do the rest, average every round."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.aggregation import freezes_lora_a
from common.data import BatchStream
from common.faults import fault_point
from common.fingerprint import compute_fingerprint
from common.logs import ContextLogger
from common.lora import adapter_state, write_adapter_file
from common.plan import options_json
from common.provenance import provenance
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.residuals import ResidualFolder
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.split.parts import SplitPart
from common.tls import open_channel
from common.wire import codec_from_name, codec_name
from splitlora_client.final import receive_whole_adapter
from splitlora_client.local import load_local
from splitlora_client.options import TrainConfig
from splitlora_client.plan import take_plan
from splitlora_client.prefetch import StepPreparer
from splitlora_client.resume import RoundSync
from splitlora_client.retry import Backoff, Reconnect, channel_options
from splitlora_client.scalars import TensorBoardScalars
from splitlora_client.session import SplitSession
from splitlora_client.state import ClientCheckpoints, ClientState

CLIENT_ADAPTER_FILE = "client_adapter.safetensors"


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


def _freeze_a_for(aggregation: str, part: SplitPart) -> None:
    """ffa: only B trains, A stays as initialised."""
    if aggregation and freezes_lora_a(aggregation):
        for name, param in part.peft.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)


def train(cfg: TrainConfig) -> Path:
    """Run every round of split training for this client; return the path of its client adapter (the whole-model
    adapter, when the server hands out its part, is in `--output/adapter/`).

    Losing the server (or the aggregator) is not an error: the client backs off, joins again and resumes from
    its checkpoint of the round the server restarts it at; a restarted client does the same from its --output."""
    log = ContextLogger(logging.getLogger("splitlora.client"), {"client": cfg.client_id})
    local = load_local(cfg)  # before any contact: a client that fails on its own files takes no slot
    options = cfg.grpc_options() + channel_options(cfg.reconnect_backoff_max)
    channel = open_channel(cfg.server, cfg, options)
    session = SplitSession(channel, cfg.client_id, cfg.max_message_bytes, cfg.server)
    plan = take_plan(cfg, session)
    sched = plan.schedule
    lora = cfg.lora_settings()
    part = SplitPart(local.model_dir, "client", cfg.split_layer, lora, cfg.dtype, lora_seed=sched.seed)
    plan.load_initial_adapter(part)
    part.train()
    batches = BatchStream(local.encoded(sched.max_seq_len), sched.batch_size, local.tokenizer.pad_token_id,
                          seed=cfg.seed)
    fingerprint = compute_fingerprint(local.model_dir, cfg.split_layer, lora)
    codecs = [codec_from_name(c) for c in cfg.codecs]
    reply = session.join(fingerprint, codecs, timeout=cfg.join_timeout,
                         backoff=Backoff(cap=5.0, budget=cfg.join_timeout))
    log.info("joined %s as %s: %d rounds x %d steps, batch %d, split layer %d, codec %s, aggregation %s",
             cfg.server, cfg.client_id, sched.rounds, sched.local_steps, sched.batch_size, cfg.split_layer,
             codec_name(reply.codec), reply.aggregation or "fedavg")
    agg_address = cfg.aggregator or reply.aggregator_address or cfg.server
    agg_channel = channel if agg_address == cfg.server else open_channel(agg_address, cfg, options)
    _freeze_a_for(reply.aggregation, part)
    params = [p for p in part.parameters() if p.requires_grad]
    optim = OptimSettings(sched.learning_rate, sched.weight_decay, sched.warmup_steps,
                          sched.rounds * sched.local_steps, sched.max_grad_norm)
    opt, lr_sched = build_optimizer(params, optim)
    state = ClientState(part.peft, opt, lr_sched, batches, ResidualFolder(part.peft))
    out_dir = cfg.output_dir
    checkpoints = ClientCheckpoints(out_dir / "checkpoints", run_identity(cfg, sched, fingerprint), state.capture())
    backoff = Backoff(cap=cfg.reconnect_backoff_max, budget=cfg.reconnect_timeout)
    rounds = RoundSync(session, (fingerprint, codecs), agrpc.AggregatorStub(agg_channel), agg_channel is channel, state,
                    checkpoints, backoff, cfg.chunk_bytes, cfg.round_timeout)
    checkpoints.drop_after(reply.start_round)
    metrics = MetricsLog(out_dir / "metrics.jsonl", out_dir / "tensorboard" if cfg.tensorboard else None)
    bar = tqdm(total=sched.rounds * sched.local_steps, disable=not cfg.progress, desc=cfg.client_id,
               unit="step", dynamic_ncols=True)
    loop = _Loop(cfg, sched, rounds, StepPreparer(part, batches, cfg.seed, cfg.client_id), metrics, bar,
                 lambda: optimizer_step(params, opt, lr_sched, optim.max_grad_norm), lambda: lr_sched.get_last_lr()[0])
    try:
        with logging_redirect_tqdm():  # log lines go above the progress bar instead of through it
            loop.run(reply.start_round)
    finally:
        bar.close()
        metrics.close()
        session.close()
    path = out_dir / CLIENT_ADAPTER_FILE
    made = provenance("client", fingerprint, options_json(cfg), str(local.model_dir))
    client_state = {**adapter_state(part.peft), **state.folder.residuals}  # fedex: residuals too
    write_adapter_file(path, client_state, made.to_metadata())
    log.info("client adapter written to %s", path)
    receive_whole_adapter(session, plan.message, part, client_state, out_dir / "adapter", made, cfg.round_timeout)
    return path


@dataclass
class _Loop:
    """The rounds of one client: local steps through the server, then the round boundary (see resume.RoundSync)."""

    cfg: TrainConfig
    sched: Any
    rounds: RoundSync
    prep: StepPreparer
    metrics: MetricsLog
    bar: Any
    update: Callable[[], None]  # clip, optimizer step, schedule step
    lr: Callable[[], float]

    def run(self, rnd: int) -> None:
        """From round `rnd` to the end, rejoining the server whenever the connection is lost."""
        while True:
            try:
                merged = self.rounds.enter(rnd)  # from the checkpoint of its start + the global adapter of rnd-1
                if merged is not None:
                    self.metrics.write(event="round", client=self.cfg.client_id, round=rnd - 1, clients=merged[0],
                                       samples=merged[1])
                if rnd >= self.sched.rounds:
                    return
                self.rounds.save(rnd + 1, self.local_steps(rnd))  # before submitting: a restart resubmits it
                rnd += 1
            except Reconnect as why:
                rnd = self.rounds.rejoin(why)
                self.metrics.write(event="rejoin", client=self.cfg.client_id, round=rnd, reason=str(why))

    def local_steps(self, rnd: int) -> int:
        """The local steps of round `rnd`; returns the examples trained on."""
        cfg, sched, prep = self.cfg, self.sched, self.prep
        self.bar.n = rnd * sched.local_steps
        samples, ahead = 0, []  # ahead: the next step, prepared while the server works (--overlap)
        for local in range(sched.local_steps):
            step = rnd * sched.local_steps + local
            started = time.perf_counter()
            prepared = ahead.pop() if ahead else prep.prepare(step)
            batch = prepared.batch
            hidden = prep.forward(prepared)
            # within the round only: a checkpoint at the boundary must not have drawn the next batch
            prepare_next = (lambda s=step: ahead.append(prep.prepare(s + 1))) \
                if cfg.overlap and local + 1 < sched.local_steps else None
            result = self.rounds.step(step, rnd, hidden.detach(), batch["attention_mask"], batch["labels"],
                                      batch["position_ids"], while_waiting=prepare_next)
            fault_point("client", "step", step)
            hidden.backward(result.grad.to(hidden.dtype))
            self.update()
            samples += int(batch["input_ids"].shape[0])
            seconds = time.perf_counter() - started
            tokens_per_s = int(batch["attention_mask"].sum()) / max(seconds, 1e-9)
            self.metrics.write(event="step", client=cfg.client_id, round=rnd, step=step, loss=result.loss,
                               tokens=result.tokens, seconds=round(seconds, 4), bytes_sent=result.bytes_sent,
                               bytes_received=result.bytes_received, lr=self.lr())
            self.bar.set_postfix(round=f"{rnd} of 0-{sched.rounds - 1}", loss=f"{result.loss:.3f}",
                                 tok_s=f"{tokens_per_s:.0f}")
            self.bar.update(1)
        return samples
