"""What the Aggregator service refuses before it touches round state: bad client ids, changing headers,
undecodable or inconsistent adapters. Each refusal carries the gRPC status the call ends with."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.lora import AdapterError, AdapterState, check_adapter, from_bytes
from common.rpc.splitlora.v1 import aggregator_pb2 as apb
from splitlora_server.errors import Refused
from splitlora_server.registry import invalid_client_id

_Code = grpc.StatusCode


@dataclass(frozen=True)
class Header:
    """The fields of a Submit stream's first message."""

    client_id: str
    round: int
    num_samples: int


def check_client_id(client_id: str) -> None:
    """An id the registry would accept: 1-64 letters, digits, '.', '_' or '-'."""
    if not client_id:
        raise Refused(_Code.INVALID_ARGUMENT, "client_id is empty; set it to this client's id")
    problem = invalid_client_id(client_id)
    if problem:
        raise Refused(_Code.INVALID_ARGUMENT, problem)


def parse_adapter(header: Header, data: bytes, reference: AdapterState | None) -> AdapterState:
    """Decode and check an uploaded adapter (outside the service's lock) against `reference`, the layout of the
    first adapter accepted (None before that)."""
    what = f"adapter from client {header.client_id!r}"
    try:
        state = from_bytes(data)
    except AdapterError as err:
        raise Refused(_Code.INVALID_ARGUMENT, f"{what}: {err}") from err
    if not state:
        raise Refused(_Code.INVALID_ARGUMENT, f"{what} has no tensors")
    check_layout(state, state, what, suffix="")  # float dtypes, finite values
    if reference is not None:
        check_layout(state, reference, what)
    return state


def check_repeated_header(header: Header, msg: apb.AdapterUpload) -> None:
    """Later messages may repeat the header fields (unset = not repeated) but must not change them."""
    for name, value in (("client_id", msg.client_id), ("round", msg.round), ("num_samples", msg.num_samples)):
        if value and value != getattr(header, name):
            raise Refused(_Code.INVALID_ARGUMENT, f"a later Submit message has {name}={value!r} but the first "
                                                   f"had {getattr(header, name)!r}; keep the header the same")


_SAME_LAYOUT = ("; every client must use the same model, split and LoRA config as the first adapter "
                "this aggregator accepted")


def check_layout(state: AdapterState, reference: AdapterState, what: str, suffix: str = _SAME_LAYOUT) -> None:
    """check_adapter as a gRPC refusal (Refused): keys, shapes, float dtypes, finite values."""
    try:
        check_adapter(state, reference, what=what)
    except AdapterError as err:
        raise Refused(_Code.INVALID_ARGUMENT, f"{err}{suffix}") from err
