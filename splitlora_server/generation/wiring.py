"""Assemble split generation on a server: the session store, the scheduler on the engine, the servicer, and what
`status` and Prometheus show of them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.rpc.splitlora.v1 import generation_pb2_grpc as ggrpc
from common.rpc.splitlora.v1 import split_pb2 as spb
from splitlora_server.auth import Authenticator
from splitlora_server.engine.core import ServerEngine
from splitlora_server.frames import FrameLimits
from splitlora_server.generation.compute import bytes_per_position
from splitlora_server.generation.scheduler import GenerationScheduler
from splitlora_server.generation.service import SplitGenerationService
from splitlora_server.generation.sessions import SessionStore
from splitlora_server.generation.validation import ValidationBook


@dataclass
class GenerationParts:
    """Generation on one server."""

    store: SessionStore
    scheduler: GenerationScheduler
    service: SplitGenerationService
    validation: ValidationBook

    def add_to(self, server: grpc.Server) -> None:
        """Serve SplitGeneration on `server`."""
        ggrpc.add_SplitGenerationServicer_to_server(self.service, server)

    def status_fields(self) -> dict[str, Any]:
        """The StatusReply fields of generation and validation."""
        sessions, cache = self.store.totals()
        rnd, loss = self.validation.latest()
        return {"generation_sessions": sessions, "generation_cache_bytes": cache,
                "generation_tokens": self.store.tokens_computed, "validation_round": rnd, "validation_loss": loss}

    def collector(self) -> Collector:
        """Prometheus metrics of generation and validation."""
        return _GenerationCollector(self)


class _GenerationCollector(Collector):
    def __init__(self, parts: GenerationParts) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        fields = self.parts.status_fields()
        yield GaugeMetricFamily("splitlora_generation_sessions", "Open inference sessions.",
                                value=fields["generation_sessions"])
        yield GaugeMetricFamily("splitlora_generation_cache_bytes", "Bytes the sessions' key/value caches hold.",
                                value=fields["generation_cache_bytes"])
        yield CounterMetricFamily("splitlora_generation_tokens", "Positions computed for generation.",
                                  value=fields["generation_tokens"])
        yield CounterMetricFamily("splitlora_generation_sessions_opened", "Inference sessions opened.",
                                  value=self.parts.store.opened_total)
        if not math.isnan(fields["validation_loss"]):
            yield GaugeMetricFamily("splitlora_validation_loss", "Sample-weighted validation loss of the clients "
                                    "in the newest round with one.", value=fields["validation_loss"])
            yield GaugeMetricFamily("splitlora_validation_round", "Round of splitlora_validation_loss.",
                                    value=fields["validation_round"])


def build_generation(cfg: Any, engine: ServerEngine, limits: FrameLimits, auth: Authenticator,
                     fingerprint: spb.Fingerprint, fingerprints: dict[int, spb.Fingerprint] | None = None
                     ) -> GenerationParts:
    """Generation for a server of `cfg` (a ServeConfig) on `engine`; score batches obey `limits` (the training
    frames' limits, with room for --generation-max-batch rows). `fingerprints`: one per split layer clients may
    have (per-client split points); each client's requests run from its own split layer."""
    store = SessionStore(cfg, bytes_per_position(engine.part), limits.max_positions)
    scheduler = GenerationScheduler(engine, cfg.generation_batching, cfg.generation_priority == "training")
    score_limits = FrameLimits(limits.hidden_size, limits.vocab_size, max(limits.max_batch, cfg.generation_max_batch),
                               limits.max_seq_len, limits.max_positions)
    validation = ValidationBook()
    service = SplitGenerationService(scheduler, store, score_limits, cfg.codecs, cfg.chunk_bytes,
                                     cfg.max_message_bytes, auth, validation=validation, fingerprint=fingerprint,
                                     fingerprints=fingerprints)
    return GenerationParts(store, scheduler, service, validation)
