"""The engine's promises, driven step by step: an `Engine` against a real `Store` on a temporary
SQLite file and fake providers that subclass the real port (adapters/base.py), with no gRPC and no
HTTP. Each test makes one step happen (`step`: claim the batch, drive it once, read it back) and
checks what a caller or operator relies on: statuses, counts, stored results, which provider calls
were made and how often, the backoff chosen, the errors recorded. A batch runs as parts (one
provider batch each, or the lines Sluice runs itself on one provider): most tests have one part,
the last section batches of several, each part advancing and ending on its own.

These are the fast tests `make mutation` runs against `service/engine/engine.py` (docs/mutation.md);
they run in `make test` too. SQLite only: the engine's logic is the same on both backends, and the
store's own tests (test_store.py) cover PostgreSQL. Time is moved, never waited for: a batch's
`expires_at` is moved (`move_expiry`) and `next_poll_at` is read back instead of slept through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from adapters.base import (
    BatchErrorItem,
    BatchJob,
    LineError,
    LineExecutor,
    LineResult,
    NativeBatchAdapter,
    ProviderError,
    ProviderState,
    ProviderStatus,
    RequestLine,
    TokenUsage,
)
from service.domain import telemetry
from service.domain.model import BatchError, BatchStatus, LineOutcome, Price, ResultStatus, Usage, now
from service.engine import engine as engine_module
from service.engine.capacity import Capacity, Ticket
from service.engine.engine import EXECUTOR_RETRIES, UNROUTABLE_RETRY_SECONDS, Engine, EngineSettings
from service.providers.routing import ProviderEntry, Router
from service.storage.db import create_engine
from service.storage.repository import NewPart, NewRequest, OutputFileIds, Store, new_id
from service.storage.tables import BatchRow, PartRow
from tests.harness import move_expiry, until

REPLICA = "replica-under-test"
PROVIDER_MODEL = "m-prov"
# Two prices, so a result priced with the wrong model's price shows.
PRICE = Price(input_per_mtok=2.0, output_per_mtok=8.0, batch_discount=0.5)
ROUTED_PRICE = Price(input_per_mtok=3.0, output_per_mtok=12.0, batch_discount=0.25)
DEFAULT_PRICE = Price(input_per_mtok=100.0, output_per_mtok=400.0, batch_discount=0.0)
TOKENS = TokenUsage(input_tokens=10, cached_tokens=2, output_tokens=4, reasoning_tokens=1)


# --------------------------------------------------------------------------- fakes


def answer(line: RequestLine, status_code: int = 200) -> LineResult:
    """A provider's answer to one line, recognisable by its line."""
    return LineResult(index=line.index, status_code=status_code, usage=TOKENS, request_id=f"req-{line.index}",
                      body={"echo": line.custom_id, "model": line.body["model"]})


Step = LineResult | BaseException | Callable[[RequestLine], Awaitable[LineResult]]


class FakeExecutor(LineExecutor):
    """A line executor whose answers are scripted per custom_id (a result, an exception to raise, or
    a coroutine to run); unscripted lines succeed. Records every call."""

    kind = "fake-executor"

    def __init__(self, name: str = "exec", concurrency: int = 4) -> None:
        super().__init__(name)
        self.concurrency = concurrency
        self.calls: list[RequestLine] = []
        self.script: dict[str, list[Step]] = {}

    async def execute(self, line: RequestLine) -> LineResult:
        self.calls.append(line)
        plan = self.script.get(line.custom_id)
        if not plan:
            return answer(line)
        step = plan.pop(0)
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, LineResult):
            return step
        return await step(line)

    def executed(self) -> list[str]:
        return [line.custom_id for line in self.calls]


class FakeNative(NativeBatchAdapter):
    """A native batch API whose answers are scripted: `polls` (each poll takes the next one; the
    last repeats; an exception is raised), `outputs` (what `results` returns), `found` (what
    `find_submitted` answers), `failures` (method name -> exception raised on its next call).
    Records every call as (method, argument)."""

    kind = "fake-native"

    def __init__(self, name: str = "native") -> None:
        super().__init__(name)
        self.calls: list[tuple[str, str]] = []
        self.jobs: list[BatchJob] = []
        self.sent_lines: list[RequestLine] = []
        self.find_args: list[tuple[str, BatchJob | None, int | None]] = []
        self.polls: list[ProviderStatus | BaseException] = [status(ProviderState.IN_PROGRESS)]
        self.outputs: list[LineResult] = []
        self.found: str | None = None
        self.failures: dict[str, BaseException] = {}
        self.provider_id = "pb_1"
        self.on_poll: Callable[[], Awaitable[None]] | None = None
        self.on_results: Callable[[], Awaitable[None]] | None = None

    def _fail(self, method: str) -> None:
        if method in self.failures:
            raise self.failures.pop(method)

    def called(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)

    async def find_submitted(self, batch_id: str, job: BatchJob | None = None,
                             since: int | None = None) -> str | None:
        self.calls.append(("find_submitted", batch_id))
        self.find_args.append((batch_id, job, since))
        self._fail("find_submitted")
        return self.found

    async def submit(self, job: BatchJob, lines: AsyncIterable[RequestLine]) -> str:
        self.calls.append(("submit", job.batch_id))
        self._fail("submit")
        self.jobs.append(job)
        self.sent_lines.extend([line async for line in lines])
        return self.provider_id

    async def poll(self, provider_batch_id: str) -> ProviderStatus:
        self.calls.append(("poll", provider_batch_id))
        if self.on_poll is not None:
            await self.on_poll()
        self._fail("poll")
        state = self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]
        if isinstance(state, BaseException):
            raise state
        return state

    async def results(self, provider_batch_id: str) -> AsyncIterator[LineResult]:
        self.calls.append(("results", provider_batch_id))
        if self.on_results is not None:
            await self.on_results()
        self._fail("results")
        for result in self.outputs:
            yield result

    async def send_cancel(self, provider_batch_id: str) -> None:
        self.calls.append(("cancel", provider_batch_id))
        self._fail("cancel")


def answer_once_collected(fake: FakeNative, timeout: float) -> Callable[[RequestLine], Awaitable[LineResult]]:
    """An executor line that answers only once the native part's results were collected: keeps an
    executor part running while a native part of the same batch ends."""
    async def until_collected(line: RequestLine) -> LineResult:
        async def collected() -> bool:
            return fake.called("results") == 1

        await until("the native part to be collected", collected, timeout)
        return answer(line)

    return until_collected


def status(state: ProviderState, raw: str | None = None, **counts: Any) -> ProviderStatus:
    return ProviderStatus(status=state, raw_status=raw or state.value, **counts)


def result(index: int, status_code: int = 200, error: LineError | None = None) -> LineResult:
    body = {"answer": index} if status_code else None
    return LineResult(index=index, status_code=status_code, body=body, error=error, usage=TOKENS,
                      request_id=f"req-{index}")


@dataclass
class RecordingFinalizer:
    """Stands in for the output-file writer: records the batch it saw and returns known file ids."""

    seen: list[tuple[str, BatchStatus]] = field(default_factory=list)

    async def __call__(self, batch: BatchRow) -> OutputFileIds:
        self.seen.append((batch.id, batch.status))
        return OutputFileIds(output_file_id=f"out-{batch.id}", error_file_id=f"err-{batch.id}")


class HalfRandom:
    """`random` for the backoff: `uniform(a, b)` is a quarter of the way, so delays are exact."""

    @staticmethod
    def uniform(a: float, b: float) -> float:
        return a + (b - a) * 0.25


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def store(tmp_path: Path, sqlite_template: Path) -> AsyncIterator[Store]:
    """SQLite only, from the migrated template (tests/databases.py): copying takes a millisecond,
    migrating most of a second, and mutation testing runs these tests many times."""
    path = tmp_path / "engine.db"
    shutil.copyfile(sqlite_template, path)
    s = Store(create_engine(f"sqlite+aiosqlite:///{path}"))
    try:
        yield s
    finally:
        await s.close()


class RecordingTelemetry(telemetry.Telemetry):
    """The process's telemetry hook (metrics, traces), recording what the engine reports."""

    def __init__(self) -> None:
        self.retries: list[tuple[str, str, float]] = []
        self.steps: list[tuple[str, str | None]] = []

    def retry(self, provider: str, operation: str, delay_seconds: float) -> None:
        self.retries.append((provider, operation, delay_seconds))

    def trace_parent(self) -> str | None:
        return TRACE_PARENT

    @contextlib.contextmanager
    def batch_work(self, batch_id: str, trace_parent: str | None) -> Iterator[None]:
        self.steps.append((batch_id, trace_parent))
        yield


TRACE_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(autouse=True)
def hooks() -> Iterator[RecordingTelemetry]:
    recorder = RecordingTelemetry()
    previous = telemetry.install(recorder)
    try:
        yield recorder
    finally:
        telemetry.install(previous)


@pytest.fixture(autouse=True)
def exact_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "random", HalfRandom())


@pytest.fixture(autouse=True)
def engine_log(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture the engine's log from INFO up, and check that every line it wrote can be read (a
    line whose arguments do not fit its format is lost to the operator)."""
    caplog.set_level(logging.INFO, logger=engine_module.__name__)
    yield
    messages(caplog)


def settings(**overrides: Any) -> EngineSettings:
    values: dict[str, Any] = {"replica_id": REPLICA, "tick_seconds": 0.05, "lease_seconds": 30.0,
                              "poll_seconds": 5.0, "max_backoff_seconds": 300.0, "expiry_grace_seconds": 7200.0}
    return EngineSettings(**{**values, **overrides})


def make_engine(store: Store, *providers: Any, finalizer: RecordingFinalizer | None = None,
                capacity: Capacity | None = None, **overrides: Any) -> Engine:
    router = Router({p.name: ProviderEntry(provider=p, models={"m"}, default_price=DEFAULT_PRICE,
                                           prices={PROVIDER_MODEL: PRICE, "m": ROUTED_PRICE}) for p in providers})
    return Engine(store, router, settings(**overrides), finalizer or RecordingFinalizer(), capacity)


async def add_batch(store: Store, provider: str, n: int = 3, *, provider_model: str | None = PROVIDER_MODEL,
                    line_provider: bool = True, **fields: Any) -> str:
    """A batch of `n` chat lines (custom ids c0, c1, ...) for `provider`, as intake stores it: one
    part. `line_provider=False`: lines stored before they named their provider (migration 0005)."""
    return await add_parts_batch(store, [(provider, n)], provider_model=provider_model,
                                 line_provider=line_provider, **fields)


async def add_parts_batch(store: Store, parts: Sequence[tuple[str, int]], *,
                          provider_model: str | None = PROVIDER_MODEL, line_provider: bool = True,
                          **fields: Any) -> str:
    """A batch in parts, as intake splits one: part k has the next `parts[k][1]` lines (custom ids
    c0, c1, ... across the batch, so a line's index is batch-wide) for provider `parts[k][0]`."""
    first = parts[0][0]
    row = BatchRow.new(id=new_id("batch_"), project="alpha", endpoint="/v1/chat/completions",
                       completion_window="24h", created_at=now())
    row.model, row.provider, row.provider_model = f"{first}/m", first, provider_model
    for name, value in fields.items():
        setattr(row, name, value)
    lines: list[NewRequest] = []
    planned: list[NewPart] = []
    for part_no, (provider, count) in enumerate(parts):
        planned.append(NewPart(part_no, provider, provider_model, count))
        for _ in range(count):
            i = len(lines)
            lines.append(NewRequest(
                custom_id=f"c{i}", model=f"{provider}/m", provider_model=provider_model,
                provider=provider if line_provider else None, part_no=part_no,
                body={"model": f"{provider}/m", "messages": [{"role": "user", "content": f"line {i}"}]}))
    return (await store.create_batch(row, lines, planned)).id


async def step(engine: Engine, batch_id: str, *, parts_due: bool = True) -> BatchRow:
    """One step of the engine on this batch, as its loop would make it: claim, drive, release.
    `parts_due=False`: only the batch is made due; each part keeps the next look it was given."""
    if parts_due:
        await engine.store.make_due(batch_id)
    else:
        async with engine.store.sessions.begin() as s:
            await s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(next_poll_at=None))

    assert batch_id in await engine.store.claim(REPLICA, engine.settings.lease_seconds, 10)
    await engine._drive(batch_id)
    lingering = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert lingering == [], "a step left tasks running"
    return await engine.store.engine_batch(batch_id)


