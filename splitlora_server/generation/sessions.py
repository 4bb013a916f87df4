"""Inference sessions: who owns each, its key/value cache, and the memory every cache holds, under limits.

A session belongs to the client that opened it and to the stream it was opened on; its cache is created, grown
and reordered only on the engine thread (`splitlora_server.generation.compute`), and dropped here (any thread) when
its stream ends, a limit is exceeded, or it sits idle too long. Dropping the last reference frees the memory.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from common.config.engine import ConfigError, option
from splitlora_server.errors import Refused


@dataclass
class GenerationOptions:
    """Limits and scheduling of split generation (`splitlora.v1.SplitGeneration`) on the server."""

    generation_max_sessions: int = option(64, "Open inference sessions the server keeps at once (0: generation off).")
    generation_max_tokens: int = option(1024, "Cached positions per row one session may reach (prompt + generated); "
                                              "capped by the model's positions.")
    generation_max_batch: int = option(16, "Rows (prompts x beams) one session may hold.")
    generation_session_bytes: int = option(256 << 20, "Key/value cache bytes one session may hold.")
    generation_cache_bytes: int = option(2 << 30, "Key/value cache bytes all sessions together may hold.")
    generation_idle_seconds: float = option(300.0, "A session without a step for this long is closed and freed.")
    generation_batching: bool = option(True, "Stack the decode steps of concurrent sessions into one forward.")
    serve_after_training: bool = option(False, "After the last round (and the export), keep serving generation "
                                               "and evaluation until stopped (a signal or the admin Shutdown).")
    generation_priority: str = option("training", "training: queued training steps run before generation steps; "
                                                  "fifo: in arrival order.", choices=["training", "fifo"])

    def validate_generation(self) -> None:
        """Limits that cannot work."""
        for name in ("generation_max_sessions", "generation_max_tokens", "generation_max_batch",
                     "generation_session_bytes", "generation_cache_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.generation_idle_seconds <= 0:
            raise ConfigError(f"generation_idle_seconds must be positive, got {self.generation_idle_seconds}")


@dataclass
class Session:
    """One inference session: its owner, adapter, answer kind, cache and its size."""

    session_id: str
    client_id: str
    adapter: str            # "shared", "own" or "none"
    reply: str              # "logits", "top_k" or "hidden"
    top_k: int
    max_tokens: int
    cache: Any = None       # a transformers DynamicCache, engine thread only
    rows: int = 0
    cached_tokens: int = 0  # positions per row in the cache
    cache_bytes: int = 0
    next_step: int = 0
    last_used: float = field(default_factory=time.monotonic)
    closed: str = ""        # why it was closed, once it is
    start: int | None = None  # the client's split layer: the first server block its steps run (None: the part's)


class SessionStore:
    """Open sessions by id, their cache bytes and the limits; thread-safe."""

    def __init__(self, options: GenerationOptions, bytes_per_position: int, max_positions: int) -> None:
        self.options, self.bytes_per_position = options, bytes_per_position
        self.max_tokens = min(options.generation_max_tokens, max_positions)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.tokens_computed = 0  # positions computed for generation since the start (status, metrics)
        self.opened_total = 0

    def open(self, client_id: str, adapter: str, reply: str, top_k: int, max_tokens: int,
             start: int | None = None) -> Session:
        """A new session of `client_id`; RESOURCE_EXHAUSTED when the server holds as many as it may."""
        limit = min(max_tokens or self.max_tokens, self.max_tokens)
        with self._lock:
            self._expire_locked(time.monotonic())
            if len(self._sessions) >= self.options.generation_max_sessions:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server holds {len(self._sessions)} inference "
                                   "sessions, its --generation-max-sessions; retry when one ends")
            session = Session(secrets.token_hex(16), client_id, adapter, reply, top_k, limit, start=start)
            self._sessions[session.session_id] = session
            self.opened_total += 1
        return session

    def get(self, session_id: str, client_id: str) -> Session:
        """The open session `session_id` of `client_id`: NOT_FOUND if unknown or expired, PERMISSION_DENIED if
        another client's."""
        with self._lock:
            self._expire_locked(time.monotonic())
            session = self._sessions.get(session_id)
        if session is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"inference session {session_id[:40]!r} is unknown or was closed "
                               "(ended, expired after --generation-idle-seconds, or over a limit); open a new one")
        if session.client_id != client_id:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"inference session {session_id[:40]!r} belongs to another client")
        return session

    def reserve(self, session: Session, rows: int, new_tokens: int) -> None:
        """Check that `new_tokens` more positions for `rows` rows fit every limit, before computing them; a step
        that does not fit closes the session (its memory is freed) and raises."""
        tokens = session.cached_tokens + new_tokens
        wanted = rows * tokens * self.bytes_per_position
        problem = ""
        if tokens > session.max_tokens:
            problem = (f"the session would hold {tokens} positions per row, over its limit of {session.max_tokens} "
                       "(--generation-max-tokens, or the model's positions)")
        elif rows > self.options.generation_max_batch:
            problem = f"{rows} rows is over the server's --generation-max-batch {self.options.generation_max_batch}"
        elif wanted > self.options.generation_session_bytes:
            problem = (f"the session's cache would hold {wanted} bytes, over --generation-session-bytes "
                       f"{self.options.generation_session_bytes}")
        else:
            with self._lock:
                others = sum(s.cache_bytes for s in self._sessions.values() if s is not session)
                if others + wanted > self.options.generation_cache_bytes:
                    problem = (f"all caches would hold {others + wanted} bytes, over the server's "
                               f"--generation-cache-bytes {self.options.generation_cache_bytes}; retry later")
        if problem:
            self.close(session, problem)
            code = grpc.StatusCode.OUT_OF_RANGE if tokens > session.max_tokens else grpc.StatusCode.RESOURCE_EXHAUSTED
            raise Refused(code, problem)

    def touch(self, session: Session, cache_bytes: int, cached_tokens: int, new_positions: int) -> None:
        """Record a finished step's cache size."""
        with self._lock:
            session.cache_bytes, session.cached_tokens = cache_bytes, cached_tokens
            session.last_used = time.monotonic()
            self.tokens_computed += new_positions

    def close(self, session: Session, reason: str) -> None:
        """Forget `session` and drop its cache (idempotent)."""
        with self._lock:
            self._sessions.pop(session.session_id, None)
            if not session.closed:
                session.closed = reason
            session.cache, session.cache_bytes = None, 0

    def _expire_locked(self, now: float) -> None:
        idle = self.options.generation_idle_seconds
        for session in [s for s in self._sessions.values() if now - s.last_used > idle]:
            self._sessions.pop(session.session_id)
            session.closed = f"idle for more than {idle:g} s (--generation-idle-seconds)"
            session.cache, session.cache_bytes = None, 0

    def expire(self) -> None:
        """Close the sessions idle longer than the limit (called on every open/get and by the status)."""
        with self._lock:
            self._expire_locked(time.monotonic())

    def totals(self) -> tuple[int, int]:
        """Open sessions and the cache bytes they hold."""
        with self._lock:
            self._expire_locked(time.monotonic())
            return len(self._sessions), sum(s.cache_bytes for s in self._sessions.values())
