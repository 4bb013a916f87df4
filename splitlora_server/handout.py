"""What the server hands its clients besides gradients: the run's plan before they join, and at the end the final
server adapter, so that every data owner holds the whole-model adapter."""
from __future__ import annotations

import threading
from typing import Callable, Iterator

from common.lora import AdapterState, to_bytes
from common.rpc.splitlora.v1 import split_pb2 as spb

PRIVATE = ("this server keeps its adapter private (--private-server-adapter): ask its operator for the "
           "whole-model adapter")


class FinalAdapter:
    """The final server adapter, cut into pieces for each client that asks once training has ended."""

    def __init__(self, finished: threading.Event, adapter: Callable[[], AdapterState]) -> None:
        self.finished, self._adapter = finished, adapter
        self._bytes: bytes | None = None
        self._lock = threading.Lock()
        self.fetched: set[str] = set()

    def wait(self, is_active: Callable[[], bool], poll: float = 0.5) -> bool:
        """Block until training has ended; False if the caller went away first."""
        while not self.finished.wait(poll):
            if not is_active():
                return False
        return True

    def pieces(self, client_id: str, chunk_bytes: int) -> Iterator[spb.AdapterPiece]:
        """The adapter's safetensors bytes in pieces of at most `chunk_bytes`; the client is counted as served."""
        with self._lock:
            if self._bytes is None:  # the engine's queue orders this after the last round's close
                self._bytes = to_bytes(self._adapter())
            data = self._bytes
        for offset in range(0, len(data), chunk_bytes):
            yield spb.AdapterPiece(safetensors_chunk=data[offset:offset + chunk_bytes])
        self.fetched.add(client_id)
