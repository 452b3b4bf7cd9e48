"""The hooks through which storage and the engine report what they do to metrics and traces.

The layers below `service.runtime` must not know Prometheus or OpenTelemetry (import-linter
forbids it), yet what to count happens there: a result stored (once, however often a retry stores
it again), a back-off, a webhook attempt, a batch step. They call the process's `Telemetry`, which
does nothing unless `service.runtime` installed a real one at start (`install`): with metrics and
tracing off, each hook is one method call that returns at once.

A process-wide hook rather than a constructor argument: the servers, engine and stores of one
process share one Prometheus registry and one tracer provider anyway, and the hook keeps the
wiring out of every constructor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from service.domain.model import LineOutcome


class Telemetry:
    """No-op implementation and the interface: `service.runtime.observability` overrides it."""

    # True when `results_stored` wants to be called: the store then reads each stored line's
    # model, which it does not need otherwise.
    counts_results: bool = False

    def results_stored(self, provider: str, stored: Sequence[tuple[str, LineOutcome]]) -> None:
        """Lines whose results were stored for the first time (a retry that stores the same result
        again does not come here): `(provider model, outcome)` pairs of one provider."""

    def retry(self, provider: str, operation: str, delay_seconds: float) -> None:
        """A provider call failed in a way worth retrying; the next try is in `delay_seconds`."""

    def webhook_attempt(self, outcome: str, seconds: float) -> None:
        """One webhook POST: `delivered`, `retrying` (will be tried again) or `failed` (given up)."""

    def trace_parent(self) -> str | None:
        """The current trace as a W3C `traceparent` value, to store with a batch so that the engine's
        work on it (on any replica, after any restart) joins the trace of the request that created it."""
        return None

    @contextlib.contextmanager
    def batch_work(self, batch_id: str, trace_parent: str | None) -> Iterator[None]:
        """Around one engine step of a batch: a span in the batch's trace, with the batch id."""
        yield


_current = Telemetry()


def current() -> Telemetry:
    return _current


def install(telemetry: Telemetry) -> Telemetry:
    """Make `telemetry` the process's hook; returns the previous one (tests put it back)."""
    global _current
    previous, _current = _current, telemetry
    return previous
