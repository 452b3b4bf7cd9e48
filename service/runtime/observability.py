"""Turns metrics and traces on for one server process, as configured, and off again at stop.

Metrics: `SLUICE_METRICS_PORT` (service/runtime/metrics.py). Traces: `OTEL_EXPORTER_OTLP_ENDPOINT`
(service/runtime/tracing.py). With neither, this installs nothing: no interceptor, no hook, no
thread, and the `service.domain.telemetry` hooks stay no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from service.domain import telemetry
from service.domain.model import LineOutcome
from service.domain.telemetry import Telemetry
from service.providers.routing import Router
from service.runtime import tracing
from service.runtime.config import Settings
from service.runtime.metrics import (
    BatchGaugeCollector,
    Metrics,
    MetricsInterceptor,
    MetricsServer,
    MetricsTelemetry,
    ModelLabels,
)
from service.storage.repository import Store


class _Both(Telemetry):
    """Metric hooks to the metrics, trace hooks to the tracing (either may be the no-op)."""

    def __init__(self, metrics: Telemetry, traces: Telemetry) -> None:
        self.metrics, self.traces = metrics, traces
        self.counts_results = metrics.counts_results

    def results_stored(self, provider: str, stored: Sequence[tuple[str, LineOutcome]]) -> None:
        self.metrics.results_stored(provider, stored)

    def retry(self, provider: str, operation: str, delay_seconds: float) -> None:
        self.metrics.retry(provider, operation, delay_seconds)

    def webhook_attempt(self, outcome: str, seconds: float) -> None:
        self.metrics.webhook_attempt(outcome, seconds)

    def trace_parent(self) -> str | None:
        return self.traces.trace_parent()

    @contextlib.contextmanager
    def batch_work(self, batch_id: str, trace_parent: str | None) -> Iterator[None]:
        with self.traces.batch_work(batch_id, trace_parent):
            yield


@dataclass
class Observability:
    interceptors: list[grpc.aio.ServerInterceptor] = field(default_factory=list)
    metrics: Metrics | None = None
    metrics_server: MetricsServer | None = None
    tracing: tracing.Tracing | None = None
    previous: Telemetry | None = None

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None

    def stop(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self.tracing is not None:
            self.tracing.stop()
        if self.previous is not None:
            telemetry.install(self.previous)


def start_observability(settings: Settings, store: Store, router: Router) -> Observability:
    """Call on the server's event loop, before the gRPC server is built (it takes `interceptors`)."""
    obs = Observability()
    metric_hooks: Telemetry = Telemetry()
    trace_hooks: Telemetry = Telemetry()
    if tracing.enabled():
        obs.tracing = tracing.Tracing(store.engine)
        obs.interceptors += obs.tracing.interceptors  # outermost: its span covers the metrics' work too
        trace_hooks = obs.tracing.telemetry
    if settings.metrics_port is not None:
        obs.metrics = Metrics()
        counted = MetricsTelemetry(obs.metrics, ModelLabels(router))
        metric_hooks = counted
        for entry in router.entries.values():
            entry.provider.observe_calls(counted)
        obs.metrics.registry.register(BatchGaugeCollector(store.sessions, settings.replica_id,
                                                          asyncio.get_running_loop()))
        obs.interceptors.append(MetricsInterceptor(obs.metrics))
        obs.metrics_server = MetricsServer(obs.metrics, settings.metrics_host or settings.grpc_host,
                                           settings.metrics_port)
    if obs.tracing is not None or obs.metrics is not None:
        obs.previous = telemetry.install(_Both(metric_hooks, trace_hooks))
    return obs
