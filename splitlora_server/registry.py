"""Who the server's clients are, their sessions, and how far each got: the service's bookkeeping."""
from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass, field

CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
    """Enrolment (first N distinct ids), sessions and per-round completion, under one lock."""

    def __init__(self, expected_clients: int, rounds: int, local_steps: int) -> None:
        self.expected, self.rounds, self.local_steps = expected_clients, rounds, local_steps
        self.clients: dict[str, ClientRecord] = {}
        self.lock = threading.Lock()
        self._done_by_round: dict[int, set[str]] = {}
        self.finished = threading.Event()
        self.started_at = time.monotonic()
        self.total_steps = 0

    def join(self, client_id: str) -> ClientRecord:
        """Enrol a new client or renew a known one's session."""
        if not CLIENT_ID_PATTERN.match(client_id):
            raise RegistryError("invalid", f"client id {client_id[:80]!r} must be 1-64 characters of letters, digits, "
                                           "'.', '_' or '-', starting with a letter or digit")
        with self.lock:
            record = self.clients.get(client_id)
            if record is None:
                if len(self.clients) >= self.expected:
                    raise RegistryError("full", f"all {self.expected} client slots are taken by "
                                                f"{', '.join(sorted(self.clients))}; start the server with "
                                                "--clients N for more")
                record = self.clients[client_id] = ClientRecord(client_id, "")
            record.session = secrets.token_hex(16)
            return record

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

    def step_done(self, record: ClientRecord, step: int, loss: float, tokens: int, samples: int) -> int | None:
        """Account a finished step; return the round number if this step completed it for every client."""
        with self.lock:
            record.next_step = step + 1
            record.last_loss, record.tokens = loss, record.tokens + tokens
            rnd = self.round_of(step)
            record.samples_by_round[rnd] = record.samples_by_round.get(rnd, 0) + samples
            self.total_steps += 1
            if (step + 1) % self.local_steps:
                return None
            done = self._done_by_round.setdefault(rnd, set())
            done.add(record.client_id)
            if len(done) < self.expected:
                return None
            if rnd == self.rounds - 1:
                self.finished.set()
            return rnd

    def round_weights(self, rnd: int) -> dict[str, float]:
        """Samples each client trained on in a round (the per-client server adapters' averaging weights)."""
        with self.lock:
            return {c: float(r.samples_by_round.get(rnd, 0)) for c, r in self.clients.items()
                    if r.samples_by_round.get(rnd)}

    def current_round(self) -> int:
        """The lowest round not yet completed by every client."""
        with self.lock:
            done = [r for r, ids in self._done_by_round.items() if len(ids) >= self.expected]
        return min(max(done) + 1, self.rounds) if done else 0

    def steps_per_second(self) -> float:
        """Server steps per second since the server started."""
        return self.total_steps / max(time.monotonic() - self.started_at, 1e-9)
