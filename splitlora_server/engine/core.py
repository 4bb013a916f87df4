"""The engine: one queue of jobs and one worker thread per device, which runs every computation of the server
part (`compute`) on the adapters it trains (`slots`), in queue order.

Request handlers put jobs on the queue and wait on futures; keeping the device in one thread makes the order of
optimizer updates explicit. A training step is a `Forward` job; the batching policy (`batching`) may stack it
with other clients' queued forward jobs; its `Backward` and `Update` run right after it, before any other job.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from common.aggregation import Strategy, build_strategy
from common.faults import fault_point
from common.lora import AdapterState
from common.optim import OptimSettings
from common.seeding import seed_torch
from common.split.parts import SplitPart
from splitlora_server.engine import compute
from splitlora_server.engine.batching import BatchPolicy, BatchSettings
from splitlora_server.engine.jobs import Backward, Call, Forward, Job, Step, Update
from splitlora_server.engine.micro import MicroAccumulator
from splitlora_server.engine.slots import SHARED, AdapterMode, Slot, Slots
from splitlora_server.engine.split_points import SplitPoints
from splitlora_server.engine.state import ServerState, SlotState

__all__ = ["SHARED", "AdapterMode", "ServerEngine", "Step"]
log = logging.getLogger(__name__)
_WAKE = Call(lambda: None)  # wakes an idle worker for a job of `call_when_idle`; never run


class ServerEngine:
    """Owns the server part and its optimizers; runs jobs from a queue on a single worker thread.

    `on_boundary(state)` is called on the engine thread with the state from which each round starts (the
    checkpoint); `strategy` averages the per-client server adapters at a round end (FedAvg by default); `points`:
    the range of split layers clients may choose (engine.split_points)."""

    def __init__(self, part: SplitPart, mode: AdapterMode, optim: OptimSettings, label_smoothing: float = 0.1,
                 seed: int = 0, batching: BatchSettings = BatchSettings(), strategy: Strategy | None = None,
                 on_boundary: Callable[[ServerState], None] | None = None, points: SplitPoints | None = None) -> None:
        self._slots = Slots(part, mode, optim, strategy or build_strategy(), points)
        self.part, self.mode, self.optim, self.label_smoothing, self.seed = part, mode, optim, label_smoothing, seed
        self.on_boundary = on_boundary
        self.batching = batching if mode == "shared" else BatchSettings()  # per-client adapters never share
        self.policy = BatchPolicy(self.batching)
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._carry: collections.deque[Job] = collections.deque()  # run before the queue: continuations, leftovers
        self._idle: collections.deque[Call] = collections.deque()  # `call_when_idle`: when nothing else waits
        self._thread = threading.Thread(target=self._work, name="splitlora-engine", daemon=True)
        self.steps_done = self._steps_here = 0
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # client steps per computation
        self._micro = MicroAccumulator()  # pipelined steps between their micro-batches

    @property
    def slots(self) -> dict[str, Slot]:
        """The server adapters, by client id (per-client mode) or SHARED."""
        return self._slots.by_key

    @property
    def incidents(self) -> list[str]:
        """Rounds whose per-client average was not finite, and who was to blame (shown by status)."""
        return self._slots.incidents

    # -- the queue -------------------------------------------------------------------------------------------
    def start(self) -> "ServerEngine":
        """Start the worker thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish queued jobs and stop the worker; jobs of `call_when_idle` not run by then fail."""
        self._jobs.put(None)
        self._thread.join(timeout=30)
        while self._idle:
            self._idle.popleft().future.set_exception(RuntimeError("the server engine stopped"))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread after every job queued before it."""
        job = Call(fn)
        self._jobs.put(job)
        return job.future

    def call_when_idle(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread once no other job waits (generation behind training steps)."""
        job = Call(fn)
        self._idle.append(job)
        if self._jobs.empty():  # a busy worker finds it when the queue runs dry; an idle one needs waking
            self._jobs.put(_WAKE)
        return job.future

    def _next(self) -> Job:
        """The next job: continuations first, then the queue, then (when nothing waits) `call_when_idle` jobs."""
        while (job := self._carry.popleft() if self._carry else self._take()) is _WAKE:
            pass
        return job

    def _take(self) -> Job:
        try:
            return self._jobs.get_nowait()
        except queue.Empty:
            return self._idle.popleft() if self._idle else self._jobs.get()

    def boundary_snapshot(self, key: str = SHARED) -> tuple[int, SlotState | None]:
        """(engine thread) The round the boundary snapshots start, and the snapshot of adapter `key` there: the
        model of the last closed round while the next one already trains (validation during training)."""
        return self._slots.boundary_round, self._slots.snapshots.get(key)

    def submit_step(self, step: Step) -> Future:
        """Queue one training step (forward, backward, update), or one micro-batch of a pipelined step (its update
        waits for the last one); the future resolves to a StepOutcome. Micro-batches are never stacked with other
        clients' steps: a stacked group takes one optimizer step for all its members."""
        job = Forward(step, alone=step.pipelined)
        self._jobs.put(job)
        return job.future

    def probe(self, step: Step) -> Future:
        """U-shape: queue a step's first exchange (the blocks' output at the top cut, nothing trained); the step
        itself follows with `submit_step` once the client sent its `top_grad`. Same random draws as that step."""
        def run():
            self._seed(step)
            self._slots.activate(step.client_id)
            return compute.probe(self.part, step)
        return self.call(run)

    def discard_step(self, client_id: str) -> Future:
        """Drop the gradient held for a client's pipelined step in progress (it was abandoned: refused, or the
        client joined again); the adapter is untouched."""
        return self.call(lambda: self._micro.discard(client_id))

    def _seed(self, step: Step) -> None:
        """The random draws (dropout) of one step or micro-batch: the same for its probe and its forward."""
        seed_torch(self.seed, "server", step.client_id, step.step, *([step.micro] if step.micro else []))

    def _work(self) -> None:
        while (job := self._next()) is not None:
            if isinstance(job, Forward):
                self._forward(self.policy.collect(job, self._jobs, self._carry))
            elif isinstance(job, Backward):
                self._guarded(job.group, lambda: self._backward(job))
            elif isinstance(job, Update):
                self._guarded(job.group, lambda: self._update(job))
            elif job.future.set_running_or_notify_cancel():
                try:
                    job.future.set_result(job.fn())
                except Exception as err:  # the worker must outlive any single bad job
                    log.exception("engine job failed")
                    job.future.set_exception(err)

    # -- a training step: forward, backward, update ----------------------------------------------------------
    def _forward(self, group: list[Forward]) -> None:
        group = [job for job in group if job.future.running() or job.future.set_running_or_notify_cancel()]
        if not group:
            return
        steps = [job.step for job in group]
        if len(steps) == 1:
            self._seed(steps[0])
        else:
            seed_torch(self.seed, "server-batch", *(f"{s.client_id}@{s.step}" for s in steps))

        def run() -> None:
            self._slots.activate(steps[0].client_id)
            pending = compute.forward(self.part, steps, self.label_smoothing)  # from the steps' own split layer
            self._carry.appendleft(Backward(group, pending))  # the step's continuation runs next

        self._guarded(group, run)

    def _backward(self, job: Backward) -> None:
        compute.backward(job.pending)
        self._carry.appendleft(Update(job.group, job.pending))

    def _update(self, job: Update) -> None:
        steps = [j.step for j in job.group]
        slot = self._slots.of(steps[0].client_id)
        if steps[0].pipelined and not self._micro_update(steps[0], slot, job):
            return
        if len(steps) > 1 and not compute.grads_finite(slot.params):
            raise FloatingPointError("the combined gradient of a batch is not finite")  # each step alone, next
        for _ in steps:
            self._steps_here += 1
            fault_point("server", "step", self._steps_here)  # counted in this process (a testing hook)
        compute.update(slot.params, slot.opt, slot.sched, job.pending, self.optim.max_grad_norm)
        self._slots.touched.update(s.client_id for s in steps)
        self.steps_done += len(steps)
        self.batch_sizes[len(steps)] += 1
        for forward, outcome in zip(job.group, compute.outcomes(job.pending)):
            forward.future.set_result(outcome)

    def _micro_update(self, step: Step, slot: Slot, job: Update) -> bool:
        """A micro-batch's gradient joins its step's sum; True after the last one (the update goes on with the
        whole step's gradient), else the micro-batch is answered at once."""
        self._micro.hold(step.client_id, step.step, step.micro, slot.params, job.pending.counted)
        if step.micro + 1 < step.micro_count:
            job.group[0].future.set_result(compute.outcomes(job.pending)[0])
            return False
        job.pending.counted = min(self._micro.release(step.client_id, slot.params), 1)  # one update for the step
        return True

    def _guarded(self, group: list[Forward], fn: Callable[[], None]) -> None:
        """Run one stage of a group; if it fails, a single step gets the error and a batch is retried step by step
        (e.g. a malformed step, or a gradient that is not finite: the bad step alone is refused)."""
        try:
            fn()
        except Exception as err:
            self._slots.of(group[0].step.client_id).opt.zero_grad(set_to_none=True)
            if len(group) == 1:
                log.exception("engine job failed")
                group[0].future.set_exception(err)
                return
            log.warning("a batch of %d client steps failed; running them one by one", len(group), exc_info=True)
            for job in reversed(group):
                self._carry.appendleft(Forward(job.step, job.future, alone=True))

    # -- streams (for the batching policy) -------------------------------------------------------------------
    def stream_opened(self, client_id: str) -> None:
        """The service opened a Train stream of `client_id` (any thread)."""
        self.policy.stream_opened(client_id)

    def stream_closed(self, client_id: str) -> None:
        """A Train stream of `client_id` ended; with none left, the batch window stops waiting for it."""
        self.policy.stream_closed(client_id)

    def awaited(self, members: set[str]) -> set[str]:
        """The clients a batch of `members` would wait for (see BatchPolicy.awaited)."""
        return self.policy.awaited(members)

    # -- adapters and round boundaries (each a job, in queue order) ------------------------------------------
    def add_client(self, client_id: str, split_layer: int | None = None) -> Future:
        """Record the client's split layer and, in per-client mode, give a new client its own copy of the server
        adapter; the future's result is an error message when the client changes its split layer, else None."""
        def run() -> str | None:
            self.policy.seen(client_id)
            return self._slots.add_client(client_id, split_layer)
        return self.call(run)

    def split_layer_of(self, client_id: str) -> int | None:
        """The split layer a client joined with (None before it joined)."""
        return self._slots.split_layers.get(client_id)

    def server_updates(self, weights: dict[str, float]) -> Future:
        """The server's copies of the blocks trained on both sides, sample-weighted (engine.split_points)."""
        return self.call(lambda: self._slots.server_updates(weights))

    def end_round(self, rnd: int, weights: dict[str, float]) -> Future:
        """Per-client mode: average the clients' server adapters (the strategy, weighted) into every copy."""
        return self.call(lambda: self._slots.average(rnd, weights))

    def close_round(self, rnd: int, weights: dict[str, float], clients: list[str],
                    overlap: AdapterState | None = None) -> Future:
        """Round `rnd` is over: average (per-client mode; the blocks trained on both sides from `overlap`), then
        take the boundary from which round rnd+1 starts: snapshot every slot and hand the state to `on_boundary`
        (the checkpoint), all before the next job."""
        return self.call(lambda: self._close_round(rnd, weights, clients, overlap))

    def _close_round(self, rnd: int, weights: dict[str, float], clients: list[str],
                     overlap: AdapterState | None = None) -> None:
        self._slots.average(rnd, weights, overlap)
        fault_point("server", "round-end", rnd)
        state = self._slots.take_boundary(rnd, clients, self.steps_done)
        if self.on_boundary is not None:
            self.on_boundary(state)

    def rollback(self, client_id: str, rnd: int) -> Future:
        """Undo a client's partial round `rnd` (it redoes the round): restore its slot from the boundary snapshot.
        In shared mode that is only possible while no other client has stepped the shared adapter since."""
        return self.call(lambda: self._slots.rollback(client_id, rnd))

    def restore(self, state: ServerState) -> Future:
        """Resume from a checkpoint: recreate the slots under their adapter names and load their states."""
        def run() -> None:
            self._slots.restore(state)
            self.steps_done = state.steps
        return self.call(run)

    def adapter_of(self, client_id: str) -> AdapterState:
        """A copy of the server adapter a client's steps update (the shared one in shared mode)."""
        return self.call(lambda: self._slots.adapter(client_id)).result()

    def server_adapter(self) -> AdapterState:
        """The server adapter to export (the shared one, or the average after the last round, with fedex's
        residuals)."""
        return self.call(self._slots.export_state).result()
