"""The hooks below the runtime, one by one: what storage reports when results are stored (once,
on both backends, even from two replicas at once), what the adapters' port reports for each
provider call, how model labels are bounded, and what the database gauges count."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from adapters.base import BatchJob, LineResult, NativeBatchAdapter, ProviderError, ProviderState, ProviderStatus
from adapters.base import RequestLine as Line
from adapters.sim import SimProvider
from service.domain import telemetry
from service.domain.model import LineOutcome, Price, ResultStatus
from service.providers.routing import ProviderEntry, Router
from service.runtime.metrics import OTHER_MODEL, Metrics, MetricsTelemetry, ModelLabels
from service.storage.db import create_engine
from service.storage.repository import Store
from service.storage.stats import batch_gauges
from service.storage.tables import BatchRow
from tests.harness import chat_line, gateway, make_settings
from tests.test_store import batch_row, failed, new_batch, ok, requests


class Recording(telemetry.Telemetry):
    counts_results = True

    def __init__(self) -> None:
        self.stored: list[tuple[str, str, int, ResultStatus]] = []
        self.calls: list[tuple[str, str, str]] = []

    def results_stored(self, provider: str, stored: Sequence[tuple[str, LineOutcome]]) -> None:
        self.stored += [(provider, model, o.index, o.status) for model, o in stored]

    def provider_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append((provider, operation, outcome))


@pytest.fixture
def recording() -> Iterator[Recording]:
    hook = Recording()
    previous = telemetry.install(hook)
    yield hook
    telemetry.install(previous)


async def test_each_stored_result_is_reported_once_with_provider_and_model(store: Store, db_url: str,
                                                                         recording: Recording) -> None:
    batch_id = await new_batch(store, 40)
    other = Store(create_engine(db_url))  # a second replica
    try:
        everything = [ok(i) for i in range(40)]
        halves = [everything[:25], everything[15:], everything, everything[::-1]]
        await asyncio.gather(*(s.store_results(batch_id, part)
                               for s, part in zip([store, other, store, other], halves, strict=True)))
        await store.store_results(batch_id, [failed(3)])  # a different outcome for a stored line: ignored
    finally:
        await other.close()
    assert sorted(index for _, _, index, _ in recording.stored) == list(range(40))
    # The lines' model as intake resolved it (requests(n) stores "sim/m"), the batch's provider.
    assert {(p, m, s) for p, m, _, s in recording.stored} == {("sim", "sim/m", ResultStatus.COMPLETED)}


async def test_nothing_is_read_for_metrics_when_they_are_off(store: Store) -> None:
    assert not telemetry.current().counts_results  # the default hook: no query for models
    batch_id = await new_batch(store, 2)
    assert await store.store_results(batch_id, [ok(0), ok(1)]) == 2


def test_model_labels_are_bounded_to_declared_models() -> None:
    sim = SimProvider("sim")
    router = Router({"sim": ProviderEntry(provider=sim),
                     "local": ProviderEntry(provider=SimProvider("local"), models={"llama3.2"},
                                            aliases={"fast": "qwen"}, prices={"priced": Price()})})
    labels = ModelLabels(router)
    assert [labels("local", m) for m in ("llama3.2", "qwen", "priced", "made-up")] == [
        "llama3.2", "qwen", "priced", OTHER_MODEL]
    assert labels("sim", "anything-a-client-sends") == OTHER_MODEL
    assert labels.provider("local") == "local" and labels.provider("gone") == OTHER_MODEL


class Native(NativeBatchAdapter):
    """A native adapter whose poll fails once (retryable), then works; cancel is refused (4xx)."""

    def __init__(self) -> None:
        super().__init__("native")
        self.polls = 0

    async def submit(self, job: BatchJob, lines: Any) -> str:
        return "pb_1"

    async def poll(self, provider_batch_id: str) -> ProviderStatus:
        self.polls += 1
        if self.polls == 1:
            raise ProviderError("busy", provider=self.name, status_code=429, retryable=True)
        return ProviderStatus(ProviderState.COMPLETED, "completed")

    async def results(self, provider_batch_id: str) -> AsyncIterator[LineResult]:
        for i in range(3):
            yield LineResult(index=i, status_code=200)

    async def send_cancel(self, provider_batch_id: str) -> None:
        raise ProviderError("already done", provider=self.name, status_code=400)


async def test_the_port_reports_every_provider_operation(recording: Recording) -> None:
    native = Native()
    native.observe_calls(recording)
    job = BatchJob("batch_x", "/v1/chat/completions", "m", "24h", 3)
    assert await native.submit(job, []) == "pb_1"
    with pytest.raises(ProviderError):
        await native.poll("pb_1")
    assert [r.index async for r in native.results("pb_1")] == [0, 1, 2]
    await native.cancel("pb_1")  # refused, then a poll says it ended: not an error for the caller
    assert recording.calls == [("native", "submit", "ok"), ("native", "poll", "retryable_error"),
                               ("native", "results", "ok"), ("native", "cancel", "error"),
                               ("native", "poll", "ok")]
    sim = SimProvider("sim")
    sim.observe_calls(recording)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    await sim.execute(Line(0, "a", "/v1/chat/completions", body))
    await sim.execute(Line(1, "b", "/v1/chat/completions", {**body, "messages": [{"role": "user",
                                                                                 "content": "SIM_FAIL"}]}))
    assert recording.calls[-2:] == [("sim", "execute", "ok"), ("sim", "execute", "error_response")]
    # Observed again (a second server on the same router): reported once, to the new observer only.
    again = Recording()
    sim.observe_calls(again)
    await sim.execute(Line(2, "c", "/v1/chat/completions", body))
    assert again.calls == [("sim", "execute", "ok")] and len(recording.calls) == 7


def test_metrics_telemetry_counts_lines_tokens_and_cost() -> None:
    metrics = Metrics()
    router = Router({"sim": ProviderEntry(provider=SimProvider("sim"), models={"m"})})
    hook = MetricsTelemetry(metrics, ModelLabels(router))
    priced = Price(input_per_mtok=1.0, output_per_mtok=2.0, batch_discount=0.0)
    done, fail = ok(0, tokens=10), failed(1)
    usage = priced.cost(done.usage)
    done = LineOutcome(done.index, done.custom_id, done.status, 200, usage=usage)
    hook.results_stored("sim", [("m", done), ("unlisted", fail)])
    hook.retry("sim", "execute", 1.5)
    hook.webhook_attempt("delivered", 0.2)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(metrics.registry).decode()) for s in f.samples}
    assert samples[("sluice_lines_total", (("model", "m"), ("provider", "sim"), ("status", "completed")))] == 1
    assert samples[("sluice_lines_total", (("model", "other"), ("provider", "sim"), ("status", "failed")))] == 1
    assert samples[("sluice_tokens_total", (("kind", "input"), ("model", "m"), ("provider", "sim")))] == 10
    assert samples[("sluice_cost_dollars_total", (("model", "m"), ("provider", "sim")))] == pytest.approx(
        usage.total_cost)
    assert samples[("sluice_provider_retries_total", (("operation", "execute"), ("provider", "sim")))] == 1
    assert samples[("sluice_webhook_deliveries_total", (("outcome", "delivered"),))] == 1


async def test_batch_gauges_count_by_status_and_provider_waiting_and_leases(store: Store) -> None:
    mine, other = "replica-a", "replica-b"
    ids = [await new_batch(store, 1) for _ in range(4)]
    await store.create_batch(batch_row(status="completed", provider="openai"), requests(1))
    assert await store.claim(mine, 30, 1) == [ids[0]]
    assert await store.claim(other, 30, 1) == [ids[1]]
    async with store.sessions.begin() as s:  # one batch waits for a later poll: not due, not waiting
        row = await s.get(BatchRow, ids[3])
        assert row is not None
        row.next_poll_at = time.time() + 3600
    gauges = await batch_gauges(store.sessions, mine)
    assert gauges.by_status == {("validating", "sim"): 4, ("completed", "openai"): 1}
    assert (gauges.waiting, gauges.leased_here, gauges.leased) == (1, 1, 2)  # ids[2] waits


async def test_a_native_batch_counted_in_process(tmp_path: Path) -> None:
    """The engine's native path with metrics on: submit, a poll that fails and is retried after a
    back-off (`step`), a poll that succeeds, the results download, and the lines stored."""
    router = Router({"sim": ProviderEntry(provider=SimProvider("sim")),
                     "native": ProviderEntry(provider=Native(), models={"m"})})
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/db.sqlite", metrics_port=0)
    async with gateway(settings, router) as (app, c):
        created = await c.create([chat_line(f"l{i}", model="native/m") for i in range(3)])
        assert (await c.wait_for(created.id)).status == "completed"
        assert app.observability.metrics_port
        async with httpx.AsyncClient() as http:  # async: the scrape reads the database on this loop
            response = await http.get(f"http://127.0.0.1:{app.observability.metrics_port}/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(response.text) for s in f.samples}

    def calls(operation: str, outcome: str) -> float:
        key = ("sluice_provider_calls_total", (("operation", operation), ("outcome", outcome), ("provider", "native")))
        return samples.get(key, 0.0)
    assert (calls("submit", "ok"), calls("poll", "retryable_error"), calls("poll", "ok"), calls("results", "ok")) == (
        1, 1, 1, 1)
    assert samples[("sluice_provider_retries_total", (("operation", "step"), ("provider", "native")))] == 1
    assert samples[("sluice_lines_total", (("model", "m"), ("provider", "native"), ("status", "completed")))] == 3
    assert samples[("sluice_batches", (("provider", "native"), ("status", "completed")))] == 1
    assert not telemetry.current().counts_results  # stopping the server put the no-op hook back
