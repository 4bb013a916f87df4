"""U-shaped (label-private) steps between their two exchanges: each client's step whose top-cut activations were
sent and whose top-cut gradient (`StepTopGrad`) is awaited.

A u-shape step is: the client's `StepForward` (no labels) -> the engine's `probe` (blocks [K, L-J), no graph) ->
`StepTop` back; the client's `StepTopGrad` -> the step, with that gradient, through the engine's one compute path
(forward again with the same random draws, backward, update) -> `StepBackward` (gradient at the bottom cut).
The probe changes nothing, so a refused or abandoned step leaves no trace; rejoining forgets it.
"""
from __future__ import annotations

import dataclasses
import threading

import grpc

from common.rpc.splitlora.v1 import split_pb2 as spb
from common.wire import WireError
from splitlora_server.engine.jobs import Step
from splitlora_server.errors import Refused
from splitlora_server.frames import FrameLimits, decode_activations

USHAPE_PIPELINING = ("--split-mode u-shape sends each step whole: --micro-batches must be 1 (pipelined u-shape steps "
                     "are not supported; docs/privacy.md)")


class TopCut:
    """The awaited step of each u-shape client (at most one: a client sends its steps in order)."""

    def __init__(self, top_blocks: int) -> None:
        self.top_blocks = top_blocks
        self._lock = threading.Lock()
        self._awaiting: dict[str, Step] = {}

    def check_none_awaited(self, client_id: str, step: int) -> None:
        """Refuse a new StepForward while the previous step still awaits its top-cut gradient."""
        with self._lock:
            awaited = self._awaiting.get(client_id)
        if awaited is not None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"step {awaited.step} awaits its top-cut gradient (a StepTopGrad frame) before step {step} "
                          "may be sent (--split-mode u-shape)")

    def park(self, step: Step) -> None:
        """The step's top-cut activations were sent: await its gradient."""
        with self._lock:
            self._awaiting[step.client_id] = step

    def drop(self, client_id: str) -> None:
        """Forget the client's awaited step (it rejoined, or its frame was refused)."""
        with self._lock:
            self._awaiting.pop(client_id, None)

    def take(self, client_id: str, frame: spb.StepTopGrad, limits: FrameLimits, codec: int) -> Step:
        """The awaited step with the client's top-cut gradient; Refused when nothing (or another step) is awaited
        or the gradient is malformed (missing, another codec, another shape, not finite)."""
        with self._lock:
            step = self._awaiting.pop(client_id, None)
        if step is None or step.step != frame.step:
            what = "no step" if step is None else f"step {step.step}"
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"a top-cut gradient for step {frame.step} arrived, but {what} awaits one: send the "
                          "step's StepForward first")
        try:
            grad = decode_activations(frame.grad, "top-cut grad", limits, codec)
            if tuple(grad.shape) != tuple(step.hidden.shape):
                raise WireError(f"top-cut grad has shape {list(grad.shape)}, expected {list(step.hidden.shape)} "
                                "like the step's activations")
            if not bool(grad.isfinite().all()):
                raise WireError("top-cut grad holds NaN or Inf")
        except WireError as err:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"malformed top-cut gradient of step {frame.step}: {err}")
        return dataclasses.replace(step, top_grad=grad.float())
