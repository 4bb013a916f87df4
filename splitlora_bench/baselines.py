"""The two baselines of the paper, in one process: CenLoRA (all data, whole model with LoRA, one device) and
FedLoRA (each client fine-tunes the whole model with LoRA on its shard; adapters averaged every round)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from peft import PeftModel

from common.aggregation import aggregate
from common.data import BatchStream, Encoded
from common.lora import AdapterState, adapter_state, load_adapter_state
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.seeding import seed_torch

Evaluate = Callable[[AdapterState], float]


@dataclass
class Curve:
    """Validation loss after every round's worth of samples, and the training seconds spent until then."""

    method: str
    samples: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, samples: int, val_loss: float, seconds: float) -> None:
        """Record one evaluation point."""
        self.samples.append(samples)
        self.val_loss.append(val_loss)
        self.seconds.append(seconds)


class WholeModelTrainer:
    """AdamW steps on the LoRA parameters of the whole model (the loss and clipping of the split)."""

    def __init__(self, model: PeftModel, optim: OptimSettings, label_smoothing: float, seed: int, name: str) -> None:
        self.model, self.optim, self.label_smoothing, self.seed, self.name = model, optim, label_smoothing, seed, name
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt, self.sched = build_optimizer(self.params, optim)
        self.steps = 0

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One training step; returns its loss."""
        self.model.train()
        seed_torch(self.seed, self.name, self.steps)
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            position_ids=batch["position_ids"]).logits
        loss, _ = causal_lm_loss(logits, batch["labels"], self.label_smoothing)
        loss.backward()
        optimizer_step(self.params, self.opt, self.sched, self.optim.max_grad_norm)
        self.steps += 1
        return float(loss.detach())


def cenlora(model: PeftModel, init: AdapterState, data: list[Encoded], pad_id: int, batch: int, steps: int,
            eval_every: int, optim: OptimSettings, label_smoothing: float, seed: int, evaluate: Evaluate) -> Curve:
    """All data in one place: `steps` steps of `batch`, evaluated every `eval_every` steps."""
    load_adapter_state(model, init)
    trainer = WholeModelTrainer(model, optim, label_smoothing, seed, "cenlora")
    stream = BatchStream(data, batch, pad_id, seed=seed)
    curve, spent = Curve("CenLoRA"), 0.0
    curve.add(0, evaluate(init), 0.0)
    for step in range(1, steps + 1):
        started = time.perf_counter()
        trainer.step(stream.next_batch())
        spent += time.perf_counter() - started
        if step % eval_every == 0:
            curve.add(step * batch, evaluate(adapter_state(model)), spent)
    return curve


def fedlora(model: PeftModel, init: AdapterState, shards: list[list[Encoded]], pad_id: int, batch: int, rounds: int,
            local_steps: int, optim: OptimSettings, label_smoothing: float, seed: int, evaluate: Evaluate) -> Curve:
    """Each client trains the whole model on its shard for `local_steps`, then the adapters are averaged (weighted
    by samples, as the split aggregator does). Clients take turns here; `seconds` is the sequential time and
    `extra['parallel_seconds']` the time with clients in parallel (the slowest client of each round)."""
    trainers, streams = [], []
    for i, shard in enumerate(shards):  # one optimizer per client, kept across rounds like a split client's
        load_adapter_state(model, init)
        trainers.append(WholeModelTrainer(model, optim, label_smoothing, seed + i, f"fedlora-{i}"))
        streams.append(BatchStream(shard, batch, pad_id, seed=seed + i))
    curve, spent, parallel, global_state = Curve("FedLoRA"), 0.0, 0.0, init
    curve.add(0, evaluate(init), 0.0)
    curve.extra["parallel_seconds"] = [0.0]
    for rnd in range(rounds):
        states, weights, times = [], [], []
        for trainer, stream in zip(trainers, streams):
            load_adapter_state(model, global_state)
            started = time.perf_counter()
            for _ in range(local_steps):
                trainer.step(stream.next_batch())
            times.append(time.perf_counter() - started)
            states.append(adapter_state(model))
            weights.append(local_steps * batch)
        global_state = aggregate(states, weights)
        spent, parallel = spent + sum(times), parallel + max(times)
        curve.add((rnd + 1) * len(shards) * local_steps * batch, evaluate(global_state), spent)
        curve.extra["parallel_seconds"].append(parallel)
    return curve
