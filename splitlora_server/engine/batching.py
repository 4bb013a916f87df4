"""Cross-client batching as a policy over queued forward jobs: which waiting steps of other clients join a
forward, and how long to wait for them. What a batched group computes is in `splitlora_server.engine.compute`.

Per-client adapter mode is never batched: every client has its own adapter, so no two waiting steps share one.
With per-client split points only steps of the same split layer are stacked (they run the same blocks).
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass

from splitlora_server.engine.jobs import Forward, Job


@dataclass(frozen=True)
class BatchSettings:
    """How long the engine waits for more clients' steps and how many it stacks (max_clients <= 1: off)."""

    window_ms: float = 0.0
    max_clients: int = 1

    @property
    def enabled(self) -> bool:
        """Whether steps of different clients may share one forward/backward."""
        return self.max_clients > 1


class BatchPolicy:
    """Collects the forward jobs of other clients queued behind a first one, knowing which clients may still
    send a step (those with a Train stream open)."""

    def __init__(self, settings: BatchSettings) -> None:
        self.settings = settings
        self._clients: set[str] = set()  # every client seen (engine thread only)
        self._streams: collections.Counter[str] = collections.Counter()  # open Train streams per client
        self._departed: set[str] = set()  # clients whose last stream closed: the batch window does not wait
        self._lock = threading.Lock()

    def seen(self, client_id: str) -> None:
        """A client the window may wait for (engine thread)."""
        self._clients.add(client_id)

    def stream_opened(self, client_id: str) -> None:
        """The service opened a Train stream of `client_id` (any thread)."""
        with self._lock:
            self._streams[client_id] += 1
            self._departed.discard(client_id)

    def stream_closed(self, client_id: str) -> None:
        """A Train stream of `client_id` ended; with none left, the batch window stops waiting for it."""
        with self._lock:
            self._streams[client_id] -= 1
            if self._streams[client_id] <= 0:
                del self._streams[client_id]
                self._departed.add(client_id)

    def awaited(self, members: set[str]) -> set[str]:
        """The clients a batch of `members` would wait for: seen before, not in it, and not departed."""
        with self._lock:
            return self._clients - members - self._departed

    def collect(self, first: Forward, jobs: queue.Queue[Job], carry: collections.deque[Job]) -> list[Forward]:
        """`first` and the forward jobs of other clients queued right behind it, up to `max_clients`.

        Jobs already waiting are always taken; the policy waits (up to the batch window) for more only while
        some client it knows of, with a stream open, is missing from the group. Collection stops at the first
        job that is not another client's forward: that job goes to `carry` and runs after the group, so the
        queue order is kept."""
        group, members = [first], {first.step.client_id}
        self.seen(first.step.client_id)
        if not self.settings.enabled or first.alone:
            return group
        deadline = time.monotonic() + self.settings.window_ms / 1000.0
        while len(group) < self.settings.max_clients:
            left = deadline - time.monotonic() if self.awaited(members) else 0.0
            try:
                job = jobs.get(timeout=left) if left > 0 else jobs.get_nowait()
            except queue.Empty:
                break
            if not isinstance(job, Forward) or job.alone or job.step.client_id in members \
                    or job.step.start != first.step.start:
                carry.append(job)
                break
            group.append(job)
            members.add(job.step.client_id)
            self.seen(job.step.client_id)
        return group
