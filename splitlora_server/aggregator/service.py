"""The Aggregator gRPC service: collects client adapters round by round and serves their average.

Rounds run 0..rounds-1, one open at a time, and belong to the round coordinator (splitlora_server.rounds): a
submission is an arrival, and a round closes once `expected_clients` distinct clients have submitted to it, or
once its deadline has passed with a quorum. Their adapters are combined by the strategy (common.aggregation;
FedAvg unless given), the result is kept (and written to
`output_dir/global/round-NNNN.safetensors` when an output directory is set), and clients waiting in
FetchGlobal receive it. Only enrolled clients submit and fetch: those the split server enrolled
(`is_enrolled`), or else the first `expected_clients` ids whose submissions were accepted. With an output
directory every accepted submission is stored too, so a restarted aggregator (`restore`) loses nothing
(splitlora_server.aggregator.store, through the `Ledger`). A refused submission never changes any state.
"""
from __future__ import annotations

import itertools
import logging
import threading
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc
import torch

from common.adapter_layout import Layout
from common.aggregation import ClientUpdate, Strategy, build_strategy
from common.faults import fault_point
from common.limits import negotiated_chunk, too_small
from common.lora import AdapterState, from_bytes
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from splitlora_server.aggregator.ledger import KEEP_IN_MEMORY, Ledger
from splitlora_server.aggregator.requests import (Header, check_client_id, check_layout, parse_adapter,
                                                  read_upload)
from splitlora_server.aggregator.store import RoundSummary
from splitlora_server.auth import Authenticator
from splitlora_server.errors import Refused, abort
from splitlora_server.rounds.coordinator import SUBMITTED, RoundCoordinator
from splitlora_server.rounds.gate import Quorum

__all__ = ["KEEP_IN_MEMORY", "AggregatorService"]
log = logging.getLogger(__name__)
WAIT_SLICE_S = 0.5  # how often a waiting FetchGlobal checks whether its call is still alive
_Code = grpc.StatusCode


