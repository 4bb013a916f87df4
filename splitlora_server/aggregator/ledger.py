"""The aggregator's data per round: the open round's submissions, each closed round's global adapter (in memory
and in the store) and who fetched it; and what it does when the round coordinator closes a round (the strategy's
average, stored before anyone sees it). All under one Condition; round numbers are the coordinator's."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import grpc
import torch

from common.aggregation import ClientUpdate, Strategy
from common.aggregation.guard import guarded_aggregate
from common.faults import fault_point
from common.integrity import IntegrityError
from common.lora import AdapterState, from_bytes, to_bytes
from splitlora_server.aggregator.store import AggregatorStore, RoundSummary
from splitlora_server.errors import Refused
from splitlora_server.rounds.coordinator import RoundCoordinator, RoundListener

log = logging.getLogger("splitlora_server.aggregator.service")
KEEP_IN_MEMORY = 3  # latest global adapters kept as bytes; older ones are read back from output_dir


class Ledger(RoundListener):
    """Submissions, global adapters and fetches, round by round."""

    def __init__(self, coordinator: RoundCoordinator, strategy: Strategy, output_dir: Path | None,
                 store_submissions: bool, on_round_closed: Callable[[int, AdapterState], None] | None,
                 on_incident: Callable[[str], None] = log.error,
                 server_updates: Callable[[int, list[str]], list[ClientUpdate]] | None = None) -> None:
        self.coordinator, self.strategy, self.on_round_closed = coordinator, strategy, on_round_closed
        # per-client split points: the split server's copies of the blocks some clients train on their side
        self.server_updates = server_updates
        self.on_incident = on_incident  # a round that kept its previous global adapter, a damaged file
        self.cond = threading.Condition()
        self.pending: dict[str, tuple[int, AdapterState]] = {}
        self.reference: AdapterState | None = None  # keys/shapes of the first accepted adapter (meta tensors)
        self.previous: AdapterState | None = None  # the last global adapter: the strategy's current state
        self.cache: OrderedDict[int, bytes] = OrderedDict()
        self.summary: dict[int, RoundSummary] = {}
        self.fetched: dict[int, set[str]] = {}
        self.members: set[str] = set()  # the ids whose submissions were accepted (and restored)
        self.store = AggregatorStore(output_dir) if output_dir is not None else None
        self.store_submissions = store_submissions  # off next to the split server: it rolls back open rounds

    # -- the open round --------------------------------------------------------------------------------------
    def record(self, rnd: int, client_id: str, num_samples: int, state: AdapterState) -> int:
        """Keep (and store) a checked submission of the open round; return the round's count (caller: cond)."""
        if self.store is not None and self.store_submissions:
            try:
                self.store.write_pending(rnd, client_id, num_samples, state)
            except OSError as err:
                raise Refused(grpc.StatusCode.INTERNAL, f"could not store the submission: {err}; retry it") from err
        self.pending[client_id] = (num_samples, state)
        return len(self.pending)

    def forget(self, rnd: int, client_id: str) -> None:
        """Drop a submission whose round could not close (caller: cond)."""
        self.pending.pop(client_id, None)
        if self.store is not None:
            self.store.drop_pending(rnd, client_id)

    def admitted(self, client_id: str, state: AdapterState) -> None:
        """A submission is in for good: its client is a member, its layout the reference (caller: cond)."""
        self.members.add(client_id)
        if self.reference is None:
            self.reference = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}

    # -- round events ----------------------------------------------------------------------------------------
    def round_closing(self, rnd: int, included: list[str]) -> Future | None:
        """Average the round's submissions with the strategy, store and publish the result; Refused (INTERNAL)
        if it cannot be computed or stored: the round stays open."""
        with self.cond:
            ids = [c for c in included if c in self.pending]
        extra = self.server_updates(rnd, ids) if self.server_updates is not None else []
        with self.cond:
            summary = RoundSummary({c: self.pending[c][0] for c in ids})
            try:
                glob, incident = guarded_aggregate(self.strategy, rnd, [
                    ClientUpdate(c, self.pending[c][1], self.pending[c][0]) for c in ids] + extra, self.previous)
                if incident:
                    self.on_incident(f"round {rnd}: {incident}")
                if glob is None:
                    raise ValueError(f"no finite global adapter ({incident})")
                fault_point("aggregator", "close", rnd)
                data = to_bytes(glob)
                if self.store is not None:
                    self.store.write_global(rnd, glob, summary)
            except (OSError, ValueError) as err:
                raise Refused(grpc.StatusCode.INTERNAL, f"could not close round {rnd}: {err}; "
                                                        "this submission was not recorded, retry it") from err
            self.cache[rnd] = data
            while len(self.cache) > KEEP_IN_MEMORY:
                self.cache.popitem(last=False)
            self.summary[rnd] = summary
            self.pending, self.previous = {}, glob
        missing = self.coordinator.expected - len(ids)
        log.info("round %d closed (%s): %d clients, %d samples%s", rnd, self.strategy.describe(), len(ids),
                 summary.total_samples, f" (deadline passed; {missing} missing)" if missing > 0 else "",
                 extra={"round": rnd})
        if self.on_round_closed is not None:
            try:
                self.on_round_closed(rnd, glob)
            except Exception:  # the round is closed either way; a faulty hook must not stall the run
                log.exception("on_round_closed hook failed for round %d", rnd)
        return None

    def current_global(self) -> AdapterState | None:
        """The newest global adapter (while a round closes: the one just computed)."""
        with self.cond:
            return self.previous

    def round_opened(self, rnd: int) -> None:
        """Wake the fetches waiting for the round just closed."""
        with self.cond:
            self.cond.notify_all()

    # -- closed rounds ---------------------------------------------------------------------------------------
    def global_bytes(self, rnd: int) -> bytes | None:
        """The serialized global adapter of a closed round, from memory or output_dir; None if unavailable."""
        with self.cond:
            if rnd >= self.coordinator.open_round or rnd < 0:
                return None
            if rnd in self.cache:
                return self.cache[rnd]
        try:
            return self.store.global_bytes(rnd) if self.store is not None else None
        except IntegrityError as err:
            self.on_incident(str(err))
            raise Refused(grpc.StatusCode.DATA_LOSS, f"the global adapter of round {rnd} on the aggregator's disk is "
                                                     "damaged; the operator must restore it") from None
        except OSError:
            return None

    def restore(self, up_to: int | None) -> tuple[int, list[str]]:
        """Read back the closed rounds (only the first `up_to` when the split server in this process restarts from
        its own checkpoint) and the open round's stored submissions; return the open round and their clients."""
        if self.store is None:
            return self.coordinator.open_round, []
        with self.cond:
            closed = self.store.closed_rounds()
            if up_to is not None:
                if len(closed) < up_to:
                    raise ValueError(f"the server's checkpoint starts round {up_to}, but the global adapters of "
                                     f"rounds {len(closed)}..{up_to - 1} are missing from {self.store.root}")
                closed = closed[:up_to]
                self.store.drop_rounds_from(up_to)  # written by a close the server's checkpoint did not see
            self.summary = {r: self.store.read_summary(r) for r in closed}
            for summary in self.summary.values():  # who was enrolled, and the clipping reference
                self.members.update(summary.samples if summary is not None else ())
            if closed:
                self.previous = from_bytes(self.store.global_bytes(closed[-1]))
            open_round = len(closed)
            readable = self.store_submissions and open_round < self.coordinator.rounds
            stored = self.store.read_pending(open_round) if readable else {}
            for client_id, (num_samples, state) in sorted(stored.items()):
                self.pending[client_id] = (num_samples, state)
                self.admitted(client_id, state)
            log.info("restored from %s: %d rounds closed, %d stored submissions to round %d", self.store.root,
                     len(closed), len(self.pending), open_round)
            return open_round, sorted(stored)
