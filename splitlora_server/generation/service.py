"""The SplitGeneration gRPC servicer: inference sessions (one per stream) and forward-only scores."""
from __future__ import annotations

import logging
import threading
from typing import Iterator

import grpc
import torch
from google.protobuf.message import DecodeError

from common.rpc.splitlora.v1 import generation_pb2 as gpb
from common.rpc.splitlora.v1 import generation_pb2_grpc as ggrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.wire import Reassembler, WireError, chunked, codec_from_name, encode_tensor
from splitlora_server.auth import Authenticator, abort_if_denied
from splitlora_server.errors import Refused, abort
from splitlora_server.frames import FrameLimits
from splitlora_server.generation.compute import StepOutput, adapter_of, boundary_adapter, score
from splitlora_server.generation.requests import ADAPTERS, REPLIES, decode_score, decode_session_step
from splitlora_server.generation.scheduler import GenerationScheduler
from splitlora_server.generation.sessions import Session, SessionStore
from splitlora_server.generation.validation import ValidationBook
from splitlora_server.registry import invalid_client_id
from splitlora_server.service import CLIENT_ID_KEY, SHUTTING_DOWN
from splitlora_server.split_range import client_split_layer

log = logging.getLogger(__name__)


class SplitGenerationService(ggrpc.SplitGenerationServicer):
    """Inference sessions and scores of any authenticated client, computed by the one engine."""

    def __init__(self, scheduler: GenerationScheduler, store: SessionStore, limits: FrameLimits,
                 codecs: list[str], chunk_bytes: int, max_message_bytes: int, auth: Authenticator | None = None,
                 stopping: threading.Event | None = None, validation: ValidationBook | None = None,
                 fingerprint: spb.Fingerprint | None = None,
                 fingerprints: dict[int, spb.Fingerprint] | None = None) -> None:
        self.scheduler, self.store, self.limits = scheduler, store, limits
        self.fingerprint = fingerprint
        # per-client split points: one fingerprint per allowed split layer
        self.fingerprints = fingerprints or ({fingerprint.split_layer: fingerprint} if fingerprint is not None
                                             else None)
        self.codecs = {codec_from_name(c) for c in codecs}
        self.chunk_bytes, self.max_message_bytes = chunk_bytes, max_message_bytes
        self.auth = auth or Authenticator()
        self.stopping = stopping or threading.Event()
        self.validation = validation or ValidationBook()
        self.part = scheduler.engine.part

    def _client(self, context: grpc.ServicerContext) -> str:
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        client_id = dict(context.invocation_metadata()).get(CLIENT_ID_KEY, "")
        problem = invalid_client_id(client_id)
        if problem:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{CLIENT_ID_KEY} metadata: {problem}")
        abort_if_denied(context, lambda: self.auth.check_client(context, client_id), "a generation call")
        return client_id

    def _check_model(self, fingerprint: spb.Fingerprint, context: grpc.ServicerContext) -> int | None:
        """The client's split layer (where its requests start on this server), once its fingerprint matches."""
        if self.fingerprints is None:
            return None
        if not fingerprint.ByteSize():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request carries no model fingerprint")
        try:
            return client_split_layer(self.fingerprints, fingerprint)
        except Refused as refused:
            abort(context, refused)

    def _adapter(self, choice: int, client_id: str, context: grpc.ServicerContext) -> str:
        adapter = ADAPTERS.get(choice)
        if adapter is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown server adapter choice {choice}")
        if adapter == "own" and client_id not in self.scheduler.engine.slots:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the server holds no per-client adapter of client {client_id!r} (it needs "
                          "--server-adapter-mode per-client and a client that trained); ask for the shared one")
        return adapter

    # -- sessions ------------------------------------------------------------------------------------------------
    def Generate(self, request_iterator: Iterator[gpb.GenerationRequest], context: grpc.ServicerContext
                 ) -> Iterator[gpb.GenerationReply]:
        client_id = self._client(context)
        parts = Reassembler(max_bytes=self.max_message_bytes * 64)
        session: Session | None = None
        try:
            for request in request_iterator:
                if self.stopping.is_set():
                    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                request = self._whole(request, parts, context)
                if request is None:
                    continue
                kind = request.WhichOneof("kind")
                if kind == "open" and session is None:
                    session = self._open(request.open, client_id, context)
                    reply = gpb.GenerationReply(opened=gpb.SessionOpened(
                        session=session.session_id, max_tokens=session.max_tokens,
                        max_cache_bytes=self.store.options.generation_session_bytes,
                        max_batch=self.store.options.generation_max_batch,
                        idle_seconds=self.store.options.generation_idle_seconds))
                elif kind == "step" and session is not None:
                    reply = gpb.GenerationReply(step=self._step(session, request.step, client_id, context))
                else:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                  "a stream opens one session (SessionOpen) first, then sends its steps")
                yield from chunked([reply], gpb.GenerationReply, self.chunk_bytes)
        finally:
            if session is not None:
                self.store.close(session, "its stream ended")

    def _whole(self, request: gpb.GenerationRequest, parts: Reassembler, context: grpc.ServicerContext
               ) -> gpb.GenerationRequest | None:
        try:
            return parts.whole(request, gpb.GenerationRequest.FromString)
        except (WireError, DecodeError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad request part: {err}")

    def _open(self, request: gpb.SessionOpen, client_id: str, context: grpc.ServicerContext) -> Session:
        start = self._check_model(request.fingerprint, context)
        adapter = self._adapter(request.adapter, client_id, context)
        reply = REPLIES.get(request.reply)
        if reply is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown reply kind {request.reply}")
        if reply == "top_k" and not 1 <= request.top_k <= self.limits.vocab_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be in [1, {self.limits.vocab_size}]")
        if reply != "hidden" and not self.part.segment.head:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server does not hold the head: ask for hidden")
        try:
            session = self.store.open(client_id, adapter, reply, request.top_k, request.max_tokens, start)
        except Refused as err:
            abort(context, err)
        log.info("client %s opened inference session %s (adapter %s)", client_id, session.session_id[:8], adapter,
                 extra={"client": client_id})
        return session

    def _step(self, session: Session, msg: gpb.GenerationStep, client_id: str, context: grpc.ServicerContext
              ) -> gpb.StepReply:
        try:
            if msg.session != session.session_id:  # another stream's session: the owner check names the cause
                other = self.store.get(msg.session, client_id)
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"session {other.session_id[:8]} is bound to another "
                                   "stream; send steps on the stream that opened it")
            self.store.get(session.session_id, client_id)  # expired?
            step = decode_session_step(msg, session, self.limits.hidden_size, self.limits.max_positions,
                                       self.store.options.generation_max_batch, self.codecs)
            self.store.reserve(session, int(step.hidden.shape[0]), int(step.hidden.shape[1]))
        except Refused as err:
            abort(context, err)
        except WireError as err:
            self.store.close(session, f"malformed step: {err}")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed generation step {msg.step}: {err}")
        try:
            out = self.scheduler.submit(session, step).result()
        except Exception as err:  # a failure in the engine ends this session only
            if session.closed:  # it expired while the step waited
                context.abort(grpc.StatusCode.NOT_FOUND, f"inference session closed: {session.closed}")
            self.store.close(session, f"failed: {err}")
            context.abort(grpc.StatusCode.INTERNAL, f"generation step {msg.step} failed: {err}")
        rows, new = int(step.hidden.shape[0]), int(step.hidden.shape[1])
        session.rows, session.next_step = rows, session.next_step + 1
        self.store.touch(session, out.cache_bytes, out.cached_tokens, rows * new)
        if session.closed:  # expired or over a limit while it computed
            self.store.close(session, session.closed)
            context.abort(grpc.StatusCode.NOT_FOUND, f"inference session closed: {session.closed}")
        return self._answer(session, msg.step, out)

    @staticmethod
    def _answer(session: Session, step: int, out: StepOutput) -> gpb.StepReply:
        reply = gpb.StepReply(step=step, cached_tokens=out.cached_tokens, cache_bytes=out.cache_bytes)
        if session.reply == "top_k":
            values, ids = torch.log_softmax(out.last, dim=-1).topk(session.top_k, dim=-1)
            reply.top_k.CopyFrom(gpb.TopK(log_probs=encode_tensor(values), token_ids=encode_tensor(ids)))
        elif session.reply == "hidden":
            reply.hidden.CopyFrom(encode_tensor(out.last))
        else:
            reply.logits.CopyFrom(encode_tensor(out.last))
        return reply

    # -- evaluation ----------------------------------------------------------------------------------------------
    def Score(self, request: gpb.ScoreRequest, context: grpc.ServicerContext) -> gpb.ScoreReply:
        client_id = self._client(context)
        start = self._check_model(request.fingerprint, context)
        adapter = self._adapter(request.adapter, client_id, context)
        u_shape = not self.part.segment.head  # the client holds the head: it computes the loss itself
        try:
            batch = decode_score(request, self.limits, self.codecs, u_shape)
        except WireError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed score request: {err}")

        def run() -> tuple[float, int] | torch.Tensor:
            name = self.scheduler.adapter_name(adapter, client_id)
            boundary, snapshot = self.scheduler.engine.boundary_snapshot()
            if adapter == "shared" and request.round >= 0 and boundary == request.round + 1 and snapshot:
                name = boundary_adapter(self.part, snapshot.adapter)  # the closed round's model, not the moving one
            with adapter_of(self.part, name):
                return score(self.part, batch.hidden, batch.attention_mask, batch.position_ids, batch.labels, start)

        try:
            result = self.scheduler.run(run).result()
        except Exception as err:
            context.abort(grpc.StatusCode.INTERNAL, f"scoring failed: {err}")
        if u_shape:
            return gpb.ScoreReply(hidden=encode_tensor(result))
        loss_sum, tokens = result
        if request.round >= 0 and (request.samples or request.last):
            self.validation.add(client_id, request.round, loss_sum, tokens, request.samples, request.last)
        return gpb.ScoreReply(loss_sum=loss_sum, tokens=tokens)