async def results(store: Store, batch_id: str) -> dict[str, Any]:
    """custom_id -> stored result (a plain row with ResultRow's column names)."""
    return {r.custom_id: r async for r in store.iter_results(batch_id)}


def usage_of(row: Any) -> Usage:
    return Usage(row.input_tokens, row.cached_tokens, row.output_tokens, row.reasoning_tokens,
                 row.input_cost, row.output_cost)


def statuses(found: dict[str, Any]) -> dict[str, ResultStatus]:
    return {custom_id: row.status for custom_id, row in sorted(found.items())}


def errors_of(found: dict[str, Any]) -> dict[str, tuple[str | None, str | None, str | None]]:
    return {c: (r.error_code, r.error_message, r.error_type) for c, r in sorted(found.items()) if r.error_code}


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == engine_module.__name__]


def priced(price: Price) -> Usage:
    return price.cost(Usage(TOKENS.input_tokens, TOKENS.cached_tokens, TOKENS.output_tokens,
                            TOKENS.reasoning_tokens))


def between(value: float | None, low: float, high: float) -> bool:
    return value is not None and low - 1e-6 <= value <= high + 1e-6


async def native_running(store: Store, n: int = 3, **fields: Any) -> str:
    """A native batch (one part) the provider accepted as `pb_1`, in progress."""
    batch_id = await add_batch(store, "native", n, **fields)
    await store.record_provider_batch_id(batch_id, 0, "pb_1")
    assert await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    return batch_id


def part(row: BatchRow, part_no: int = 0) -> PartRow:
    return next(p for p in row.parts if p.part_no == part_no)



# --------------------------------------------------------------------------- executor providers


async def test_an_executor_batch_runs_every_line_once_and_completes(store: Store, hooks: RecordingTelemetry) -> None:
    fx = FakeExecutor()
    finalizer = RecordingFinalizer()
    batch_id = await add_batch(store, "exec", 3)
    engine = make_engine(store, fx, finalizer=finalizer)
    done = await step(engine, batch_id)

    assert done.status is BatchStatus.COMPLETED
    assert (done.completed, done.failed, done.total) == (3, 0, 3)
    assert done.in_progress_at is not None and done.finalizing_at is not None and done.completed_at is not None
    assert sorted(fx.executed()) == ["c0", "c1", "c2"]
    line = next(c for c in fx.calls if c.custom_id == "c1")
    assert (line.index, line.url, line.body["model"]) == (1, "/v1/chat/completions", PROVIDER_MODEL)
    assert line.body["messages"] == [{"role": "user", "content": "line 1"}]
    # The output files are written once, while the batch is finalizing, and recorded on it.
    assert finalizer.seen == [(batch_id, BatchStatus.FINALIZING)]
    assert (done.output_file_id, done.error_file_id) == (f"out-{batch_id}", f"err-{batch_id}")
    assert (done.lease_owner, done.next_poll_at) == (None, None)
    assert (part(done).status, part(done).completed, part(done).failed) == (BatchStatus.COMPLETED, 3, 0)
    assert part(done).ended_at is not None
    assert engine._wake.is_set()  # after a step, the loop looks for more work at once
    assert hooks.steps == [(batch_id, TRACE_PARENT)]  # the step joins the trace of the request that made the batch
    stored = (await results(store, batch_id))["c1"]
    assert (stored.status, stored.status_code, stored.request_id) == (ResultStatus.COMPLETED, 200, "req-1")
    assert json.loads(stored.response_json or "null") == {"echo": "c1", "model": PROVIDER_MODEL}
    assert usage_of(stored) == priced(PRICE)
    assert done.usage == Usage(30, 6, 12, 3, 3 * priced(PRICE).input_cost, 3 * priced(PRICE).output_cost)


async def test_lines_stored_without_a_provider_model_are_routed_and_priced_now(store: Store) -> None:
    fx = FakeExecutor()
    batch_id = await add_batch(store, "exec", 1, provider_model=None, line_provider=False)
    await step(make_engine(store, fx), batch_id)
    assert fx.calls[0].body["model"] == "m"  # "exec/m" routed now
    assert usage_of((await results(store, batch_id))["c0"]) == priced(ROUTED_PRICE)


async def test_http_errors_and_provider_failures_are_failed_results(store: Store) -> None:
    fx = FakeExecutor()
    fx.script = {
        "c0": [lambda line: _async(answer(line, 503))],
        "c1": [ProviderError("bad request", code="invalid_thing", status_code=400)],
        "c2": [ProviderError("no answer")],
    }
    batch_id = await add_batch(store, "exec", 4)
    done = await step(make_engine(store, fx), batch_id)

    assert done.status is BatchStatus.COMPLETED
    assert (done.completed, done.failed) == (1, 3)
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.FAILED, "c1": ResultStatus.FAILED, "c2": ResultStatus.FAILED,
                               "c3": ResultStatus.COMPLETED}
    assert found["c0"].status_code == 503
    assert (found["c1"].status_code, found["c2"].status_code) == (400, 0)
    assert errors_of(found) == {"c1": ("invalid_thing", "bad request", "provider_error"),
                                "c2": ("provider_error", "no answer", "provider_error")}
    assert fx.executed().count("c1") == 1  # not retryable: asked once


async def _async(value: LineResult) -> LineResult:
    return value


async def test_retryable_failures_are_retried_with_backoff_then_kept(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                                      hooks: RecordingTelemetry) -> None:
    fx = FakeExecutor()
    flaky = ProviderError("overloaded", retryable=True, status_code=529, code="overloaded")
    fx.script = {"c0": [flaky, ProviderError("slow down", retryable=True, retry_after=2.0), flaky, flaky, flaky],
                 "c1": [flaky]}
    engine = make_engine(store, fx)
    waits: list[tuple[int, float | None, float | None]] = []

    def no_wait(failures: int, retry_after: float | None, base: float | None = None) -> float:
        waits.append((failures, retry_after, base))
        return 0.0

    monkeypatch.setattr(engine, "_backoff", no_wait)
    batch_id = await add_batch(store, "exec", 2)
    done = await step(engine, batch_id)

    assert fx.executed().count("c0") == EXECUTOR_RETRIES + 1 == 4
    assert fx.executed().count("c1") == 2  # one retry, then it answered
    assert sorted(waits) == [(0, None, 0.5), (0, None, 0.5), (1, 2.0, 0.5), (2, None, 0.5)]
    assert hooks.retries == [("exec", "execute", 0.0)] * 4  # each retry is counted, with its delay
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.FAILED, "c1": ResultStatus.COMPLETED}
    assert (found["c0"].status_code, found["c0"].error_code, found["c0"].error_message) == (529, "overloaded",
                                                                                             "overloaded")
    assert (done.status, done.completed, done.failed) == (BatchStatus.COMPLETED, 1, 1)


async def test_backoff_is_exponential_with_jitter_capped_and_never_shorter_than_asked(store: Store) -> None:
    engine = make_engine(store, poll_seconds=5.0, max_backoff_seconds=300.0)
    # delay = d/2 + uniform(0, d/2), d = min(base * 2**failures, ceiling); HalfRandom takes a quarter.
    assert engine._backoff(0, None) == 5 * 0.625
    assert engine._backoff(1, None) == 10 * 0.625
    assert engine._backoff(3, None) == 40 * 0.625
    assert engine._backoff(7, None) == 300 * 0.625  # 640 s capped at the ceiling
    assert engine._backoff(2, None, base=0.5) == 2 * 0.625
    assert engine._backoff(0, None, base=0.5) == 0.5 * 0.625  # shorter than a second, as computed
    assert engine._backoff(1, 60.0) == 60.0  # Retry-After wins when longer
    assert engine._backoff(1, 1.0) == 10 * 0.625  # and not when shorter
    assert engine._backoff(0, 0.0) == 5 * 0.625


async def test_a_cancelled_executor_batch_closes_its_unfinished_lines(store: Store) -> None:
    fx = FakeExecutor()
    finalizer = RecordingFinalizer()
    batch_id = await add_batch(store, "exec", 3)
    await store.request_cancel("alpha", batch_id)
    done = await step(make_engine(store, fx, finalizer=finalizer), batch_id)

    assert done.status is BatchStatus.CANCELLED and done.cancelled_at is not None
    assert fx.calls == []
    found = await results(store, batch_id)
    assert statuses(found) == dict.fromkeys(["c0", "c1", "c2"], ResultStatus.CANCELLED)
    assert set(errors_of(found).values()) == {
        ("batch_cancelled", "The batch was cancelled before this request ran.", "batch_error")}
    assert (done.completed, done.failed) == (0, 0)  # cancelled lines are neither
    assert finalizer.seen == [(batch_id, BatchStatus.CANCELLING)]
    assert done.output_file_id == f"out-{batch_id}"


async def test_a_cancel_during_execution_stops_it_and_keeps_what_ran(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)  # look at the batch after every line
    fx = FakeExecutor(concurrency=1)
    batch_id = await add_batch(store, "exec", 3)
    store_results = store.store_results

    async def cancel_once_c0_is_stored(batch: str, outcomes: Sequence[LineOutcome], part_no: int | None = None) -> int:
        stored = await store_results(batch, outcomes, part_no=part_no)
        if [o.custom_id for o in outcomes] == ["c0"]:
            await store.request_cancel("alpha", batch_id)
        return stored

    monkeypatch.setattr(store, "store_results", cancel_once_c0_is_stored)
    done = await step(make_engine(store, fx), batch_id)

    assert fx.executed() == ["c0"]
    assert done.status is BatchStatus.CANCELLED
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.COMPLETED, "c1": ResultStatus.CANCELLED,
                                                        "c2": ResultStatus.CANCELLED}
    assert (done.completed, done.failed) == (1, 0)
    assert not any("requests done" in m for m in messages(caplog))  # progress is logged every 10 s, not at each look


