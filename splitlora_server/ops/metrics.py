"""Prometheus metrics of the split server and the aggregator, read from their state at scrape time.

Collectors look at the Registry / AggregatorService when Prometheus scrapes, so the request path carries
no instrumentation. `start_metrics_server` serves them over HTTP on `--metrics-port` (0: off).
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from typing import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.redact import shown
from splitlora_server.aggregator.service import AggregatorService
from splitlora_server.refusals import RefusalBook
from splitlora_server.registry import Registry

log = logging.getLogger(__name__)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class SplitServerCollector(Collector):
    """Training progress and per-client traffic of one split server."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        reg = self.registry
        with reg.lock:
            records = sorted(reg.clients.values(), key=lambda r: r.client_id)
            rows = [(r.client_id, r.connected, r.next_step, r.tokens, r.bytes_in, r.bytes_out,
                     r.errors, r.last_loss) for r in records]
            total_steps = reg.total_steps
        yield _gauge("splitlora_rounds", "Federated rounds of this run.", reg.rounds)
        yield _gauge("splitlora_round_current", "Round in progress (0-based; equals splitlora_rounds when done).",
                     reg.coordinator.current_round())
        yield _gauge("splitlora_training_finished", "1 once every client finished the last round.",
                     float(reg.coordinator.finished.is_set()))
        yield _gauge("splitlora_clients_expected", "Clients expected in each round.", reg.expected)
        yield _gauge("splitlora_clients_joined", "Clients that have joined.", len(rows))
        yield _gauge("splitlora_clients_connected", "Clients with an open training stream.",
                     sum(1 for row in rows if row[1]))
        yield _counter("splitlora_steps", "Client steps the server has computed.", total_steps)
        yield _gauge("splitlora_steps_per_second", "Steps per second since the server started.",
                     reg.steps_per_second())
        families = {
            "connected": GaugeMetricFamily("splitlora_client_connected", "1 while the client's stream is open.",
                                           labels=["client"]),
            "steps": CounterMetricFamily("splitlora_client_steps", "Steps of the client.", labels=["client"]),
            "tokens": CounterMetricFamily("splitlora_client_tokens", "Target tokens of the client's steps.",
                                          labels=["client"]),
            "received": CounterMetricFamily("splitlora_client_received_bytes", "Bytes received from the client.",
                                            labels=["client"]),
            "sent": CounterMetricFamily("splitlora_client_sent_bytes", "Bytes sent to the client.",
                                        labels=["client"]),
            "errors": CounterMetricFamily("splitlora_client_errors", "Refused frames and failed steps.",
                                          labels=["client"]),
            "loss": GaugeMetricFamily("splitlora_client_loss", "Loss of the client's last step.", labels=["client"]),
        }
        for cid, connected, steps, tokens, received, sent, errors, loss in rows:
            for key, value in (("connected", float(connected)), ("steps", steps), ("tokens", tokens),
                               ("received", received), ("sent", sent), ("errors", errors)):
                families[key].add_metric([cid], value)
            if not math.isnan(loss):
                families["loss"].add_metric([cid], loss)
        yield from families.values()


class AggregatorCollector(Collector):
    """Round progress and submissions of one aggregator."""

    def __init__(self, aggregator: AggregatorService) -> None:
        self.aggregator = aggregator

    def collect(self) -> Iterator[Metric]:
        agg = self.aggregator
        open_round = agg.open_round
        yield _gauge("splitlora_aggregator_rounds", "Federated rounds of this run.", agg.rounds)
        yield _gauge("splitlora_aggregator_open_round", "Round accepting submissions (equals rounds when done).",
                     open_round)
        yield _counter("splitlora_aggregator_rounds_closed", "Rounds averaged and published.", open_round)
        yield _gauge("splitlora_aggregator_clients_expected", "Clients expected in each round.",
                     agg.expected_clients)
        yield _counter("splitlora_aggregator_submissions", "Client adapters accepted.",
                       agg.submissions)
        yield _counter("splitlora_aggregator_refusals", "Client submissions or fetches refused.",
                       agg.refusals)
        yield _counter("splitlora_aggregator_received_bytes", "Adapter bytes received from clients.",
                       agg.bytes_received)
        yield _counter("splitlora_aggregator_fetches", "Global adapters downloaded by clients.",
                       sum(len(agg.fetched(r)) for r in range(min(open_round, agg.rounds))))


class RefusalCollector(Collector):
    """Refused calls by caller and reason (splitlora_server.refusals): the limits, when they trigger."""

    def __init__(self, refusals: RefusalBook) -> None:
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        counts, incidents = self.refusals.snapshot()
        family = CounterMetricFamily("splitlora_refusals", "Calls refused, by caller and reason.",
                                     labels=["caller", "reason"])
        for (caller, reason), n in sorted(counts.items()):
            family.add_metric([shown(caller, 64), reason], n)
        yield family
        yield _counter("splitlora_incidents", "Notable events (e.g. a round kept its previous global adapter).",
                       len(incidents))


@dataclass
class MetricsServer:
    """A running metrics endpoint."""

    httpd: WSGIServer
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def start_metrics_server(host: str, port: int, *collectors: Collector) -> MetricsServer:
    """Serve `collectors` (and nothing else) at http://host:port/metrics; port 0 picks a free port."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise ValueError(f"cannot serve metrics on {host}:{port}: {err.strerror or err}; "
                         "choose another --metrics-port") from err
    server = MetricsServer(httpd, thread, httpd.server_port)
    log.info("Prometheus metrics on http://%s:%d/metrics", host, server.port)
    return server


def metrics_for(host: str, port: int, registry: Registry | None = None,
                aggregator: AggregatorService | None = None, refusals: RefusalBook | None = None,
                *more: Collector | None) -> MetricsServer | None:
    """The `--metrics-port` option: None when 0 (off), else an endpoint for the given server parts."""
    if not port:
        return None
    collectors: list[Collector] = []
    if registry is not None:
        collectors.append(SplitServerCollector(registry))
    if aggregator is not None:
        collectors.append(AggregatorCollector(aggregator))
    if refusals is not None:
        collectors.append(RefusalCollector(refusals))
    collectors.extend(c for c in more if c is not None)
    return start_metrics_server(host, port, *collectors)
