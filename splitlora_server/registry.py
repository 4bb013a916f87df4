"""Who the server's clients are, their sessions, and how far each got: the service's bookkeeping."""
from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

import grpc

from common.redact import shown
from splitlora_server.errors import Refused
from splitlora_server.pipelining import MicroProgress
from splitlora_server.rounds.coordinator import FINISHED, SUBMITTED, RoundCoordinator

log = logging.getLogger(__name__)
# The client id character set (documented in SECURITY.md); \Z, not $: "alice\n" is not "alice".
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def invalid_client_id(client_id: str) -> str | None:
    """Why `client_id` is not a valid client id, or None if it is."""
    if CLIENT_ID_PATTERN.match(client_id):
        return None
    return (f"client id {shown(client_id)} must be 1-64 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")


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
    split_layer: int | None = None  # the client's split layer (from its Join)
    errors: int = 0  # refused frames and failed steps
    tokens: int = 0
    samples_by_round: dict[int, int] = field(default_factory=dict)
    codec: int = 1  # negotiated activation/gradient codec (CODEC_RAW)
    chunk_bytes: int = 4 << 20  # negotiated piece size of large frames, both ways
    micro_batches: int = 1  # negotiated most micro-batches per step (pipelined steps)
    micro: MicroProgress = field(default_factory=MicroProgress)  # its step in progress
    step_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)


class Registry:
    """Enrolment (first N distinct ids), sessions and how far each client got, under one lock. Rounds are the
    coordinator's (`coordinator`); the registry knows what each client trained in them."""

    def __init__(self, expected_clients: int, local_steps: int, coordinator: RoundCoordinator) -> None:
        self.expected, self.local_steps, self.coordinator = expected_clients, local_steps, coordinator
        self.rounds = coordinator.rounds
        self.clients: dict[str, ClientRecord] = {}
        self.lock = threading.Lock()
        self.started_at = time.monotonic()
        self.total_steps = 0

    def join(self, client_id: str) -> ClientRecord:
        """Enrol a new client or renew a known one's session."""
        problem = invalid_client_id(client_id)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self.lock:
            record = self.clients.get(client_id)
            if record is None:
                if len(self.clients) >= self.expected and (freed := self._free_idle_slot()) is not None:
                    log.info("client %s left before its first step: its slot goes to %s", freed, client_id)
                if len(self.clients) >= self.expected:
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"all {self.expected} client slots are taken by {', '.join(sorted(self.clients))}; "
                                  "start the server with --clients N for more")
                record = self.clients[client_id] = ClientRecord(client_id, "")
            record.session = secrets.token_hex(16)
            return record

    def _free_idle_slot(self) -> str | None:
        """Under the lock, with every slot taken: free the slot of a client that left before its first step of the
        run (its stream closed, nothing trained, no frame refused: it failed on its own side), if there is one."""
        if self.coordinator.open_round != 0:  # an int read: no coordinator lock under this one
            return None
        for client_id, record in sorted(self.clients.items()):
            if record.next_step == 0 and record.opened and record.streams == 0 and record.errors == 0:
                del self.clients[client_id]  # it never finished a round: the coordinator has no arrival of it
                return client_id
        return None

    def authenticate(self, client_id: str, session: str) -> ClientRecord:
        """The record of a client whose session token is current."""
        with self.lock:
            record = self.clients.get(client_id)
        if record is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"unknown client {shown(client_id)}: it has not joined "
                                                               "this server (call Join first)")
        if not secrets.compare_digest(record.session, session):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          f"session of client {shown(client_id)} is not current; join again")
        return record

    def is_enrolled(self, client_id: str) -> bool:
        """Whether `client_id` has joined this server."""
        return client_id in self.clients

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

    def resume(self, record: ClientRecord) -> tuple[int, bool]:
        """Where a (re)joining client starts, and whether it had partial progress in that round to undo.

        A client always (re)starts at the open round, from its own checkpoint of that round's start: its partial
        progress in the round is dropped (it redoes the round), so a resumed run retraces an uninterrupted one.
        The exception: a client that finished the round and whose adapter the aggregator holds goes on to the
        next round."""
        rounds = self.coordinator
        with rounds.lock:  # no round closes meanwhile
            rnd = rounds.open_round
            kept = rounds.has_arrived(record.client_id, rnd, SUBMITTED)
            with self.lock:
                start = rnd * self.local_steps
                if kept and record.next_step >= start + self.local_steps:
                    return rnd + 1, False
                partial = record.next_step > start
                record.next_step = start
                record.samples_by_round.pop(rnd, None)
            rounds.leave(record.client_id, FINISHED)
            return rnd, partial

    def step_done(self, record: ClientRecord, step: int, loss: float, tokens: int, samples: int) -> bool:
        """Account a finished step; True if it was the client's last step of its round."""
        with self.lock:
            record.next_step = step + 1
            record.last_loss, record.tokens = loss, record.tokens + tokens
            rnd = self.round_of(step)
            record.samples_by_round[rnd] = record.samples_by_round.get(rnd, 0) + samples
            self.total_steps += 1
            return (step + 1) % self.local_steps == 0

    def restore(self, open_round: int, roster: list[str]) -> None:
        """Resume at the start of `open_round` with the clients enrolled then (each must join again)."""
        with self.lock:
            for client_id in roster:
                self.clients.setdefault(client_id, ClientRecord(client_id, "", next_step=open_round * self.local_steps))

    def round_weights(self, rnd: int, included: list[str]) -> dict[str, float]:
        """Samples each of `included` trained on in round `rnd` (the per-client server adapters' weights)."""
        with self.lock:
            return {c: float(self.clients[c].samples_by_round[rnd]) for c in sorted(included)
                    if c in self.clients and self.clients[c].samples_by_round.get(rnd)}

    def roster(self) -> list[str]:
        """Enrolled client ids, in enrolment order."""
        with self.lock:
            return list(self.clients)

    def steps_per_second(self) -> float:
        """Server steps per second since the server started."""
        return self.total_steps / max(time.monotonic() - self.started_at, 1e-9)
