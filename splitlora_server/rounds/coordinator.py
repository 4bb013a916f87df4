"""The one owner of round state: which round is open, who has arrived in it, and when it closes; it publishes
round events (closing, opened, deadline) to the parts that act on them.

The application builds one coordinator and subscribes its listeners in order (the in-process aggregator first,
which computes and stores the global adapter and may refuse the close; then the engine's round end). A client
*arrives* when it has done what a round asks of it: `FINISHED` its local steps (a split server whose aggregator
runs elsewhere) or `SUBMITTED` its adapter (wherever an aggregator runs). A round closes when every expected
client has arrived, or at the deadline with a quorum (see `gate`). Closing runs each listener's `round_closing`
under the coordinator's lock, waits for the futures they return, and only then opens the next round, so nothing
of round r+1 is admitted (`open_for`) or served before round r is closed everywhere.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future
from typing import Iterable, Iterator

import grpc

from splitlora_server.errors import Refused
from splitlora_server.rounds.gate import Quorum, RoundGate

log = logging.getLogger(__name__)
FINISHED, SUBMITTED = "finished their steps", "submitted"


class RoundListener:
    """What a part does on round events (override what it needs; the defaults do nothing)."""

    def round_closing(self, rnd: int, included: list[str]) -> Future | None:
        """Round `rnd` closes with `included` (sorted ids): do this part's work, or raise Refused to keep it open;
        a returned future is waited for before the next round opens."""
        return None

    def round_opened(self, rnd: int) -> None:
        """Round `rnd` is open (also after a restore)."""

    def deadline_passed(self, rnd: int, closing: bool) -> None:
        """Round `rnd`'s deadline passed; `closing`: with a quorum (it closes now), else it waits for one."""


class RoundCoordinator:
    """Open round, arrivals and closing of a run of `rounds` rounds; thread-safe."""

    def __init__(self, rounds: int, quorum: Quorum, arrival: str = FINISHED) -> None:
        self.rounds, self.arrival = rounds, arrival
        self.lock = threading.RLock()
        self.open_round = 0
        self.finished = threading.Event()
        self._gate = RoundGate(quorum, on_due=self._deadline, what=arrival)
        self._listeners: list[RoundListener] = []

    def subscribe(self, listener: RoundListener) -> None:
        """Add a listener; listeners hear events in the order they subscribed."""
        with self.lock:
            self._listeners.append(listener)

    @property
    def expected(self) -> int:
        """Clients expected per round."""
        return self._gate.quorum.expected

    def current_round(self) -> int:
        """The open round (equals `rounds` once every round is closed)."""
        with self.lock:
            return min(self.open_round, self.rounds)

    @contextlib.contextmanager
    def open_for(self, client_id: str, rnd: int) -> Iterator[None]:
        """Hold round `rnd` open while the body queues work of it (Refused when it is not the open round)."""
        with self.lock:
            if rnd < self.open_round:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {rnd} was closed without client {client_id!r} (its deadline passed); join "
                              f"again to continue from round {self.open_round}")
            if rnd > self.open_round:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              f"round {rnd} has not started: round {self.open_round} is still open; wait for its "
                              "global adapter (or join again)")
            yield

    def arrive(self, client_id: str, rnd: int, kind: str) -> bool:
        """`client_id` has done `kind` for round `rnd`; close the round if it may close now (True then). Only the
        coordinator's own kind of arrival counts. A listener's refusal takes the arrival back and is raised."""
        if kind != self.arrival:
            return False
        with self.lock:
            if rnd != self.open_round:
                return False
            self._gate.arrive(client_id)
            if not self._gate.ready():
                return False
            try:
                self._close(rnd)
            except Exception:
                self._gate.leave(client_id)
                raise
            return True

    def leave(self, client_id: str, kind: str) -> None:
        """Take back an arrival (the client redoes the round)."""
        if kind == self.arrival:
            with self.lock:
                self._gate.leave(client_id)

    def has_arrived(self, client_id: str, rnd: int, kind: str) -> bool:
        """True if `client_id` has done `kind` for the open round `rnd` (and that kind is what counts)."""
        with self.lock:
            return kind == self.arrival and rnd == self.open_round and client_id in self._gate.arrived

    def status(self) -> tuple[str, bool]:
        """A line on the open round for logs and status, and whether it is waiting for a quorum."""
        with self.lock:
            if self.open_round >= self.rounds:
                return "every round is closed", False
            return self._gate.describe(), self._gate.waiting_for_quorum()

    def restore(self, open_round: int, arrived: Iterable[str] = ()) -> None:
        """Resume at `open_round` with the arrivals already known (stored submissions); close it if they suffice."""
        with self.lock:
            self.open_round = open_round
            self._gate.open(open_round)
            for client_id in arrived:
                self._gate.arrive(client_id)
            if open_round >= self.rounds:
                self.finished.set()
            for listener in self._listeners:
                listener.round_opened(open_round)
            if open_round < self.rounds and self._gate.arrived and self._gate.ready():  # killed while closing it
                self._close(open_round)

    def _close(self, rnd: int) -> None:
        """Close the open round `rnd` (the caller holds the lock)."""
        included = sorted(self._gate.arrived)
        waits = [listener.round_closing(rnd, included) for listener in self._listeners]
        for future in waits:
            if future is not None:
                try:
                    future.result()
                except Exception:  # the round is closed either way; a faulty listener must not stall the run
                    log.exception("a round-closing listener failed for round %d", rnd)
        self.open_round = rnd + 1
        self._gate.open(rnd + 1)
        if self.open_round >= self.rounds:
            self.finished.set()
        for listener in self._listeners:
            listener.round_opened(rnd + 1)

    def _deadline(self, rnd: int) -> None:
        """The deadline timer: close the round with the quorum, or say that it waits for one."""
        with self.lock:
            if rnd != self.open_round:
                return
            closing = self._gate.ready()
            for listener in self._listeners:
                listener.deadline_passed(rnd, closing)
            if not closing:
                log.warning("round %d: deadline passed without a quorum; the round waits (%s)", rnd,
                            self._gate.describe())
                return
            try:
                self._close(rnd)
            except Refused as refused:
                log.error("round %d: %s", rnd, refused.message)
