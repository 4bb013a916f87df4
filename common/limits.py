"""gRPC message size limits: the piece size both ends can take, and errors that say which limit to raise.

gRPC enforces `--max-message-bytes` on each end before any handler runs and answers RESOURCE_EXHAUSTED
"Received message larger than max (N vs. M)". `explain_too_large` turns that into a message naming the
end that refused, its limit and the flag that raises it.
"""
from __future__ import annotations

import re

import grpc

ENVELOPE_BYTES = 4096  # room for the protobuf envelope around a piece's payload
MIN_CHUNK_BYTES = 1024
_TOO_LARGE = re.compile(r"(CLIENT|SERVER): (Received|Sent) message larger than max \((\d+) vs\. (\d+)\)")


class MessageTooLarge(ConnectionError):
    """A message exceeded a gRPC size limit; the message says which and how to raise it."""


def negotiated_chunk(own_chunk: int, peer_max_message: int) -> int | None:
    """The piece size that fits both ends: `own_chunk`, lowered to what the peer accepts (None: too small)."""
    if not peer_max_message:
        return own_chunk
    fits = peer_max_message - ENVELOPE_BYTES
    return min(own_chunk, fits) if fits >= MIN_CHUNK_BYTES else None


def too_small(peer_max_message: int) -> str:
    """Why a client that accepts messages of at most `peer_max_message` bytes cannot be served
    (`negotiated_chunk` gave None)."""
    return (f"the client accepts messages of at most {peer_max_message} bytes; at least "
            f"{MIN_CHUNK_BYTES + ENVELOPE_BYTES} are needed (raise the client's --max-message-bytes)")


def explain_too_large(err: grpc.RpcError, peer: str, peer_command: str) -> str | None:
    """A readable account of a RESOURCE_EXHAUSTED size error on a call to `peer`; None for other errors."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    match = _TOO_LARGE.search(err.details() or "")
    if match is None:
        return None
    side, direction, size, limit = match.groups()
    if side == "SERVER":
        return (f"the {peer} refused a message of {size} bytes: its limit is {limit} bytes; raise it with "
                f"`{peer_command} --max-message-bytes`, or send smaller pieces (this client's --chunk-bytes)")
    verb = "receive a message of {} bytes from" if direction == "Received" else "send a message of {} bytes to"
    return (f"this client cannot {verb.format(size)} the {peer}: its own limit is {limit} bytes; raise this "
            "client's --max-message-bytes")


def raise_if_too_large(err: grpc.RpcError, peer: str, peer_command: str) -> None:
    """Raise MessageTooLarge (from `err`) when `err` is a message-size refusal."""
    message = explain_too_large(err, peer, peer_command)
    if message is not None:
        raise MessageTooLarge(message) from err
