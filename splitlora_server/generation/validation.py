"""Validation losses the clients report during training (`--eval-data`): per round, sample-weighted over clients."""
from __future__ import annotations

import logging
import math
import threading
from collections import defaultdict

log = logging.getLogger("splitlora.server")


class ValidationBook:
    """Sums of each client's score requests per round; a client's `last` batch closes its entry for the round."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0, 0])  # loss sum, tokens, samples
        self._done: dict[int, dict[str, tuple[float, int]]] = defaultdict(dict)  # round -> client -> (loss, samples)

    def add(self, client_id: str, rnd: int, loss_sum: float, tokens: int, samples: int, last: bool) -> None:
        """Count one scored batch of `client_id` for round `rnd`; log the round's weighted loss on `last`."""
        with self._lock:
            entry = self._open[(rnd, client_id)]
            entry[0] += loss_sum
            entry[1] += tokens
            entry[2] += samples
            if not last:
                return
            total, count, n = self._open.pop((rnd, client_id))
            self._done[rnd][client_id] = (total / count if count else math.nan, n)
            loss, clients = self._weighted(rnd), len(self._done[rnd])
        log.info("round %d: validation loss %.4f (sample-weighted over %d client%s; %s: %.4f)", rnd, loss, clients,
                 "" if clients == 1 else "s", client_id, self._done[rnd][client_id][0],
                 extra={"client": client_id, "round": rnd})

    def _weighted(self, rnd: int) -> float:
        entries = [(loss, n) for loss, n in self._done[rnd].values() if n and math.isfinite(loss)]
        weight = sum(n for _, n in entries)
        return sum(loss * n for loss, n in entries) / weight if weight else math.nan

    def latest(self) -> tuple[int, float]:
        """The newest round with a reported loss and its sample-weighted loss; (-1, nan) before any."""
        with self._lock:
            if not self._done:
                return -1, math.nan
            rnd = max(self._done)
            return rnd, self._weighted(rnd)
