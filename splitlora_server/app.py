"""Assemble and run the server process: model part, engine, services, gRPC server, and the final export."""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.adapter_layout import adapter_layout
from common.aggregation.coverage import PerModule
from common.faults import fault_point
from common.lora import AdapterState, export_adapter, write_adapter_file
from common.optim import OptimSettings
from common.plan import options_json
from common.provenance import Provenance, provenance
from common.rpc.splitlora.v1 import aggregator_pb2_grpc as agrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from common.split.lora_settings import whole_model_lora_config
from common.split.parts import SplitPart
from common.split.router import router_aux
from common.threads import apply_threads
from common.tls import add_port
from splitlora_server.admission import RPC_THREADS, Admission, AdmissionInterceptor, AdmissionOptions
from splitlora_server.aggregator.service import AggregatorService
from splitlora_server.auth import Authenticator, AuthInterceptor, build_authenticator
from splitlora_server.engine.batching import BatchSettings
from splitlora_server.engine.core import ServerEngine
from splitlora_server.engine.state import ServerCheckpoints, run_identity
from splitlora_server.frames import FrameLimits
from splitlora_server.generation.wiring import GenerationParts, build_generation
from splitlora_server.init_adapter import InitialAdapter, load_initial_adapter
from splitlora_server.ops.metrics import metrics_for
from splitlora_server.ops.steplog import StepLog
from splitlora_server.options import AggregateConfig, ServeConfig
from splitlora_server.registry import Registry
from splitlora_server.rounds.coordinator import FINISHED, SUBMITTED, RoundCoordinator, RoundListener
from splitlora_server.service import SplitTrainingService, add_to_server
from splitlora_server.split_range import SplitRange, build_split_range

log = logging.getLogger("splitlora.server")
SERVER_ADAPTER_FILE = "server_adapter.safetensors"


def _grpc_server(max_workers: int, options: list[tuple[str, int]], auth: Authenticator,
                 limits: AdmissionOptions) -> tuple[grpc.Server, Admission]:
    """A grpc server whose calls are authenticated, then admitted (splitlora_server.admission). No SO_REUSEPORT:
    a second server on a taken port must fail to bind, not share the port with the first."""
    admission = Admission(auth, limits, max_workers)
    server = grpc.server(admission.pool, options=[*options, ("grpc.so_reuseport", 0)],
                         interceptors=[AuthInterceptor(auth), AdmissionInterceptor(admission)])
    return server, admission