class AggregatorService(agrpc.AggregatorServicer):
    """Round-based aggregation of client LoRA adapters over gRPC.

    `rounds`: the coordinator that owns the rounds (the application's; without one, the service makes its own
    from `rounds_total` and `quorum`, and subscribes to it). `auth`: a client may submit and fetch only as itself.
    `verify_claim(client_id, round, num_samples)`: an error message when the split server knows the claim to be
    false (round not trained, samples inflated). `layout`: the keys and shapes of the run's client adapter
    (common.adapter_layout, from the model and LoRA options); every upload is checked against it piece by piece.
    Without one (embedded uses and tests; both commands pass one) the first accepted adapter defines the layout.
    Per-client split points: `client_layout(client_id)` is each client's layout (its split layer's), and
    `server_updates(round, client_ids)` the split server's copies of the blocks trained on both sides, combined
    with the clients' adapters (the strategy should be a `PerModule`).
    """

    def __init__(self, expected_clients: int, rounds: int, output_dir: Path | None,
                 max_adapter_bytes: int = 512 << 20, is_enrolled: Callable[[str], bool] | None = None,
                 chunk_bytes: int = 1 << 20,
                 on_round_closed: Callable[[int, AdapterState], None] | None = None, *,
                 strategy: Strategy | None = None, auth: Authenticator | None = None,
                 verify_claim: Callable[[str, int, int], str | None] | None = None,
                 quorum: Quorum | None = None, store_submissions: bool = True,
                 coordinator: RoundCoordinator | None = None, layout: Layout | None = None,
                 client_layout: Callable[[str], Layout] | None = None,
                 server_updates: Callable[[int, list[str]], list[ClientUpdate]] | None = None) -> None:
        for name, value in (("expected_clients", expected_clients), ("rounds", rounds),
                            ("max_adapter_bytes", max_adapter_bytes), ("chunk_bytes", chunk_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.expected_clients, self.rounds = expected_clients, rounds
        self.coordinator = coordinator or RoundCoordinator(rounds, quorum or Quorum(expected_clients), SUBMITTED)
        self.strategy = strategy or build_strategy()
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._auth, self._layout = auth or Authenticator(), layout
        self.ledger = Ledger(self.coordinator, self.strategy, self.output_dir, store_submissions, on_round_closed,
                             on_incident=self._auth.refusals.incident, server_updates=server_updates)
        self._client_layout = client_layout
        self._references: dict[int, AdapterState] = {}  # per-client layouts as meta tensors, by id of the layout
        if layout is not None:  # the run's layout, never the first submitter's
            self.ledger.reference = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
        if coordinator is None:
            self.coordinator.subscribe(self.ledger)
        self._verify_claim, self._is_enrolled = verify_claim, is_enrolled
        self.max_adapter_bytes, self.chunk_bytes = max_adapter_bytes, chunk_bytes
        self.submissions = self.refusals = self.bytes_received = 0  # counters for the metrics endpoint
        self._accepted_here = 0  # submissions accepted by this process (the fault hook counts them)
        self.stopping = threading.Event()  # set on shutdown: calls are refused with UNAVAILABLE (retry)

    # ----------------------------------------------------------------- introspection
    @property
    def open_round(self) -> int:
        """The round accepting submissions; equals `rounds` once every round is closed."""
        return self.coordinator.open_round

    @property
    def closed_rounds(self) -> tuple[int, ...]:
        """The closed rounds, in order (rounds close strictly one after another)."""
        return tuple(range(self.coordinator.open_round))

    @property
    def finished(self) -> bool:
        """True once every round has closed."""
        return self.coordinator.finished.is_set()

    def global_adapter(self, round: int) -> AdapterState | None:
        """The global adapter of a closed round, or None if not closed or no longer available."""
        data = self.ledger.global_bytes(round)
        return from_bytes(data) if data is not None else None

    def wait_until_closed(self, round: int, timeout: float | None = None) -> bool:
        """Block until `round` closes; False on timeout or if the run has no such round."""
        if not 0 <= round < self.rounds:
            return False
        with self.ledger.cond:
            return self.ledger.cond.wait_for(lambda: round < self.coordinator.open_round, timeout)

    def fetched(self, round: int) -> set[str]:
        """Client ids that have downloaded the global adapter of `round`."""
        with self.ledger.cond:
            return set(self.ledger.fetched.get(round, ()))

    def round_path(self, round: int) -> Path | None:
        """Where the global adapter of `round` is written, if there is an output directory."""
        return self.ledger.store.global_path(round) if self.ledger.store is not None else None

    def included(self, round: int) -> set[str]:
        """The clients a closed round averaged."""
        with self.ledger.cond:
            summary = self.ledger.summary.get(round)
            return set(summary.samples) if summary is not None else set()

    def has_submitted(self, client_id: str, round: int) -> bool:
        """True if `client_id` has a submission in open round `round`."""
        return self.coordinator.has_arrived(client_id, round, SUBMITTED)

    def round_status(self) -> tuple[str, bool]:
        """A line on the open round for logs and status, and whether it is waiting for a quorum."""
        return self.coordinator.status()

    def restore(self, up_to: int | None = None) -> int:
        """Resume from the output directory: the closed rounds (only the first `up_to` of them when the split
        server in this process restarts from its own checkpoint) and the open round's stored submissions
        (a round they complete closes now). Returns the open round."""
        open_round, arrived = self.ledger.restore(up_to)
        self.coordinator.restore(open_round, arrived)
        return self.coordinator.open_round

    # ----------------------------------------------------------------- Submit
    def Submit(self, request_iterator: Iterator[apb.AdapterUpload],
               context: grpc.ServicerContext) -> apb.SubmitReply:
        """Receive one client's adapter for the open round; close the round when all have come in."""
        try:
            if self.stopping.is_set():
                raise Refused(_Code.UNAVAILABLE, "aggregator shutting down, retry")
            header, data = self._receive(request_iterator, context)
            reference = self._reference(header.client_id)
            state = parse_adapter(header, data, reference)
            submitted = self._accept(header, state, reference)
            return apb.SubmitReply(round=header.round, submitted=submitted, expected=self.expected_clients)
        except Refused as refusal:
            with self.ledger.cond:
                self.refusals += 1
            self._auth.refusals.refuse(self._auth.caller(context), refusal.code.name.lower(),
                                       f"submission: {refusal.message}")
            abort(context, refusal)

    def _receive(self, messages: Iterable[apb.AdapterUpload], context: grpc.ServicerContext
                 ) -> tuple[Header, bytes]:
        """Read the stream: header checks as soon as the first message is in, then the bytes."""
        stream = iter(messages)
        first = next(stream, None)
        if first is None:
            raise Refused(_Code.INVALID_ARGUMENT, "Submit stream was empty; send AdapterUpload messages with "
                                                  "client_id, round, num_samples and the adapter bytes")
        header = Header(first.client_id, first.round, first.num_samples)
        self._check_client(header.client_id, header.round, context)
        if header.num_samples == 0:
            raise Refused(_Code.INVALID_ARGUMENT, f"client {header.client_id!r} sent num_samples=0; set it to the "
                                                  "number of training samples behind the adapter (it weights the "
                                                  "average)")
        with self.ledger.cond:
            self._check_open(header)  # fail fast before reading a large upload; re-checked on accept
        problem = self._verify_claim(header.client_id, header.round, header.num_samples) if self._verify_claim else None
        if problem:
            raise Refused(_Code.FAILED_PRECONDITION, f"submission of client {header.client_id!r} for round "
                                                     f"{header.round} refused: {problem}")
        layout = self._client_layout(header.client_id) if self._client_layout is not None else self._layout
        data = read_upload(header, itertools.chain([first], stream), layout, self.max_adapter_bytes)
        with self.ledger.cond:
            self.bytes_received += len(data)
        return header, data

    def _reference(self, client_id: str) -> AdapterState | None:
        """The layout a client's adapter must have: its own (per-client split points) or the run's."""
        if self._client_layout is None:
            return self.ledger.reference  # set once under the lock and never changed afterwards
        layout = self._client_layout(client_id)
        if id(layout) not in self._references:
            self._references[id(layout)] = {k: torch.empty(shape, device="meta") for k, shape in layout.items()}
        return self._references[id(layout)]

    def _check_client(self, client_id: str, round: int, context: grpc.ServicerContext) -> None:
        """Checks shared by Submit and FetchGlobal that need no round state."""
        check_client_id(client_id)
        self._auth.check_client(context, client_id)
        if self._is_enrolled is not None and not self._is_enrolled(client_id):
            raise Refused(_Code.PERMISSION_DENIED, f"client {client_id!r} is not enrolled with this aggregator; "
                                                   "check its client id and enrolment")
        if round >= self.rounds:
            raise Refused(_Code.OUT_OF_RANGE, f"round {round} is out of range: this run has {self.rounds} "
                                              f"rounds, numbered 0..{self.rounds - 1}")

    def _check_open(self, header: Header) -> None:
        """Refuse a submission to a round other than the open one, or a second one from a client."""
        r, open_round = header.round, self.coordinator.open_round
        if r < open_round:
            raise Refused(_Code.FAILED_PRECONDITION, f"round {r} is closed; fetch its global adapter and "
                                                     f"continue (round {open_round} is open)")
        if r > open_round:
            raise Refused(_Code.FAILED_PRECONDITION, f"round {r} is not open yet; round {open_round} is open "
                                                     f"and needs {self.expected_clients} clients to close")
        if header.client_id in self.ledger.pending:
            raise Refused(_Code.ALREADY_EXISTS, f"client {header.client_id!r} already submitted for round {r}; "
                                                "wait for the round to close and fetch its global adapter")
        self._check_member(header.client_id)

    def _check_member(self, client_id: str) -> None:
        """Without an enrolment check, the first `expected_clients` ids accepted are the only ones served."""
        members = self.ledger.members
        if self._is_enrolled is None and client_id not in members and len(members) >= self.expected_clients:
            raise Refused(_Code.PERMISSION_DENIED, f"client {client_id!r} is not enrolled: this aggregator serves "
                                                   f"the {self.expected_clients} clients that submitted first "
                                                   f"({', '.join(sorted(members))})")

    def _accept(self, header: Header, state: AdapterState, checked_against: AdapterState | None) -> int:
        """Record (and store) the submission and arrive in the round, which may close it; return the count."""
        cid, ledger = header.client_id, self.ledger
        with self.coordinator.lock:  # the round cannot close under us
            with ledger.cond:
                self._check_open(header)
                expected = self._reference(cid)
                if expected is not None and checked_against is not expected:
                    check_layout(state, expected, f"adapter from client {cid!r}")
                count = ledger.record(header.round, cid, header.num_samples, state)
                self._accepted_here += 1
                fault_point("aggregator", "submit", self._accepted_here)
            try:
                self.coordinator.arrive(cid, header.round, SUBMITTED)
            except Refused:
                with ledger.cond:
                    ledger.forget(header.round, cid)
                raise
            with ledger.cond:
                ledger.admitted(cid, state)
                self.submissions += 1
            return count

    # ----------------------------------------------------------------- FetchGlobal
    def FetchGlobal(self, request: apb.FetchRequest,
                    context: grpc.ServicerContext) -> Iterator[apb.AdapterDownload]:
        """Wait for the round to close, then stream its global adapter in `chunk_bytes` pieces."""
        try:
            self._check_client(request.client_id, request.round, context)
            with self.ledger.cond:
                self._check_member(request.client_id)
            chunk = negotiated_chunk(self.chunk_bytes, request.max_message_bytes)
            if chunk is None:
                raise Refused(_Code.INVALID_ARGUMENT, too_small(request.max_message_bytes))
            if not self._wait_closed(request.round, context):
                return  # cancelled or past its deadline while waiting
            data = self.ledger.global_bytes(request.round)
            if data is None:
                raise Refused(_Code.NOT_FOUND, f"the global adapter of round {request.round} is no longer kept in "
                                               "memory and was not written to disk; start the aggregator with an "
                                               "output directory to serve old rounds")
        except Refused as refusal:
            with self.ledger.cond:
                self.refusals += 1
            abort(context, refusal)
        summary = self.ledger.summary.get(request.round) or RoundSummary({})
        for offset in range(0, len(data), chunk):
            yield apb.AdapterDownload(round=request.round, num_clients=summary.num_clients,
                                      total_samples=summary.total_samples,
                                      safetensors_chunk=data[offset:offset + chunk])
        with self.ledger.cond:
            self.ledger.fetched.setdefault(request.round, set()).add(request.client_id)

    def _wait_closed(self, round: int, context: grpc.ServicerContext) -> bool:
        """Wait until `round` closes; False if the call stops being active first."""
        with self.ledger.cond:
            while round >= self.coordinator.open_round:
                if self.stopping.is_set():
                    raise Refused(_Code.UNAVAILABLE, "aggregator shutting down, retry")
                if not context.is_active():
                    return False
                self.ledger.cond.wait(WAIT_SLICE_S)
            return True
