"""Serve aggregator servicers on loopback ports for tests, and catch the RpcError of a refused call."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import grpc
import pytest
import torch

from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from splitlora_server.aggregator.service import AggregatorService


class AggregatorServers:
    """Starts AggregatorService instances on 127.0.0.1:0 and stops them all in `close`."""

    def __init__(self) -> None:
        self._running: list[tuple[grpc.Server, grpc.Channel]] = []

    def serve(self, service: agrpc.AggregatorServicer, workers: int = 8) -> agrpc.AggregatorStub:
        """Serve `service` on a fresh loopback port; return a stub connected to it."""
        server = grpc.server(ThreadPoolExecutor(max_workers=workers))
        agrpc.add_AggregatorServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._running.append((server, channel))
        return agrpc.AggregatorStub(channel)

    def close(self) -> None:
        """Close every channel and stop every server."""
        for server, channel in self._running:
            channel.close()
            server.stop(None)


def rpc_error(fn: Callable[..., object], *args: object, **kwargs: object) -> grpc.RpcError:
    """Call `fn` and return the RpcError it raises."""
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


def adapter(value: float) -> dict[str, torch.Tensor]:
    """A tiny two-tensor adapter filled with `value` (B holds twice the value)."""
    return {"m.lora_A.weight": torch.full((2, 3), value), "m.lora_B.weight": torch.full((3, 2), 2 * value)}


def aggregators(restore: bool, workers: int = 8) -> Iterator[Callable[..., tuple[AggregatorService, Any]]]:
    """The body of an aggregator fixture: a `start(**kwargs)` that builds an AggregatorService (2 clients,
    3 rounds, no output directory unless given; restored from its directory first when `restore`, up to
    `up_to`), serves it on loopback and returns (service, stub). Everything is stopped afterwards."""
    servers = AggregatorServers()

    def start(up_to: int | None = None, workers: int = workers, **kwargs: Any) -> tuple[AggregatorService, Any]:
        service = AggregatorService(**{"expected_clients": 2, "rounds": 3, "output_dir": None, **kwargs})
        if restore:
            service.restore(up_to)
        return service, servers.serve(service, workers)

    yield start
    servers.close()
