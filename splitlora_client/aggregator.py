"""Client side of the Aggregator service: submit an adapter in chunks, fetch a round's global adapter."""
from __future__ import annotations

from typing import Iterator, Sequence

import grpc

from common.limits import raise_if_too_large
from common.lora import AdapterError, AdapterState, from_bytes, to_bytes
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc

Metadata = Sequence[tuple[str, str | bytes]]
AGGREGATOR_COMMAND = "splitlora-server aggregate|serve"


def upload_messages(client_id: str, round: int, num_samples: int, data: bytes,
                    chunk_bytes: int = 1 << 20) -> Iterator[apb.AdapterUpload]:
    """The Submit stream: the header on the first message, the bytes cut into `chunk_bytes` pieces."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be > 0, got {chunk_bytes}")
    yield apb.AdapterUpload(client_id=client_id, round=round, num_samples=num_samples,
                            safetensors_chunk=data[:chunk_bytes])
    for offset in range(chunk_bytes, len(data), chunk_bytes):
        yield apb.AdapterUpload(safetensors_chunk=data[offset:offset + chunk_bytes])


def submit_adapter(stub: agrpc.AggregatorStub, client_id: str, round: int, num_samples: int,
                   state: AdapterState, chunk_bytes: int = 1 << 20, timeout: float | None = None,
                   metadata: Metadata | None = None) -> apb.SubmitReply:
    """Upload this client's adapter for `round`; raises grpc.RpcError if the aggregator refuses it."""
    messages = upload_messages(client_id, round, num_samples, to_bytes(state), chunk_bytes)
    try:
        return stub.Submit(messages, timeout=timeout, metadata=metadata)
    except grpc.RpcError as err:
        raise_if_too_large(err, "aggregator", AGGREGATOR_COMMAND)
        raise


def fetch_global(stub: agrpc.AggregatorStub, client_id: str, round: int, timeout: float | None = None,
                 metadata: Metadata | None = None, max_message_bytes: int = 0) -> tuple[AdapterState, int, int]:
    """Wait for `round` to close and download its global adapter: (state, num_clients, total_samples).
    `max_message_bytes`: this end's message limit, so the aggregator sends pieces that fit (0: not said)."""
    pieces: list[bytes] = []
    num_clients = total_samples = 0
    request = apb.FetchRequest(client_id=client_id, round=round, max_message_bytes=max_message_bytes)
    try:
        for msg in stub.FetchGlobal(request, timeout=timeout, metadata=metadata):
            if msg.round != round:
                raise AdapterError(f"aggregator sent round {msg.round} while round {round} was asked for")
            num_clients, total_samples = msg.num_clients, msg.total_samples
            pieces.append(msg.safetensors_chunk)
    except grpc.RpcError as err:
        raise_if_too_large(err, "aggregator", AGGREGATOR_COMMAND)
        raise
    if not pieces:
        raise AdapterError(f"aggregator sent no data for round {round}")
    return from_bytes(b"".join(pieces)), num_clients, total_samples
