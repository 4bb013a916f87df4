"""Refusals and how they reach the caller: every request the server refuses raises `Refused(code, message)`,
and the handler that received it aborts the call with that gRPC status (`abort`). The one error-to-status
mapping of the server."""
from __future__ import annotations

from typing import NoReturn

import grpc


class Refused(Exception):
    """A request the server refuses; it becomes the call's gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def abort(context: grpc.ServicerContext, refused: Refused) -> NoReturn:
    """End the call with the refusal's status and message."""
    context.abort(refused.code, refused.message)
    raise refused  # unreachable: abort raises
