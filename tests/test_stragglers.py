"""Dropouts and stragglers through the split server (with its aggregator) on loopback: one of three clients
disappears mid-round; the round closes at its deadline with the other two, the late client's step and its
submission are refused with FAILED_PRECONDITION, and it joins again and trains the next round. Without a quorum
a round waits, and the status says so."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from common.lora import adapter_state
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from splitlora_client.aggregator import fetch_global, submit_adapter
from tests.support.servers import ClientSide, exchange, join, running_server, train_ok, valid_forward

DEADLINE = 1.0
STEPS = 2


def test_a_client_that_disappears_mid_round_is_left_behind_then_rejoins(builtin_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    side = ClientSide(builtin_model_dir)
    adapter = adapter_state(side.part.peft)
    with running_server(builtin_model_dir, tmp_path, clients=3, rounds=3, local_steps=STEPS, min_clients=2,
                        round_deadline=DEADLINE, server_adapter_mode="per-client") as server:
        agg = agrpc.AggregatorStub(server.channel)
        a, b, c = (join(server, name) for name in ("a", "b", "c"))

        def train(client, rnd: int, steps: range | None = None) -> None:
            for step in steps or range(rnd * STEPS, (rnd + 1) * STEPS):
                train_ok(server, client.metadata, valid_forward(side, step, STEPS))

        train(c, 0, range(0, 1))  # c does one step of round 0, then disappears
        started = time.monotonic()
        for client in (a, b):
            train(client, 0)
            submit_adapter(agg, client.client_id, 0, 4, adapter, timeout=10)
        assert server.status().round == 0  # the others wait for c until the deadline...
        _, clients, _ = fetch_global(agg, "a", 0, timeout=10)
        assert clients == 2 and time.monotonic() - started >= DEADLINE  # ...then the round closes without it
        assert server.running.aggregator.included(0) == {"a", "b"} and server.status().round == 1

        # c comes back: its next step and its submission for the closed round are refused
        _, err = exchange(server, c.metadata, [spb.ClientFrame(forward=valid_forward(side, 1, STEPS))])
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "round 0 was closed without client 'c'" \
            in err.details()
        with pytest.raises(grpc.RpcError) as late:
            submit_adapter(agg, "c", 0, 4, adapter, timeout=10)
        assert late.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "round 0 is closed" in late.value.details()
        # it joins again, learns the current round and continues from the current global adapter
        c = join(server, "c")
        assert c.reply.start_round == 1
        assert fetch_global(agg, "c", 0, timeout=10)[1] == 2
        for client in (a, b, c):
            train(client, 1)
            submit_adapter(agg, client.client_id, 1, 4, adapter, timeout=10)
        assert fetch_global(agg, "c", 1, timeout=10)[1] == 3  # round 1 closed at once, with all three

        # round 2: only a is done; past the deadline the round waits for a quorum and the status says so
        train(a, 2)
        submit_adapter(agg, "a", 2, 4, adapter, timeout=10)
        time.sleep(DEADLINE + 0.3)
        status = server.status()
        assert status.round == 2 and status.waiting_for_quorum
        assert "1 of 3 clients submitted" in status.round_status and "waiting for quorum" in status.round_status
        train(b, 2)
        submit_adapter(agg, "b", 2, 4, adapter, timeout=10)  # the quorum: the overdue round closes at once
        assert fetch_global(agg, "b", 2, timeout=10)[1] == 2
        assert server.status().finished


def test_the_real_client_left_behind_rejoins_by_itself(builtin_model_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through `splitlora_client.trainer.train`: its step of a closed round is refused, it joins again,
    continues from the global adapter of the round it missed and finishes the run."""
    import json
    import threading

    from splitlora_client.options import TrainConfig
    from splitlora_client.session import SplitSession
    from splitlora_client.trainer import train

    release, original = threading.Event(), SplitSession.send

    def send(self, step, rnd, *args, **kwargs):
        if self.client_id == "c" and step == 1:
            assert release.wait(30)  # c stalls before its second step
        return original(self, step, rnd, *args, **kwargs)

    monkeypatch.setattr(SplitSession, "send", send)
    side = ClientSide(builtin_model_dir)
    adapter = adapter_state(side.part.peft)
    with running_server(builtin_model_dir, tmp_path / "server", clients=3, rounds=2, local_steps=STEPS,
                        min_clients=2, round_deadline=DEADLINE, server_adapter_mode="per-client") as server:
        agg = agrpc.AggregatorStub(server.channel)
        cfg = TrainConfig(server=server.address, client_id="c", output=str(tmp_path / "c"), progress=False,
                          insecure=True,
                          builtin_examples=16, reconnect_backoff_max=0.2)
        a, b = join(server, "a"), join(server, "b")  # before c builds its model: accelerate's meta-device
        result: list = []                              # context is process-wide (two roles share this process)
        thread = threading.Thread(target=lambda: result.append(train(cfg)), daemon=True)
        thread.start()
        for client in (a, b):
            for s in range(0, STEPS):
                train_ok(server, client.metadata, valid_forward(side, s, STEPS))
            submit_adapter(agg, client.client_id, 0, 4, adapter, timeout=10)
        assert server.running.aggregator.wait_until_closed(0, timeout=10)
        release.set()  # c wakes up after round 0 closed without it
        for client in (a, b):
            for s in range(STEPS, 2 * STEPS):
                train_ok(server, client.metadata, valid_forward(side, s, STEPS))
        deadline = time.monotonic() + 60
        while not server.running.aggregator.has_submitted("c", 1):  # c trained round 1 and submitted it
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        for client in (a, b):
            submit_adapter(agg, client.client_id, 1, 4, adapter, timeout=10)
        thread.join(timeout=60)
        assert result and result[0].exists()
        assert server.running.aggregator.included(0) == {"a", "b"}
        assert server.running.aggregator.included(1) == {"a", "b", "c"}
    events = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "rejoin"] == [1]
    assert [e["step"] for e in events if e["event"] == "step"] == [0, 2, 3]