async def test_a_line_finishing_as_a_cancel_is_noticed_keeps_its_result(store: Store,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)
    fx = FakeExecutor(concurrency=2)
    batch_id = await add_batch(store, "exec", 3)
    store_results = store.store_results
    c0_stored = asyncio.Event()

    async def cancel_once_c0_is_stored(batch: str, outcomes: Sequence[LineOutcome], part_no: int | None = None) -> int:
        stored = await store_results(batch, outcomes, part_no=part_no)
        if [o.custom_id for o in outcomes] == ["c0"]:
            await store.request_cancel("alpha", batch_id)
            c0_stored.set()  # c1 answers now, while the engine reads the batch and sees the cancel
        return stored

    async def after_c0(line: RequestLine) -> LineResult:
        await c0_stored.wait()
        return answer(line)

    fx.script = {"c1": [after_c0]}
    monkeypatch.setattr(store, "store_results", cancel_once_c0_is_stored)
    done = await step(make_engine(store, fx), batch_id)
    assert (done.status, sorted(fx.executed())) == (BatchStatus.CANCELLED, ["c0", "c1"])
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.COMPLETED, "c1": ResultStatus.COMPLETED,
                                                        "c2": ResultStatus.CANCELLED}
    assert (done.completed, part(done).completed) == (2, 2)


async def test_a_cancel_is_noticed_while_a_line_hangs(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)
    fx = FakeExecutor(concurrency=1)
    batch_id = await add_batch(store, "exec", 3)
    never = asyncio.Event()

    async def cancel_then_hang(line: RequestLine) -> LineResult:
        await store.request_cancel("alpha", batch_id)
        await never.wait()
        return answer(line)

    fx.script = {"c0": [cancel_then_hang]}
    done = await step(make_engine(store, fx), batch_id)
    assert done.status is BatchStatus.CANCELLED
    # c0 never answered: it is closed with the batch, like the lines that never started.
    assert statuses(await results(store, batch_id)) == dict.fromkeys(["c0", "c1", "c2"], ResultStatus.CANCELLED)
    assert fx.executed() == ["c0"]


async def test_an_executor_batch_expires_keeping_finished_work(store: Store) -> None:
    fx = FakeExecutor()
    finalizer = RecordingFinalizer()
    batch_id = await add_batch(store, "exec", 3)
    await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    await store.store_results(batch_id, [engine_module.outcome(result(0), "c0", ResultStatus.COMPLETED, PRICE)],
                              part_no=0)
    await move_expiry(store, batch_id, now())  # the window ends now
    done = await step(make_engine(store, fx, finalizer=finalizer), batch_id)

    assert done.status is BatchStatus.EXPIRED and done.expired_at is not None
    assert fx.calls == []
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.COMPLETED, "c1": ResultStatus.EXPIRED, "c2": ResultStatus.EXPIRED}
    assert errors_of(found)["c1"] == ("batch_expired", "The batch expired before this request ran.", "batch_error")
    assert finalizer.seen == [(batch_id, BatchStatus.IN_PROGRESS)]
    assert (done.completed, done.failed) == (1, 0)
    assert (part(done).status, part(done).completed) == (BatchStatus.EXPIRED, 1)


@pytest.mark.parametrize("provider", ["exec", "native"])
async def test_no_line_starts_in_the_last_second_of_the_window(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                               provider: str) -> None:
    """The window ends at `expires_at` (whole seconds): a batch that reaches it unfinished starts
    nothing more, also in that very second (the clock is held there)."""
    fx, fake = FakeExecutor(), FakeNative()
    batch_id = await add_batch(store, provider, 2)
    expires_at = (await store.engine_batch(batch_id)).expires_at
    monkeypatch.setattr(engine_module, "now", lambda: expires_at)
    row = await step(make_engine(store, fx, fake), batch_id)
    assert (row.status, fx.calls, fake.calls) == (BatchStatus.EXPIRED, [], [])
    assert statuses(await results(store, batch_id)) == dict.fromkeys(["c0", "c1"], ResultStatus.EXPIRED)


async def test_a_validating_executor_batch_past_its_window_expires_without_running(store: Store) -> None:

    fx = FakeExecutor()
    batch_id = await add_batch(store, "exec", 2)
    await move_expiry(store, batch_id, now() - 1)
    done = await step(make_engine(store, fx), batch_id)
    assert (done.status, fx.calls, done.in_progress_at) == (BatchStatus.EXPIRED, [], None)  # never started
    assert done.expired_at is not None and part(done).status is BatchStatus.EXPIRED
    assert statuses(await results(store, batch_id)) == dict.fromkeys(["c0", "c1"], ResultStatus.EXPIRED)


async def test_a_batch_that_expires_while_running_ends_in_that_step(store: Store,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)
    fx = FakeExecutor(concurrency=1)
    batch_id = await add_batch(store, "exec", 3)

    async def expire_then_answer(line: RequestLine) -> LineResult:
        await move_expiry(store, batch_id, now())  # the window ends this very second
        return answer(line)

    fx.script = {"c0": [expire_then_answer]}
    done = await step(make_engine(store, fx), batch_id)
    assert done.status is BatchStatus.EXPIRED
    assert fx.executed() == ["c0"]  # no line starts once the window has passed
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.COMPLETED, "c1": ResultStatus.EXPIRED,
                                                        "c2": ResultStatus.EXPIRED}
    assert (done.completed, done.failed) == (1, 0)


async def test_lines_run_at_most_concurrency_at_a_time(store: Store) -> None:
    fx = FakeExecutor(concurrency=2)
    running = peak = 0

    async def slow(line: RequestLine) -> LineResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for _ in range(5):
            await asyncio.sleep(0)  # yield, so the others can start if they are allowed to
        running -= 1
        return answer(line)

    fx.script = {f"c{i}": [slow] for i in range(6)}
    batch_id = await add_batch(store, "exec", 6)
    done = await step(make_engine(store, fx), batch_id)
    assert (done.status, done.completed, peak) == (BatchStatus.COMPLETED, 6, 2)
    assert sorted(fx.executed()) == [f"c{i}" for i in range(6)]


class RecordingCapacity:
    """A shared capacity (service/engine/capacity.py's port) of one line at a time per batch, that
    records who asked and what each call reported using."""

    def __init__(self) -> None:
        self.widths: list[tuple[str, str]] = []
        self.calls: list[tuple[str, str, str]] = []
        self.used: list[int | None] = []

    async def width(self, provider: LineExecutor, project: str) -> int:
        self.widths.append((provider.name, project))
        return 1

    @contextlib.asynccontextmanager
    async def request(self, provider: LineExecutor, project: str, line: RequestLine) -> AsyncIterator[Ticket]:
        self.calls.append((provider.name, project, line.custom_id))
        ticket = Ticket()
        try:
            yield ticket
        finally:
            self.used.append(ticket.used_tokens)


async def test_executor_lines_run_within_the_shared_capacity_of_their_project(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)  # the width is asked again at every look
    capacity = RecordingCapacity()
    fx = FakeExecutor(concurrency=4)
    running = peak = 0

    async def counted(line: RequestLine) -> LineResult:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        for _ in range(5):
            await asyncio.sleep(0)
        running -= 1
        return answer(line)

    fx.script = {f"c{i}": [counted] for i in range(3)}
    batch_id = await add_batch(store, "exec", 3)
    row = await step(make_engine(store, fx, capacity=capacity), batch_id)
    assert (row.status, row.completed, peak) == (BatchStatus.COMPLETED, 3, 1)  # the capacity's width, not 4
    assert sorted(capacity.calls) == [("exec", "alpha", "c0"), ("exec", "alpha", "c1"), ("exec", "alpha", "c2")]
    assert capacity.used == [TOKENS.total_tokens] * 3  # what each call used, for the per-minute token budget
    assert len(capacity.widths) >= 2 and set(capacity.widths) == {("exec", "alpha")}


async def test_a_slow_line_does_not_hold_the_others_back(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:

    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 3600.0)  # only a finished line frees a slot
    fx = FakeExecutor(concurrency=2)
    last_started = asyncio.Event()

    async def slow(line: RequestLine) -> LineResult:
        await asyncio.wait_for(last_started.wait(), 10)  # answers only once c2 has started
        return answer(line)

    async def last(line: RequestLine) -> LineResult:
        last_started.set()
        return answer(line)

    fx.script = {"c0": [slow], "c2": [last]}
    batch_id = await add_batch(store, "exec", 3)
    done = await step(make_engine(store, fx), batch_id)
    assert (done.status, done.completed) == (BatchStatus.COMPLETED, 3)
    assert fx.executed() == ["c0", "c1", "c2"]


async def test_only_lines_without_a_result_run_again(store: Store) -> None:
    fx = FakeExecutor()
    batch_id = await add_batch(store, "exec", 3)
    await store.store_results(batch_id, [engine_module.outcome(result(1), "c1", ResultStatus.COMPLETED, PRICE)],
                              part_no=0)
    done = await step(make_engine(store, fx), batch_id)
    assert sorted(fx.executed()) == ["c0", "c2"]
    assert (done.status, done.completed, part(done).completed) == (BatchStatus.COMPLETED, 3, 3)


@pytest.mark.logs_errors("running a part failed; retrying later")
async def test_a_part_that_fails_unexpectedly_is_retried_later(store: Store,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    fx = FakeExecutor(concurrency=1)
    fx.script = {"c1": [RuntimeError("adapter bug")]}
    batch_id = await add_batch(store, "exec", 3)
    before = time.time()
    with caplog.at_level(logging.ERROR):
        row = await step(make_engine(store, fx, poll_seconds=7.0), batch_id)
    after = time.time()
    assert row.status is BatchStatus.IN_PROGRESS
    assert between(row.next_poll_at, before + 7.0, after + 7.0)
    assert row.lease_owner is None
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.COMPLETED}  # kept, not lost
    assert part(row).status is BatchStatus.IN_PROGRESS
    assert f"engine: batch {batch_id}: running a part failed; retrying later" in messages(caplog)
    logged = next(r for r in caplog.records if "running a part failed" in r.getMessage())
    assert logged.exc_info is not None and str(logged.exc_info[1]) == "adapter bug"  # with its traceback


    row = await step(make_engine(store, fx, poll_seconds=7.0), batch_id)  # c1 answers this time
    assert (row.status, row.completed) == (BatchStatus.COMPLETED, 3)


@pytest.mark.logs_errors("step failed; retrying later")
async def test_a_step_that_fails_unexpectedly_is_retried_later(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 3600.0)  # no look at the batch while lines run
    fx = FakeExecutor()
    batch_id = await add_batch(store, "exec", 2)
    engine_batch = store.engine_batch
    reads = 0

    async def second_read_fails(batch: str) -> BatchRow:
        nonlocal reads
        reads += 1
        if reads == 2:  # the read after the executor parts ran
            raise RuntimeError("database hiccup")
        return await engine_batch(batch)

    monkeypatch.setattr(store, "engine_batch", second_read_fails)
    before = time.time()
    with caplog.at_level(logging.ERROR):
        row = await step(make_engine(store, fx, poll_seconds=7.0), batch_id)
    after = time.time()
    assert (row.status, row.lease_owner, row.completed) == (BatchStatus.IN_PROGRESS, None, 2)
    assert between(row.next_poll_at, before + 7.0, after + 7.0)
    assert f"engine: batch {batch_id} step failed; retrying later" in messages(caplog)
    row = await step(make_engine(store, fx), batch_id)
    assert row.status is BatchStatus.COMPLETED and len(fx.calls) == 2  # nothing ran twice


