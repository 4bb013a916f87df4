"""Generation steps as engine jobs: continuous batching of the decode steps of concurrent sessions.

Steps wait in a list; one engine job ("drain") takes every step waiting when it runs, and runs the decode steps
that share an adapter as one stacked forward (`compute.run_stacked`), prefills and the rest one by one. Sessions
join and leave between steps, from any client. With batching off each step is its own job. With training
priority the jobs run only when no training step waits (`ServerEngine.call_when_idle`).
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

from transformers import DynamicCache

from splitlora_server.engine.core import SHARED, ServerEngine
from splitlora_server.generation.compute import StepInput, StepOutput, adapter_of, run_one, run_stacked, stackable
from splitlora_server.generation.sessions import Session

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    session: Session
    step: StepInput
    future: Future


class GenerationScheduler:
    """Queues session steps and scores on the engine; resolves each with its result."""

    def __init__(self, engine: ServerEngine, batching: bool = True, training_first: bool = True) -> None:
        self.engine, self.batching = engine, batching
        self._schedule: Callable[[Callable[[], Any]], Future] = (engine.call_when_idle if training_first
                                                                 else engine.call)
        self._pending: list[_Pending] = []
        self._lock = threading.Lock()
        self._drain_queued = False
        self.batch_sizes: Counter[int] = Counter()  # sessions per forward

    def adapter_name(self, session_adapter: str, client_id: str) -> str | None:
        """The peft adapter name a session's forward applies (engine thread): None = LoRA off."""
        if session_adapter == "none":
            return None
        slot = self.engine.slots.get(client_id) if session_adapter == "own" else None
        return (slot or self.engine.slots[SHARED]).name

    def run(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` (a forward-only job, e.g. a score) on the engine with generation's priority."""
        return self._schedule(fn)

    def submit(self, session: Session, step: StepInput) -> Future:
        """Queue one step of `session`; the future resolves to a StepOutput."""
        pending = _Pending(session, step, Future())
        if not self.batching:
            self._schedule(lambda: self._run([pending]))
            return pending.future
        with self._lock:
            self._pending.append(pending)
            queue_drain = not self._drain_queued
            self._drain_queued = True
        if queue_drain:
            self._schedule(self._drain)
        return pending.future

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending, self._drain_queued = self._pending, [], False
        self._run(batch)

    def _run(self, batch: list[_Pending]) -> None:
        groups: dict[tuple[str | None, int | None], list[_Pending]] = defaultdict(list)
        for p in batch:  # stacked: the same adapter and the same split layer (the same blocks)
            if p.future.set_running_or_notify_cancel():
                groups[self.adapter_name(p.session.adapter, p.session.client_id), p.session.start].append(p)
        for (name, start), items in groups.items():
            with adapter_of(self.engine.part, name):
                decodes = [p for p in items if p.session.cache is not None and p.step.hidden.shape[1] == 1]
                if len(decodes) > 1 and stackable(self.engine.part, [p.session.cache for p in decodes],
                                                  [p.step for p in decodes], start):
                    self._stacked(decodes, start)
                    items = [p for p in items if p not in decodes]
                for p in items:
                    self._one(p)

    def _one(self, p: _Pending) -> None:
        try:
            if p.session.cache is None:
                if p.session.next_step != 0 or p.session.closed:
                    raise RuntimeError(f"session closed: {p.session.closed or 'no cache'}")
                p.session.cache = DynamicCache(config=self.engine.part.config)
            p.future.set_result(run_one(self.engine.part, p.session.cache, p.step, p.session.start))
            self.batch_sizes[1] += 1
        except Exception as err:  # a bad step fails its own session only
            log.warning("generation step of session %s failed: %s", p.session.session_id[:8], err)
            p.future.set_exception(err)

    def _stacked(self, items: list[_Pending], start: int | None = None) -> None:
        try:
            outputs: list[StepOutput] = run_stacked(self.engine.part, self.engine.part.config,
                                                    [p.session.cache for p in items], [p.step for p in items], start)
        except Exception:  # e.g. one malformed step: each then gets its own result or error
            log.warning("a stacked decode of %d sessions failed; running them one by one", len(items), exc_info=True)
            for p in items:
                self._one(p)
            return
        self.batch_sizes[len(items)] += 1
        for p, out in zip(items, outputs):
            p.future.set_result(out)
