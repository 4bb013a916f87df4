"""Refused calls, counted and logged without letting a caller flood the log.

Every refusal the servers make on a caller's behalf (stream and RPC limits, first-message timeouts, undecodable
messages, malformed frames and uploads) goes through one `RefusalBook`: it counts refusals per caller and reason
(shown by `status` and as Prometheus metrics) and logs one line per refusal, never a traceback, at most
`burst` lines per caller per `window_s` seconds; the lines it holds back are summed up in the next line it writes.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from common.redact import shown

log = logging.getLogger("splitlora.server.refusals")
MAX_CALLERS = 1024  # callers tracked one by one; beyond that they are counted together as "(others)"


@dataclass
class _Bucket:
    """The log budget of one caller: lines written in the current window and lines held back."""

    window_start: float = 0.0
    written: int = 0
    held_back: int = 0


@dataclass
class RefusalBook:
    """Counts refusals by (caller, reason) and rate-limits their log lines per caller."""

    burst: int = 5
    window_s: float = 10.0
    counts: Counter = field(default_factory=Counter)
    incidents: list[str] = field(default_factory=list)  # notable events for `status` (the latest few)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refuse(self, caller: str, reason: str, message: str, level: int = logging.WARNING) -> None:
        """Count one refusal of `caller` for `reason` and log `message` unless its budget is spent."""
        now = time.monotonic()
        with self._lock:
            known = {c for c, _ in self.counts}
            if caller not in known and len(known) >= MAX_CALLERS:
                caller = "(others)"
            self.counts[(caller, reason)] += 1
            bucket = self._buckets.setdefault(caller, _Bucket(now))
            if now - bucket.window_start >= self.window_s:
                bucket.window_start, bucket.written = now, 0
            if bucket.written >= self.burst:
                bucket.held_back += 1
                return
            bucket.written += 1
            held, bucket.held_back = bucket.held_back, 0
        more = f" ({held} more refusals of this caller were not logged)" if held else ""
        log.log(level, "refused %s (%s): %s%s", shown(caller, 64), reason, message[:300], more)

    def incident(self, text: str, keep: int = 20) -> None:
        """Record a notable event (also logged as an error) for `status`."""
        log.error("%s", text)
        with self._lock:
            self.incidents.append(text[:500])
            del self.incidents[:-keep]

    def snapshot(self) -> tuple[dict[tuple[str, str], int], list[str]]:
        """The refusal counts and the recent incidents."""
        with self._lock:
            return dict(self.counts), list(self.incidents)

    def total(self, reason: str | None = None) -> int:
        """Refusals so far (of one reason when given)."""
        with self._lock:
            return sum(n for (_, r), n in self.counts.items() if reason is None or r == reason)