async def test_a_batch_for_an_unconfigured_provider_waits_a_minute(store: Store,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    batch_id = await add_batch(store, "gone", 1)
    before = time.time()
    with caplog.at_level(logging.WARNING):
        row = await step(make_engine(store, FakeExecutor()), batch_id)
    after = time.time()
    assert UNROUTABLE_RETRY_SECONDS == 60.0
    assert row.status is BatchStatus.VALIDATING and row.lease_owner is None
    assert between(row.next_poll_at, before + 60.0, after + 60.0)
    assert part(row).status is BatchStatus.VALIDATING
    assert messages(caplog) == [
        f"batch {batch_id} needs provider 'gone', which is not configured now (is its API key set?); "
        "its part 0 waits until a replica that has it picks it up"]



async def test_a_step_without_the_lease_does_nothing(store: Store) -> None:
    fx = FakeExecutor()
    batch_id = await add_batch(store, "exec", 2)
    assert await store.claim("another-replica", 30.0, 10) == [batch_id]
    engine = make_engine(store, fx)
    await engine._drive(batch_id)
    row = await store.engine_batch(batch_id)
    assert (row.status, row.lease_owner, fx.calls) == (BatchStatus.VALIDATING, "another-replica", [])


async def test_a_stopping_engine_stores_what_ran_and_leaves_the_rest_for_later(store: Store) -> None:
    fx = FakeExecutor()
    finalizer = RecordingFinalizer()
    batch_id = await add_batch(store, "exec", 2)
    engine = make_engine(store, fx, finalizer=finalizer)
    engine._stopping = True
    row = await step(engine, batch_id)
    assert (row.status, row.completed, row.lease_owner) == (BatchStatus.IN_PROGRESS, 2, None)
    assert finalizer.seen == []  # the next replica to claim it finalizes it
    assert not engine._wake.is_set()  # a stopping engine looks for no more work
    row = await step(make_engine(store, fx, finalizer=finalizer), batch_id)
    assert row.status is BatchStatus.COMPLETED and len(fx.calls) == 2


async def test_progress_is_logged_while_lines_run(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)
    monkeypatch.setattr(engine_module, "PROGRESS_LOG_SECONDS", 0.0)
    fx = FakeExecutor(concurrency=1)
    fx.script = {"c0": [lambda line: _async(answer(line, 500))]}
    batch_id = await add_batch(store, "exec", 2)
    with caplog.at_level(logging.INFO):
        await step(make_engine(store, fx), batch_id)
    assert f"batch {batch_id}: 1 of 2 requests done (1 failed)" in messages(caplog)
    assert f"batch {batch_id} completed: 1 completed, 1 failed of 2" in messages(caplog)


async def test_progress_is_not_logged_at_every_look(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)  # look at the batch all the time
    batch_id = await add_batch(store, "exec", 1)
    looks = 0
    engine_batch = store.engine_batch

    async def counted(batch: str) -> BatchRow:
        nonlocal looks
        looks += 1
        return await engine_batch(batch)

    monkeypatch.setattr(store, "engine_batch", counted)
    fx = FakeExecutor()

    async def after_three_looks(line: RequestLine) -> LineResult:
        start = looks

        async def looked() -> bool:
            return looks >= start + 3

        await until("the engine to look at the batch three times", looked, 10)
        return answer(line)

    fx.script = {"c0": [after_three_looks]}
    done = await step(make_engine(store, fx), batch_id)
    assert done.status is BatchStatus.COMPLETED
    assert not any("requests done" in m for m in messages(caplog))  # once every PROGRESS_LOG_SECONDS (10 s)


async def test_a_long_step_renews_its_lease_and_says_when_it_lost_it(store: Store,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    fx = FakeExecutor()
    batch_id = await add_batch(store, "exec", 1)
    lease = 1.5  # renewed every half second
    claimed: float | None = None

    async def held_until_renewed_then_stolen(line: RequestLine) -> LineResult:
        async def renewed() -> bool:
            lease_until = (await store.engine_batch(batch_id)).lease_until
            assert lease_until is not None and lease_until > time.time(), "the lease ran out during the step"
            assert not any("lost the lease" in m for m in messages(caplog))
            return claimed is not None and lease_until > claimed + 0.1

        await until("the lease to be renewed", renewed, 10)
        async with store.sessions.begin() as s:
            (await s.get(BatchRow, batch_id)).lease_owner = "thief"  # type: ignore[union-attr]

        async def warned() -> bool:
            return f"engine: lost the lease on {batch_id}" in messages(caplog)

        await until("a warning about the lost lease", warned, 10)
        return answer(line)

    fx.script = {"c0": [held_until_renewed_then_stolen]}
    await store.make_due(batch_id)
    assert await store.claim(REPLICA, lease, 10) == [batch_id]
    claimed = (await store.engine_batch(batch_id)).lease_until
    await make_engine(store, fx, lease_seconds=lease)._drive(batch_id)
    assert (await store.engine_batch(batch_id)).lease_owner == "thief"  # its release touched no one else's lease


@pytest.mark.logs_errors("claiming work failed")
async def test_the_loop_survives_a_failed_claim(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    fx = FakeExecutor()
    batch_id = await add_batch(store, "exec", 1)
    real_claim = store.claim
    attempts: list[int] = []

    async def flaky_claim(owner: str, lease_seconds: float, limit: int) -> list[str]:
        attempts.append(limit)
        if len(attempts) == 1:
            raise RuntimeError("database hiccup")
        return await real_claim(owner, lease_seconds, limit)

    monkeypatch.setattr(store, "claim", flaky_claim)
    engine = make_engine(store, fx, tick_seconds=0.02, max_parallel_batches=3)
    engine.start()
    try:
        async def completed() -> bool:
            return (await store.engine_batch(batch_id)).status is BatchStatus.COMPLETED

        await until("the batch to complete after a failed claim", completed, 10)
    finally:
        await engine.stop()
    assert attempts[:2] == [3, 3]  # every free slot, at every tick
    assert "engine: claiming work failed; retrying at the next tick" in messages(caplog)


async def test_a_step_whose_lease_cannot_be_handed_back_still_ends(store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The database failing at the very end of a step: the lease then simply runs out (another
    replica takes over after lease_seconds); the step itself ends cleanly and is forgotten."""
    batch_id = await add_batch(store, "exec", 1)

    async def broken_release(batch: str, owner: str, next_poll_at: float | None = None) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(store, "release", broken_release)
    engine = make_engine(store, FakeExecutor())
    engine._running[batch_id] = asyncio.current_task()  # type: ignore[assignment]
    row = await step(engine, batch_id)
    assert row.status is BatchStatus.COMPLETED and row.lease_owner == REPLICA
    assert engine._running == {}


# --------------------------------------------------------------------------- the loop


async def test_the_loop_claims_drives_and_stops_handing_leases_back(store: Store) -> None:
    fx = FakeExecutor()
    release = asyncio.Event()

    async def blocked(line: RequestLine) -> LineResult:
        await release.wait()
        return answer(line)

    fx.script = {"c0": [blocked]}
    held = await add_batch(store, "exec", 1)
    engine = make_engine(store, fx, tick_seconds=0.02, max_parallel_batches=2)
    engine.start()
    try:
        async def started() -> bool:
            return fx.executed() == ["c0"]

        await until("the first batch's line to start", started, 10)
        # A slot is free: a batch created now runs while the first one is still busy.
        other = await add_batch(store, "exec", 2)
        engine.wake()

        async def completed() -> bool:
            return (await store.engine_batch(other)).status is BatchStatus.COMPLETED

        await until("the second batch to complete", completed, 10)
    finally:
        await engine.stop(grace_seconds=0.05)
    row = await store.engine_batch(held)
    assert (row.status, row.completed) == (BatchStatus.IN_PROGRESS, 0)
    assert row.lease_owner is None  # handed back at once: another replica may take it now
    assert engine._running == {}


async def test_stop_cancels_a_step_stuck_at_the_provider_after_the_grace(store: Store) -> None:
    fake = FakeNative()
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()

    fake.on_poll = stuck
    batch_id = await native_running(store, 1)
    engine = make_engine(store, fake, tick_seconds=0.02)
    engine.start()
    try:
        async def polling() -> bool:
            return fake.called("poll") == 1

        await until("the step to reach the provider", polling, 10)
    finally:
        await engine.stop(grace_seconds=0.05)
    row = await store.engine_batch(batch_id)
    assert (row.status, row.lease_owner, engine._running) == (BatchStatus.IN_PROGRESS, None, {})


async def test_stop_ends_a_loop_waiting_on_the_database(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shutdown while the loop waits for a claim (a slow database) cancels it and returns."""
    claiming = asyncio.Event()

    async def slow_claim(owner: str, lease_seconds: float, limit: int) -> list[str]:
        claiming.set()
        await asyncio.Event().wait()
        return []

    monkeypatch.setattr(store, "claim", slow_claim)
    engine = make_engine(store, FakeExecutor(), tick_seconds=0.02)
    engine.start()
    await asyncio.wait_for(claiming.wait(), 10)
    await engine.stop(grace_seconds=0.05)
    assert engine._loop_task is not None and engine._loop_task.cancelled()


async def test_stop_gives_running_steps_five_seconds_by_default(
store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's shutdown calls `stop()` without a grace: a running step gets 5 s to reach a
    stored state. The wait is recorded and cut short rather than sat through."""
    fake = FakeNative()
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()

    fake.on_poll = stuck
    batch_id = await native_running(store, 1)
    engine = make_engine(store, fake, tick_seconds=0.02)
    real_wait = asyncio.wait
    graces: list[float | None] = []

    async def recorded(tasks: Any, *, timeout: float | None = None, **kwargs: Any) -> Any:
        if engine._stopping and timeout is not None and timeout >= 1:
            graces.append(timeout)
            timeout = 0.05
        return await real_wait(tasks, timeout=timeout, **kwargs)

    engine.start()
    try:
        async def polling() -> bool:
            return fake.called("poll") == 1

        await until("the step to reach the provider", polling, 10)
        monkeypatch.setattr(asyncio, "wait", recorded)  # the engine's asyncio is this one
    finally:
        await engine.stop()
    assert graces == [5.0]
    assert ((await store.engine_batch(batch_id)).lease_owner, engine._running) == (None, {})


async def test_the_loop_takes_at_most_max_parallel_batches(store: Store) -> None:

    gate = asyncio.Event()
    fx = FakeExecutor(concurrency=1)

    async def blocked(line: RequestLine) -> LineResult:
        await gate.wait()
        return answer(line)

    fx.script = {"c0": [blocked, blocked, blocked]}
    # The oldest batch is not due at first (a backoff), and becomes due while no slot is free.
    oldest = await add_batch(store, "exec", 1, created_at=now() - 10, next_poll_at=time.time() + 3600)
    ids = [oldest] + [await add_batch(store, "exec", 1) for _ in range(2)]
    engine = make_engine(store, fx, tick_seconds=0.02, max_parallel_batches=2)
    engine.start()
    try:
        async def two_running() -> bool:
            return len(fx.calls) == 2

        await until("two batches running", two_running, 10)
        await store.make_due(oldest)
        for _ in range(5):
            engine.wake()
            await asyncio.sleep(0.03)  # ticks in which a third batch must not start
        owners = [(await store.engine_batch(i)).lease_owner for i in ids]
        assert owners == [None, REPLICA, REPLICA] and len(fx.calls) == 2
        gate.set()

        async def all_done() -> bool:
            return [(await store.engine_batch(i)).status for i in ids] == [BatchStatus.COMPLETED] * 3

        await until("every batch to complete", all_done, 10)
    finally:
        await engine.stop(grace_seconds=1.0)


# --------------------------------------------------------------------------- native batch APIs


async def test_a_native_batch_is_submitted_once_with_its_lines(store: Store,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    batch_id = await add_batch(store, "native", 3)
    before = time.time()
    row = await step(make_engine(store, fake), batch_id)
    after = time.time()

    assert fake.calls == [("submit", batch_id)]  # a first submission asks no one whether it exists
    assert fake.jobs == [BatchJob(batch_id=batch_id, endpoint="/v1/chat/completions", model=PROVIDER_MODEL,
                                  completion_window="24h", line_count=3)]
    assert [(line.index, line.custom_id, line.body["model"]) for line in fake.sent_lines] == [
        (0, "c0", PROVIDER_MODEL), (1, "c1", PROVIDER_MODEL), (2, "c2", PROVIDER_MODEL)]
    assert (row.status, part(row).status, part(row).provider_batch_id) == (BatchStatus.IN_PROGRESS,
                                                                          BatchStatus.IN_PROGRESS, "pb_1")
    started = part(row).submit_started_at
    assert started is not None and before - 1 <= started <= after
    assert f"batch {batch_id} part 0: submitted to native as pb_1 (3 lines)" in messages(caplog)
    assert between(row.next_poll_at, before + 5.0, after + 5.0)
    assert part(row).next_poll_at == row.next_poll_at


async def test_a_batch_of_several_models_is_submitted_without_one(store: Store) -> None:
    fake = FakeNative()
    batch_id = await add_batch(store, "native", 1, provider_model=None)
    await step(make_engine(store, fake), batch_id)
    assert fake.jobs[0].model == ""
    assert fake.sent_lines[0].body["model"] == "m"  # "native/m", routed now


async def test_a_lost_submission_is_found_not_submitted_again(store: Store,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    fake.found = "pb_found"
    batch_id = await add_batch(store, "native", 2)
    await store.mark_submit_started(batch_id, 0)  # a crash after this, before the provider's id was stored
    started = part(await store.engine_batch(batch_id)).submit_started_at
    row = await step(make_engine(store, fake), batch_id)

    assert fake.calls == [("find_submitted", batch_id)]
    job = BatchJob(batch_id=batch_id, endpoint="/v1/chat/completions", model=PROVIDER_MODEL,
                   completion_window="24h", line_count=2)
    assert fake.find_args == [(batch_id, job, started)]
    assert (row.status, part(row).provider_batch_id, part(row).submit_started_at) == (
        BatchStatus.IN_PROGRESS, "pb_found", started)
    assert f"batch {batch_id} part 0: found earlier submission pb_found at native" in messages(caplog)


async def test_a_submission_the_provider_never_got_is_made_again(store: Store) -> None:
    fake = FakeNative()
    batch_id = await add_batch(store, "native", 2)
    await store.mark_submit_started(batch_id, 0)
    row = await step(make_engine(store, fake), batch_id)
    assert fake.calls == [("find_submitted", batch_id), ("submit", batch_id)]
    assert (row.status, part(row).provider_batch_id) == (BatchStatus.IN_PROGRESS, "pb_1")


async def test_a_failed_submit_backs_off_then_asks_before_submitting_again(store: Store) -> None:
    fake = FakeNative()
    fake.failures["submit"] = ProviderError("busy", retryable=True, status_code=503)
    batch_id = await add_batch(store, "native", 2)
    engine = make_engine(store, fake)
    before = time.time()
    row = await step(engine, batch_id)
    after = time.time()
    assert (row.status, part(row).provider_batch_id, part(row).poll_failures) == (BatchStatus.VALIDATING, None, 1)
    assert part(row).submit_started_at is not None
    assert between(row.next_poll_at, before + 10 * 0.625, after + 10 * 0.625)  # poll_seconds * 2**1, jittered
    assert part(row).next_poll_at == row.next_poll_at

    row = await step(engine, batch_id)
    assert fake.calls == [("submit", batch_id), ("find_submitted", batch_id), ("submit", batch_id)]
    assert (row.status, part(row).provider_batch_id) == (BatchStatus.IN_PROGRESS, "pb_1")


async def test_polling_records_the_providers_status_and_counts(store: Store,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.IN_PROGRESS, "running", total=3, completed=1, failed=1)]
    batch_id = await native_running(store)
    before = time.time()
    with caplog.at_level(logging.INFO):
        row = await step(make_engine(store, fake), batch_id)
    after = time.time()
    assert fake.calls == [("poll", "pb_1")]
    p = part(row)
    assert (row.status, p.provider_status, p.provider_completed, p.provider_failed) == (
        BatchStatus.IN_PROGRESS, "running", 1, 1)
    assert between(row.next_poll_at, before + 5.0, after + 5.0)
    assert f"batch {batch_id} part 0: native reports running (2 of 3 requests done)" in messages(caplog)

    caplog.clear()
    fake.polls = [status(ProviderState.IN_PROGRESS, "running")]
    with caplog.at_level(logging.INFO):
        row = await step(make_engine(store, fake), batch_id)
    p = part(row)
    assert (p.provider_status, p.provider_completed, p.provider_failed) == ("running", None, None)
    assert not any("reports" in m for m in messages(caplog))  # the same status is not logged again

    fake.polls = [status(ProviderState.FINALIZING, "finishing")]
    with caplog.at_level(logging.INFO):
        await step(make_engine(store, fake), batch_id)
    assert f"batch {batch_id} part 0: native reports finishing (0 of ? requests done)" in messages(caplog)


async def test_a_batch_the_provider_still_validates_stays_validating(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.VALIDATING), status(ProviderState.IN_PROGRESS)]
    batch_id = await add_batch(store, "native", 2)
    await store.record_provider_batch_id(batch_id, 0, "pb_1")  # stored, then a crash before the transition
    engine = make_engine(store, fake)
    assert (await step(engine, batch_id)).status is BatchStatus.VALIDATING
    row = await step(engine, batch_id)
    assert row.status is BatchStatus.IN_PROGRESS and row.in_progress_at is not None
    assert fake.called("submit") == 0


async def test_a_validating_batch_the_provider_already_finished_completes(store: Store) -> None:
    """The crash window between storing the provider's id and leaving validating, with a provider
    that finished meanwhile: the batch completes (it used to fail every step on the illegal
    validating -> finalizing edge until the watchdog expired it)."""
    fake = FakeNative()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(0), result(1)]
    batch_id = await add_batch(store, "native", 2)
    await store.record_provider_batch_id(batch_id, 0, "pb_1")
    row = await step(make_engine(store, fake), batch_id)
    assert (row.status, row.completed) == (BatchStatus.COMPLETED, 2)
    assert row.in_progress_at is not None and row.finalizing_at is not None


async def test_a_validating_batch_cancelled_while_polling_a_finished_provider_completes(store: Store) -> None:
    """The cancel lost the race: the provider had finished (cancelling -> completed), with every
    result; it is not sent to a provider whose batch has ended."""
    fake = FakeNative()
    finalizer = RecordingFinalizer()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(0)]
    batch_id = await add_batch(store, "native", 1)
    await store.record_provider_batch_id(batch_id, 0, "pb_1")

    async def cancel_now() -> None:
        fake.on_poll = None
        await store.request_cancel("alpha", batch_id)

    fake.on_poll = cancel_now
    row = await step(make_engine(store, fake, finalizer=finalizer), batch_id)
    assert (row.status, row.completed, fake.called("cancel")) == (BatchStatus.COMPLETED, 1, 0)
    assert (row.cancelling_at is not None, row.finalizing_at) == (True, None)
    assert finalizer.seen == [(batch_id, BatchStatus.CANCELLING)]
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.COMPLETED}


async def test_a_completed_native_batch_stores_every_result_once(store: Store,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    finalizer = RecordingFinalizer()
    fake.polls = [status(ProviderState.COMPLETED, "ended")]
    fake.outputs = [
        result(0),
        result(99),  # a line the batch does not have: skipped, the others still stored
        result(1, 400),
        result(2, 0, LineError("batch_cancelled", "not run")),
        result(3, 0, LineError("batch_expired", "too late")),
        result(4, 0, LineError("server_error", "oops", type="upstream_error")),
    ]
    batch_id = await native_running(store, 6)
    seen_while_storing: list[tuple[BatchStatus, BatchStatus]] = []

    async def look() -> None:
        row = await store.engine_batch(batch_id)
        seen_while_storing.append((row.status, part(row).status))

    fake.on_results = look
    with caplog.at_level(logging.WARNING):
        row = await step(make_engine(store, fake, finalizer=finalizer), batch_id)
    assert seen_while_storing == [(BatchStatus.FINALIZING, BatchStatus.FINALIZING)]

    assert row.status is BatchStatus.COMPLETED and row.next_poll_at is None
    assert row.finalizing_at is not None and row.completed_at is not None
    assert finalizer.seen == [(batch_id, BatchStatus.FINALIZING)]
    assert row.output_file_id == f"out-{batch_id}"
    assert fake.called("results") == 1
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.COMPLETED, "c1": ResultStatus.FAILED, "c2": ResultStatus.CANCELLED,
                               "c3": ResultStatus.EXPIRED, "c4": ResultStatus.FAILED, "c5": ResultStatus.FAILED}
    assert errors_of(found) == {
        "c2": ("batch_cancelled", "not run", "provider_error"),
        "c3": ("batch_expired", "too late", "provider_error"),
        "c4": ("server_error", "oops", "upstream_error"),
        "c5": ("missing_result", "native returned no result for this request (ended).", "batch_error"),
    }
    assert usage_of(found["c0"]) == priced(PRICE) and found["c0"].request_id == "req-0"
    assert found["c1"].status_code == 400
    assert (row.completed, row.failed) == (1, 3)
    assert (part(row).status, part(row).completed, part(row).failed) == (BatchStatus.COMPLETED, 1, 3)
    assert f"batch {batch_id} part 0: native returned a result for unknown line 99; ignored" in messages(caplog)


def stored_groups(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the groups of results the engine stores (empty calls left out)."""
    sizes: list[int] = []
    store_results = store.store_results

    async def spy(batch_id: str, outcomes: Sequence[LineOutcome], part_no: int | None = None) -> int:
        if outcomes:
            sizes.append(len(outcomes))
        return await store_results(batch_id, outcomes, part_no=part_no)


    monkeypatch.setattr(store, "store_results", spy)
    return sizes


async def test_native_results_of_lines_stored_without_their_provider_are_priced_by_the_part(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(0)]
    batch_id = await add_batch(store, "native", 1, line_provider=False)  # rows from before migration 0005
    await store.record_provider_batch_id(batch_id, 0, "pb_1")
    row = await step(make_engine(store, fake), batch_id)
    assert (row.status, usage_of((await results(store, batch_id))["c0"])) == (BatchStatus.COMPLETED, priced(PRICE))


async def test_native_results_are_stored_in_groups(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "STORE_CHUNK", 2)
    fake = FakeNative()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(i) for i in range(5)]
    batch_id = await native_running(store, 10)
    groups = stored_groups(store, monkeypatch)
    row = await step(make_engine(store, fake), batch_id)
    assert groups == [2, 2, 1, 2, 2, 1]  # the provider's five in twos, then the five missing lines in twos
    assert (row.status, row.completed, row.failed) == (BatchStatus.COMPLETED, 5, 5)


async def test_executed_results_are_stored_in_groups(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "STORE_CHUNK", 2)
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 3600.0)  # no timed flush: groups by size only
    batch_id = await add_batch(store, "exec", 5)
    groups = stored_groups(store, monkeypatch)
    row = await step(make_engine(store, FakeExecutor(concurrency=1)), batch_id)
    assert groups == [2, 2, 1]
    assert (row.status, row.completed, part(row).completed) == (BatchStatus.COMPLETED, 5, 5)



async def test_a_native_batch_the_provider_expired_keeps_its_results(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.EXPIRED, "expired")]
    fake.outputs = [result(0)]
    batch_id = await native_running(store, 3)
    row = await step(make_engine(store, fake), batch_id)
    # While its results are stored, the batch shows finalizing; then it ends expired.
    assert row.status is BatchStatus.EXPIRED and row.finalizing_at is not None and row.expired_at is not None
    assert part(row).status is BatchStatus.EXPIRED
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.COMPLETED, "c1": ResultStatus.EXPIRED, "c2": ResultStatus.EXPIRED}
    assert errors_of(found)["c1"] == ("batch_expired", "native returned no result for this request (expired).",
                                      "batch_error")


async def test_a_native_batch_cancelled_at_the_provider_ends_cancelled(store: Store) -> None:
    fake = FakeNative()
    finalizer = RecordingFinalizer()
    fake.polls = [status(ProviderState.CANCELLED, "cancelled")]
    fake.outputs = [result(1)]
    batch_id = await native_running(store, 2)
    row = await step(make_engine(store, fake, finalizer=finalizer), batch_id)
    assert row.status is BatchStatus.CANCELLED and row.cancelled_at is not None
    assert finalizer.seen == [(batch_id, BatchStatus.FINALIZING)]
    assert fake.called("cancel") == 0  # it was not Sluice's cancel

    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.CANCELLED, "c1": ResultStatus.COMPLETED}
    assert errors_of(found)["c0"] == ("batch_cancelled", "native returned no result for this request (cancelled).",
                                      "batch_error")


