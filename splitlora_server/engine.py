"""The one compute worker: every forward/backward of the server part runs here, one job at a time.

Request handlers put jobs on a queue and wait on futures; keeping the accelerator in one thread makes
the order of optimizer updates explicit and leaves room for cross-client batching.
"""
from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from common.lora import AdapterState, adapter_state, load_adapter_state
from common.aggregation import aggregate
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.seeding import seed_step
from common.split.parts import SplitPart

log = logging.getLogger(__name__)
AdapterMode = Literal["shared", "per-client"]
SHARED = "default"


@dataclass
class StepInputs:
    """One client step as it arrives at the server (already validated)."""

    client_id: str
    step: int
    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor


@dataclass
class StepOutcome:
    """The server's answer to one step."""

    grad: torch.Tensor
    loss: float
    tokens: int


class _Slot:
    """The trainable state of one server adapter: its parameters, optimizer and schedule."""

    def __init__(self, part: SplitPart, name: str, settings: OptimSettings) -> None:
        self.name = name
        self.params = [p for n, p in part.peft.named_parameters() if f".{name}." in n and "lora_" in n]
        self.opt, self.sched = build_optimizer(self.params, settings)


class ServerEngine:
    """Owns the server part and its optimizers; runs jobs from a queue on a single worker thread."""

    def __init__(self, part: SplitPart, mode: AdapterMode, optim: OptimSettings, label_smoothing: float = 0.1,
                 seed: int = 0) -> None:
        if mode not in ("shared", "per-client"):
            raise ValueError(f"server adapter mode {mode!r} is not 'shared' or 'per-client'")
        self.part, self.mode, self.optim, self.label_smoothing = part, mode, optim, label_smoothing
        self.slots: dict[str, _Slot] = {SHARED: _Slot(part, SHARED, optim)}
        self._jobs: queue.Queue[tuple[Callable[[], Any], Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="splitlora-engine", daemon=True)
        self.steps_done = 0
        self.seed = seed

    def start(self) -> "ServerEngine":
        """Start the worker thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish queued jobs and stop the worker."""
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as err:  # the worker must outlive any single bad job
                log.exception("engine job failed")
                future.set_exception(err)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread after every job queued before it."""
        future: Future = Future()
        self._jobs.put((fn, future))
        return future

    def submit_step(self, step: StepInputs) -> Future:
        """Queue one forward/backward/update; the future resolves to a StepOutcome."""
        return self.call(lambda: self._step(step))

    def add_client(self, client_id: str) -> Future:
        """Per-client mode: give a new client its own copy of the server adapter."""
        return self.call(lambda: self._add_client(client_id))

    def _add_client(self, client_id: str) -> None:
        if self.mode != "per-client" or client_id in self.slots:
            return
        name = f"client{len(self.slots)}"  # client ids may hold '.', which peft adapter names must not
        self.part.peft.add_adapter(name, self.part.lora.peft_config(self.part.family))
        load_adapter_state(self.part.peft, adapter_state(self.part.peft, SHARED), name)
        self.slots[client_id] = _Slot(self.part, name, self.optim)

    def _step(self, step: StepInputs) -> StepOutcome:
        slot = self.slots[step.client_id if self.mode == "per-client" else SHARED]
        self.part.peft.set_adapter(slot.name)
        self.part.train()
        seed_step(self.seed, "server", step.client_id, step.step)
        device = self.part.device
        hidden = step.hidden.detach().to(device).requires_grad_(True)
        logits = self.part(hidden, step.attention_mask.to(device), step.position_ids.to(device))
        loss, tokens = causal_lm_loss(logits, step.labels.to(device), self.label_smoothing)
        loss.backward()
        finite = torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in slot.params)
        if tokens and finite:
            optimizer_step(slot.params, slot.opt, slot.sched, self.optim.max_grad_norm)
        else:
            slot.opt.zero_grad(set_to_none=True)
        self.steps_done += 1
        return StepOutcome(grad=hidden.grad.detach().float().cpu(), loss=float(loss.detach()), tokens=tokens)

    def end_round(self, weights: dict[str, float]) -> Future:
        """Per-client mode: average the clients' server adapters (weighted) into every copy."""
        return self.call(lambda: self._end_round(weights))

    def _end_round(self, weights: dict[str, float]) -> None:
        if self.mode != "per-client":
            return
        clients = [c for c in weights if c in self.slots and c != SHARED]
        if not clients:
            return
        merged = aggregate([adapter_state(self.part.peft, self.slots[c].name) for c in clients],
                           [weights[c] for c in clients])
        for slot in self.slots.values():
            load_adapter_state(self.part.peft, merged, slot.name)

    def adapter_of(self, client_id: str) -> AdapterState:
        """A copy of the server adapter a client's steps update (the shared one in shared mode)."""
        slot = self.slots.get(client_id, self.slots[SHARED])
        return self.call(lambda: adapter_state(self.part.peft, slot.name)).result()

    def server_adapter(self) -> AdapterState:
        """The server adapter to export (the shared one, or the average after the last round)."""
        return self.call(lambda: adapter_state(self.part.peft, SHARED)).result()
