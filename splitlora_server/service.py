"""The SplitTraining gRPC servicer: handshake, the per-step training stream, and status."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from common.faults import fault_point
from common.limits import negotiated_chunk, too_small
from common.redact import shown
from common.router_wire import encode_backward
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.rpc.splitlora.v1 import split_pb2_grpc as sgrpc
from common.rpc.splitlora.v1 import tensor_pb2 as tpb
from common.wire import Reassembler, WireError, codec_from_name, codec_name, encode_tensor, serialized
from splitlora_server.auth import Authenticator, abort_if_denied
from splitlora_server.engine.core import ServerEngine
from splitlora_server.engine.jobs import Step
from splitlora_server.errors import Refused, abort
from splitlora_server.frames import FrameLimits, decode_step, max_frame_bytes
from splitlora_server.handout import PRIVATE, FinalAdapter
from splitlora_server.ops.steplog import StepLog
from splitlora_server.pipelining import MicroProgress
from splitlora_server.registry import ClientRecord, Registry, invalid_client_id
from splitlora_server.rounds.coordinator import FINISHED, RoundCoordinator
from splitlora_server.split_range import client_split_layer
from splitlora_server.ushape import TopCut

log = logging.getLogger(__name__)
CLIENT_ID_KEY = "x-splitlora-client-id"
SESSION_KEY = "x-splitlora-session"
VERSION = "0.1.0"
SHUTTING_DOWN = "server shutting down, retry"


class SplitTrainingService(sgrpc.SplitTrainingServicer):
    """Serves many clients at once; every computation goes through the one engine, every round through the one
    coordinator (the registry's)."""

    def __init__(self, engine: ServerEngine, registry: Registry, fingerprint: spb.Fingerprint,
                 schedule: spb.Schedule, limits: FrameLimits, codecs: list[str], aggregator_address: str,
                 max_message_bytes: int, chunk_bytes: int, auth: Authenticator | None = None,
                 on_shutdown: Callable[[str], None] | None = None, aggregation: str = "fedavg",
                 status_extras: Callable[[], dict[str, Any]] | None = None, micro_batches: int = 1,
                 plan: spb.Plan | None = None, top: TopCut | None = None, step_log: StepLog | None = None,
                 fingerprints: dict[int, spb.Fingerprint] | None = None) -> None:
        self.engine, self.registry, self.fingerprint = engine, registry, fingerprint
        # the fingerprint a client of each allowed split layer sends (per-client split points; else just one)
        self.fingerprints = fingerprints or {fingerprint.split_layer: fingerprint}
        self.aggregation = aggregation  # announced at Join: how the clients' adapters are combined
        self.status_extras = status_extras or dict  # more StatusReply fields (generation, validation)
        self.micro_batches = micro_batches  # per step, for clients that do not ask for a number at Join
        self.rounds: RoundCoordinator = registry.coordinator
        self.plan = plan if plan is not None else spb.Plan(schedule=schedule, send_final_adapter=True)
        self.final = FinalAdapter(self.rounds.finished, engine.server_adapter)
        self.auth, self.on_shutdown = auth or Authenticator(), on_shutdown
        self.schedule, self.limits = schedule, limits
        self.codecs = [codec_from_name(c) for c in codecs]
        self.aggregator_address = aggregator_address
        self.max_message_bytes, self.chunk_bytes = max_message_bytes, chunk_bytes
        self.top = top  # u-shape mode: steps awaiting their top-cut gradient (None: standard mode)
        self.stopping = threading.Event()  # set on shutdown: calls are refused with UNAVAILABLE (retry)
        self._replies = 0
        self.step_log = step_log  # per-step timing (metrics.jsonl in --output)

    # -- handshake -------------------------------------------------------------------------------------------
    def GetPlan(self, request: spb.PlanRequest, context: grpc.ServicerContext) -> spb.Plan:
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        abort_if_denied(context, lambda: self.auth.check_client(context, request.client_id))
        problem = invalid_client_id(request.client_id)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return self.plan

    def Join(self, request: spb.JoinRequest, context: grpc.ServicerContext) -> spb.JoinReply:
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        abort_if_denied(context, lambda: self.auth.check_client(context, request.client_id), "Join", self.auth)
        chunk = negotiated_chunk(self.chunk_bytes, request.max_message_bytes)
        if chunk is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, too_small(request.max_message_bytes))
        try:
            split_layer = client_split_layer(self.fingerprints, request.fingerprint)
            record = self.registry.join(request.client_id)
        except Refused as refused:
            abort(context, refused)
        micro = request.micro_batches or self.micro_batches
        if not 1 <= micro <= self.schedule.batch_size:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"micro_batches {micro} must be between 1 and the "
                                                            f"batch size {self.schedule.batch_size}")
        record.codec, record.chunk_bytes = self._negotiate(list(request.codecs)), chunk
        problem = self.engine.add_client(record.client_id, split_layer).result()
        if problem:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, problem)
        record.split_layer = split_layer
        with record.step_lock:  # after any step of its old stream still in flight
            self._abandon(record)  # a step in progress on its old stream is abandoned (it changed nothing)
            record.micro_batches = micro
            start, partial = self.registry.resume(record)
            if partial:
                self.engine.rollback(record.client_id, start).result()
        log.info("client %s joined (codec %s, split layer %d): starts round %d%s", record.client_id,
                 codec_name(record.codec), split_layer, start,
                 " (its partial progress in it is undone)" if partial else "",
                 extra={"client": record.client_id, "round": start})
        return spb.JoinReply(session=record.session, schedule=self.schedule,
                             aggregator_address=self.aggregator_address, codec=record.codec,
                             max_message_bytes=self.max_message_bytes, chunk_bytes=chunk,
                             start_round=start, num_clients=self.rounds.expected, server_version=VERSION,
                             aggregation=self.aggregation, micro_batches=micro)

    def _negotiate(self, offered: list[int]) -> int:
        for codec in offered or [tpb.CODEC_RAW]:
            if codec in self.codecs:
                return codec
        return tpb.CODEC_RAW if tpb.CODEC_RAW in self.codecs else self.codecs[0]

    # -- training stream -------------------------------------------------------------------------------------
    def _authenticate(self, context: grpc.ServicerContext) -> ClientRecord:
        metadata = dict(context.invocation_metadata())
        client_id, session = metadata.get(CLIENT_ID_KEY, ""), metadata.get(SESSION_KEY, "")
        if not client_id or not session:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"missing {CLIENT_ID_KEY} / {SESSION_KEY} metadata; call Join first")
        abort_if_denied(context, lambda: self.auth.check_client(context, client_id), "Train", self.auth)
        try:
            return self.registry.authenticate(client_id, session)
        except Refused as refused:
            abort(context, refused)

    def _abandon(self, record: ClientRecord) -> None:
        """Forget the client's step in progress: its micro-batches' progress, the held sum of their gradients
        (discarded on the engine thread) and, in u-shape mode, the micro-batches awaiting a top-cut gradient."""
        if self.top is not None:
            self.top.drop(record.client_id)
        record.micro = MicroProgress()
        self.engine.discard_step(record.client_id)

    def _fail(self, context: grpc.ServicerContext, record: ClientRecord, code: grpc.StatusCode, message: str):
        """Refuse the frame and end the stream; the step in progress is abandoned (nothing of it stays)."""
        self._abandon(record)
        record.last_error = f"{code.name}: {message[:300]}"
        record.errors += 1
        self.auth.refusals.refuse(record.client_id, code.name.lower(), message)  # rate-limited, no traceback
        context.abort(code, message)

    def Train(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """The training stream, frames as bytes (registered without serializers by `add_to_server`): each frame
        is parsed once and each answer serialized once, and their sizes are the lengths of those bytes."""
        if self.stopping.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        record = self._authenticate(context)
        with self.registry.lock:
            record.streams, record.opened = record.streams + 1, record.opened + 1
        record.connected = True
        self.engine.stream_opened(record.client_id)
        parts, step_bytes = Reassembler(max_frame_bytes(self.limits, record.codec), max_piece=record.chunk_bytes), 0
        try:
            for raw in request_iterator:
                if self.stopping.is_set():  # shutting down: no new step; the client retries after a restart
                    context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
                record.bytes_in += len(raw)
                step_bytes += len(raw)
                started = time.perf_counter()
                frame = self._parse(record, raw, parts, context)
                if frame is None:
                    continue
                phases = {"decode": time.perf_counter() - started}
                reply = self._step(record, frame, context, step_bytes, phases)
                step_bytes = 0
                encoding = time.perf_counter()
                pieces = serialized(reply, spb.ServerFrame, record.chunk_bytes)
                phases["encode"] += time.perf_counter() - encoding
                if self.step_log is not None:
                    kind = reply.WhichOneof("kind")  # backward, or top (a u-shape step's first exchange)
                    answer = getattr(reply, kind)
                    self.step_log.step(record.client_id, answer.step, answer.micro, phases, answer=kind)
                for out in pieces:
                    record.bytes_out += len(out)
                    yield out
                self._replies += 1
                fault_point("server", "reply", self._replies)
            if parts.pending:  # the client ended its stream within a frame
                self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT,
                           "the stream ended in the middle of a frame; the partial frame was dropped")
        finally:
            parts.clear()  # a partial frame is dropped with its stream
            with self.registry.lock:
                record.streams -= 1
            record.connected = record.streams > 0
            self.engine.stream_closed(record.client_id)

    def _parse(self, record: ClientRecord, raw: bytes, parts: Reassembler, context: grpc.ServicerContext
               ) -> spb.ClientFrame | None:
        """The frame `raw` holds, or the one its piece completes (None while pieces are missing)."""
        try:
            frame = spb.ClientFrame.FromString(raw)
        except DecodeError as err:
            self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT,
                       f"a Train message could not be decoded (not the protobuf message this method takes: {err})")
        kind = frame.WhichOneof("kind")
        if kind == "part":
            try:
                data = parts.add(frame.part)
                if data is None:
                    return None
                frame = spb.ClientFrame.FromString(data)
            except (WireError, DecodeError) as err:
                self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT, f"bad frame part: {err}")
            if frame.WhichOneof("kind") not in ("forward", "top_grad"):
                self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT,
                           "a reassembled frame must hold a StepForward or a StepTopGrad")
        elif kind not in ("forward", "top_grad"):
            self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT,
                       "empty frame: set forward, top_grad or part")
        return frame

    def _step(self, record: ClientRecord, frame: spb.ClientFrame, context: grpc.ServicerContext, nbytes: int,
              phases: dict[str, float]) -> spb.ServerFrame:
        with record.step_lock:  # a client's step is checked and applied once, even if it arrives on two streams
            if frame.WhichOneof("kind") == "top_grad":
                return spb.ServerFrame(backward=self._top_grad_locked(record, frame.top_grad, context, nbytes, phases))
            return self._step_locked(record, frame.forward, context, nbytes, phases)

    def _top_grad_locked(self, record: ClientRecord, msg: spb.StepTopGrad, context: grpc.ServicerContext,
                         nbytes: int, phases: dict[str, float]) -> spb.StepBackward:
        if self.top is None:
            self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT,
                       "a top-cut gradient (StepTopGrad) was sent, but the server runs --split-mode standard: it "
                       "holds the head and computes the loss from the step's labels")
        clock = time.perf_counter()
        try:
            step = self.top.take(record.client_id, msg, self.limits, record.codec)
        except Refused as refused:
            self._fail(context, record, refused.code, refused.message)
        phases["decode"] += time.perf_counter() - clock
        return self._train(record, step, self.registry.round_of(step.step), nbytes, context, phases)

    def _step_locked(self, record: ClientRecord, fwd: spb.StepForward, context: grpc.ServicerContext, nbytes: int,
                     phases: dict[str, float]) -> spb.ServerFrame:
        """Check, decode and run one step (micro-batch) through the engine (u-shape: its first exchange); `phases`
        gets the seconds of decoding, the engine (queue, forward, backward, update) and encoding the answer."""
        if self.top is not None:
            try:
                self.top.check_none_awaited(record.client_id, fwd.step, fwd.micro)
            except Refused as refused:
                self._fail(context, record, refused.code, refused.message)
        total = self.schedule.rounds * self.schedule.local_steps
        if fwd.step >= total:
            self._fail(context, record, grpc.StatusCode.OUT_OF_RANGE,
                       f"step {fwd.step} is past the end of training ({total} steps)")
        if fwd.step != record.next_step:
            self._fail(context, record, grpc.StatusCode.FAILED_PRECONDITION,
                       f"step {fwd.step} is out of order: the server expects step {record.next_step} "
                       f"from client {record.client_id}")
        if fwd.round != self.registry.round_of(fwd.step):
            self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT,
                       f"step {fwd.step} belongs to round {self.registry.round_of(fwd.step)}, frame says {fwd.round}")
        clock = time.perf_counter()
        try:
            step = decode_step(fwd, self.limits, record.codec, record.client_id, u_shape=self.top is not None)
            step.start = record.split_layer
        except WireError as err:
            self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT, f"malformed step {fwd.step}: {err}")
        phases["decode"] += time.perf_counter() - clock
        if self.top is not None:
            return spb.ServerFrame(top=self._probe(record, step, fwd, context, nbytes, phases))
        return spb.ServerFrame(backward=self._train(record, step, fwd.round, nbytes, context, phases))

    def _run(self, record: ClientRecord, step: Step, rnd: int, context: grpc.ServicerContext,
             phases: dict[str, float], check: Callable[[], None], submit: Callable[[Step], Any]) -> Any:
        """`check` the step, `submit` it to the engine inside round `rnd` (no step overtakes a round close) and
        await its result (timed as the phase "server"); a refusal or an engine failure ends the stream."""
        try:
            check()
            with self.rounds.open_for(record.client_id, rnd):
                future = submit(step)
        except Refused as refused:
            self._fail(context, record, refused.code, refused.message)
        clock = time.perf_counter()
        try:
            result = future.result()
        except Exception as err:  # a failure inside the engine is reported, never fatal to the server
            self._fail(context, record, grpc.StatusCode.INTERNAL, f"server failed on step {step.step}: {err}")
        phases["server"] = time.perf_counter() - clock
        return result

    def _probe(self, record: ClientRecord, step: Step, fwd: spb.StepForward, context: grpc.ServicerContext,
               nbytes: int, phases: dict[str, float]) -> spb.StepTop:
        """U-shape, a step's (micro-batch's) first exchange: the server blocks' output at the top cut; the
        micro-batch then awaits its top-cut gradient."""
        top = self._run(record, step, fwd.round, context, phases,
                        lambda: self.top.check_order(step, record.micro_batches), self.engine.probe)
        self.top.park(step)
        clock = time.perf_counter()
        reply = spb.StepTop(step=fwd.step, hidden=encode_tensor(top, record.codec), bytes_received=nbytes,
                            micro=step.micro)
        phases["encode"] = time.perf_counter() - clock
        return reply

    def _train(self, record: ClientRecord, step: Step, rnd: int, nbytes: int, context: grpc.ServicerContext,
               phases: dict[str, float]) -> spb.StepBackward:
        """Run a decoded step through the engine, account it and answer it (gradient at the bottom cut)."""
        outcome = self._run(record, step, rnd, context, phases,
                            lambda: record.micro.check(step, record.micro_batches), self.engine.submit_step)
        if not math.isfinite(outcome.loss):
            self._fail(context, record, grpc.StatusCode.INVALID_ARGUMENT,
                       f"step {step.step} produced a non-finite loss; the update was skipped")
        whole = record.micro.add(step, outcome.loss, outcome.tokens)  # the step's last (or only) micro-batch
        if whole and self.registry.step_done(record, step.step, record.micro.loss, record.micro.tokens,
                                             samples=record.micro.rows):
            try:  # the round may close here, before the reply: no client sees round r+1 early
                self.rounds.arrive(record.client_id, rnd, FINISHED)
            except Refused as refused:
                self._fail(context, record, refused.code, refused.message)
        clock = time.perf_counter()
        router = None if outcome.router_grad is None else encode_backward(outcome.router_grad, outcome.aux_loss)
        reply = spb.StepBackward(step=step.step, grad=encode_tensor(outcome.grad, record.codec), loss=outcome.loss,
                                 tokens=outcome.tokens, bytes_received=nbytes, micro=step.micro, router=router)
        phases["encode"] = time.perf_counter() - clock
        return reply

    def FetchServerAdapter(self, request: spb.ServerAdapterRequest, context: grpc.ServicerContext
                           ) -> Iterator[spb.AdapterPiece]:
        abort_if_denied(context, lambda: self.auth.check_client(context, request.client_id))
        if not self.plan.send_final_adapter:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, PRIVATE)
        if not self.registry.is_enrolled(request.client_id):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"client {request.client_id!r} did not train here")
        chunk = negotiated_chunk(self.chunk_bytes, request.max_message_bytes)
        if chunk is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, too_small(request.max_message_bytes))
        if self.final.wait(context.is_active):
            yield from self.final.pieces(request.client_id, chunk)

    # -- status ----------------------------------------------------------------------------------------------
    def Status(self, request: spb.StatusRequest, context: grpc.ServicerContext) -> spb.StatusReply:
        reg, rounds = self.registry, self.rounds
        with reg.lock:
            clients = [spb.ClientStatus(client_id=r.client_id, connected=r.connected, round=reg.round_of(r.next_step),
                                        steps=r.next_step, last_loss=r.last_loss, bytes_in=r.bytes_in,
                                        bytes_out=r.bytes_out, last_error=r.last_error)
                       for r in sorted(reg.clients.values(), key=lambda r: r.client_id)]
        text, waiting = rounds.status()
        counts, incidents = self.auth.refusals.snapshot()
        refusals = [spb.RefusalCount(caller=shown(caller, 64), reason=reason, count=n)
                    for (caller, reason), n in sorted(counts.items())]
        return spb.StatusReply(round=rounds.current_round(), rounds=rounds.rounds, steps=reg.total_steps,
                               steps_per_second=reg.steps_per_second(), clients=clients,
                               server_adapter_mode=self.engine.mode, finished=rounds.finished.is_set(),
                               round_status=text, waiting_for_quorum=waiting, refusals=refusals,
                               incidents=[*incidents, *self.engine.incidents[-20:]], **self.status_extras())

    # -- shutdown (the interceptor lets only the admin credential through) ------------------------------------
    def Shutdown(self, request: spb.ShutdownRequest, context: grpc.ServicerContext) -> spb.ShutdownReply:
        if self.on_shutdown is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server cannot be shut down remotely")
        log.warning("shutdown requested by %s: %r", context.peer(), request.reason[:200] or "(no reason given)")
        self.on_shutdown(request.reason)
        return spb.ShutdownReply()


class _Handlers:
    """Collects the method handlers a generated `add_*Servicer_to_server` function registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def add_to_server(service: SplitTrainingService, server: grpc.Server) -> None:
    """Register the servicer as the generated code does, except `Train`, whose frames cross as bytes (no
    serializers): the servicer parses and serializes each frame once, and counts the bytes it already has."""
    collected = _Handlers()
    sgrpc.add_SplitTrainingServicer_to_server(service, collected)
    handlers = collected.handlers
    handlers["Train"] = grpc.stream_stream_rpc_method_handler(service.Train)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collected.service, handlers),))
    server.add_registered_method_handlers(collected.service, handlers)