async def test_a_batch_the_provider_rejected_fails_with_its_reasons(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.FAILED, errors=(BatchErrorItem("invalid_line", "bad body", 2, "body"),))]
    batch_id = await native_running(store, 2)
    row = await step(make_engine(store, fake), batch_id)
    assert row.status is BatchStatus.FAILED and row.failed_at is not None
    assert row.errors == [BatchError("invalid_line", "bad body", "body", 2)]
    assert fake.called("results") == 0 and await results(store, batch_id) == {}

    fake.polls = [status(ProviderState.FAILED)]
    other = await native_running(store, 1)
    row = await step(make_engine(store, fake), other)
    assert (row.status, row.errors) == (BatchStatus.FAILED, [BatchError("provider_error", "native rejected the batch")])


async def test_cancel_is_sent_to_the_provider_once_and_confirmed_by_poll(store: Store,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.CANCELLING), status(ProviderState.CANCELLING),
                  status(ProviderState.CANCELLED)]
    batch_id = await native_running(store, 2)
    await store.request_cancel("alpha", batch_id)
    engine = make_engine(store, fake)
    with caplog.at_level(logging.INFO):
        row = await step(engine, batch_id)
    assert fake.calls == [("cancel", "pb_1"), ("poll", "pb_1")]
    assert row.status is BatchStatus.CANCELLING and part(row).cancel_sent_at is not None
    assert f"batch {batch_id} part 0: cancel sent to native" in messages(caplog)

    row = await step(engine, batch_id)
    assert row.status is BatchStatus.CANCELLING
    row = await step(engine, batch_id)
    assert fake.called("cancel") == 1
    assert row.status is BatchStatus.CANCELLED
    assert statuses(await results(store, batch_id)) == dict.fromkeys(["c0", "c1"], ResultStatus.CANCELLED)


