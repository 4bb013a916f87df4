"""Who the server's clients are, their sessions, and how far each got: the service's bookkeeping."""
from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from splitlora_server.rounds.gate import Quorum, RoundGate

T = TypeVar("T")
log = logging.getLogger(__name__)
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def invalid_client_id(client_id: str) -> str | None:
    """Why `client_id` is not a valid client id, or None if it is."""
    if CLIENT_ID_PATTERN.match(client_id):
        return None
    return (f"client id {client_id[:80]!r} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


class RegistryError(Exception):
    """A client may not do what it asked; `kind` picks the gRPC status."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ClientRecord:
    """One enrolled client."""

    client_id: str
    session: str
    next_step: int = 0
    connected: bool = False
    streams: int = 0  # Train streams open (a reconnecting client may briefly have two)
    opened: int = 0  # Train streams ever opened (a client opens one at Join)
    last_loss: float = float("nan")
    bytes_in: int = 0
    bytes_out: int = 0
    last_error: str = ""
    errors: int = 0  # refused frames and failed steps
    tokens: int = 0
    samples_by_round: dict[int, int] = field(default_factory=dict)
    codec: int = 1  # negotiated activation/gradient codec (CODEC_RAW)
    chunk_bytes: int = 4 << 20  # negotiated piece size of large frames, both ways
    step_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class Registry:
    """Enrolment (first N distinct ids), sessions, the open round and who finished it, under one lock.

    Rounds close one at a time for everybody. A self-closing registry closes its open round itself when every
    expected client has finished it (or the deadline passed with a quorum: see splitlora_server.rounds.gate); next to an
    in-process aggregator the aggregator's round close drives `close_round` instead, so both agree."""

    def __init__(self, expected_clients: int, rounds: int, local_steps: int, quorum: Quorum | None = None,
                 self_closing: bool = True) -> None:
        self.expected, self.rounds, self.local_steps = expected_clients, rounds, local_steps
        self.clients: dict[str, ClientRecord] = {}
        self.lock = threading.Lock()
        self.open_round = 0
        self.self_closing = self_closing
        self.gate = RoundGate(quorum or Quorum(expected_clients), what="finished their steps")
        self.finished = threading.Event()
        self.started_at = time.monotonic()
        self.total_steps = 0

    def join(self, client_id: str) -> ClientRecord:
        """Enrol a new client or renew a known one's session."""
        problem = invalid_client_id(client_id)
        if problem:
            raise RegistryError("invalid", problem)
        with self.lock:
            record = self.clients.get(client_id)
            if record is None:
                if len(self.clients) >= self.expected and (freed := self._free_idle_slot()) is not None:
                    log.info("client %s left before its first step: its slot goes to %s", freed, client_id)
                if len(self.clients) >= self.expected:
                    raise RegistryError("full", f"all {self.expected} client slots are taken by "
                                                f"{', '.join(sorted(self.clients))}; start the server with "
                                                "--clients N for more")
                record = self.clients[client_id] = ClientRecord(client_id, "")
            record.session = secrets.token_hex(16)
            return record

    def _free_idle_slot(self) -> str | None:
        """Under the lock, with every slot taken: free the slot of a client that left before its first step of the
        run (its stream closed, nothing trained, no frame refused: it failed on its own side), if there is one."""
        if self.open_round != 0:
            return None
        for client_id, record in sorted(self.clients.items()):
            if record.next_step == 0 and record.opened and record.streams == 0 and record.errors == 0:
                del self.clients[client_id]
                self.gate.leave(client_id)
                return client_id
        return None

    def authenticate(self, client_id: str, session: str) -> ClientRecord:
        """The record of a client whose session token is current."""
        with self.lock:
            record = self.clients.get(client_id)
        if record is None:
            raise RegistryError("unknown", f"unknown client {client_id!r}: it has not joined this server "
                                           "(call Join first)")
        if not secrets.compare_digest(record.session, session):
            raise RegistryError("session", f"session of client {client_id!r} is not current; join again")
        return record

    def verify_claim(self, client_id: str, rnd: int, num_samples: int) -> str | None:
        """Why a client's adapter submission for round `rnd` cannot be true, or None if it can."""
        with self.lock:
            record = self.clients.get(client_id)
            if record is None:
                return f"client {client_id!r} has not joined the split server"
            end, trained = (rnd + 1) * self.local_steps, record.samples_by_round.get(rnd, 0)
            if record.next_step < end:
                return f"it has trained {record.next_step} steps and round {rnd} ends at step {end}"
        if num_samples > trained:
            return f"it claims {num_samples} samples but trained on {trained} in round {rnd}"
        return None

    def round_of(self, step: int) -> int:
        """The round a client step belongs to."""
        return step // self.local_steps

    def resume(self, record: ClientRecord, submitted: Callable[[str, int], bool] | None = None) -> tuple[int, bool]:
        """Where a (re)joining client starts, and whether it had partial progress in that round to undo.

        A client always (re)starts at the open round, from its own checkpoint of that round's start: its partial
        progress in the round is dropped (it redoes the round), so a resumed run retraces an uninterrupted one.
        The exception: a client that finished the round and whose submission the aggregator holds
        (`submitted(client_id, round)`) goes on to the next round."""
        rnd = self.open_round
        kept = submitted is not None and submitted(record.client_id, rnd)  # outside the lock: the aggregator's
        with self.lock:
            start = self.open_round * self.local_steps
            if kept and rnd == self.open_round and record.next_step >= start + self.local_steps:
                return rnd + 1, False
            partial = record.next_step > start
            record.next_step = start
            record.samples_by_round.pop(self.open_round, None)
            self.gate.leave(record.client_id)
            return self.open_round, partial

    def admit(self, record: ClientRecord, step: int, enqueue: Callable[[], T]) -> T:
        """Queue a step of the open round (`enqueue`, under the lock: no step overtakes a round close)."""
        with self.lock:
            rnd = self.round_of(step)
            if rnd < self.open_round:
                raise RegistryError("closed", f"round {rnd} was closed without client {record.client_id!r} (its "
                                              f"deadline passed); join again to continue from round {self.open_round}")
            if rnd > self.open_round:
                raise RegistryError("closed", f"round {rnd} has not started: round {self.open_round} is still open; "
                                              "wait for its global adapter (or join again)")
            return enqueue()

    def step_done(self, record: ClientRecord, step: int, loss: float, tokens: int, samples: int) -> bool:
        """Account a finished step; True if it lets a self-closing registry close the open round now."""
        with self.lock:
            record.next_step = step + 1
            record.last_loss, record.tokens = loss, record.tokens + tokens
            rnd = self.round_of(step)
            record.samples_by_round[rnd] = record.samples_by_round.get(rnd, 0) + samples
            self.total_steps += 1
            if (step + 1) % self.local_steps or rnd != self.open_round:
                return False
            self.gate.arrive(record.client_id)
            return self.self_closing and self.gate.ready()

    def ready(self, rnd: int) -> bool:
        """True if round `rnd` is open and may close now."""
        with self.lock:
            return rnd == self.open_round and self.gate.ready()

    def close_round(self, rnd: int, included: set[str] | None,
                    enqueue: Callable[[dict[str, float], list[str]], T]) -> T | None:
        """Close round `rnd` (None if it is not the open one): weights of the clients that finished it (of
        `included` when given), in id order; `enqueue(weights, roster)` runs under the lock."""
        with self.lock:
            if rnd != self.open_round:
                return None
            ids = sorted(self.gate.arrived if included is None else included)
            weights = {c: float(self.clients[c].samples_by_round.get(rnd, 0)) for c in ids
                       if c in self.clients and self.clients[c].samples_by_round.get(rnd)}
            self.open_round = rnd + 1
            self.gate.open(rnd + 1)
            if self.open_round >= self.rounds:
                self.finished.set()
            return enqueue(weights, list(self.clients))

    def restore(self, open_round: int, roster: list[str]) -> None:
        """Resume at the start of `open_round` with the clients enrolled then (each must join again)."""
        with self.lock:
            self.open_round = open_round
            for client_id in roster:
                self.clients.setdefault(client_id, ClientRecord(client_id, "", next_step=open_round * self.local_steps))
            self.gate.open(open_round)
            if open_round >= self.rounds:
                self.finished.set()

    def round_weights(self, rnd: int) -> dict[str, float]:
        """Samples each client trained on in a round (the per-client server adapters' averaging weights)."""
        with self.lock:
            return {c: float(self.clients[c].samples_by_round[rnd]) for c in sorted(self.clients)
                    if self.clients[c].samples_by_round.get(rnd)}

    def current_round(self) -> int:
        """The open round (equals `rounds` once every round is closed)."""
        with self.lock:
            return min(self.open_round, self.rounds)

    def round_status(self) -> tuple[str, bool]:
        """A line on the open round for logs and status, and whether it is waiting for a quorum."""
        with self.lock:
            if self.open_round >= self.rounds:
                return "every round is closed", False
            return self.gate.describe(), self.gate.waiting_for_quorum()

    def steps_per_second(self) -> float:
        """Server steps per second since the server started."""
        return self.total_steps / max(time.monotonic() - self.started_at, 1e-9)
