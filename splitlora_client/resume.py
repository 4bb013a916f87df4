"""Round boundaries on the client: checkpoint, submit, fetch the global adapter, and recover from lost connections.

`RoundSync.enter(r)` brings the client to the start of round r from its checkpoint of that boundary (submitting
that checkpoint's adapter again if the aggregator may not have it, then loading the global adapter of r-1);
`RoundSync.rejoin()` backs off, joins the server again and returns the round the server says to (re)start. The
server always answers with its open round and undoes the client's partial progress in it, so after any fault
every side restarts from the same boundary and the run ends exactly as an uninterrupted one would.
"""
from __future__ import annotations

import logging
from typing import Callable

import grpc

from common.faults import fault_point
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from splitlora_client.aggregator import fetch_global, submit_adapter
from splitlora_client.retry import RESYNC, TRANSIENT, Backoff, Reconnect
from splitlora_client.session import SplitSession, StepResult
from splitlora_client.state import ClientCheckpoints, ClientState

log = logging.getLogger("splitlora.client")
MAX_RESYNCS = 10  # joins in a row that bring no progress before the client gives up


class RoundSync:
    """The client's side of round boundaries and reconnection."""

    def __init__(self, session: SplitSession, join: tuple[spb.Fingerprint, list[int]], aggregator: agrpc.AggregatorStub,
                 aggregator_in_server: bool, state: ClientState, checkpoints: ClientCheckpoints, backoff: Backoff,
                 chunk_bytes: int, round_timeout: float) -> None:
        self.session, self.join_args, self.aggregator = session, join, aggregator
        self.aggregator_in_server, self.state, self.checkpoints = aggregator_in_server, state, checkpoints
        self.backoff, self.chunk_bytes, self.round_timeout = backoff, chunk_bytes, round_timeout
        self.client_id = session.client_id
        self.in_memory: int | None = 0  # the checkpoint the in-memory state equals (None: trained since)
        self.samples = 0  # examples behind that checkpoint's adapter (the weight of its submission)
        self._resyncs = 0

    # -- the boundary ----------------------------------------------------------------------------------------
    def save(self, round: int, samples: int) -> None:
        """The local steps of round-1 are done: checkpoint the state from which `round` starts."""
        self.checkpoints.save(round, self.state.capture(samples))
        self.in_memory, self.samples = round, samples

    def enter(self, round: int) -> tuple[int, int] | None:
        """Make the in-memory state the start of `round`: its checkpoint plus the global adapter of round-1.
        Returns (clients, samples) behind that global adapter (None for round 0)."""
        k = self.checkpoints.best(round)
        if self.in_memory != k:
            snap = self.checkpoints.load(k)
            self.state.restore(snap)
            self.in_memory, self.samples = k, snap.meta["samples"]
            log.info("client %s restored its checkpoint of the start of round %d", self.client_id, k)
        if k < round:
            log.warning("client %s missed rounds %d..%d; it continues from the global adapter of round %d",
                        self.client_id, k, round - 1, round - 1)
        if round == 0:
            return None
        if k == round:  # this adapter may never have reached the aggregator
            self._submit(round - 1, self.samples)
            fault_point("client", "submit", round - 1)
        state, num_clients, total = self._fetch(round - 1)
        self.state.load_global(state)
        self.in_memory = None
        return num_clients, total

    def _submit(self, round: int, samples: int) -> None:
        while True:
            try:
                reply = submit_adapter(self.aggregator, self.client_id, round, samples, self.state.local_adapter(),
                                       chunk_bytes=self.chunk_bytes)
                log.debug("submitted round %d (%d of %d in)", round, reply.submitted, reply.expected)
                return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.ALREADY_EXISTS:
                    return  # the aggregator kept it from before a restart
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the round closed: without this client,
                    log.info("submission refused: %s", err.details())  # or with this adapter sent before a restart
                    return
                self._transient(err, f"submit round {round}")

    def _fetch(self, round: int) -> tuple[dict, int, int]:
        while True:
            try:
                state, num_clients, total = fetch_global(self.aggregator, self.client_id, round,
                                                         timeout=self.round_timeout,
                                                         max_message_bytes=self.session.max_message_bytes)
                log.info("round %d closed: global adapter of %d clients (%d samples) loaded", round, num_clients,
                         total, extra={"client": self.client_id, "round": round})
                return state, num_clients, total
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise  # --round-timeout passed
                self._transient(err, f"fetch round {round}")

    def _transient(self, err: grpc.RpcError, what: str) -> None:
        """A lost aggregator: with the aggregator inside the server, the server is lost too (join it again);
        on its own, wait and retry the same call. Anything else is a real refusal."""
        if err.code() not in TRANSIENT:
            raise err
        why = f"{what}: {err.code().name}: {err.details()}"
        if self.aggregator_in_server:
            raise Reconnect(why) from err
        self.backoff.wait(why)

    # -- steps and reconnection ------------------------------------------------------------------------------
    def step(self, step: int, exchange: Callable[[SplitSession], StepResult]) -> StepResult:
        """One step through the server (`exchange` sends it on the session and receives its answer); Reconnect
        when the stream is lost or the server's view has moved."""
        self.in_memory = None
        try:
            result = exchange(self.session)
        except grpc.RpcError as err:
            if err.code() in TRANSIENT or err.code() in RESYNC:
                raise Reconnect(f"step {step}: {err.code().name}: {err.details()}") from err
            raise
        except ConnectionError as err:
            raise Reconnect(f"step {step}: {err}") from err
        self.backoff.reset()
        self._resyncs = 0
        return result

    def join(self, timeout: float) -> spb.JoinReply:
        """Join (or join again); forget checkpoints past the round the server starts this client at."""
        reply = self.session.join(*self.join_args, timeout=timeout, backoff=self.backoff)
        self.checkpoints.drop_after(reply.start_round)
        return reply

    def rejoin(self, why: Reconnect) -> int:
        """Back off, join again, and return the round to (re)start."""
        self._resyncs += 1
        if self._resyncs > MAX_RESYNCS:
            raise ConnectionError(f"joined the server {MAX_RESYNCS} times without progress; last: {why}")
        log.warning("client %s: %s; joining the server again", self.client_id, why)
        self.backoff.wait(str(why))
        return self.join(timeout=self.backoff.budget).start_round