async def test_a_cancel_that_loses_the_race_ends_completed(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(0), result(1)]
    batch_id = await native_running(store, 2)
    await store.request_cancel("alpha", batch_id)
    row = await step(make_engine(store, fake), batch_id)
    assert fake.calls == [("cancel", "pb_1"), ("poll", "pb_1"), ("results", "pb_1")]
    assert (row.status, row.completed) == (BatchStatus.COMPLETED, 2)
    assert row.finalizing_at is None  # cancelling -> completed directly


async def test_a_cancel_before_submission_ends_the_batch_without_the_provider(store: Store) -> None:
    fake = FakeNative()
    batch_id = await add_batch(store, "native", 2)
    await store.request_cancel("alpha", batch_id)
    row = await step(make_engine(store, fake), batch_id)
    assert (row.status, fake.calls, row.next_poll_at) == (BatchStatus.CANCELLED, [], None)
    assert statuses(await results(store, batch_id)) == dict.fromkeys(["c0", "c1"], ResultStatus.CANCELLED)


async def test_a_native_batch_past_its_window_before_submission_expires_unsent(store: Store) -> None:
    fake = FakeNative()
    batch_id = await add_batch(store, "native", 2)
    await move_expiry(store, batch_id, now() - 1)
    row = await step(make_engine(store, fake), batch_id)
    assert (row.status, fake.calls, row.next_poll_at) == (BatchStatus.EXPIRED, [], None)
    assert statuses(await results(store, batch_id)) == dict.fromkeys(["c0", "c1"], ResultStatus.EXPIRED)


async def test_a_cancel_arriving_while_polling_a_finished_provider_completes(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(0)]
    batch_id = await native_running(store, 1)

    async def cancel_now() -> None:
        fake.on_poll = None
        await store.request_cancel("alpha", batch_id)

    fake.on_poll = cancel_now
    row = await step(make_engine(store, fake), batch_id)
    assert (row.status, row.completed, fake.called("cancel")) == (BatchStatus.COMPLETED, 1, 0)
    assert row.finalizing_at is None  # the batch was cancelling, not in progress, when its part ended
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.COMPLETED}


# --------------------------------------------------------------------------- the retry policy and the watchdog


async def test_a_retryable_poll_failure_backs_off_exponentially(store: Store, caplog: pytest.LogCaptureFixture,
                                                                hooks: RecordingTelemetry) -> None:
    fake = FakeNative()
    fake.polls = [ProviderError("busy", retryable=True, status_code=503), ProviderError("timeout", retryable=True),
                  status(ProviderState.IN_PROGRESS)]
    batch_id = await native_running(store, 1)
    engine = make_engine(store, fake)
    before = time.time()
    with caplog.at_level(logging.WARNING):
        row = await step(engine, batch_id)
    after = time.time()
    assert (row.status, part(row).poll_failures) == (BatchStatus.IN_PROGRESS, 1)
    assert between(row.next_poll_at, before + 6.25, after + 6.25)
    assert part(row).next_poll_at == row.next_poll_at
    assert f"batch {batch_id} part 0: native answered 503 (busy); next try in 6.2s" in messages(caplog)
    assert hooks.retries == [("native", "step", 6.25)]


    before = time.time()
    with caplog.at_level(logging.WARNING):
        row = await step(engine, batch_id)
    after = time.time()
    assert part(row).poll_failures == 2
    assert between(row.next_poll_at, before + 12.5, after + 12.5)
    assert f"batch {batch_id} part 0: native answered nothing (timeout); next try in 12.5s" in messages(caplog)

    row = await step(engine, batch_id)
    assert part(row).poll_failures == 0  # a poll that answers ends the streak


