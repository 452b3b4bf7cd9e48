"""OpenTelemetry traces, exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; with neither, nothing here runs (no SDK, no
instrumentation, no cost).

What is traced: every RPC (the gRPC server interceptor, which continues a `traceparent` the client
sent: through Envoy, a REST client's header arrives as gRPC metadata), every SQL statement
(SQLAlchemy), every outgoing HTTP call (httpx: provider calls, webhook deliveries; each carries
`traceparent` onwards), and each engine step on a batch. A batch keeps the `traceparent` of the
RPC that created it (`batches.trace_parent`), so the engine's work on it, on whichever replica and
after any restart, lands in the creating request's trace. `sluice.batch_id` is an attribute of
batch RPC spans and engine spans. The standard `OTEL_*` variables (service name, sampler, headers,
timeouts) apply as the SDK reads them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.telemetry import Telemetry

BATCH_ID = "sluice.batch_id"
HEALTH = "grpc.health.v1.Health"  # Envoy's health checks, every 2 s: not worth a trace each
_PROPAGATOR = TraceContextTextMapPropagator()


def enabled() -> bool:
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
                or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip())


class TracingTelemetry(Telemetry):
    """The domain hooks that concern traces: the batch's stored trace, and engine step spans."""

    def __init__(self, provider: TracerProvider) -> None:
        self.tracer = provider.get_tracer("sluice")

    def trace_parent(self) -> str | None:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get("traceparent")

    @contextlib.contextmanager
    def batch_work(self, batch_id: str, trace_parent: str | None) -> Iterator[None]:
        parent = _PROPAGATOR.extract({"traceparent": trace_parent}) if trace_parent else None
        with self.tracer.start_as_current_span("sluice.engine.step", context=parent, kind=trace.SpanKind.INTERNAL,
                                               attributes={BATCH_ID: batch_id}):
            yield


def _batch_id(message: Any) -> str | None:
    for name in ("id", "batch_id"):
        value = getattr(message, name, None)
        if isinstance(value, str) and value.startswith("batch_"):
            return value
    return None


class BatchIdInterceptor(grpc.aio.ServerInterceptor):
    """Puts `sluice.batch_id` on the RPC's span: the request's batch id, or the created batch's.
    Runs inside OpenTelemetry's interceptor, whose span is then the current one."""

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith("/sluice.v1.BatchService/"):
            return handler
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                span = trace.get_current_span()
                if batch_id := _batch_id(request):
                    span.set_attribute(BATCH_ID, batch_id)
                response = await inner(request, context)
                if batch_id := _batch_id(response):
                    span.set_attribute(BATCH_ID, batch_id)
                return response
            return handler._replace(unary_unary=unary)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                if batch_id := _batch_id(request):
                    trace.get_current_span().set_attribute(BATCH_ID, batch_id)
                async for response in inner_stream(request, context):
                    yield response
            return handler._replace(unary_stream=stream)
        return handler


class Tracing:
    """The SDK, its exporter and the instrumentations, for one server process."""

    def __init__(self, engine: AsyncEngine) -> None:
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "").strip() or "sluice"})
        export = BatchSpanProcessor(OTLPSpanExporter())
        self.provider = TracerProvider(resource=resource)  # sampler: the OTEL_TRACES_SAMPLER variables
        self.provider.add_span_processor(export)
        # SQL statements are traced only inside a trace (an RPC, an engine step): the engine's look
        # for work every tick and the sweeper would otherwise bury everything under one-span traces.
        sql_provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_OFF), shutdown_on_exit=False)
        sql_provider.add_span_processor(export)
        trace.set_tracer_provider(self.provider)  # for log correlation and libraries; once per process
        self.telemetry = TracingTelemetry(self.provider)
        self.interceptors: list[grpc.aio.ServerInterceptor] = [
            aio_server_interceptor(tracer_provider=self.provider,  # type: ignore[no-untyped-call]
                                   filter_=filters.negate(filters.service_name(HEALTH))),
            BatchIdInterceptor()]
        self._httpx = HTTPXClientInstrumentor()
        self._httpx.instrument(tracer_provider=self.provider)
        self._sqlalchemy = SQLAlchemyInstrumentor()
        # The instrumentation declares SQLAlchemy < 2.1; it works with the 2.1 series Sluice pins
        # (tests/test_observability.py sees the SQL spans), so its version check is skipped.
        self._sqlalchemy.instrument(engine=engine.sync_engine, tracer_provider=sql_provider,
                                    enable_commenter=False, skip_dep_check=True)

    def stop(self) -> None:
        """Export what is buffered, then stop."""
        self._httpx.uninstrument()
        self._sqlalchemy.uninstrument()
        self.provider.shutdown()
