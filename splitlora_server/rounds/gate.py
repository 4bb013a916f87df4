"""When a round may close: every expected client is in, or the deadline has passed with a quorum.

The deadline counts from the first arrival of the round (the first client done with it), so a round never
closes before anyone has arrived and slow rounds are not cut short: it bounds how long the others wait for
stragglers. Without a deadline a round waits for every expected client. The gate is not thread-safe: its owner
calls it under its own lock; the deadline timer calls `on_due(round)` from its own thread, and the owner
re-checks `ready()` under its lock before closing.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Quorum:
    """Clients expected per round, the fewest a round may close with, and the straggler deadline (0: none)."""

    expected: int
    min_clients: int = 0   # 0: all expected
    deadline: float = 0.0  # seconds after the round's first arrival

    @property
    def minimum(self) -> int:
        return self.min_clients or self.expected


class RoundGate:
    """Arrivals in the open round and whether it may close."""

    def __init__(self, quorum: Quorum, on_due: Callable[[int], None] | None = None, what: str = "done") -> None:
        self.quorum, self.on_due, self.what = quorum, on_due, what
        self.round = 0
        self.arrived: set[str] = set()
        self.first_at: float | None = None
        self._timer: threading.Timer | None = None

    def open(self, round: int) -> None:
        """Start tracking `round` with nobody in."""
        self.cancel()
        self.round, self.arrived, self.first_at = round, set(), None

    def arrive(self, client_id: str) -> None:
        """A client is done with the open round; the first arrival starts the deadline."""
        self.arrived.add(client_id)
        if self.first_at is None:
            self.start_clock()

    def start_clock(self) -> None:
        """Start the deadline now (also used when a round's arrivals are restored after a restart)."""
        self.first_at = time.monotonic()
        if self.quorum.deadline > 0 and self.on_due is not None:
            self._timer = threading.Timer(self.quorum.deadline, self.on_due, args=(self.round,))
            self._timer.daemon = True
            self._timer.start()

    def leave(self, client_id: str) -> None:
        """Take back an arrival (the client rolled back to redo the round)."""
        self.arrived.discard(client_id)

    def past_deadline(self) -> bool:
        return (self.quorum.deadline > 0 and self.first_at is not None
                and time.monotonic() - self.first_at >= self.quorum.deadline)

    def ready(self) -> bool:
        """True when the round may close now."""
        n = len(self.arrived)
        return n >= self.quorum.expected or (self.past_deadline() and n >= self.quorum.minimum)

    def waiting_for_quorum(self) -> bool:
        """The deadline has passed but too few clients are in: the round waits."""
        return self.past_deadline() and len(self.arrived) < self.quorum.minimum

    def describe(self) -> str:
        """One line for logs and status."""
        q, n = self.quorum, len(self.arrived)
        text = f"round {self.round}: {n} of {q.expected} clients {self.what}"
        if q.deadline > 0:
            text += f" (quorum {q.minimum}, deadline {q.deadline:g}s"
            if self.first_at is None:
                text += " from the first arrival)"
            else:
                left = q.deadline - (time.monotonic() - self.first_at)
                text += f", {left:.0f}s left)" if left > 0 else ", passed)"
        if self.waiting_for_quorum():
            text += f"; waiting for quorum: {q.minimum - n} more needed"
        return text

    def cancel(self) -> None:
        """Stop the deadline timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
