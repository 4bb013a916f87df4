"""How the client tells a lost connection from a refusal, and how long it waits before trying again."""
from __future__ import annotations

import logging
import random
import time

import grpc

log = logging.getLogger(__name__)
_Code = grpc.StatusCode
# the peer went away (killed, restarting, shutting down, network): try again after a while
TRANSIENT = frozenset({_Code.UNAVAILABLE, _Code.CANCELLED, _Code.ABORTED, _Code.DEADLINE_EXCEEDED})
# the server's view of this client moved on (it restarted, or closed a round without it): join again
RESYNC = frozenset({_Code.FAILED_PRECONDITION, _Code.UNAUTHENTICATED})


class Reconnect(Exception):
    """The training stream is lost or out of step: join the server again and resume where it says."""


def channel_options(backoff_max: float) -> list[tuple[str, int]]:
    """gRPC's own reconnection backoff, short enough to notice a restarted server quickly."""
    return [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", max(int(backoff_max * 1000), 100))]


class Backoff:
    """Capped exponential backoff with jitter, giving up `budget` seconds after the first failure of a streak."""

    def __init__(self, first: float = 0.1, cap: float = 10.0, budget: float = 900.0) -> None:
        self.first, self.cap, self.budget = first, cap, budget
        self._attempt, self._since = 0, None

    def wait(self, why: str) -> None:
        """Sleep before the next attempt; ConnectionError once the budget is spent."""
        now = time.monotonic()
        self._since = self._since if self._since is not None else now
        if now - self._since > self.budget:
            raise ConnectionError(f"gave up after {self.budget:g}s of retrying: {why}")
        delay = min(self.cap, self.first * 2 ** self._attempt) * random.uniform(0.8, 1.0)
        if self._attempt == 0 or delay >= self.cap * 0.8:
            log.info("retrying in %.1fs: %s", delay, why)
        self._attempt += 1
        time.sleep(delay)

    def reset(self) -> None:
        """The last attempt worked: the next failure starts a new streak."""
        self._attempt, self._since = 0, None
