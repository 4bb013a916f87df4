"""The client's connection to the split server: Join, then one bidirectional stream of steps."""
from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import torch

from common.limits import raise_if_too_large
from common.reach import unreachable
from common.tls import ClientTlsOptions
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.router_wire import decode_backward, encode_stats
from common.split.router import RouterStats
from common.wire import Reassembler, decode_tensor, encode_tensor, method_path, serialized
from splitlora_client.retry import TRANSIENT, Backoff

CLIENT_ID_KEY = "x-splitlora-client-id"
SESSION_KEY = "x-splitlora-session"


@dataclass
class StepResult:
    """The server's answer to one step, with the bytes it took."""

    grad: torch.Tensor
    loss: float
    tokens: int
    bytes_sent: int
    bytes_received: int
    router_grad: torch.Tensor | None = None  # d loss / d the sent routing probabilities (mixture of experts)
    aux_loss: float = 0.0                    # the router's auxiliary loss term, included in `loss`
    phases: dict[str, float] = field(default_factory=dict)  # seconds of the step's parts (pipeline.pipelined_step)


class SplitSession:
    """Join the server and exchange one activation/gradient pair per step over a single stream."""

    def __init__(self, channel: grpc.Channel, client_id: str, max_message_bytes: int = 0, micro_batches: int = 0,
                 address: str = "") -> None:
        self.stub, self.address = sgrpc.SplitTrainingStub(channel), address
        # the training stream without serializers: each frame is serialized (and parsed) once, here
        self._train = channel.stream_stream(method_path(spb.DESCRIPTOR.services_by_name["SplitTraining"].full_name,
                                                        "Train"))
        self.client_id, self.max_message_bytes = client_id, max_message_bytes
        self.micro_batches = micro_batches  # asked for at Join (0: the server's); the reply says what is used
        self.reply: spb.JoinReply | None = None
        self._requests: queue.Queue = queue.Queue()
        self._responses: Iterator[spb.ServerFrame] | None = None
        self._call = None

    def get_plan(self, timeout: float, opts: ClientTlsOptions) -> spb.Plan:
        """The run's plan, waiting up to `timeout` s for the server to come up; ConnectionError saying what was
        tried and the likely causes when it never answers; other refusals raise grpc.RpcError."""
        backoff, last = Backoff(first=0.2, cap=2.0, budget=timeout), None
        while True:
            try:
                return self.stub.GetPlan(spb.PlanRequest(client_id=self.client_id), timeout=min(10.0, timeout))
            except grpc.RpcError as err:
                if err.code() not in TRANSIENT:
                    raise
                last = err
            try:
                backoff.wait(f"plan of {self.address}: {last.code().name}: {last.details()}")
            except ConnectionError:
                raise ConnectionError(unreachable("the split server", self.address, opts, last, timeout)) from None

    def join(self, fingerprint: spb.Fingerprint, codecs: list[int], timeout: float = 120.0,
             backoff: Backoff | None = None) -> spb.JoinReply:
        """Handshake, retrying (capped exponential backoff) while the server is not up or shutting down;
        other refusals raise grpc.RpcError. Joining again renews the session and closes the old stream."""
        self.close()
        backoff = backoff or Backoff(first=0.2, cap=5.0, budget=timeout)
        while True:
            try:
                self.reply = self.stub.Join(spb.JoinRequest(client_id=self.client_id, fingerprint=fingerprint,
                                                            codecs=codecs, max_message_bytes=self.max_message_bytes,
                                                            micro_batches=self.micro_batches),
                                            timeout=10.0, wait_for_ready=True)
                backoff.reset()
                self._open()  # at once: if this client dies before its first step, the server frees its slot
                return self.reply
            except grpc.RpcError as err:
                if err.code() not in TRANSIENT:
                    raise
                try:
                    backoff.wait(f"join {self.client_id}: {err.code().name}: {err.details()}")
                except ConnectionError:
                    raise err from None

    def _metadata(self) -> list[tuple[str, str]]:
        return [(CLIENT_ID_KEY, self.client_id), (SESSION_KEY, self.reply.session)]

    def _open(self) -> None:
        self._requests = queue.Queue()
        self._call = self._train(iter(self._requests.get, None), metadata=self._metadata())
        self._responses = iter(self._call)

    def step(self, step: int, rnd: int, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
             position_ids: torch.Tensor, router: RouterStats | None = None) -> StepResult:
        """Send one step's activations; return the gradient at the cut and the loss."""
        return self.receive(step, self.send(step, rnd, hidden, attention_mask, labels, position_ids, router))

    def send(self, step: int, rnd: int, hidden: torch.Tensor, attention_mask: torch.Tensor,
             labels: torch.Tensor | None, position_ids: torch.Tensor, router: RouterStats | None = None,
             micro: int = 0, micro_count: int = 1, step_tokens: int = 0) -> int:
        """Queue one step's frame (in pieces if large) without waiting; return the bytes it takes. `labels` None:
        u-shape mode, the frame carries none. `router`: the client layers' router statistics, for a
        mixture-of-experts model with the auxiliary loss on. A pipelined step is sent as `micro_count` frames,
        micro-batch `micro` of a step with `step_tokens` target tokens."""
        if self.reply is None:
            raise RuntimeError("join before training")
        codec = self.reply.codec
        # the integer tensors in their smallest exact types (the server widens them): 9 bytes a token, not 24
        forward = spb.StepForward(
            step=step, round=rnd, hidden=encode_tensor(hidden, codec),
            attention_mask=encode_tensor(attention_mask.to(torch.uint8)),
            position_ids=encode_tensor(position_ids.to(torch.int32)), micro=micro, micro_count=micro_count,
            step_tokens=step_tokens, router=None if router is None else encode_stats(router))
        if labels is not None:
            forward.labels.CopyFrom(encode_tensor(labels.to(torch.int32)))
        return self._put(spb.ClientFrame(forward=forward))

    def send_top_grad(self, step: int, grad: torch.Tensor, micro: int = 0) -> int:
        """U-shape mode: queue a step's (micro-batch's) gradient at the top cut; return the bytes it takes."""
        grad_msg = encode_tensor(grad, self.reply.codec)
        return self._put(spb.ClientFrame(top_grad=spb.StepTopGrad(step=step, grad=grad_msg, micro=micro)))

    def _put(self, frame: spb.ClientFrame) -> int:
        if self._call is None:
            self._open()
        sent = 0
        for piece in serialized(frame, spb.ClientFrame, self.reply.chunk_bytes or (4 << 20)):
            sent += len(piece)
            self._requests.put(piece)
        return sent

    def receive(self, step: int, sent: int = 0, micro: int = 0) -> StepResult:
        """Wait for the server's answer to `step` (micro-batch `micro` of it), sent with `send`."""
        back, received, arrived = self._read(step, "backward", micro)
        grad = decode_tensor(back.grad, name="grad")
        router_grad, aux = decode_backward(back.router) if back.HasField("router") else (None, 0.0)
        return StepResult(grad, back.loss, back.tokens, sent, received, router_grad, aux,
                          phases={"decode": time.perf_counter() - arrived})

    def receive_top(self, step: int, micro: int = 0) -> tuple[torch.Tensor, int]:
        """U-shape mode: wait for the server blocks' output at the top cut of `step` (micro-batch `micro`);
        return it and its bytes."""
        top, received, _ = self._read(step, "top", micro)
        return decode_tensor(top.hidden, name="top hidden"), received

    def _read(self, step: int, kind: str, micro: int):
        try:
            return self._receive(step, kind, micro)
        except grpc.RpcError as err:
            raise_if_too_large(err, "split server", "splitlora-server serve")
            raise

    def _receive(self, step: int, kind: str, micro: int):
        """The awaited answer (`kind` of `step`, micro-batch `micro`), its bytes and when its last piece arrived."""
        parts, received = Reassembler(max_bytes=1 << 34), 0
        for raw in self._responses:
            arrived = time.perf_counter()  # decoding starts: what comes before is the wire and the server
            received += len(raw)
            out = parts.whole(spb.ServerFrame.FromString(raw), spb.ServerFrame.FromString)
            if out is None:
                continue
            if out.WhichOneof("kind") != kind:
                raise RuntimeError(f"server answered {out.WhichOneof('kind')} while {kind} of step {step} was awaited")
            msg = getattr(out, kind)
            if (msg.step, msg.micro) != (step, micro):
                raise RuntimeError(f"server answered step {msg.step} micro-batch {msg.micro} while step {step} "
                                   f"micro-batch {micro} was awaited")
            return msg, received, arrived
        raise ConnectionError("the server closed the training stream")

    def close(self) -> None:
        """End the stream: half-close it, then cancel it, so that no call outlives the session (a stream the
        server stopped reading would otherwise keep the client process from exiting)."""
        if self._call is not None:
            self._requests.put(None)
            self._call.cancel()
            self._call = None