def exit_if_stuck(code: int, grace: float) -> None:
    """After an orderly stop (idle handler threads end with `Admission.close`): if handler threads are still alive
    `grace` seconds later (a call that ignores cancellation), exit at once rather than hang in the interpreter's
    join of the thread pool."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not any(t.name.startswith(RPC_THREADS) and t.is_alive() for t in threading.enumerate()):
            return
        time.sleep(0.05)
    log.error("handler threads still running %.1f s after shutdown; exiting without waiting for them", grace)
    logging.shutdown()
    os._exit(code)


def _add_health(server: grpc.Server, *services: str) -> health.HealthServicer:
    servicer = health.HealthServicer()
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    return servicer


@dataclass
class RunningServer:
    """A started split server and the parts a caller (CLI or test) may want to look at."""

    server: grpc.Server
    port: int
    config: ServeConfig
    part: SplitPart
    engine: ServerEngine
    registry: Registry
    rounds: RoundCoordinator
    service: SplitTrainingService
    aggregator: AggregatorService | None
    stop_requested: threading.Event = field(default_factory=threading.Event)  # set by the admin Shutdown call
    health: health.HealthServicer | None = None
    resumed_round: int | None = None  # the round the server resumed at from its checkpoint, if it did
    admission: Admission | None = None
    generation: GenerationParts | None = None
    provenance: Provenance | None = None  # written into the headers of the adapter files it exports

    def wait_finished(self, stop: threading.Event | None = None) -> bool:
        """Block until every round is done (and aggregated, when hosted here); False if `stop` was set first."""
        stop = stop or threading.Event()
        while not stop.is_set():
            if self.rounds.finished.is_set():
                return True
            stop.wait(0.2)
        return False

    def export(self) -> Path:
        """Write the server adapter and, with the aggregator in process, the whole-model PEFT adapter."""
        out = Path(self.config.output)
        server_state = self.engine.server_adapter()
        meta = self.provenance.to_metadata() if self.provenance else None
        write_adapter_file(out / SERVER_ADAPTER_FILE, server_state, meta)
        if self.aggregator is None:
            log.info("server adapter written to %s; run `splitlora-server export` with the aggregator's output",
                     out / SERVER_ADAPTER_FILE)
            return out / SERVER_ADAPTER_FILE
        client_state = self.aggregator.global_adapter(self.config.rounds - 1)
        # per-client split points: the blocks trained on both sides are in both, with the same values
        server_state = {k: v for k, v in server_state.items() if k not in client_state}
        lora = whole_model_lora_config(self.part.lora, self.part.family, self.part.config)
        whole = dataclasses.replace(self.provenance, side="model").to_metadata() if self.provenance else None
        path = export_adapter(out / "adapter", lora, client_state, server_state, base_model=str(self.part.model_dir),
                              metadata=whole)
        log.info("exported the whole-model PEFT adapter to %s", path)
        return path

    def wait_for_final_fetches(self, grace_seconds: float) -> None:
        """Give clients time to download the last global adapter before the process exits."""
        deadline = time.monotonic() + grace_seconds
        wanted = set(self.registry.clients)

        def done() -> bool:
            fetched_global = self.aggregator is None or wanted <= self.aggregator.fetched(self.config.rounds - 1)
            return fetched_global and (self.config.private_server_adapter or wanted <= self.service.final.fetched)

        while time.monotonic() < deadline and not done():
            time.sleep(0.1)
        missing = sorted(wanted - self.service.final.fetched) if not self.config.private_server_adapter else []
        if missing:
            log.warning("clients %s did not fetch the final server adapter within --finish-grace-seconds %g",
                        ", ".join(missing), grace_seconds)

    def drain(self) -> None:
        """Graceful shutdown, first half: health NOT_SERVING, new calls and open streams answered UNAVAILABLE
        ("server shutting down, retry") once their current step is done. The last round's checkpoint is already
        on disk: a restarted server resumes there, and clients redo the open round."""
        if self.health is not None:
            self.health.enter_graceful_shutdown()
        self.service.stopping.set()
        if self.generation is not None:
            self.generation.service.stopping.set()
        if self.aggregator is not None:
            self.aggregator.stopping.set()
        try:
            self.engine.call(lambda: None).result(timeout=self.config.shutdown_grace_seconds)  # queued steps finish
        except TimeoutError:
            log.warning("the engine did not finish its queued steps within %.1f s", self.config.shutdown_grace_seconds)
        log.info("shutting down; a restart with --output %s resumes at round %d", self.config.output,
                 self.rounds.current_round())

    def stop(self, grace: float = 2.0) -> None:
        """Stop serving and stop the engine."""
        self.server.stop(grace).wait(grace + 1.0)
        if self.admission is not None:
            self.admission.close()
        self.engine.stop()
        if self.service.step_log is not None:
            self.service.step_log.close()


class EngineRoundEnd(RoundListener):
    """The engine's part of a round close: average the per-client server adapters (with the samples each client
    trained on) and checkpoint the boundary, before the next round opens."""

    def __init__(self, engine: ServerEngine, registry: Registry,
                 combined: Callable[[], AdapterState | None] | None = None) -> None:
        self.engine, self.registry = engine, registry
        self.combined = combined  # per-client split points: the aggregator's result (blocks on both sides)

    def round_closing(self, rnd: int, included: list[str]) -> Future:
        weights = self.registry.round_weights(rnd, included)
        log.info("round %d closed on the server with %d of %d clients", rnd, len(weights), self.registry.expected)
        overlap = self.combined() if self.combined is not None else None
        return self.engine.close_round(rnd, weights, self.registry.roster(), overlap)


def _engine(cfg: ServeConfig, part: SplitPart, checkpoints: ServerCheckpoints, ranges: SplitRange) -> ServerEngine:
    """The started engine of the server part, with its optimizer schedule and round-end checkpoint."""
    steps_per_adapter = cfg.rounds * cfg.local_steps * (cfg.clients if cfg.server_adapter_mode == "shared" else 1)
    optim = OptimSettings(cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, steps_per_adapter, cfg.max_grad_norm)
    return ServerEngine(part, cfg.server_adapter_mode, optim, cfg.label_smoothing, cfg.seed,
                        BatchSettings(cfg.batch_window_ms, cfg.max_batch_clients), strategy=cfg.strategy(),
                        on_boundary=lambda state: checkpoints.save(
                            state, fault=lambda: fault_point("server", "checkpoint", state.round - 1)),
                        points=ranges.points).start()


def _schedule(cfg: ServeConfig, max_positions: int) -> spb.Schedule:
    return spb.Schedule(rounds=cfg.rounds, local_steps=cfg.local_steps, batch_size=cfg.batch_size,
                        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                        warmup_steps=cfg.warmup_steps, max_seq_len=min(cfg.max_seq_len, max_positions),
                        label_smoothing=cfg.label_smoothing, seed=cfg.seed, max_grad_norm=cfg.max_grad_norm)


def _plan(cfg: ServeConfig, planned: str, schedule: spb.Schedule, part: SplitPart,
          initial: InitialAdapter | None) -> spb.Plan:
    """What every client is handed before it joins (GetPlan)."""
    return spb.Plan(model_options_json=planned, schedule=schedule, family=part.family.name,
                    initial_client_adapter=initial.client_bytes if initial else b"",
                    send_final_adapter=not cfg.private_server_adapter)


def start_server(cfg: ServeConfig, stop: threading.Event | None = None) -> RunningServer:
    """Load the server part, start the engine and serve SplitTraining (+ Aggregator, + health); the admin
    Shutdown call sets `stop`. One round coordinator drives the rounds of every part: with the aggregator in
    this process a round closes when the clients' adapters are in (the aggregator averages first, then the
    engine's round end), else when the clients have finished their steps."""
    cfg.validate_tls()  # secure by default: no certificates and no --insecure is refused before anything starts
    auth = build_authenticator(cfg.tokens_file, cfg.require_client_cert, "the split server")
    stop = stop if stop is not None else threading.Event()
    apply_threads("server", cfg.torch_threads, cfg.device, cfg.max_workers)
    model_dir, lora = cfg.model_dir(), cfg.lora_settings()
    low, high = cfg.split_bounds()  # per-client split points: the server holds blocks [K_min, L)
    part = SplitPart(model_dir, "server", low, lora, cfg.dtype, cfg.device, lora_seed=cfg.seed,
                     gradient_checkpointing=cfg.gradient_checkpointing, per_module_init=high > low)
    ranges = build_split_range(cfg, model_dir, part.family.layers_path, part.num_layers)
    fingerprint = ranges.default
    planned = options_json(cfg)
    initial = load_initial_adapter(cfg.init_adapter, part, fingerprint, planned) if cfg.init_adapter else None
    identity = {**run_identity(cfg, fingerprint), **({"init_adapter": initial.sha256} if initial else {})}
    checkpoints = ServerCheckpoints(Path(cfg.output), identity)
    engine = _engine(cfg, part, checkpoints, ranges)
    in_process = not cfg.aggregator
    coordinator = RoundCoordinator(cfg.rounds, cfg.quorum(cfg.clients), SUBMITTED if in_process else FINISHED)
    registry = Registry(cfg.clients, cfg.local_steps, coordinator)
    max_positions = int(getattr(part.config, "max_position_embeddings", cfg.max_seq_len))
    schedule = _schedule(cfg, max_positions)
    aux = router_aux(part.family, part.config)
    limits = FrameLimits(part.hidden_size, part.vocab_size, cfg.batch_size, schedule.max_seq_len, max_positions,
                         num_experts=aux.num_experts if aux else 0)
    generation = build_generation(cfg, engine, limits, auth, fingerprint, ranges.fingerprints)
    service = SplitTrainingService(engine, registry, fingerprint, schedule, limits, cfg.codecs, cfg.aggregator,
                                   cfg.max_message_bytes, cfg.chunk_bytes, auth=auth, on_shutdown=lambda _: stop.set(),
                                   aggregation=cfg.aggregation, micro_batches=cfg.micro_batches,
                                   status_extras=generation.status_fields,
                                   plan=_plan(cfg, planned, schedule, part, initial),
                                   step_log=StepLog(Path(cfg.output) / "metrics.jsonl"),
                                   fingerprints=ranges.fingerprints)
    server, admission = _grpc_server(cfg.max_workers, cfg.grpc_options(), auth, cfg)
    add_to_server(service, server)
    generation.add_to(server)
    aggregator = None
    if in_process:
        ranged = ranges.points.ranged
        aggregator = AggregatorService(cfg.clients, cfg.rounds, Path(cfg.output) / "aggregator",
                                       max_adapter_bytes=cfg.max_adapter_bytes, is_enrolled=registry.is_enrolled,
                                       chunk_bytes=cfg.chunk_bytes, auth=auth,
                                       strategy=PerModule(cfg.strategy()) if ranged else cfg.strategy(),
                                       verify_claim=registry.verify_claim, store_submissions=False,
                                       coordinator=coordinator, layout=ranges.layouts[cfg.split_layer],
                                       client_layout=ranges.layout_of(engine.split_layer_of) if ranged else None,
                                       server_updates=(lambda rnd, ids: engine.server_updates(
                                           registry.round_weights(rnd, ids)).result()) if ranged else None)
        coordinator.subscribe(aggregator.ledger)  # first: the global adapter is computed and stored, or refused
        agrpc.add_AggregatorServicer_to_server(aggregator, server)
    combined = aggregator.ledger.current_global if aggregator is not None and ranges.points.ranged else None
    coordinator.subscribe(EngineRoundEnd(engine, registry, combined))
    resumed = _resume(checkpoints, engine, registry)
    if aggregator is not None:
        aggregator.restore(up_to=resumed if resumed is not None else 0)
    else:
        coordinator.restore(resumed or 0)
    health_servicer = _add_health(server, "splitlora.v1.SplitTraining", "splitlora.v1.Aggregator",
                                  "splitlora.v1.SplitGeneration")
    port = add_port(server, f"{cfg.host}:{cfg.port}", cfg, "the split server")
    server.start()
    return RunningServer(server, port, cfg, part, engine, registry, coordinator, service, aggregator,
                         stop_requested=stop, health=health_servicer, resumed_round=resumed, admission=admission,
                         generation=generation, provenance=provenance("server", fingerprint, planned, str(model_dir)))


