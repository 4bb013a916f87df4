"""The one compute worker: every forward/backward of the server part runs here, one job at a time.

Request handlers put jobs on a queue and wait on futures; keeping the accelerator in one thread makes
the order of optimizer updates explicit. With batching on (shared adapter mode), steps of several clients
that wait together run as one stacked forward/backward; see `splitlora_server.engine.batching` for the semantics.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Literal, Union

import torch

from common.aggregation import aggregate
from common.faults import fault_point
from common.lora import AdapterState, adapter_state, load_adapter_state
from common.loss import causal_lm_loss
from common.optim import OptimSettings, build_optimizer, optimizer_step
from common.seeding import seed_torch
from common.split.parts import SplitPart
from splitlora_server.engine.batching import BatchSettings, forward_backward, split_rows, stack
from splitlora_server.engine.state import ServerState, SlotState, capture_slot, restore_slot

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


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: Future


@dataclass
class _StepJob:
    step: StepInputs
    future: Future


_Job = Union[_Call, _StepJob, None]  # None stops the worker


class _Slot:
    """The trainable state of one server adapter: its parameters, optimizer and schedule."""

    def __init__(self, part: SplitPart, name: str, settings: OptimSettings) -> None:
        self.name = name
        self.params = [p for n, p in part.peft.named_parameters() if f".{name}." in n and "lora_" in n]
        self.opt, self.sched = build_optimizer(self.params, settings)

    def capture(self, part: SplitPart) -> SlotState:
        return capture_slot(part.peft, self.name, self.opt, self.sched)

    def restore(self, part: SplitPart, state: SlotState) -> None:
        restore_slot(part.peft, state, self.opt, self.sched)


class ServerEngine:
    """Owns the server part and its optimizers; runs jobs from a queue on a single worker thread."""

    def __init__(self, part: SplitPart, mode: AdapterMode, optim: OptimSettings, label_smoothing: float = 0.1,
                 seed: int = 0, batching: BatchSettings = BatchSettings()) -> None:
        if mode not in ("shared", "per-client"):
            raise ValueError(f"server adapter mode {mode!r} is not 'shared' or 'per-client'")
        self.part, self.mode, self.optim, self.label_smoothing = part, mode, optim, label_smoothing
        self.slots: dict[str, _Slot] = {SHARED: _Slot(part, SHARED, optim)}
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._carry: collections.deque[_Job] = collections.deque()  # taken from the queue, not batchable
        self._thread = threading.Thread(target=self._work, name="splitlora-engine", daemon=True)
        self.steps_done = self._steps_here = 0
        self.seed = seed
        # the round boundary: the round whose start the snapshots hold (rollbacks of a client's partial round
        # restore its slot from them) and, in shared mode, who has stepped the shared adapter since then
        self.boundary_round = 0
        self.snapshots: dict[str, SlotState] = {SHARED: self.slots[SHARED].capture(part)}
        self._touched: set[str] = set()
        self.on_boundary: Callable[[ServerState], None] | None = None  # writes the checkpoint (engine thread)
        self.batching = batching if mode == "shared" else BatchSettings()  # per-client adapters never share
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # client steps per computation
        self._clients: set[str] = set()  # every client seen (engine thread only)
        self._streams: collections.Counter[str] = collections.Counter()  # open Train streams per client
        self._departed: set[str] = set()  # clients whose last stream closed: the batch window does not wait
        self._streams_lock = threading.Lock()

    def start(self) -> "ServerEngine":
        """Start the worker thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish queued jobs and stop the worker."""
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _next(self) -> _Job:
        return self._carry.popleft() if self._carry else self._jobs.get()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            if isinstance(job, _StepJob) and self.batching.enabled:
                self._run_steps(self._collect(job))
            elif isinstance(job, _StepJob):
                self._run(job.future, lambda: self._step(job.step))
            else:
                self._run(job.future, job.fn)

    @staticmethod
    def _run(future: Future, fn: Callable[[], Any]) -> None:
        if future.set_running_or_notify_cancel():
            ServerEngine._settle(future, fn)

    @staticmethod
    def _settle(future: Future, fn: Callable[[], Any]) -> None:
        """Resolve a running `future` with `fn()` or the exception it raises."""
        try:
            future.set_result(fn())
        except Exception as err:  # the worker must outlive any single bad job
            log.exception("engine job failed")
            future.set_exception(err)

    def _collect(self, first: _StepJob) -> list[_StepJob]:
        """`first` and the steps of other clients queued right behind it, up to `max_clients`.

        Steps already waiting are always taken; the engine waits (up to the batch window) for more only while
        some client it knows of, with a stream open, is missing from the batch. Collection stops at the first
        job that is not another client's step: that job runs after the batch, so the queue order is kept.
        """
        batch, members = [first], {first.step.client_id}
        self._clients.add(first.step.client_id)
        deadline = time.monotonic() + self.batching.window_ms / 1000.0
        while len(batch) < self.batching.max_clients:
            left = deadline - time.monotonic() if self.awaited(members) else 0.0
            try:
                job = self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, _StepJob) or job.step.client_id in members:
                self._carry.append(job)
                break
            batch.append(job)
            members.add(job.step.client_id)
            self._clients.add(job.step.client_id)
        return batch

    def _run_steps(self, jobs: list[_StepJob]) -> None:
        """Run collected steps as one stacked computation; one by one if there is one, or if stacking fails."""
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        outcomes = None
        if len(jobs) > 1:
            try:
                outcomes = self._step_batch([j.step for j in jobs])
            except Exception:  # e.g. a malformed step: each step then gets its own result or error
                log.warning("a batch of %d client steps failed; running them one by one", len(jobs), exc_info=True)
        if outcomes is not None:
            for job, outcome in zip(jobs, outcomes):
                job.future.set_result(outcome)
            return
        for job in jobs:
            self._settle(job.future, lambda: self._step(job.step))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread after every job queued before it."""
        future: Future = Future()
        self._jobs.put(_Call(fn, future))
        return future

    def submit_step(self, step: StepInputs) -> Future:
        """Queue one forward/backward/update; the future resolves to a StepOutcome."""
        future: Future = Future()
        self._jobs.put(_StepJob(step, future))
        return future

    def stream_opened(self, client_id: str) -> None:
        """The service opened a Train stream of `client_id` (any thread)."""
        with self._streams_lock:
            self._streams[client_id] += 1
            self._departed.discard(client_id)

    def stream_closed(self, client_id: str) -> None:
        """A Train stream of `client_id` ended; with none left, the batch window stops waiting for it."""
        with self._streams_lock:
            self._streams[client_id] -= 1
            if self._streams[client_id] <= 0:
                del self._streams[client_id]
                self._departed.add(client_id)

    def awaited(self, members: set[str]) -> set[str]:
        """The clients a batch of `members` would wait for: seen before, not in it, and not departed."""
        with self._streams_lock:
            return self._clients - members - self._departed

    def add_client(self, client_id: str) -> Future:
        """Per-client mode: give a new client its own copy of the server adapter."""
        return self.call(lambda: self._add_client(client_id))

    def _add_client(self, client_id: str) -> None:
        self._clients.add(client_id)
        if self.mode != "per-client" or client_id in self.slots:
            return
        names, i = {slot.name for slot in self.slots.values()}, len(self.slots)
        while f"client{i}" in names:  # restored slots keep their names
            i += 1
        name = f"client{i}"  # client ids may hold '.', which peft adapter names must not
        self._new_slot(client_id, name)
        load_adapter_state(self.part.peft, adapter_state(self.part.peft, SHARED), name)
        self.snapshots[client_id] = self.slots[client_id].capture(self.part)

    def _new_slot(self, key: str, name: str) -> _Slot:
        self.part.peft.add_adapter(name, self.part.lora.peft_config(self.part.family))
        self.slots[key] = _Slot(self.part, name, self.optim)
        return self.slots[key]

    def _step(self, step: StepInputs) -> StepOutcome:
        slot = self.slots[step.client_id if self.mode == "per-client" else SHARED]
        self.part.peft.set_adapter(slot.name)
        self.part.train()
        seed_torch(self.seed, "server", step.client_id, step.step)
        device = self.part.device
        hidden = step.hidden.detach().to(device).requires_grad_(True)
        logits = self.part(hidden, step.attention_mask.to(device), step.position_ids.to(device))
        loss, tokens = causal_lm_loss(logits, step.labels.to(device), self.label_smoothing)
        loss.backward()
        finite = torch.isfinite(loss) and _grads_finite(slot)
        self._steps_here += 1
        fault_point("server", "step", self._steps_here)  # counted in this process (a testing hook)
        self._touched.add(step.client_id)
        if tokens and finite:
            optimizer_step(slot.params, slot.opt, slot.sched, self.optim.max_grad_norm)
        else:
            slot.opt.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.batch_sizes[1] += 1
        return StepOutcome(grad=hidden.grad.detach().float().cpu(), loss=float(loss.detach()), tokens=tokens)

    def _step_batch(self, steps: list[StepInputs]) -> list[StepOutcome] | None:
        """Several clients' steps as one forward/backward on the sum of their mean losses, one optimizer step.

        Returns None (nothing changed) when the combined gradient is not finite, so the caller can fall back
        to one-by-one steps and the bad step alone is refused."""
        slot = self.slots[SHARED]
        self.part.peft.set_adapter(slot.name)
        self.part.train()
        seed_torch(self.seed, "server-batch", *(f"{s.client_id}@{s.step}" for s in steps))
        stacked = stack(steps)
        try:
            losses, grad, counted = forward_backward(self.part, stacked, self.label_smoothing)
        except Exception:
            slot.opt.zero_grad(set_to_none=True)
            raise
        if not _grads_finite(slot):
            slot.opt.zero_grad(set_to_none=True)
            return None
        if counted:
            optimizer_step(slot.params, slot.opt, slot.sched, self.optim.max_grad_norm)
            for _ in range(counted - 1):  # the schedule counts client steps, as without batching
                slot.sched.step()
        self._touched.update(s.client_id for s in steps)
        self.steps_done += len(steps)
        self.batch_sizes[len(steps)] += 1
        return [StepOutcome(grad=g.detach().float().cpu(), loss=loss, tokens=tokens)
                for g, (loss, tokens) in zip(split_rows(grad, stacked.spans), losses)]

    def end_round(self, weights: dict[str, float]) -> Future:
        """Per-client mode: average the clients' server adapters (weighted) into every copy."""
        return self.call(lambda: self._end_round(weights))

    def _end_round(self, weights: dict[str, float]) -> None:
        if self.mode != "per-client":
            return
        clients = sorted(c for c in weights if c in self.slots and c != SHARED)  # a fixed order: bit-reproducible
        if not clients:
            return
        merged = aggregate([adapter_state(self.part.peft, self.slots[c].name) for c in clients],
                           [weights[c] for c in clients])
        for slot in self.slots.values():
            load_adapter_state(self.part.peft, merged, slot.name)

    def close_round(self, rnd: int, weights: dict[str, float], clients: list[str]) -> Future:
        """Round `rnd` is over: average (per-client mode), then take the boundary from which round rnd+1 starts:
        snapshot every slot and hand the state to `on_boundary` (the checkpoint), all before the next job."""
        return self.call(lambda: self._close_round(rnd, weights, clients))

    def _close_round(self, rnd: int, weights: dict[str, float], clients: list[str]) -> None:
        self._end_round(weights)
        fault_point("server", "round-end", rnd)
        self.boundary_round, self._touched = rnd + 1, set()
        self.snapshots = {key: slot.capture(self.part) for key, slot in self.slots.items()}
        if self.on_boundary is not None:
            self.on_boundary(ServerState(rnd + 1, dict(self.snapshots), list(clients), self.steps_done))

    def rollback(self, client_id: str, rnd: int) -> Future:
        """Undo a client's partial round `rnd` (it redoes the round): restore its slot from the boundary snapshot.
        In shared mode that is only possible while no other client has stepped the shared adapter since."""
        return self.call(lambda: self._rollback(client_id, rnd))

    def _rollback(self, client_id: str, rnd: int) -> bool:
        if rnd != self.boundary_round:
            return False  # the round has closed meanwhile: the slot already holds the next boundary
        key = client_id if self.mode == "per-client" else SHARED
        if key == SHARED and not self._touched <= {client_id}:
            log.warning("client %s redoes round %d, but other clients have stepped the shared server adapter since "
                        "it started; its partial steps stay in (use --server-adapter-mode per-client for exact "
                        "recovery)", client_id, rnd)
            return False
        if key in self.slots and key in self.snapshots:
            self.slots[key].restore(self.part, self.snapshots[key])
        self._touched.discard(client_id)
        return True

    def restore(self, state: ServerState) -> Future:
        """Resume from a checkpoint: recreate the slots under their adapter names and load their states."""
        return self.call(lambda: self._restore(state))

    def _restore(self, state: ServerState) -> None:
        for key, slot_state in state.slots.items():
            slot = self.slots.get(key) or self._new_slot(key, slot_state.name)
            slot.restore(self.part, slot_state)
        self.boundary_round, self._touched, self.steps_done = state.round, set(), state.steps
        self.snapshots = dict(state.slots)

    def adapter_of(self, client_id: str) -> AdapterState:
        """A copy of the server adapter a client's steps update (the shared one in shared mode)."""
        slot = self.slots.get(client_id, self.slots[SHARED])
        return self.call(lambda: adapter_state(self.part.peft, slot.name)).result()

    def server_adapter(self) -> AdapterState:
        """The server adapter to export (the shared one, or the average after the last round)."""
        return self.call(lambda: adapter_state(self.part.peft, SHARED)).result()


def _grads_finite(slot: _Slot) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in slot.params)
