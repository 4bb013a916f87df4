"""The round coordinator: one owner of the open round, arrivals and closing; listeners hear its events in order."""
from __future__ import annotations

import threading
from concurrent.futures import Future

import grpc
import pytest

from splitlora_server.errors import Refused
from splitlora_server.rounds.coordinator import FINISHED, SUBMITTED, RoundCoordinator, RoundListener
from splitlora_server.rounds.gate import Quorum


class Recorder(RoundListener):
    """Writes every event it hears into a shared log; optionally refuses closes or answers with a future."""

    def __init__(self, name: str, log: list, refuse: bool = False, future: Future | None = None) -> None:
        self.name, self.log, self.refuse, self.future = name, log, refuse, future

    def round_closing(self, rnd: int, included: list[str]) -> Future | None:
        self.log.append((self.name, "closing", rnd, tuple(included)))
        if self.refuse:
            raise Refused(grpc.StatusCode.INTERNAL, "disk full")
        return self.future

    def round_opened(self, rnd: int) -> None:
        self.log.append((self.name, "opened", rnd))

    def deadline_passed(self, rnd: int, closing: bool) -> None:
        self.log.append((self.name, "deadline", rnd, closing))


def test_a_round_closes_when_everyone_arrived_and_listeners_hear_it_in_order() -> None:
    log: list = []
    rounds = RoundCoordinator(2, Quorum(2), SUBMITTED)
    for name in ("aggregator", "engine"):
        rounds.subscribe(Recorder(name, log))
    assert not rounds.arrive("b", 0, SUBMITTED)
    assert not rounds.arrive("a", 0, FINISHED)  # not the kind this coordinator counts
    assert rounds.has_arrived("b", 0, SUBMITTED) and not rounds.has_arrived("a", 0, SUBMITTED)
    assert rounds.arrive("a", 0, SUBMITTED)
    assert log == [("aggregator", "closing", 0, ("a", "b")), ("engine", "closing", 0, ("a", "b")),
                   ("aggregator", "opened", 1), ("engine", "opened", 1)]
    assert rounds.open_round == 1 and not rounds.finished.is_set()
    rounds.arrive("a", 1, SUBMITTED), rounds.arrive("b", 1, SUBMITTED)
    assert rounds.finished.is_set() and rounds.current_round() == 2 and rounds.status()[0] == "every round is closed"


def test_the_next_round_opens_only_after_the_closing_work_is_done() -> None:
    log: list = []
    work: Future = Future()
    rounds = RoundCoordinator(2, Quorum(1), FINISHED)
    rounds.subscribe(Recorder("engine", log, future=work))
    closer = threading.Thread(target=rounds.arrive, args=("a", 0, FINISHED))
    closer.start()
    while not log:
        closer.join(0.01)
    assert rounds.open_round == 0 and closer.is_alive()  # the engine's round end is still running
    work.set_result(None)
    closer.join()
    assert rounds.open_round == 1 and log[-1] == ("engine", "opened", 1)


def test_a_refused_close_keeps_the_round_open_and_takes_the_arrival_back() -> None:
    log: list = []
    rounds = RoundCoordinator(2, Quorum(1), SUBMITTED)
    rounds.subscribe(Recorder("aggregator", log, refuse=True))
    rounds.subscribe(Recorder("engine", log))
    with pytest.raises(Refused, match="disk full"):
        rounds.arrive("a", 0, SUBMITTED)
    assert rounds.open_round == 0 and not rounds.has_arrived("a", 0, SUBMITTED)
    assert log == [("aggregator", "closing", 0, ("a",))]  # the engine never heard of it


def test_only_the_open_round_admits_work() -> None:
    rounds = RoundCoordinator(3, Quorum(1))
    rounds.restore(1)
    with rounds.open_for("a", 1):
        pass
    for rnd, match in ((0, "round 0 was closed without client 'a'"), (2, "round 2 has not started")):
        with pytest.raises(Refused, match=match) as info, rounds.open_for("a", rnd):
            pass
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_at_the_deadline_a_quorum_closes_the_round_and_listeners_hear_it() -> None:
    log: list = []
    rounds = RoundCoordinator(2, Quorum(3, min_clients=2, deadline=0.05), SUBMITTED)
    rounds.subscribe(Recorder("aggregator", log))
    rounds.arrive("a", 0, SUBMITTED)
    rounds.arrive("b", 0, SUBMITTED)
    assert rounds.open_round == 0  # 2 of 3: not before the deadline
    while rounds.open_round == 0:
        threading.Event().wait(0.02)
    assert log[:2] == [("aggregator", "deadline", 0, True), ("aggregator", "closing", 0, ("a", "b"))]


def test_a_restore_with_every_arrival_in_closes_the_round() -> None:
    log: list = []
    rounds = RoundCoordinator(3, Quorum(2), SUBMITTED)
    rounds.subscribe(Recorder("aggregator", log))
    rounds.restore(1, arrived=["a", "b"])  # killed while closing round 1
    assert rounds.open_round == 2 and ("aggregator", "closing", 1, ("a", "b")) in log
