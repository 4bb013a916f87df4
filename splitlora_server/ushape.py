"""U-shaped (label-private) steps between their two exchanges: each client's micro-batches whose top-cut activations
were sent and whose top-cut gradients (`StepTopGrad`) are awaited, in order.

A u-shape step (or each micro-batch of a pipelined one) is: the client's `StepForward` (no labels) -> the engine's
`probe` (blocks [K, L-J), no graph) -> `StepTop` back; the client's `StepTopGrad` -> the micro-batch, with that
gradient, through the engine's one compute path (forward again with the same random draws, backward, and the update
after the step's last micro-batch) -> `StepBackward` (gradient at the bottom cut). A pipelined client sends micro-batch
i+1's forward while micro-batch i awaits its top-cut gradient; the gradients come back in the forwards' order. The
probe changes nothing, so a refused or abandoned step leaves no trace here; rejoining forgets it.
"""
from __future__ import annotations

import collections
import dataclasses
import threading

import grpc

from common.rpc.splitlora.v1 import split_pb2 as spb
from common.wire import WireError
from splitlora_server.engine.jobs import Step
from splitlora_server.errors import Refused
from splitlora_server.frames import FrameLimits, decode_activations
from splitlora_server.pipelining import MicroProgress


def _named(step: int, micro: int, count: int) -> str:
    return f"step {step}" if count <= 1 else f"micro-batch {micro} of step {step}"


class TopCut:
    """Per u-shape client: the probed micro-batches of its step in progress that await their top-cut gradient
    (oldest first), and how far the step's forwards got (`MicroProgress`, as the server tracks trained ones)."""

    def __init__(self, top_blocks: int) -> None:
        self.top_blocks = top_blocks
        self._lock = threading.Lock()
        self._awaiting: dict[str, collections.deque[Step]] = {}
        self._forwarded: dict[str, MicroProgress] = {}

    def check_none_awaited(self, client_id: str, step: int, micro: int) -> None:
        """Refuse a StepForward while micro-batches await their top-cut gradient, unless it is the next
        micro-batch of the same step (a pipelined client sends it while the server works on the earlier ones)."""
        with self._lock:
            awaited = self._awaiting.get(client_id)
            head = awaited[0] if awaited else None
            following = self._forwarded[client_id].next if head is not None else 0
        if head is not None and not (following and step == head.step and micro == following):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{_named(head.step, head.micro, head.micro_count)} awaits its top-cut gradient (a "
                          f"StepTopGrad frame) before {_named(step, micro, head.micro_count)} may be sent "
                          "(--split-mode u-shape)")

    def check_order(self, step: Step, negotiated: int) -> None:
        """Refuse a forward micro-batch that does not follow the step's previous one, or whose count differs."""
        with self._lock:
            progress = self._forwarded.setdefault(step.client_id, MicroProgress())
        progress.check(step, negotiated)

    def park(self, step: Step) -> None:
        """The micro-batch's top-cut activations were sent: await its gradient."""
        with self._lock:
            self._awaiting.setdefault(step.client_id, collections.deque()).append(step)
            self._forwarded.setdefault(step.client_id, MicroProgress()).add(step, 0.0, 0)

    def drop(self, client_id: str) -> None:
        """Forget the client's step in progress (it rejoined, or a frame of it was refused)."""
        with self._lock:
            self._awaiting.pop(client_id, None)
            self._forwarded.pop(client_id, None)

    def take(self, client_id: str, frame: spb.StepTopGrad, limits: FrameLimits, codec: int) -> Step:
        """The oldest awaited micro-batch with the client's top-cut gradient; Refused when nothing (or another
        micro-batch) awaits one or the gradient is malformed (missing, another codec, another shape, not finite)."""
        with self._lock:
            awaited = self._awaiting.get(client_id)
            step = awaited[0] if awaited else None
        if step is None or (step.step, step.micro) != (frame.step, frame.micro):
            count = step.micro_count if step is not None else max(frame.micro + 1, 1)
            what = "no step" if step is None else _named(step.step, step.micro, count) + " (sent first)"
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"a top-cut gradient for {_named(frame.step, frame.micro, count)} arrived, but {what} "
                          "awaits one: send its StepForward first, and the gradients in the forwards' order")
        try:
            grad = decode_activations(frame.grad, "top-cut grad", limits, codec)
            if tuple(grad.shape) != tuple(step.hidden.shape):
                raise WireError(f"top-cut grad has shape {list(grad.shape)}, expected {list(step.hidden.shape)} "
                                "like the micro-batch's activations")
            if not bool(grad.isfinite().all()):
                raise WireError("top-cut grad holds NaN or Inf")
        except WireError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed top-cut gradient of {_named(frame.step, frame.micro, count=step.micro_count)}: "
                          f"{err}")
        with self._lock:
            awaited.popleft()
        return dataclasses.replace(step, top_grad=grad.float())
