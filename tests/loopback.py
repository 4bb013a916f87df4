"""Serve aggregator servicers on loopback ports for tests, and catch the RpcError of a refused call."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc
import pytest

from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc


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
