"""A batch in parts, over gRPC against the loopback provider fake: lines for several providers
(OpenAI and Anthropic batch APIs, the sim run by Sluice) in one batch, and more lines than a
provider takes per batch. Each part is its own provider batch, run concurrently, with its own
submit, lost-submission recovery, cancel and expiry; results, usage and cost merge into the one
batch, and into one output file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from adapters.anthropic import AnthropicAdapter
from adapters.base import BatchJob, RequestLine
from adapters.openai import OpenAIAdapter
from adapters.sim import SimProvider
from service.domain.model import Price, now
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from service.storage.db import create_engine
from service.storage.repository import Store
from service.storage.tables import BatchRow, WebhookEventRow
from sluice.v1 import batch_pb2, file_pb2, file_pb2_grpc
from tests.harness import Client, chat_line, gateway, make_settings, md, until
from tests.provider_fake import ProviderFake

HOLD = 10**9
OPENAI_PRICE = Price(input_per_mtok=2.0, output_per_mtok=8.0, batch_discount=0.5)
ANTHROPIC_PRICE = Price(input_per_mtok=3.0, output_per_mtok=15.0, batch_discount=0.5)
WAIT = 60.0


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ProviderFake]:
    with ProviderFake() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: ProviderFake) -> ProviderFake:
    fake_server.reset()
    fake_server.configure(polls_per_state=1, anthropic_eventual_404=False)
    return fake_server


def router(fake: ProviderFake, sim_latency_ms: float = 0, openai_max_lines: int | None = None) -> Router:
    return Router({
        SIM: ProviderEntry(provider=SimProvider(SIM, options={"latency_ms": sim_latency_ms, "concurrency": 2}),
                           default_price=DEFAULT_SIM_PRICE),
        "openai": ProviderEntry(provider=OpenAIAdapter("openai", base_url=fake.url("openai"),
                                                       api_key=fake.key("openai")),
                                models={"gpt-4o-mini"}, prices={"gpt-4o-mini": OPENAI_PRICE},
                                max_lines=openai_max_lines),
        "anthropic": ProviderEntry(provider=AnthropicAdapter("anthropic", base_url=fake.base_url + "/anthropic",
                                                             api_key=fake.key("anthropic")),
                                   models={"claude-haiku"}, prices={"claude-haiku": ANTHROPIC_PRICE}),
    })


MODELS = {"o": "openai/gpt-4o-mini", "a": "anthropic/claude-haiku", "s": "sim/small"}


def mixed_lines(pattern: str) -> list[batch_pb2.BatchRequestLine]:
    """One line per letter: o (OpenAI), a (Anthropic), s (sim); `x` after a letter fails it."""
    out = []
    for i, token in enumerate(pattern.split()):
        fails = token.endswith("x")
        text = ("FAIL SIM_FAIL please" if fails else f"question number {i}")
        out.append(chat_line(f"{token[0]}{i}", text, model=MODELS[token[0]]))
    return out


async def file_lines(c: Client, file_id: str) -> list[dict[str, Any]]:
    files = file_pb2_grpc.FileServiceStub(c.channel)
    data = b"".join([m.data async for m in files.GetFileContent(file_pb2.GetFileContentRequest(id=file_id),
                                                                metadata=md())])
    return [json.loads(line) for line in data.splitlines()]


def creates(fake: ProviderFake) -> dict[str, int]:
    return {p: n for p, n in fake.state()["batch_creates"].items() if n}


async def test_one_batch_across_three_providers(fake: ProviderFake, db_url: str) -> None:
    lines = mixed_lines("o a s o a s ox ax sx o")
    async with gateway(make_settings(db_url, poll_seconds=0.02), router(fake)) as (_, c):
        created = await c.create(lines)
        assert created.provider == "mixed" and not created.HasField("model")
        assert [(p.part, p.provider, p.request_counts.total, p.status) for p in created.parts] == [
            (0, "openai", 4, "validating"), (1, "anthropic", 3, "validating"), (2, "sim", 3, "validating")]
        done = await c.wait_for(created.id, timeout=WAIT)
        results = {r.custom_id: r for r in await c.results(done.id)}

    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (10, 7, 3)
    assert [(p.provider, p.status, p.request_counts.completed, p.request_counts.failed) for p in done.parts] == [
        ("openai", "completed", 3, 1), ("anthropic", "completed", 2, 1), ("sim", "completed", 2, 1)]
    native = {p.provider: p.provider_batch_id for p in done.parts if p.provider != "sim"}
    assert all(native.values()) and not done.parts[2].HasField("provider_batch_id")
    assert not done.HasField("provider_batch_id")  # several provider batches: see parts
    state = fake.state()
    assert creates(fake) == {"openai": 1, "anthropic": 1}
    assert state["batches"]["openai"][native["openai"]]["kind"] == "completed"
    assert state["batches"]["anthropic"][native["anthropic"]]["kind"] == "completed"

    # Every line's result came from its own provider; usage and cost are the sums of the lines'.
    assert {cid: r.provider for cid, r in results.items()} == {
        cid: {"o": "openai", "a": "anthropic", "s": "sim"}[cid[0]] for cid in results}
    assert results["o0"].response["object"] == "chat.completion"
    assert "echo:" in results["a1"].response["choices"][0]["message"]["content"]  # Anthropic's, translated back
    assert results["s2"].response["choices"][0]["message"]["content"].startswith("Simulated answer")
    for field in ("input_tokens", "output_tokens"):
        assert getattr(done.usage, field) == sum(getattr(r.usage, field) for r in results.values())
    assert done.usage.total_cost == pytest.approx(sum(r.usage.total_cost for r in results.values()), rel=1e-9)
    assert done.usage.total_cost > 0

    # One output file, in input order, whatever provider ran each line.
    async with gateway(make_settings(db_url), router(fake)) as (_, c):
        output = await file_lines(c, done.output_file_id)
        errors = await file_lines(c, done.error_file_id)
    assert [x["custom_id"] for x in output] == [line.custom_id for line in lines if "FAIL" not in str(line.body)]
    assert [x["custom_id"] for x in errors] == ["o6", "a7", "s8"]


async def test_a_mixed_batch_is_watched_in_parts_and_ends_with_one_webhook_event(fake: ProviderFake,
                                                                                  sqlite_url: str) -> None:
    """The merged features meet: WatchBatch follows the batch and shows its parts, and the one
    transaction that ends the batch (whichever part ended last) writes exactly one outbox event."""
    async with gateway(make_settings(sqlite_url, poll_seconds=0.02), router(fake)) as (app, c):
        created = await c.create(mixed_lines("o a s o a s"))
        stream = c.stub.WatchBatch(batch_pb2.WatchBatchRequest(id=created.id), metadata=md(), timeout=WAIT)
        events = [e async for e in stream]
        async with app.store.sessions() as s:
            outbox = list((await s.scalars(select(WebhookEventRow.type).where(
                WebhookEventRow.batch_id == created.id))).all())
    assert events[0].type == "snapshot" and [p.provider for p in events[0].batch.parts] == ["openai", "anthropic",
                                                                                            "sim"]
    last = events[-1].batch
    assert last.status == "completed" and [(p.status, p.request_counts.completed) for p in last.parts] == [
        ("completed", 2)] * 3
    assert outbox == ["batch.completed"]


async def test_a_cancel_reaches_every_part(fake: ProviderFake, sqlite_url: str) -> None:
    fake.configure(polls_per_state=HOLD)  # the providers hold their batches where they are
    lines = mixed_lines("o a " + "s " * 200)
    async with gateway(make_settings(sqlite_url, poll_seconds=0.02), router(fake, sim_latency_ms=20)) as (_, c):
        created = await c.create(lines)
        running = await c.wait_until(created.id, lambda b: all(p.provider_batch_id for p in b.parts[:2])
                                     and b.parts[2].request_counts.completed >= 2, timeout=WAIT)
        assert running.status == "in_progress"
        assert [p.status for p in running.parts] == ["in_progress", "in_progress", "in_progress"]
        await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())

        async def cancels_sent() -> bool:
            sent = {r["provider"] for r in fake.state()["requests"]
                    if r["method"] == "POST" and r["path"].endswith("/cancel") and not r["fault"]}
            return sent == {"openai", "anthropic"}

        await until("a cancel at both providers", cancels_sent, WAIT)
        for part in running.parts[:2]:  # the providers confirm on their next poll
            fake.settings(part.provider, part.provider_batch_id, polls_per_state=1)
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await c.results(done.id)
    assert done.status == "cancelled", done
    assert [p.status for p in done.parts] == ["cancelled", "cancelled", "cancelled"]
    sim_done = done.parts[2].request_counts.completed
    assert 2 <= sim_done < 200  # the sim part stopped too
    sim_statuses = [r.status for r in results if r.provider == "sim"]
    assert sim_statuses.count("completed") == sim_done and sim_statuses.count("cancelled") == 200 - sim_done
    # A provider keeps what it finished before the cancel; the rest of its lines are cancelled.
    assert {r.status for r in results if r.provider != "sim"} <= {"completed", "cancelled"}
    assert len(results) == 202


async def test_a_part_larger_than_the_provider_takes_is_several_provider_batches(fake: ProviderFake,
                                                                                 db_url: str) -> None:
    lines = [chat_line(f"r{i}", f"question {i}" + (" FAIL" if i == 7 else ""), model="openai/gpt-4o-mini")
             for i in range(10)]
    async with gateway(make_settings(db_url, poll_seconds=0.02), router(fake, openai_max_lines=3)) as (_, c):
        created = await c.create(lines)
        assert [(p.provider, p.request_counts.total) for p in created.parts] == [("openai", 3)] * 3 + [("openai", 1)]
        assert created.provider == "openai" and created.model == "openai/gpt-4o-mini"
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await c.results(done.id)
    assert done.status == "completed" and done.request_counts.completed == 9 and done.request_counts.failed == 1
    assert creates(fake) == {"openai": 4}
    ids = {p.provider_batch_id for p in done.parts}
    assert len(ids) == 4 and all(ids)
    assert [r.custom_id for r in results] == [f"r{i}" for i in range(10)]
    assert results[7].status == "failed"


async def test_a_lost_submission_of_a_second_part_is_found_not_repeated(fake: ProviderFake, db_url: str) -> None:
    """A crash between 'submitting part 1' and 'its provider id stored': on restart, Sluice asks the
    provider for the batch it made for that part (named after the part) before submitting again."""
    lines = [chat_line(f"r{i}", f"question {i}", model="openai/gpt-4o-mini") for i in range(4)]
    async with gateway(make_settings(db_url), router(fake, openai_max_lines=2)) as (app, c):
        await app.engine.stop()
        created = await c.create(lines)
    adapter = OpenAIAdapter("openai", base_url=fake.url("openai"), api_key=fake.key("openai"))

    async def part_lines() -> Any:
        for i in (2, 3):
            yield RequestLine(i, f"r{i}", "/v1/chat/completions",
                              {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]})

    lost = await adapter.submit(BatchJob(f"{created.id}-p1", "/v1/chat/completions", "gpt-4o-mini", "24h", 2),
                                part_lines())
    await adapter.aclose()
    store = Store(create_engine(db_url))
    await store.mark_submit_started(created.id, 1)
    await store.close()

    async with gateway(make_settings(db_url, poll_seconds=0.02), router(fake, openai_max_lines=2)) as (_, c):
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await c.results(done.id)
    assert done.status == "completed" and done.request_counts.completed == 4
    assert done.parts[1].provider_batch_id == lost
    assert creates(fake) == {"openai": 2}  # the lost one and part 0's: nothing submitted twice
    assert [r.custom_id for r in results] == ["r0", "r1", "r2", "r3"]


async def test_a_part_failing_while_others_run_fails_only_its_lines(fake: ProviderFake, sqlite_url: str) -> None:
    """Anthropic refuses its part (a non-retryable 400 at create): its lines fail with the reason,
    the OpenAI part completes, and the batch completes with the part's error in `errors`; retrying
    the batch runs just the failed part's lines again."""
    fake.add_fault(provider="anthropic", method="POST", path_regex=r"/messages/batches$", status=400, times=1,
                   body={"type": "error", "error": {"type": "invalid_request_error", "message": "bad batch"}})
    async with gateway(make_settings(sqlite_url, poll_seconds=0.02), router(fake)) as (_, c):
        done = await c.wait_for((await c.create(mixed_lines("o a o a"))).id, timeout=WAIT)
        results = {r.custom_id: r for r in await c.results(done.id)}
        assert done.status == "completed", done
        assert [(p.provider, p.status) for p in done.parts] == [("openai", "completed"), ("anthropic", "failed")]
        assert len(done.errors.data) == 1 and "bad batch" in done.errors.data[0].message
        assert done.errors.data[0].param == "parts[1]"
        assert {cid: r.status for cid, r in results.items()} == {"o0": "completed", "a1": "failed",
                                                                 "o2": "completed", "a3": "failed"}
        assert "bad batch" in results["a1"].error.message
        again = await c.wait_for((await c.stub.RetryBatch(batch_pb2.RetryBatchRequest(id=done.id),
                                                          metadata=md())).id, timeout=WAIT)
        assert again.status == "completed" and again.request_counts.completed == 2
        assert [p.provider for p in again.parts] == ["anthropic"]



