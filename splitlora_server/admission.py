"""Admission of SplitLoRA calls: no caller can take the handler threads, the health service or the admin calls.

One interceptor, inside the authentication interceptor, applies per call:
- **one `Train` stream per caller**: a caller's new Train stream cancels its previous one (a reconnecting client
  replaces its half-dead stream; a hostile one never holds more than one);
- **at most `--max-streams-per-client` concurrent calls of each other method per caller** (Join, Submit,
  FetchGlobal), then RESOURCE_EXHAUSTED;
- **at most `--max-concurrent-rpcs` SplitLoRA calls in all** (default: `--max-workers` minus
  `--reserved-workers`), then RESOURCE_EXHAUSTED: the reserved handler threads stay free for the health service
  and the admin calls (Status, Shutdown), which are never counted;
- **a deadline for the first message** of a client-streaming call (Train, Submit): a stream that sends nothing
  for `--first-message-seconds` is cancelled;
- **undecodable messages** are refused with INVALID_ARGUMENT and one rate-limited log line (grpc would log a
  traceback per message and, with the stream left open, keep its handler thread past shutdown).
Every refusal is counted per caller and reason (splitlora_server.refusals). The per-caller rules apply when
callers have identities (certificates or tokens); the others apply always.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import grpc

from common.config.engine import ConfigError, option
from splitlora_server.auth import ADMIN_METHODS, PROTECTED_PREFIX, Authenticator, rewrap
from splitlora_server.refusals import RefusalBook

TRAIN = "/splitlora.v1.SplitTraining/Train"
RPC_THREADS = "splitlora-rpc"  # the handler threads' name prefix
UNDECODABLE = object()  # what the safe deserializer returns for bytes that are not the method's message
WATCH_INTERVAL_S = 0.25


@dataclass
class AdmissionOptions:
    """Limits on concurrent calls (see SECURITY.md, "Limits")."""

    max_concurrent_rpcs: int = option(0, "SplitLoRA calls served at once, all callers together; more are "
                                         "RESOURCE_EXHAUSTED (0: --max-workers minus --reserved-workers).")
    reserved_workers: int = option(4, "Handler threads kept free for the health service and the admin calls.")
    max_streams_per_client: int = option(2, "Concurrent Join, Submit and FetchGlobal calls of one caller, per "
                                            "method (a caller's Train stream is always one: a new one replaces it).")
    first_message_seconds: float = option(10.0, "A Train or Submit stream that sends no message for this long "
                                                "after opening is cancelled.")
    shutdown_grace_seconds: float = option(5.0, "On SIGTERM or Shutdown: how long open calls may take to end "
                                                "before they are cancelled and the process exits.")

    def validate_admission(self, max_workers: int) -> None:
        """The limits leave room for the reserved threads."""
        if self.reserved_workers < 1 or self.reserved_workers >= max_workers:
            raise ConfigError(f"reserved_workers must be in [1, max_workers={max_workers}), got "
                              f"{self.reserved_workers}")
        if self.max_concurrent_rpcs < 0 or self.max_concurrent_rpcs > max_workers - self.reserved_workers:
            raise ConfigError(f"max_concurrent_rpcs must be in [0, max_workers - reserved_workers = "
                              f"{max_workers - self.reserved_workers}], got {self.max_concurrent_rpcs}")
        if self.max_streams_per_client < 1:
            raise ConfigError(f"max_streams_per_client must be at least 1, got {self.max_streams_per_client}")
        if not self.first_message_seconds > 0 or not self.shutdown_grace_seconds >= 0:
            raise ConfigError("first_message_seconds must be > 0 and shutdown_grace_seconds >= 0")

    def rpc_cap(self, max_workers: int) -> int:
        """The concurrent SplitLoRA calls admitted."""
        return self.max_concurrent_rpcs or max_workers - self.reserved_workers


@dataclass(eq=False)
class _Call:
    """One admitted call."""

    caller: str
    method: str
    context: grpc.ServicerContext
    opened: float
    streaming_in: bool
    first_seen: bool = False
    released: bool = False


class Admission:
    """The handler threads (`pool`, for grpc.server) and the bookkeeping of the calls admitted to them; the
    `AdmissionInterceptor` applies it."""

    def __init__(self, auth: Authenticator, options: AdmissionOptions, max_workers: int) -> None:
        self.auth, self.options, self.cap = auth, options, options.rpc_cap(max_workers)
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=RPC_THREADS)
        self.refusals: RefusalBook = auth.refusals
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._watch_first_messages, name="splitlora-admission", daemon=True)
        self._watch.start()

    @property
    def active(self) -> int:
        """SplitLoRA calls being served now."""
        with self._lock:
            return len(self._calls)

    def close(self) -> None:
        """Stop the first-message watchdog and let idle handler threads end (after the server stopped)."""
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def caller_of(self, context: grpc.ServicerContext) -> str:
        """The caller's identity (its peer address when identities are not configured)."""
        return self.auth.caller(context)

    def admit(self, method: str, context: grpc.ServicerContext, streaming_in: bool) -> _Call:
        """Admit a call or abort it with RESOURCE_EXHAUSTED; a caller's older Train stream is cancelled."""
        caller, name = self.caller_of(context), method.rsplit("/", 1)[-1]
        replaced: list[_Call] = []
        with self._lock:
            # per-caller rules need identities: anonymous callers (no --require-client-cert, no --tokens-file)
            # may act as any client anyway, and many share one connection
            same = [c for c in self._calls if c.caller == caller and c.method == method] if self.auth.enabled else []
            if method == TRAIN:
                replaced = same
            elif len(same) >= self.options.max_streams_per_client:
                self._refuse(context, caller, "stream-limit", f"{caller} already has {len(same)} open {name} calls "
                             f"(--max-streams-per-client {self.options.max_streams_per_client})")
            if len(self._calls) - len(replaced) >= self.cap:
                self._refuse(context, caller, "rpc-limit", f"the server is serving its maximum of {self.cap} calls "
                             "(--max-concurrent-rpcs); retry later")
            call = _Call(caller, method, context, time.monotonic(), streaming_in)
            self._calls.add(call)
            self._calls.difference_update(replaced)
            for old in replaced:
                old.released = True
        for old in replaced:
            self.refusals.refuse(caller, "train-replaced", "a newer Train stream of the same caller replaced it")
            old.context.cancel()
        if not context.add_callback(lambda: self.release(call)):
            self.release(call)  # the call is already over
        return call

    def _refuse(self, context: grpc.ServicerContext, caller: str, reason: str, message: str) -> None:
        self.refusals.refuse(caller, reason, message)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def release(self, call: _Call) -> None:
        """The call ended (idempotent)."""
        with self._lock:
            if not call.released:
                call.released = True
                self._calls.discard(call)

    def _watch_first_messages(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            limit = time.monotonic() - self.options.first_message_seconds
            with self._lock:
                late = [c for c in self._calls if c.streaming_in and not c.first_seen and c.opened < limit]
                for call in late:
                    call.first_seen = True  # cancelled once
            for call in late:
                self.refusals.refuse(call.caller, "first-message-timeout", f"its {call.method.rsplit('/', 1)[-1]} "
                                     f"stream sent nothing for {self.options.first_message_seconds:g} s")
                call.context.cancel()

    # -- the interceptor's wrapping of one handler -----------------------------------------------------------------
    def undecodable(self, context: grpc.ServicerContext, method: str) -> None:
        """Refuse a message that does not parse as the method's request."""
        message = f"a {method.rsplit('/', 1)[-1]} message could not be decoded (not the protobuf message this " \
                  "method takes)"
        self.refusals.refuse(self.caller_of(context), "undecodable", message)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    def _requests(self, requests: Iterator[Any], call: _Call) -> Iterator[Any]:
        for request in requests:
            call.first_seen = True
            if request is UNDECODABLE:
                self.undecodable(call.context, call.method)
            yield request

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler with a safe deserializer, admission before its behaviour and release after it."""
        counted = method not in ADMIN_METHODS
        streaming_in = handler.request_streaming

        def before(request: Any, context: grpc.ServicerContext) -> Any:
            if counted:
                call = self.admit(method, context, streaming_in)
                if streaming_in:
                    return self._requests(request, call)
            if not streaming_in and request is UNDECODABLE:
                self.undecodable(context, method)
            return request

        return rewrap(handler, before, _safe(handler.request_deserializer))


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns UNDECODABLE instead of raising."""
    if deserializer is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the caller's, refused by the handler
            return UNDECODABLE

    return safe


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Applies `Admission` to every SplitLoRA method; the health service and unknown methods pass untouched."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        return self.admission.wrap(handler, details.method)