def _resume(checkpoints: ServerCheckpoints, engine: ServerEngine, registry: Registry) -> int | None:
    """Resume the engine and the roster from the newest checkpoint in --output, if any; return its round."""
    state = checkpoints.latest()
    if state is None:
        return None
    engine.restore(state).result()
    registry.restore(state.round, state.clients)
    log.info("resumed from %s: round %d starts again with %d enrolled clients", checkpoints.dir.path(state.round),
             state.round, len(state.clients))
    return state.round


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def serve(cfg: ServeConfig) -> int:
    """Run `splitlora-server serve` until training ends (exit 0) or a signal stops it (exit 1)."""
    stop = _stop_on_signals()
    running = start_server(cfg, stop)
    metrics = metrics_for(cfg.host, cfg.metrics_port, running.registry, running.aggregator,
                          running.service.auth.refusals,
                          running.generation.collector() if running.generation else None)
    log.info("listening on %s:%d; expecting %d clients for %d rounds of %d steps", cfg.host, running.port,
             cfg.clients, cfg.rounds, cfg.local_steps)
    print(f"splitlora-server listening on {cfg.host}:{running.port}", flush=True)
    finished = running.wait_finished(stop)
    if finished:
        running.export()
        running.wait_for_final_fetches(cfg.finish_grace_seconds)
        if cfg.serve_after_training:
            log.info("training done; serving generation and evaluation until stopped (--serve-after-training)")
            stop.wait()
    else:
        running.drain()
    running.stop(cfg.shutdown_grace_seconds)
    if metrics is not None:
        metrics.stop()
    exit_if_stuck(0 if finished else 1, 1.0)
    return 0 if finished else 1


