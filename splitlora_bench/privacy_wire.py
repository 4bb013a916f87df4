"""The server's view of a run: every request message a client sends (`Capture`, a gRPC client interceptor on the
client's channel, i.e. the bytes the server receives), and the cut activations and labels in it as the server
decodes them (after the negotiated codec, frame pieces reassembled)."""
from __future__ import annotations

from typing import Iterator

import grpc
import torch
from google.protobuf.message import Message

from common.rpc.splitlora.v1 import split_pb2 as spb
from common.wire import Reassembler, decode_tensor


class Capture(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
              grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Records every request message sent on the channel it wraps (`grpc.intercept_channel(channel, capture)`)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Message | bytes]] = []  # Train frames travel serialized

    def _tap(self, method: str, requests: Iterator[Message]) -> Iterator[Message]:
        for request in requests:
            self.sent.append((method, request))
            yield request

    def intercept_unary_unary(self, continuation, details, request):
        self.sent.append((details.method, request))
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):
        self.sent.append((details.method, request))
        return continuation(details, request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(details, self._tap(details.method, requests))

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(details, self._tap(details.method, requests))

    def messages(self) -> list[tuple[str, Message]]:
        """Every recorded request as (method, message), the serialized Train frames parsed."""
        return [(m, spb.ClientFrame.FromString(msg) if isinstance(msg, bytes) else msg) for m, msg in self.sent]

    def frames(self) -> list[spb.ClientFrame]:
        """The Train frames the server received (serialized on the wire), pieces reassembled, in order."""
        parts, out = Reassembler(max_bytes=1 << 34), []
        for method, msg in self.messages():
            whole = parts.whole(msg, spb.ClientFrame.FromString) if method.endswith("/Train") else None
            if whole is not None:
                out.append(whole)
        return out


def forward_steps(capture: Capture) -> list[dict[str, torch.Tensor | None]]:
    """Per step, what the server decodes from its StepForward: hidden, attention_mask, position_ids and labels
    (None when the frame has no labels field)."""
    steps = []
    for frame in capture.frames():
        if frame.WhichOneof("kind") != "forward":
            continue
        f = frame.forward
        steps.append({"step": f.step, "hidden": decode_tensor(f.hidden).float(),
                      "attention_mask": decode_tensor(f.attention_mask).long(),
                      "position_ids": decode_tensor(f.position_ids).long(),
                      "labels": decode_tensor(f.labels).long() if f.HasField("labels") else None})
    return steps
