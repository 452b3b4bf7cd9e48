"""Prometheus metrics: what they are, where they are collected, and the admin HTTP server.

Everything here is off unless `SLUICE_METRICS_PORT` is set (`service/runtime/observability.py`
turns it on). Sources:

- RPCs: `MetricsInterceptor`, a grpc.aio server interceptor (every RPC, its code and latency; the
  bytes of file uploads and downloads). Names and labels are go-grpc-prometheus's
  (`grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}`...), so existing
  dashboards work.
- Lines, tokens, cost, retries, webhook attempts: `MetricsTelemetry`, the `service.domain.telemetry`
  hook that storage and the engine call. Lines are counted when their result is stored for the
  first time, so a retried store never counts twice.
- Provider calls: `Provider.observe_calls` (the adapters' port) reports each operation.
- Batches by status and provider, batches waiting, leases: `BatchGaugeCollector` reads the shared
  database at scrape time, so the values are right whichever replica is scraped (they are the same
  on every replica: aggregate them with `max`, not `sum`; `sluice_engine_leases_held` is this
  replica's own).

Label values are bounded: methods and codes come from the contract, providers from the providers
file, models from each provider's declared models (any other model is `other`), never a batch id
or a custom_id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from service.domain.model import LineOutcome
from service.domain.telemetry import Telemetry
from service.providers.registry import ConfigError
from service.providers.routing import Router
from service.storage.db import Sessions
from service.storage.stats import batch_gauges

log = logging.getLogger(__name__)

OTHER_MODEL = "other"
# Seconds: from a cached GetBatch (milliseconds) to a 200 MB upload or a provider's results download.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BACKOFF_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SCRAPE_DB_TIMEOUT = 10.0


class Metrics:
    """Every metric Sluice exports, in one registry of its own (plus the process, platform and GC
    collectors of prometheus_client)."""

    def __init__(self) -> None:
        # No `*_created` series: they double a scrape for nothing Prometheus uses.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        rpc = ["grpc_type", "grpc_service", "grpc_method"]
        self.rpc_started = Counter("grpc_server_started_total", "RPCs started on the server.", rpc, registry=r)
        self.rpc_handled = Counter("grpc_server_handled_total", "RPCs completed on the server, by gRPC status code.",
                                   [*rpc, "grpc_code"], registry=r)
        self.rpc_seconds = Histogram("grpc_server_handling_seconds", "Time from the start of an RPC to its end.",
                                     rpc, buckets=LATENCY_BUCKETS, registry=r)
        self.lines = Counter("sluice_lines_total", "Request lines whose result was stored, by result status "
                             "(completed, failed, cancelled, expired).", ["provider", "model", "status"], registry=r)
        self.tokens = Counter("sluice_tokens_total", "Tokens of stored results, by kind (input, output, cached, "
                              "reasoning; cached and reasoning are parts of input and output).",
                              ["provider", "model", "kind"], registry=r)
        self.cost = Counter("sluice_cost_dollars_total", "Cost of stored results in US dollars, at the configured "
                            "prices with the batch discount.", ["provider", "model"], registry=r)
        self.provider_calls = Counter("sluice_provider_calls_total", "Calls into providers by operation and "
                                      "outcome (ok, retryable_error, error, exception).",
                                      ["provider", "operation", "outcome"], registry=r)
        self.provider_seconds = Histogram("sluice_provider_call_duration_seconds", "Duration of calls into "
                                          "providers (results: the whole download).", ["provider", "operation"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.retries = Counter("sluice_provider_retries_total", "Provider failures that will be retried after a "
                               "back-off (operation: execute for a line, step for a native batch step).",
                               ["provider", "operation"], registry=r)
        self.backoff = Histogram("sluice_provider_backoff_seconds", "Back-off chosen before the next try.",
                                 ["provider", "operation"], buckets=BACKOFF_BUCKETS, registry=r)
        self.upload_bytes = Counter("sluice_file_upload_bytes_total", "Request body bytes received by UploadFile "
                                    "(POST /v1/files: the whole multipart form), refused uploads included.",
                                    registry=r)
        self.download_bytes = Counter("sluice_file_download_bytes_total", "Bytes sent by GetFileContent "
                                      "(GET /v1/files/{id}/content).", registry=r)
        self.webhooks = Counter("sluice_webhook_deliveries_total", "Webhook POST attempts by outcome (delivered, "
                                "retrying, failed: given up).", ["outcome"], registry=r)
        self.webhook_seconds = Histogram("sluice_webhook_delivery_duration_seconds", "Duration of webhook POST "
                                         "attempts.", buckets=LATENCY_BUCKETS, registry=r)


class ModelLabels:
    """A model's label value: itself if its provider declares it (models, aliases or prices in the
    providers file), else `other`, so a client cannot mint new series with made-up model names."""

    def __init__(self, router: Router) -> None:
        self.known = {name: {*entry.models, *entry.aliases.values(), *entry.prices}
                      for name, entry in router.entries.items()}

    def __call__(self, provider: str, model: str) -> str:
        return model if model in self.known.get(provider, ()) else OTHER_MODEL

    def provider(self, provider: str) -> str:
        return provider if provider in self.known else OTHER_MODEL


class MetricsTelemetry(Telemetry):
    """The domain hooks, counted."""

    counts_results = True

    def __init__(self, metrics: Metrics, labels: ModelLabels) -> None:
        self.metrics = metrics
        self.labels = labels

    def results_stored(self, provider: str, stored: Sequence[tuple[str, LineOutcome]]) -> None:
        m, provider_label = self.metrics, self.labels.provider(provider)
        for model, outcome in stored:
            model_label = self.labels(provider, model)
            m.lines.labels(provider_label, model_label, outcome.status.value).inc()
            usage = outcome.usage
            for kind, tokens in (("input", usage.input_tokens), ("output", usage.output_tokens),
                                 ("cached", usage.cached_tokens), ("reasoning", usage.reasoning_tokens)):
                if tokens:
                    m.tokens.labels(provider_label, model_label, kind).inc(tokens)
            if usage.total_cost:
                m.cost.labels(provider_label, model_label).inc(usage.total_cost)

    def retry(self, provider: str, operation: str, delay_seconds: float) -> None:
        provider = self.labels.provider(provider)
        self.metrics.retries.labels(provider, operation).inc()
        self.metrics.backoff.labels(provider, operation).observe(delay_seconds)

    def webhook_attempt(self, outcome: str, seconds: float) -> None:
        self.metrics.webhooks.labels(outcome).inc()
        self.metrics.webhook_seconds.observe(seconds)

    def provider_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        """`adapters.base.CallObserver`."""
        provider = self.labels.provider(provider)
        self.metrics.provider_calls.labels(provider, operation, outcome).inc()
        self.metrics.provider_seconds.labels(provider, operation).observe(seconds)


class BatchGaugeCollector:
    """Gauges read from the database at scrape time, on the server's event loop (the scrape runs in
    prometheus_client's HTTP thread and waits for it, at most `SCRAPE_DB_TIMEOUT`)."""

    def __init__(self, sessions: Sessions, replica_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.sessions = sessions
        self.replica_id = replica_id
        self.loop = loop
        self.loop_thread = threading.get_ident()  # a scrape from there would wait for itself

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; never query the database from there

    def collect(self) -> Iterable[Metric]:
        if self.loop.is_closed() or threading.get_ident() == self.loop_thread:
            return []
        try:
            future = asyncio.run_coroutine_threadsafe(batch_gauges(self.sessions, self.replica_id), self.loop)
            gauges = future.result(SCRAPE_DB_TIMEOUT)
        except Exception as exc:  # the scrape still serves every other metric
            log.warning("metrics: could not read batch counts from the database (%s: %s)", type(exc).__name__, exc)
            return []
        batches = GaugeMetricFamily("sluice_batches", "Batches in the database by status and provider "
                                    "(the same on every replica).", labels=["status", "provider"])
        for (status, provider), count in sorted(gauges.by_status.items()):
            batches.add_metric([status, provider], count)
        waiting = GaugeMetricFamily("sluice_batches_waiting", "Unfinished batches that are due and leased by no "
                                    "replica: work waiting for an engine.", value=gauges.waiting)
        held = GaugeMetricFamily("sluice_engine_leases_held", "Batches this replica's engine holds a lease on.",
                                 value=gauges.leased_here)
        leased = GaugeMetricFamily("sluice_engine_leases", "Batches leased by any replica.", value=gauges.leased)
        return [batches, waiting, held, leased]


# --- RPCs ---------------------------------------------------------------------------------------

Behavior = Callable[[Any, Any], Any]
_BYTES: dict[str, tuple[str, Callable[[Any], int]]] = {
    # method -> (which counter, bytes of one message): requests of UploadFile, responses of GetFileContent
    "/sluice.v1.FileService/UploadFile": ("upload", lambda m: len(getattr(getattr(m, "body", None), "data", b""))),
    "/sluice.v1.FileService/GetFileContent": ("download", lambda m: len(getattr(m, "data", b""))),
}


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    return {(False, False): "unary", (False, True): "server_stream", (True, False): "client_stream",
            (True, True): "bidi_stream"}[(bool(handler.request_streaming), bool(handler.response_streaming))]


def _code(context: Any, exc: BaseException | None) -> str:
    """The RPC's status code name: what the servicer set or aborted with; UNKNOWN for an exception
    that escaped (grpc reports those as UNKNOWN); CANCELLED if the client went away."""
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    try:
        code = context.code()
    except Exception:
        code = None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN" if exc is not None and not isinstance(exc, grpc.aio.AbortError) else "OK"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED; no label for made-up names
            return None
        full = str(details.method)
        service, _, method = full.lstrip("/").rpartition("/")
        labels = (_rpc_type(handler), service, method)
        counter = self._bytes_counter(full)
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, labels, None))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, labels, counter))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._stream(handler.unary_stream, labels, counter))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, labels, None))
        return handler

    def _bytes_counter(self, method: str) -> Callable[[Any], None] | None:
        if method not in _BYTES:
            return None
        which, size = _BYTES[method]
        counter = self.metrics.upload_bytes if which == "upload" else self.metrics.download_bytes

        def count(message: Any) -> None:
            try:
                counter.inc(size(message))
            except Exception:  # an undecodable message has no bytes to count
                pass
        return count

    def _done(self, labels: tuple[str, str, str], context: Any, exc: BaseException | None, seconds: float) -> None:
        self.metrics.rpc_handled.labels(*labels, _code(context, exc)).inc()
        self.metrics.rpc_seconds.labels(*labels).observe(seconds)

    def _unary(self, behavior: Behavior, labels: tuple[str, str, str],
               count_request: Callable[[Any], None] | None) -> Behavior:
        async def unary(request: Any, context: Any) -> Any:
            self.metrics.rpc_started.labels(*labels).inc()
            started = asyncio.get_running_loop().time()
            if count_request is not None and hasattr(request, "__aiter__"):
                request = _counted(request, count_request)
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                self._done(labels, context, exc, asyncio.get_running_loop().time() - started)
                raise
            self._done(labels, context, None, asyncio.get_running_loop().time() - started)
            return response
        return unary

    def _stream(self, behavior: Behavior, labels: tuple[str, str, str],
                count_response: Callable[[Any], None] | None) -> Behavior:
        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            self.metrics.rpc_started.labels(*labels).inc()
            started = asyncio.get_running_loop().time()
            try:
                async for response in behavior(request, context):
                    if count_response is not None:
                        count_response(response)
                    yield response
            except BaseException as exc:
                self._done(labels, context, exc, asyncio.get_running_loop().time() - started)
                raise
            self._done(labels, context, None, asyncio.get_running_loop().time() - started)
        return stream


async def _counted(messages: AsyncIterator[Any], count: Callable[[Any], None]) -> AsyncIterator[Any]:
    async for message in messages:
        count(message)
        yield message


class MetricsServer:
    """The admin HTTP server: `GET /metrics` (any path, as prometheus_client serves it), in a thread."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        try:
            self.httpd, self.thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror}): "
                              "set SLUICE_METRICS_PORT to a free port") from None
        self.port: int = self.httpd.server_port

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)