async def test_a_restart_resumes_every_part_without_submitting_any_twice(fake: ProviderFake, db_url: str) -> None:
    fake.configure(polls_per_state=HOLD)
    lines = mixed_lines("o a " + "s " * 60)
    async with gateway(make_settings(db_url, poll_seconds=0.02), router(fake, sim_latency_ms=20)) as (_, c):
        created = await c.create(lines)
        running = await c.wait_until(created.id, lambda b: all(p.provider_batch_id for p in b.parts[:2])
                                     and b.parts[2].request_counts.completed >= 2, timeout=WAIT)
    for part in running.parts[:2]:  # the providers carry on while Sluice is down
        fake.settings(part.provider, part.provider_batch_id, polls_per_state=1)
    async with gateway(make_settings(db_url, poll_seconds=0.02, replica_id="after-restart"),
                       router(fake, sim_latency_ms=20)) as (_, c):
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await c.results(done.id)
    assert done.status == "completed" and done.request_counts.completed == 62
    assert [p.provider_batch_id for p in done.parts[:2]] == [p.provider_batch_id for p in running.parts[:2]]
    assert creates(fake) == {"openai": 1, "anthropic": 1}
    assert len(results) == 62 and len({r.custom_id for r in results}) == 62


async def test_expiry_ends_every_part(fake: ProviderFake, sqlite_url: str) -> None:
    """Past the window (and the grace for provider batches), each part ends: the provider batch is
    cancelled at the provider and its lines expire; the sim part's unfinished lines expire too."""
    fake.configure(polls_per_state=HOLD)
    settings = make_settings(sqlite_url, poll_seconds=0.02, expiry_grace_seconds=0)
    async with gateway(settings, router(fake, sim_latency_ms=50)) as (app, c):
        created = await c.create(mixed_lines("o " + "s " * 200))
        await c.wait_until(created.id, lambda b: bool(b.parts[0].provider_batch_id)
                           and b.parts[1].request_counts.completed >= 1, timeout=WAIT)
        async with app.store.sessions.begin() as s:  # the 24 h window has passed
            await s.execute(update(BatchRow).where(BatchRow.id == created.id).values(expires_at=now() - 1))
        await app.store.make_due(created.id)
        app.engine.wake()
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await c.results(done.id)
    assert done.status == "expired", done
    assert [p.status for p in done.parts] == ["expired", "expired"]
    assert done.parts[0].errors.data[0].code == "batch_expired"
    cancels = [r for r in fake.state()["requests"] if r["method"] == "POST" and r["path"].endswith("/cancel")]
    assert len(cancels) == 1
    assert {r.status for r in results if r.provider == "openai"} == {"expired"}
    assert {r.status for r in results if r.provider == "sim"} <= {"completed", "expired"}
    assert sum(r.status == "expired" for r in results if r.provider == "sim") > 0
