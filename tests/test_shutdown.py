"""Graceful shutdown (what `splitlora-server serve` does on SIGTERM): health turns NOT_SERVING, the step in
flight is answered, and every later call, on an open stream or a new one, gets UNAVAILABLE "server shutting
down, retry", the status the clients reconnect on."""
from __future__ import annotations

import queue
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.lora import adapter_state
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from splitlora_client.aggregator import fetch_global, submit_adapter
from tests.support.servers import ClientSide, join, running_server, valid_forward

Code = grpc.StatusCode


def test_drain_answers_the_step_in_flight_then_tells_everyone_to_retry(builtin_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    side = ClientSide(builtin_model_dir)
    with running_server(builtin_model_dir, tmp_path, clients=1) as server:
        health = health_pb2_grpc.HealthStub(server.channel)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service="splitlora.v1.SplitTraining"),  # noqa
                                     timeout=5).status
        assert check() == health_pb2.HealthCheckResponse.SERVING
        client = join(server, "solo")
        requests: queue.Queue = queue.Queue()
        responses = server.stub.Train(iter(requests.get, None), metadata=client.metadata, timeout=30)
        requests.put(spb.ClientFrame(forward=valid_forward(side, 0, 3)))
        assert next(responses).backward.step == 0

        server.running.drain()
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        requests.put(spb.ClientFrame(forward=valid_forward(side, 1, 3)))  # the open stream: refused
        with pytest.raises(grpc.RpcError) as err:
            next(responses)
        requests.put(None)
        assert err.value.code() == Code.UNAVAILABLE and err.value.details() == "server shutting down, retry"
        assert server.client_status("solo").steps == 1  # nothing half-done
        with pytest.raises(grpc.RpcError) as err:
            join(server, "solo")
        assert err.value.code() == Code.UNAVAILABLE
        agg = agrpc.AggregatorStub(server.channel)
        for call in (lambda: submit_adapter(agg, "solo", 0, 4, adapter_state(side.part.peft), timeout=5),
                     lambda: fetch_global(agg, "solo", 0, timeout=5)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == Code.UNAVAILABLE and "shutting down, retry" in err.value.details()