async def test_retry_after_is_honoured_and_the_ceiling_applies(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [ProviderError("slow down", retryable=True, status_code=429, retry_after=120.0)]
    batch_id = await native_running(store, 1)
    before = time.time()
    row = await step(make_engine(store, fake), batch_id)
    after = time.time()
    assert between(row.next_poll_at, before + 120.0, after + 120.0)

    fake.polls = [ProviderError("busy", retryable=True)]
    before = time.time()
    row = await step(make_engine(store, fake, max_backoff_seconds=8.0), batch_id)
    after = time.time()
    assert part(row).poll_failures == 2
    assert between(row.next_poll_at, before + 5.0, after + 5.0)  # min(5 * 4, 8) jittered to 8 * 0.625


async def test_a_backoff_never_sleeps_past_the_watchdogs_deadline(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [ProviderError("busy", retryable=True, retry_after=3600.0)]
    batch_id = await native_running(store, 1)
    expires_at = (await store.engine_batch(batch_id)).expires_at
    deadline = time.time() + 30.0
    engine = make_engine(store, fake, expiry_grace_seconds=deadline - expires_at, tick_seconds=1.0)
    row = await step(engine, batch_id)
    assert between(row.next_poll_at, deadline, deadline)

    # A deadline closer than a tick: look again one tick from now, not in a busy loop.
    deadline = time.time() + 0.2
    engine = make_engine(store, fake, expiry_grace_seconds=deadline - expires_at, tick_seconds=2.0)
    before = time.time()
    row = await step(engine, batch_id)
    after = time.time()
    assert between(row.next_poll_at, before + 2.0, after + 2.0)


@pytest.mark.logs_errors("step failed")
async def test_an_unreadable_answer_is_retried_like_a_provider_failure(store: Store,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    fake.polls = [ValueError("not json")]
    batch_id = await native_running(store, 1)
    before = time.time()
    with caplog.at_level(logging.WARNING):
        row = await step(make_engine(store, fake), batch_id)
    after = time.time()
    assert (row.status, part(row).poll_failures) == (BatchStatus.IN_PROGRESS, 1)
    assert between(row.next_poll_at, before + 6.25, after + 6.25)
    assert f"engine: batch {batch_id} part 0 step failed" in messages(caplog)
    assert f"batch {batch_id} part 0: ValueError: not json; next try in 6.2s" in messages(caplog)


async def test_a_non_retryable_failure_cancels_at_the_provider_and_fails(store: Store) -> None:
    fake = FakeNative()
    fake.polls = [ProviderError("batch is gone", status_code=404, code="not_found")]
    batch_id = await native_running(store, 2)
    row = await step(make_engine(store, fake), batch_id)
    assert fake.calls == [("poll", "pb_1"), ("cancel", "pb_1")]
    assert row.status is BatchStatus.FAILED and part(row).cancel_sent_at is not None
    assert row.errors == [BatchError("not_found", "native: batch is gone")]
    assert (part(row).status, part(row).errors) == (BatchStatus.FAILED, row.errors)
    assert row.next_poll_at is None

    fake = FakeNative()
    fake.failures["poll"] = ProviderError("forbidden", status_code=403)
    other = await native_running(store, 1)
    row = await step(make_engine(store, fake), other)
    assert row.errors == [BatchError("provider_error", "native: forbidden")]


async def test_a_refused_submission_fails_the_batch_without_a_cancel(store: Store,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    fake.failures["submit"] = ProviderError("model not allowed", code="model_not_found")
    batch_id = await add_batch(store, "native", 2)
    row = await step(make_engine(store, fake), batch_id)
    assert fake.calls == [("submit", batch_id)]
    assert (row.status, row.errors) == (BatchStatus.FAILED, [BatchError("model_not_found",
                                                                        "native: model not allowed")])
    assert row.next_poll_at is None
    assert f"batch {batch_id} failed: native: model not allowed" in messages(caplog)


async def test_giving_up_when_the_cancel_fails_still_ends_the_batch(store: Store,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    fake.polls = [ProviderError("gone", status_code=410)]
    fake.failures["cancel"] = ProviderError("cancel broke", retryable=True, status_code=500)
    batch_id = await native_running(store, 1)
    with caplog.at_level(logging.WARNING):
        row = await step(make_engine(store, fake), batch_id)
    assert row.status is BatchStatus.FAILED and part(row).cancel_sent_at is None
    assert (f"batch {batch_id} part 0: giving up; could not cancel pb_1 at native (cancel broke): cancel it there "
            "by hand" in messages(caplog))


async def test_the_watchdog_expires_a_batch_the_provider_never_ends(store: Store,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNative()
    finalizer = RecordingFinalizer()
    batch_id = await native_running(store, 3)
    await store.record_provider_status(batch_id, 0, "in_progress", None, None)
    await store.store_results(batch_id, [engine_module.outcome(result(1), "c1", ResultStatus.COMPLETED, PRICE)],
                              part_no=0)
    await move_expiry(store, batch_id, now() - 7200)  # window and grace both over
    with caplog.at_level(logging.INFO):
        row = await step(make_engine(store, fake, finalizer=finalizer), batch_id)

    assert fake.calls == [("cancel", "pb_1")]  # no poll: the watchdog does not wait for the provider
    assert row.status is BatchStatus.EXPIRED and part(row).cancel_sent_at is not None
    assert part(row).status is BatchStatus.EXPIRED
    assert row.next_poll_at is None
    assert row.errors == [BatchError("batch_expired", (
        "native did not report the end of this batch within its completion window and 7200 s of grace "
        "(last status: in_progress); Sluice asked native to cancel it and kept what was done."))]
    assert finalizer.seen == [(batch_id, BatchStatus.IN_PROGRESS)]
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.EXPIRED, "c1": ResultStatus.COMPLETED, "c2": ResultStatus.EXPIRED}
    assert errors_of(found)["c0"] == ("batch_expired", "The batch expired before this request ran.", "batch_error")
    assert f"batch {batch_id} part 0: giving up; cancel sent to native" in messages(caplog)


async def test_the_watchdog_waits_for_the_grace_and_sends_no_second_cancel(store: Store) -> None:
    fake = FakeNative()
    batch_id = await native_running(store, 1)
    await move_expiry(store, batch_id, now() - 7000)  # window over, grace not yet
    engine = make_engine(store, fake, expiry_grace_seconds=7200.0)
    assert (await step(engine, batch_id)).status is BatchStatus.IN_PROGRESS
    assert fake.calls == [("poll", "pb_1")]

    await store.request_cancel("alpha", batch_id)
    await store.mark_cancel_sent(batch_id)
    await move_expiry(store, batch_id, int(time.time() - 7200))  # the deadline is now: it has passed
    row = await step(engine, batch_id)
    assert fake.calls == [("poll", "pb_1")]  # the cancel was already sent
    assert row.status is BatchStatus.EXPIRED
    assert row.errors is not None and "(last status: in_progress)" in row.errors[0].message


async def test_the_watchdog_expires_an_unsubmitted_batch_without_a_cancel(store: Store) -> None:
    fake = FakeNative()
    batch_id = await add_batch(store, "native", 1)
    await move_expiry(store, batch_id, now() - 7201)
    row = await step(make_engine(store, fake), batch_id)
    assert (row.status, fake.calls, row.next_poll_at) == (BatchStatus.EXPIRED, [], None)
    assert row.errors is not None and "(last status: none)" in row.errors[0].message
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.EXPIRED}


@pytest.mark.parametrize("dst", [BatchStatus.FAILED, BatchStatus.EXPIRED])
async def test_giving_up_on_a_part_that_ended_meanwhile_changes_nothing(store: Store, dst: BatchStatus) -> None:
    fake = FakeNative()
    finalizer = RecordingFinalizer()
    batch_id = await native_running(store, 2)
    await store.request_cancel("alpha", batch_id)
    await store.mark_cancel_sent(batch_id, 0)
    batch = await store.engine_batch(batch_id)  # what a slow replica read, before another one ended it
    fake.polls = [status(ProviderState.CANCELLED)]
    row = await step(make_engine(store, fake, finalizer=finalizer), batch_id)
    assert row.status is BatchStatus.CANCELLED
    calls, seen, found = list(fake.calls), list(finalizer.seen), await results(store, batch_id)

    await make_engine(store, fake, finalizer=finalizer)._give_up(batch, part(batch), fake, dst, BatchError("x", "late"))
    row = await store.engine_batch(batch_id)
    assert (row.status, row.errors, part(row).status, part(row).errors) == (
        BatchStatus.CANCELLED, None, BatchStatus.CANCELLED, None)
    assert (fake.calls, finalizer.seen) == (calls, seen)
    assert statuses(await results(store, batch_id)) == statuses(found) == dict.fromkeys(["c0", "c1"],
                                                                                        ResultStatus.CANCELLED)


async def test_an_ended_batch_is_never_finalized_again(store: Store) -> None:
    """A second replica that read the batch before the first one ended it: its `_finalize` leaves
    the batch and its files alone, whether it read it in progress or finalizing."""
    fx = FakeExecutor()
    finalizer = RecordingFinalizer()
    batch_id = await add_batch(store, "exec", 1)
    engine = make_engine(store, fx, finalizer=finalizer)
    done = await step(engine, batch_id)
    for stale in (BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.COMPLETED):
        batch = await store.engine_batch(batch_id)
        batch.status = stale  # the late replica's copy (parts all ended)
        await engine._finalize(batch)
    assert finalizer.seen == [(batch_id, BatchStatus.FINALIZING)]
    row = await store.engine_batch(batch_id)
    assert (row.status, row.completed_at, row.output_file_id) == (BatchStatus.COMPLETED, done.completed_at,
                                                                 f"out-{batch_id}")



# --------------------------------------------------------------------------- batches in parts


async def parts_running(store: Store, parts: Sequence[tuple[str, int]], ids: Sequence[str]) -> str:
    """A batch in parts, each accepted by its provider as `ids[k]`, in progress."""
    batch_id = await add_parts_batch(store, parts)
    for part_no, provider_id in enumerate(ids):
        await store.record_provider_batch_id(batch_id, part_no, provider_id)
    assert await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    return batch_id


def two_natives() -> tuple[FakeNative, FakeNative]:
    a, b = FakeNative("na"), FakeNative("nb")
    a.provider_id, b.provider_id = "pa", "pb"
    return a, b


async def test_a_mixed_batch_runs_each_part_on_its_provider_and_ends_once_every_part_has(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    fx, fake = FakeExecutor(), FakeNative()
    finalizer = RecordingFinalizer()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(2), result(3), result(4), result(0)]  # line 0 is the executor part's: not native's
    batch_id = await add_parts_batch(store, [("exec", 2), ("native", 3)])
    engine = make_engine(store, fx, fake, finalizer=finalizer)
    before = time.time()
    row = await step(engine, batch_id)
    after = time.time()

    # The executor part ran its own lines and ended; the native part was submitted with its own.
    assert sorted(fx.executed()) == ["c0", "c1"]
    assert fake.jobs == [BatchJob(batch_id=f"{batch_id}-p1", endpoint="/v1/chat/completions", model=PROVIDER_MODEL,
                                  completion_window="24h", line_count=3)]
    assert [(line.index, line.custom_id) for line in fake.sent_lines] == [(2, "c2"), (3, "c3"), (4, "c4")]
    assert [(p.status, p.completed, p.provider_batch_id) for p in row.parts] == [
        (BatchStatus.COMPLETED, 2, None), (BatchStatus.IN_PROGRESS, 0, "pb_1")]
    assert (part(row, 0).submit_started_at, part(row, 1).submit_started_at is not None) == (None, True)
    assert (row.status, row.completed, row.finalizing_at, finalizer.seen) == (BatchStatus.IN_PROGRESS, 2, None, [])
    assert between(row.next_poll_at, before + 5.0, after + 5.0)  # when the native part is due

    with caplog.at_level(logging.WARNING):
        row = await step(engine, batch_id)
    assert fake.calls == [("submit", f"{batch_id}-p1"), ("poll", "pb_1"), ("results", "pb_1")]
    assert len(fx.calls) == 2  # an ended part never runs again
    assert (row.status, row.completed, row.failed, row.next_poll_at) == (BatchStatus.COMPLETED, 5, 0, None)
    assert [(p.status, p.completed) for p in row.parts] == [(BatchStatus.COMPLETED, 2), (BatchStatus.COMPLETED, 3)]
    assert finalizer.seen == [(batch_id, BatchStatus.FINALIZING)]
    found = await results(store, batch_id)
    assert json.loads(found["c0"].response_json or "null") == {"echo": "c0", "model": PROVIDER_MODEL}  # not native's
    assert json.loads(found["c2"].response_json or "null") == {"answer": 2}
    assert f"batch {batch_id} part 1: native returned a result for unknown line 0; ignored" in messages(caplog)


async def test_native_parts_have_their_own_provider_batch_status_and_schedule(store: Store) -> None:
    na, nb = two_natives()
    finalizer = RecordingFinalizer()
    batch_id = await add_parts_batch(store, [("na", 2), ("nb", 2)])
    engine = make_engine(store, na, nb, finalizer=finalizer)
    row = await step(engine, batch_id)
    assert (na.calls, nb.calls) == ([("submit", batch_id)], [("submit", f"{batch_id}-p1")])
    assert [line.custom_id for line in na.sent_lines] == ["c0", "c1"]
    assert [line.custom_id for line in nb.sent_lines] == ["c2", "c3"]
    assert [(p.provider, p.provider_batch_id, p.status) for p in row.parts] == [
        ("na", "pa", BatchStatus.IN_PROGRESS), ("nb", "pb", BatchStatus.IN_PROGRESS)]
    assert all(p.submit_started_at is not None for p in row.parts)


    # Each part is polled at its own pace: one answers, the other backs off.
    na.polls = [status(ProviderState.IN_PROGRESS, "running", completed=1, failed=0)]
    nb.polls = [ProviderError("busy", retryable=True, status_code=503)]
    before = time.time()
    row = await step(engine, batch_id)
    after = time.time()
    a, b = part(row, 0), part(row, 1)
    assert (a.provider_status, a.provider_completed, a.poll_failures) == ("running", 1, 0)
    assert (b.provider_status, b.provider_completed, b.poll_failures) == (None, None, 1)
    assert between(a.next_poll_at, before + 5.0, after + 5.0)
    assert between(b.next_poll_at, before + 6.25, after + 6.25)
    assert row.next_poll_at == a.next_poll_at  # the batch is looked at when its first part is due

    # Only a part that is due is polled; the batch then waits for the other part's next look.
    await store.schedule_part(batch_id, 0, time.time() - 1)
    na.polls = [status(ProviderState.COMPLETED)]
    na.outputs = [result(0), result(1)]
    # While a part's results are stored, the batch shows finalizing only if no other part still runs.
    seen: list[tuple[BatchStatus, list[BatchStatus]]] = []

    async def look() -> None:
        row = await store.engine_batch(batch_id)
        seen.append((row.status, [p.status for p in row.parts]))

    na.on_results = nb.on_results = look
    row = await step(engine, batch_id, parts_due=False)
    assert (na.called("poll"), nb.called("poll")) == (2, 1)
    assert [p.status for p in row.parts] == [BatchStatus.COMPLETED, BatchStatus.IN_PROGRESS]
    assert (row.status, row.completed, row.finalizing_at, finalizer.seen) == (BatchStatus.IN_PROGRESS, 2, None, [])
    assert row.next_poll_at == b.next_poll_at

    nb.polls = [status(ProviderState.COMPLETED)]
    nb.outputs = [result(2), result(3)]
    row = await step(engine, batch_id)
    assert (na.called("poll"), nb.called("poll")) == (2, 2)  # an ended part is not polled again
    assert seen == [(BatchStatus.IN_PROGRESS, [BatchStatus.FINALIZING, BatchStatus.IN_PROGRESS]),
                    (BatchStatus.FINALIZING, [BatchStatus.COMPLETED, BatchStatus.FINALIZING])]

    assert (row.status, row.completed, row.next_poll_at) == (BatchStatus.COMPLETED, 4, None)
    assert row.finalizing_at is not None and finalizer.seen == [(batch_id, BatchStatus.FINALIZING)]


async def test_a_part_failing_while_others_run_fails_only_its_lines(store: Store) -> None:
    na, nb = two_natives()
    na.polls = [status(ProviderState.FAILED, errors=(BatchErrorItem("invalid_line", "bad body", 1, "body"),
                                                     BatchErrorItem("invalid_file", "no such file")))]
    nb.polls = [status(ProviderState.COMPLETED)]
    nb.outputs = [result(2), result(3)]
    batch_id = await parts_running(store, [("na", 2), ("nb", 2)], ["pa", "pb"])
    row = await step(make_engine(store, na, nb), batch_id)

    assert (row.status, row.completed, row.failed) == (BatchStatus.COMPLETED, 2, 2)
    assert [p.status for p in row.parts] == [BatchStatus.FAILED, BatchStatus.COMPLETED]
    # The batch's errors say which part failed, unless the provider named the field itself.
    assert row.errors == [BatchError("invalid_line", "bad body", "body", 1),
                          BatchError("invalid_file", "no such file", "parts[0]", None)]
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.FAILED, "c1": ResultStatus.FAILED,
                               "c2": ResultStatus.COMPLETED, "c3": ResultStatus.COMPLETED}
    assert errors_of(found) == dict.fromkeys(["c0", "c1"], ("invalid_line", "bad body", "batch_error"))
    assert (part(row, 0).failed, part(row, 1).completed) == (2, 2)
    assert na.called("results") == 0


async def test_a_part_ended_failed_without_a_reason_fails_its_lines_with_one(store: Store) -> None:
    nb = FakeNative("nb")
    nb.polls = [status(ProviderState.COMPLETED)]
    nb.outputs = [result(1)]
    batch_id = await parts_running(store, [("na", 1), ("nb", 1)], ["pa", "pb"])
    await store.end_part(batch_id, 0, BatchStatus.FAILED)  # by an older replica, without errors
    row = await step(make_engine(store, FakeNative("na"), nb), batch_id)
    assert (row.status, row.errors) == (BatchStatus.COMPLETED, None)
    found = await results(store, batch_id)
    assert errors_of(found) == {"c0": ("provider_error", "na failed this part", "batch_error")}
    assert statuses(found)["c1"] is ResultStatus.COMPLETED


async def test_a_batch_whose_parts_all_failed_fails_with_every_reason(store: Store,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    na, nb = two_natives()
    finalizer = RecordingFinalizer()
    na.polls = [status(ProviderState.FAILED, errors=(BatchErrorItem("invalid_file", "bad a"),))]
    nb.polls = [ProviderError("forbidden", status_code=403, code="permission_denied")]
    batch_id = await parts_running(store, [("na", 1), ("nb", 2)], ["pa", "pb"])
    with caplog.at_level(logging.WARNING):
        row = await step(make_engine(store, na, nb, finalizer=finalizer), batch_id)
    assert (row.status, row.failed_at is not None, row.next_poll_at) == (BatchStatus.FAILED, True, None)
    assert row.errors == [BatchError("invalid_file", "bad a", "parts[0]"),
                          BatchError("permission_denied", "nb: forbidden", "parts[1]")]
    assert (finalizer.seen, await results(store, batch_id)) == ([], {})  # like OpenAI: no per-line results
    assert nb.calls == [("poll", "pb"), ("cancel", "pb")]
    assert (part(row, 0).cancel_sent_at, part(row, 1).cancel_sent_at is not None) == (None, True)

    assert f"batch {batch_id} failed: bad a; nb: forbidden" in messages(caplog)


async def test_one_expired_part_makes_the_batch_expired_keeping_the_others_results(store: Store) -> None:
    na, nb = two_natives()
    finalizer = RecordingFinalizer()
    na.polls = [status(ProviderState.EXPIRED)]
    nb.polls = [status(ProviderState.COMPLETED)]
    nb.outputs = [result(1)]
    batch_id = await parts_running(store, [("na", 1), ("nb", 1)], ["pa", "pb"])
    row = await step(make_engine(store, na, nb, finalizer=finalizer), batch_id)
    assert (row.status, row.completed) == (BatchStatus.EXPIRED, 1)
    assert [p.status for p in row.parts] == [BatchStatus.EXPIRED, BatchStatus.COMPLETED]
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.EXPIRED, "c1": ResultStatus.COMPLETED}
    assert len(finalizer.seen) == 1


async def test_a_cancel_reaches_every_part_at_once(store: Store) -> None:
    fx, fake = FakeExecutor(), FakeNative()
    fake.polls = [status(ProviderState.CANCELLING), status(ProviderState.CANCELLED)]
    fake.outputs = [result(2)]
    batch_id = await add_parts_batch(store, [("exec", 2), ("native", 2)])
    await store.record_provider_batch_id(batch_id, 1, "pb_1")
    assert await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    await store.schedule_part(batch_id, 1, time.time() + 3600)  # polled a moment ago
    await store.request_cancel("alpha", batch_id)
    engine = make_engine(store, fx, fake)
    row = await step(engine, batch_id, parts_due=False)

    assert fake.calls == [("cancel", "pb_1"), ("poll", "pb_1")]  # a cancel not yet sent does not wait
    assert fx.calls == []
    assert (row.status, [p.status for p in row.parts]) == (BatchStatus.CANCELLING,
                                                           [BatchStatus.CANCELLED, BatchStatus.IN_PROGRESS])
    assert part(row, 1).cancel_sent_at is not None

    row = await step(engine, batch_id)
    assert fake.called("cancel") == 1
    assert (row.status, row.completed) == (BatchStatus.CANCELLED, 1)
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.CANCELLED, "c1": ResultStatus.CANCELLED,
                                                        "c2": ResultStatus.COMPLETED, "c3": ResultStatus.CANCELLED}


async def test_a_part_for_an_unconfigured_provider_waits_while_the_others_run(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    fx = FakeExecutor()
    batch_id = await add_parts_batch(store, [("gone", 1), ("exec", 1)])
    before = time.time()
    with caplog.at_level(logging.WARNING):
        row = await step(make_engine(store, fx), batch_id)
    after = time.time()
    assert fx.executed() == ["c1"]
    assert (row.status, [p.status for p in row.parts]) == (BatchStatus.IN_PROGRESS,
                                                           [BatchStatus.VALIDATING, BatchStatus.COMPLETED])
    assert between(row.next_poll_at, before + 60.0, after + 60.0)
    assert (f"batch {batch_id} needs provider 'gone', which is not configured now (is its API key set?); its part 0 "
            "waits until a replica that has it picks it up") in messages(caplog)



async def test_native_parts_are_stepped_while_an_executor_part_runs(store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A native part that becomes due during a long executor part is stepped when it is due, not
    after the executor part (nor at the next look at the batch): here it is submitted, polled and
    collected while the executor part's only line waits for exactly that."""
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 3600.0)  # no periodic look: only the part's due time
    fx, fake = FakeExecutor(), FakeNative()
    fake.polls = [status(ProviderState.COMPLETED)]
    fake.outputs = [result(1)]
    batch_id = await add_parts_batch(store, [("exec", 1), ("native", 1)])

    fx.script = {"c0": [answer_once_collected(fake, 10)]}
    row = await step(make_engine(store, fx, fake, poll_seconds=0.2), batch_id)
    assert fake.calls == [("submit", f"{batch_id}-p1"), ("poll", "pb_1"), ("results", "pb_1")]
    assert (row.status, row.completed) == (BatchStatus.COMPLETED, 2)
    assert [p.status for p in row.parts] == [BatchStatus.COMPLETED, BatchStatus.COMPLETED]


@pytest.mark.logs_errors("step failed; retrying later")
async def test_a_failure_while_an_executor_part_runs_fails_the_step_and_ends_its_lines(
        store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A database error in the loop that steps native parts while an executor part runs: the step
    fails as a failure (logged, looked at again after `poll_seconds`, the lease handed back), not as
    a cancellation, and the executor part's tasks have all ended before the lease is released."""
    fx, fake = FakeExecutor(), FakeNative()
    batch_id = await add_parts_batch(store, [("exec", 1), ("native", 1)])
    started = asyncio.Event()

    async def never_answers(line: RequestLine) -> LineResult:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    fx.script = {"c0": [never_answers]}
    engine_batch = store.engine_batch
    reads = 0

    async def second_read_fails(batch: str) -> BatchRow:
        nonlocal reads
        reads += 1
        if reads == 2:  # the read of the loop that steps the native part, once the line runs
            await started.wait()
            raise RuntimeError("database hiccup")
        return await engine_batch(batch)

    monkeypatch.setattr(store, "engine_batch", second_read_fails)
    before = time.time()
    with caplog.at_level(logging.ERROR):
        row = await step(make_engine(store, fx, fake, poll_seconds=7.0), batch_id)
    after = time.time()
    assert f"engine: batch {batch_id} step failed; retrying later" in messages(caplog)
    assert not row.status.terminal and row.lease_owner is None
    assert between(row.next_poll_at, before + 7.0, after + 7.0)
    assert fx.executed() == ["c0"] and fake.calls == []
