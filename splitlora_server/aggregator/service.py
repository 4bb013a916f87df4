"""The Aggregator gRPC service: collects client adapters round by round and serves their average.

Rounds run 0..rounds-1, one open at a time. A round closes once `expected_clients` distinct
clients have submitted to it, or once its deadline has passed with a quorum (splitlora_server.rounds.gate): their
adapters are combined (sample-weighted FedAvg, or a robust mode, with optional update-norm clipping against
the previous global adapter; see common.aggregation), the result is kept (and written to
`output_dir/global/round-NNNN.safetensors` when an output directory is set), and clients waiting in
FetchGlobal receive it. Only enrolled clients submit and fetch: those the split server enrolled
(`is_enrolled`), or else the first `expected_clients` ids whose submissions were accepted. With an output
directory every accepted submission is stored too, so a restarted aggregator (`restore`) loses nothing
(splitlora_server.aggregator.store). All state sits behind one Condition, so the servicer is safe under
grpc's thread pool; a refused submission never changes that state.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc
import torch
from safetensors.torch import load_file

from common.aggregation import DEFAULT_TRIM_FRACTION, MODES, aggregate
from common.faults import fault_point
from common.limits import negotiated_chunk, too_small
from common.lora import AdapterState, from_bytes, to_bytes
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from splitlora_server.aggregator.requests import (Header, Refusal, check_client_id, check_layout,
                                                  check_repeated_header, parse_adapter)
from splitlora_server.aggregator.store import AggregatorStore, RoundSummary
from splitlora_server.auth import AccessDenied, Authenticator
from splitlora_server.rounds.gate import Quorum, RoundGate

log = logging.getLogger(__name__)
KEEP_IN_MEMORY = 3  # latest global adapters kept as bytes; older ones are read back from output_dir
WAIT_SLICE_S = 0.5  # how often a waiting FetchGlobal checks whether its call is still alive
_Code = grpc.StatusCode


class AggregatorService(agrpc.AggregatorServicer):
    """Round-based aggregation of client LoRA adapters over gRPC.

    `mode`, `clip_norm`, `trim_fraction`: how a round's adapters are combined (common.aggregation).
    `auth`: a client may submit and fetch only as itself. `verify_claim(client_id, round, num_samples)`:
    an error message when the split server knows the claim to be false (round not trained, samples inflated).
    """

    def __init__(self, expected_clients: int, rounds: int, output_dir: Path | None,
                 max_adapter_bytes: int = 512 << 20, is_enrolled: Callable[[str], bool] | None = None,
                 chunk_bytes: int = 1 << 20,
                 on_round_closed: Callable[[int, AdapterState], None] | None = None, *, mode: str = "fedavg",
                 clip_norm: float = 0.0, trim_fraction: float = DEFAULT_TRIM_FRACTION,
                 auth: Authenticator | None = None,
                 verify_claim: Callable[[str, int, int], str | None] | None = None,
                 quorum: Quorum | None = None, store_submissions: bool = True) -> None:
        for name, value in (("expected_clients", expected_clients), ("rounds", rounds),
                            ("max_adapter_bytes", max_adapter_bytes), ("chunk_bytes", chunk_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if mode not in MODES:
            raise ValueError(f"unknown aggregation mode {mode!r}; choose one of {sorted(MODES)}")
        self.mode, self.clip_norm, self.trim_fraction = mode, clip_norm, trim_fraction
        self._auth, self._verify_claim = auth or Authenticator(), verify_claim
        self._previous: AdapterState | None = None  # the last global adapter: the clipping reference
        self.expected_clients, self.rounds = expected_clients, rounds
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_adapter_bytes, self.chunk_bytes = max_adapter_bytes, chunk_bytes
        self._is_enrolled, self._on_round_closed = is_enrolled, on_round_closed
        self._cond = threading.Condition()
        self._open_round = 0
        self._pending: dict[str, tuple[int, AdapterState]] = {}
        self._reference: AdapterState | None = None  # keys/shapes of the first accepted adapter (meta tensors)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._summary: dict[int, RoundSummary] = {}
        self._fetched: dict[int, set[str]] = {}
        self._members: set[str] = set()  # without `is_enrolled`: the first `expected_clients` ids accepted
        self.submissions = self.refusals = self.bytes_received = 0  # counters for the metrics endpoint
        self._store = AggregatorStore(self.output_dir) if self.output_dir is not None else None
        self._store_submissions = store_submissions  # off next to the split server: it rolls back open rounds
        self._gate = RoundGate(quorum or Quorum(expected_clients), on_due=self._deadline_passed, what="submitted")
        self._accepted_here = 0  # submissions accepted by this process (the fault hook counts them)
        self.stopping = threading.Event()  # set on shutdown: calls are refused with UNAVAILABLE (retry)

    # ----------------------------------------------------------------- introspection
    @property
    def open_round(self) -> int:
        """The round accepting submissions; equals `rounds` once every round is closed."""
        with self._cond:
            return self._open_round

    @property
    def closed_rounds(self) -> tuple[int, ...]:
        """The closed rounds, in order (rounds close strictly one after another)."""
        with self._cond:
            return tuple(range(self._open_round))

    @property
    def finished(self) -> bool:
        """True once every round has closed."""
        with self._cond:
            return self._open_round >= self.rounds

    def global_adapter(self, round: int) -> AdapterState | None:
        """The global adapter of a closed round, or None if not closed or no longer available."""
        data = self._global_bytes(round)
        return from_bytes(data) if data is not None else None

    def wait_until_closed(self, round: int, timeout: float | None = None) -> bool:
        """Block until `round` closes; False on timeout or if the run has no such round."""
        if not 0 <= round < self.rounds:
            return False
        with self._cond:
            return self._cond.wait_for(lambda: round < self._open_round, timeout)

    def fetched(self, round: int) -> set[str]:
        """Client ids that have downloaded the global adapter of `round`."""
        with self._cond:
            return set(self._fetched.get(round, ()))

    def round_path(self, round: int) -> Path | None:
        """Where the global adapter of `round` is written, if there is an output directory."""
        return self._store.global_path(round) if self._store is not None else None

    def included(self, round: int) -> set[str]:
        """The clients a closed round averaged."""
        with self._cond:
            summary = self._summary.get(round)
            return set(summary.samples) if summary is not None else set()

    def has_submitted(self, client_id: str, round: int) -> bool:
        """True if `client_id` has a submission in open round `round`."""
        with self._cond:
            return round == self._open_round and client_id in self._pending

    def round_status(self) -> tuple[str, bool]:
        """A line on the open round for logs and status, and whether it is waiting for a quorum."""
        with self._cond:
            if self._open_round >= self.rounds:
                return "every round is closed", False
            return self._gate.describe(), self._gate.waiting_for_quorum()

    def restore(self, up_to: int | None = None) -> int:
        """Resume from the output directory: the closed rounds (only the first `up_to` of them when the split
        server in this process restarts from its own checkpoint) and the open round's stored submissions.
        Returns the open round."""
        if self._store is None:
            return self._open_round
        with self._cond:
            closed = self._store.closed_rounds()
            if up_to is not None:
                if len(closed) < up_to:
                    raise ValueError(f"the server's checkpoint starts round {up_to}, but the global adapters of "
                                     f"rounds {len(closed)}..{up_to - 1} are missing from {self._store.root}")
                closed = closed[:up_to]
                self._store.drop_rounds_from(up_to)  # written by a close the server's checkpoint did not see
            self._summary = {r: self._store.read_summary(r) for r in closed}
            for summary in self._summary.values():  # who was enrolled, and the clipping reference
                self._members.update(summary.samples if summary is not None else ())
            if closed:
                last = load_file(str(self._store.global_path(closed[-1])))
                self._previous = {k: v.float() for k, v in last.items()}
            self._open_round = len(closed)
            self._gate.open(self._open_round)
            if self._open_round < self.rounds:
                stored = self._store.read_pending(self._open_round) if self._store_submissions else {}
                for client_id, (num_samples, state) in sorted(stored.items()):
                    self._pending[client_id] = (num_samples, state)
                    self._members.add(client_id)
                    self._gate.arrive(client_id)
                    if self._reference is None:
                        self._reference = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
            log.info("restored from %s: %d rounds closed, %d stored submissions to round %d", self._store.root,
                     len(closed), len(self._pending), self._open_round)
            if self._pending and self._gate.ready():  # killed while closing it: close it now
                self._close_round()
            return self._open_round

    # ----------------------------------------------------------------- Submit
    def Submit(self, request_iterator: Iterator[apb.AdapterUpload],
               context: grpc.ServicerContext) -> apb.SubmitReply:
        """Receive one client's adapter for the open round; close the round when all have come in."""
        try:
            if self.stopping.is_set():
                raise Refusal(_Code.UNAVAILABLE, "aggregator shutting down, retry")
            header, data = self._receive(request_iterator, context)
            reference = self._reference  # set once under the lock and never changed afterwards
            state = parse_adapter(header, data, reference)
            submitted = self._accept(header, state, reference)
            return apb.SubmitReply(round=header.round, submitted=submitted, expected=self.expected_clients)
        except Refusal as refusal:
            with self._cond:
                self.refusals += 1
            log.warning("refused submission: %s", refusal.message)
            context.abort(refusal.code, refusal.message)
            raise  # unreachable: abort raises

    def _receive(self, messages: Iterable[apb.AdapterUpload], context: grpc.ServicerContext
                 ) -> tuple[Header, bytes]:
        """Read the stream: header checks as soon as the first message is in, then the bytes."""
        stream = iter(messages)
        first = next(stream, None)
        if first is None:
            raise Refusal(_Code.INVALID_ARGUMENT, "Submit stream was empty; send AdapterUpload messages with "
                                                   "client_id, round, num_samples and the adapter bytes")
        header = Header(first.client_id, first.round, first.num_samples)
        self._check_client(header.client_id, header.round, context)
        if header.num_samples == 0:
            raise Refusal(_Code.INVALID_ARGUMENT, f"client {header.client_id!r} sent num_samples=0; set it to the "
                                                   "number of training samples behind the adapter (it weights the average)")
        with self._cond:
            self._check_open(header)  # fail fast before reading a large upload; re-checked on accept
        problem = self._verify_claim(header.client_id, header.round, header.num_samples) if self._verify_claim else None
        if problem:
            raise Refusal(_Code.FAILED_PRECONDITION, f"submission of client {header.client_id!r} for round "
                                                      f"{header.round} refused: {problem}")
        pieces, size = [], 0
        for msg in itertools.chain([first], stream):
            check_repeated_header(header, msg)
            size += len(msg.safetensors_chunk)
            if size > self.max_adapter_bytes:
                raise Refusal(_Code.RESOURCE_EXHAUSTED, f"adapter from client {header.client_id!r} exceeds "
                                                         f"{self.max_adapter_bytes} bytes; raise --max-adapter-bytes")
            pieces.append(msg.safetensors_chunk)
        with self._cond:
            self.bytes_received += size
        return header, b"".join(pieces)

    def _check_client(self, client_id: str, round: int, context: grpc.ServicerContext) -> None:
        """Checks shared by Submit and FetchGlobal that need no round state."""
        check_client_id(client_id)
        try:
            self._auth.check_client(context, client_id)
        except AccessDenied as denied:
            raise Refusal(denied.code, denied.message) from None
        if self._is_enrolled is not None and not self._is_enrolled(client_id):
            raise Refusal(_Code.PERMISSION_DENIED, f"client {client_id!r} is not enrolled with this aggregator; "
                                                    "check its client id and enrolment")
        if round >= self.rounds:
            raise Refusal(_Code.OUT_OF_RANGE, f"round {round} is out of range: this run has {self.rounds} "
                                               f"rounds, numbered 0..{self.rounds - 1}")

    def _check_open(self, header: Header) -> None:
        """Refuse a submission to a round other than the open one, or a second one from a client."""
        r, open_round = header.round, self._open_round
        if r < open_round:
            raise Refusal(_Code.FAILED_PRECONDITION, f"round {r} is closed; fetch its global adapter and "
                                                      f"continue (round {open_round} is open)")
        if r > open_round:
            raise Refusal(_Code.FAILED_PRECONDITION, f"round {r} is not open yet; round {open_round} is open "
                                                      f"and needs {self.expected_clients} clients to close")
        if header.client_id in self._pending:
            raise Refusal(_Code.ALREADY_EXISTS, f"client {header.client_id!r} already submitted for round {r}; "
                                                 "wait for the round to close and fetch its global adapter")
        self._check_member(header.client_id)

    def _check_member(self, client_id: str) -> None:
        """Without an enrolment check, the first `expected_clients` ids accepted are the only ones served."""
        if (self._is_enrolled is None and client_id not in self._members
                and len(self._members) >= self.expected_clients):
            raise Refusal(_Code.PERMISSION_DENIED, f"client {client_id!r} is not enrolled: this aggregator serves "
                                                    f"the {self.expected_clients} clients that submitted first "
                                                    f"({', '.join(sorted(self._members))})")

    def _accept(self, header: Header, state: AdapterState, checked_against: AdapterState | None) -> int:
        """Record (and store) the submission, closing the round if it may close now; return the round's count."""
        with self._cond:
            self._check_open(header)
            if self._reference is not None and checked_against is not self._reference:
                check_layout(state, self._reference, f"adapter from client {header.client_id!r}")
            cid = header.client_id
            if self._store is not None and self._store_submissions:
                try:
                    self._store.write_pending(header.round, cid, header.num_samples, state)
                except OSError as err:
                    raise Refusal(_Code.INTERNAL, f"could not store the submission: {err}; retry it") from err
            self._pending[cid] = (header.num_samples, state)
            self._gate.arrive(cid)
            count = len(self._pending)
            self._accepted_here += 1
            fault_point("aggregator", "submit", self._accepted_here)
            if self._gate.ready():
                try:
                    self._close_round()
                except Refusal:
                    del self._pending[cid]
                    self._gate.leave(cid)
                    if self._store is not None:
                        self._store.drop_pending(header.round, cid)
                    raise
            self._members.add(cid)
            self.submissions += 1
            if self._reference is None:
                self._reference = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
            return count

    def _close_round(self) -> None:
        """Average, store and publish the open round; the caller holds the lock."""
        r, pending = self._open_round, self._pending
        ids = sorted(pending)
        weights = [pending[c][0] for c in ids]
        summary = RoundSummary({c: pending[c][0] for c in ids})
        try:
            glob = aggregate([pending[c][1] for c in ids], weights, mode=self.mode, clip_norm=self.clip_norm,
                             reference=self._previous, trim_fraction=self.trim_fraction)
            fault_point("aggregator", "close", r)
            data = to_bytes(glob)
            if self._store is not None:
                self._store.write_global(r, glob, summary)
        except (OSError, ValueError) as err:
            raise Refusal(_Code.INTERNAL, f"could not close round {r}: {err}; "
                                           "this submission was not recorded, retry it") from err
        self._cache[r] = data
        while len(self._cache) > KEEP_IN_MEMORY:
            self._cache.popitem(last=False)
        self._summary[r] = summary
        self._pending, self._previous = {}, glob
        late = "" if len(ids) >= self.expected_clients else f" (deadline passed; {self.expected_clients - len(ids)} missing)"
        log.info("round %d closed (%s%s): %d clients, %d samples%s", r, self.mode,
                 f", updates clipped to norm {self.clip_norm}" if self.clip_norm else "", len(ids), sum(weights),
                 late, extra={"round": r})
        if self._on_round_closed is not None:
            try:
                self._on_round_closed(r, glob)
            except Exception:  # the round is closed either way; a faulty hook must not stall the run
                log.exception("on_round_closed hook failed for round %d", r)
        self._open_round = r + 1
        self._gate.open(r + 1)
        self._cond.notify_all()

    def _deadline_passed(self, round: int) -> None:
        """The deadline timer: close the round with the quorum, or say that it waits for one."""
        with self._cond:
            if round != self._open_round:
                return
            if self._gate.ready():
                try:
                    self._close_round()
                except Refusal as refusal:
                    log.error("round %d: %s", round, refusal.message)
            else:
                log.warning("round %d: deadline passed without a quorum; the round waits (%s)", round,
                            self._gate.describe())

    # ----------------------------------------------------------------- FetchGlobal
    def FetchGlobal(self, request: apb.FetchRequest,
                    context: grpc.ServicerContext) -> Iterator[apb.AdapterDownload]:
        """Wait for the round to close, then stream its global adapter in `chunk_bytes` pieces."""
        try:
            self._check_client(request.client_id, request.round, context)
            with self._cond:
                self._check_member(request.client_id)
            chunk = negotiated_chunk(self.chunk_bytes, request.max_message_bytes)
            if chunk is None:
                raise Refusal(_Code.INVALID_ARGUMENT, too_small(request.max_message_bytes))
            if not self._wait_closed(request.round, context):
                return  # cancelled or past its deadline while waiting
            data = self._global_bytes(request.round)
            if data is None:
                raise Refusal(_Code.NOT_FOUND, f"the global adapter of round {request.round} is no longer kept in "
                                                "memory and was not written to disk; start the aggregator with an "
                                                "output directory to serve old rounds")
        except Refusal as refusal:
            with self._cond:
                self.refusals += 1
            context.abort(refusal.code, refusal.message)
            raise  # unreachable: abort raises
        summary = self._summary.get(request.round) or RoundSummary({})
        num_clients, total_samples = summary.num_clients, summary.total_samples
        for offset in range(0, len(data), chunk):
            yield apb.AdapterDownload(round=request.round, num_clients=num_clients, total_samples=total_samples,
                                      safetensors_chunk=data[offset:offset + chunk])
        with self._cond:
            self._fetched.setdefault(request.round, set()).add(request.client_id)

    def _wait_closed(self, round: int, context: grpc.ServicerContext) -> bool:
        """Wait until `round` closes; False if the call stops being active first."""
        with self._cond:
            while round >= self._open_round:
                if self.stopping.is_set():
                    raise Refusal(_Code.UNAVAILABLE, "aggregator shutting down, retry")
                if not context.is_active():
                    return False
                self._cond.wait(WAIT_SLICE_S)
            return True

    def _global_bytes(self, round: int) -> bytes | None:
        """The serialized global adapter of a closed round, from memory or output_dir; None if unavailable."""
        with self._cond:
            if round >= self._open_round or round < 0:
                return None
            if round in self._cache:
                return self._cache[round]
        path = self.round_path(round)
        try:
            return path.read_bytes() if path is not None else None
        except OSError:
            return None