def aggregate(cfg: AggregateConfig) -> int:
    """Run `splitlora-server aggregate`: the aggregator alone; it resumes from --output after a restart."""
    stop = _stop_on_signals()
    cfg.validate_tls()
    auth = build_authenticator(cfg.tokens_file, cfg.require_client_cert, "the aggregator")
    server, admission = _grpc_server(cfg.max_workers, cfg.grpc_options(), auth, cfg)
    layout = adapter_layout(cfg.model_dir(), "client", cfg.split_layer, cfg.lora_settings())
    aggregator = AggregatorService(cfg.clients, cfg.rounds, Path(cfg.output), max_adapter_bytes=cfg.max_adapter_bytes,
                                   chunk_bytes=cfg.chunk_bytes, strategy=cfg.strategy(), auth=auth,
                                   quorum=cfg.quorum(cfg.clients), layout=layout)
    aggregator.restore()
    agrpc.add_AggregatorServicer_to_server(aggregator, server)
    health_servicer = _add_health(server, "splitlora.v1.Aggregator")
    port = add_port(server, f"{cfg.host}:{cfg.port}", cfg, "the aggregator")
    server.start()
    metrics = metrics_for(cfg.host, cfg.metrics_port, aggregator=aggregator, refusals=auth.refusals)
    print(f"splitlora-server aggregate listening on {cfg.host}:{port}", flush=True)
    while not stop.is_set() and not aggregator.finished:
        stop.wait(0.2)
    if aggregator.finished:  # let clients fetch the last round
        deadline = time.monotonic() + cfg.finish_grace_seconds
        while not stop.is_set() and time.monotonic() < deadline and \
                len(aggregator.fetched(cfg.rounds - 1)) < len(aggregator.included(cfg.rounds - 1)):
            stop.wait(0.2)
    else:
        health_servicer.enter_graceful_shutdown()
        aggregator.stopping.set()
    server.stop(cfg.shutdown_grace_seconds).wait(cfg.shutdown_grace_seconds + 1.0)
    admission.close()
    if metrics is not None:
        metrics.stop()
    exit_if_stuck(0 if aggregator.finished else 1, 1.0)
    return 0 if aggregator.finished else 1
