"""Estimates (service/intake/estimate.py) and monthly budgets, below the REST edge: the token bounds
each line gets, EstimateBatch over gRPC, reservations that cannot be overbooked by concurrent
creates on two replicas, and a settlement that happens exactly once."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from adapters.sim import SimProvider
from service.domain.model import BatchStatus, Limits, LineOutcome, Price, ResultStatus, Usage, month_of, now
from service.domain.tokens import DEFAULT_OUTPUT_BOUND, MEDIA_TOKENS, line_tokens
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from service.storage.db import create_engine, migrate
from service.storage.repository import NewRequest, Reservation, Store, new_id
from service.storage.tables import BatchRow
from sluice.v1 import batch_pb2
from tests.harness import KEY_B, chat_line, gateway, make_settings, md
from tests.rpc_errors import expect_error

CHAT = "/v1/chat/completions"


def test_bounds_of_one_line() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "héllo wörld, how are you?"}], "max_tokens": 50}
    t = line_tokens(CHAT, body)
    assert t.input_min == 7  # words
    text_bytes = len(b"be brief") + len("héllo wörld, how are you?".encode())
    assert t.input_max == text_bytes + 2 * 4 + 3  # bytes plus framing
    assert t.input_min <= t.input_estimate <= t.input_max and (t.output_max, t.bounded) == (50, True)

    assert line_tokens(CHAT, {**body, "max_completion_tokens": 7, "n": 3}).output_max == 21
    unbounded = line_tokens(CHAT, {"messages": body["messages"]})
    assert (unbounded.output_max, unbounded.bounded) == (DEFAULT_OUTPUT_BOUND, False)
    assert line_tokens(CHAT, {"messages": body["messages"]}, default_output=100).output_max == 100

    image = line_tokens(CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})
    assert image.input_min == 3 and image.input_max >= MEDIA_TOKENS

    tools = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    assert line_tokens(CHAT, {**body, "tools": [tools]}).input_max > t.input_max

    embed = line_tokens("/v1/embeddings", {"input": [[1, 2, 3], [4, 5]]})
    assert (embed.input_min, embed.input_estimate, embed.input_max, embed.output_max) == (5, 5, 5, 0)
    assert line_tokens("/v1/embeddings", {"input": ["two words", "three more words"]}).input_min == 5
    completion = line_tokens("/v1/completions", {"prompt": "say something", "max_tokens": 9})
    assert (completion.input_min, completion.output_max) == (2, 9)
    response = line_tokens("/v1/responses", {"instructions": "be kind", "input": "hi there",
                                             "max_output_tokens": 11})
    assert (response.input_min, response.output_max) == (4, 11)
    assert line_tokens(CHAT, {"messages": []}).input_min == 1  # never free


def _priced_router() -> Router:
    price = Price(input_per_mtok=1.0, output_per_mtok=2.0, batch_discount=0.5)
    return Router({SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
                   "other": ProviderEntry(provider=SimProvider("other"), models={"m"}, prices={"m": price})})


async def test_estimate_over_grpc_per_part_and_nothing_stored(sqlite_url: str) -> None:
    lines = [chat_line("a", "one two three"), chat_line("b", "four five", model="other/m"),
             chat_line("c", "six", model="other/m")]
    async with gateway(make_settings(sqlite_url), _priced_router()) as (app, c):
        estimate = await c.stub.EstimateBatch(batch_pb2.EstimateBatchRequest(endpoint=CHAT, requests=lines),
                                              metadata=md())
        assert await app.store.count_batches("alpha") == 0
        assert [(p.part, p.provider, p.line_count) for p in estimate.parts] == [(0, SIM, 1), (1, "other", 2)]
        other = estimate.parts[1]
        assert (other.input_per_mtok, other.output_per_mtok, other.batch_discount) == (1.0, 2.0, 0.5)
        assert other.input_tokens.min == 3 and other.output_tokens_max == 32
        assert other.cost_min == pytest.approx(3 * 1.0 * 0.5 / 1e6)
        assert other.cost_max == pytest.approx((other.input_tokens.max * 1.0 + 32 * 2.0) * 0.5 / 1e6)
        assert estimate.cost_max == pytest.approx(sum(p.cost_max for p in estimate.parts))
        assert estimate.input_tokens.min == sum(p.input_tokens.min for p in estimate.parts)

        done = await c.wait_for((await c.create(lines)).id)
        assert estimate.cost_min <= done.usage.total_cost <= estimate.cost_max
        err = await expect_error(c.stub.EstimateBatch(batch_pb2.EstimateBatchRequest(
            endpoint=CHAT, requests=[chat_line("x", model="nope/m")]), metadata=md()), grpc.StatusCode.INVALID_ARGUMENT)
        assert (err.envelope["code"], err.envelope["param"]) == ("model_not_found", "requests[0].body.model")


async def test_concurrent_creates_on_two_replicas_cannot_overbook_a_budget(db_url: str) -> None:
    """Each create alone fits; together they would pass the limit. The reservation is a
    conditional UPDATE in the transaction that inserts the batch, so exactly the ones that fit
    are stored, whichever replica they reach."""
    lines = [chat_line(f"r{i}", "write at length", max_tokens=50_000) for i in range(4)]
    async with gateway(make_settings(db_url), _priced_router()) as (_, a):
        estimate = await a.stub.EstimateBatch(batch_pb2.EstimateBatchRequest(endpoint=CHAT, requests=lines),
                                              metadata=md(KEY_B))
    limit = estimate.cost_max * 2.5  # room for two such batches, not three
    settings = {"budgets": {"beta": limit}}
    async with gateway(make_settings(db_url, **settings), _priced_router()) as (app, a), \
            gateway(make_settings(db_url, replica_id="replica-b", **settings), _priced_router()) as (app_b, b):
        # Nothing runs: a batch that ended would hand back its reservation and make room.
        await app.engine.stop()
        await app_b.engine.stop()
        outcomes = await asyncio.gather(*(client.create(lines, key=KEY_B) for client in (a, b, a, b)),
                                        return_exceptions=True)
        made = [o for o in outcomes if isinstance(o, batch_pb2.Batch)]
        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(made) == 2 and len(refused) == 2, outcomes
        for err in refused:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "insufficient_quota" in dict(err.trailing_metadata())["x-openai-error"]
        assert await app.store.count_batches("beta") == 2
        budget = await a.stub.GetBudget(batch_pb2.GetBudgetRequest(), metadata=md(KEY_B))
        assert budget.reserved == pytest.approx(2 * estimate.cost_max)
        assert budget.remaining == pytest.approx(limit - 2 * estimate.cost_max)
        assert budget.month == month_of(now()) and budget.spent == 0


async def test_the_reservation_is_settled_to_the_actual_cost_exactly_once(db_url: str) -> None:
    await migrate(db_url)
    store = Store(create_engine(db_url))
    try:
        batch = BatchRow.new(id=new_id("batch_"), project="p", endpoint=CHAT, completion_window="24h",
                             created_at=now())
        batch.provider = SIM
        await store.create_batch(batch, [NewRequest("a", "sim/m", {"model": "sim/m"})],
                                 reservation=Reservation(amount=0.5, limit=1.0))
        month = month_of(batch.created_at)
        assert (await store.spend("p", month)).reserved == 0.5
        await store.store_results(batch.id, [LineOutcome(0, "a", ResultStatus.COMPLETED, 200, body={},
                                                         usage=Usage(input_cost=0.1, output_cost=0.02))], part_no=0)
        assert await store.transition(batch.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
        assert (await store.spend("p", month)).reserved == 0.5  # still running: still reserved
        assert await store.transition(batch.id, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
        ends = await asyncio.gather(store.transition(batch.id, BatchStatus.FINALIZING, BatchStatus.COMPLETED),
                                    store.transition(batch.id, BatchStatus.FINALIZING, BatchStatus.COMPLETED))
        assert sorted(ends) == [False, True]
        spend = await store.spend("p", month)
        assert spend.reserved == pytest.approx(0.0) and spend.spent == pytest.approx(0.12)
    finally:
        await store.close()


async def test_a_budget_survives_restarts_and_is_charged_once(db_url: str) -> None:
    """A batch reserved before a restart is settled once by whichever replica ends it."""
    lines = [chat_line(f"r{i}", f"question {i}") for i in range(30)]
    settings: dict[str, Any] = {"budgets": {"beta": 1.0}}
    async with gateway(make_settings(db_url, **settings)) as (app, c):
        await app.engine.stop()
        created = await c.create(lines, key=KEY_B)
        reserved = (await c.stub.GetBudget(batch_pb2.GetBudgetRequest(), metadata=md(KEY_B))).reserved
        assert reserved > 0
    for replica in ("second", "third"):
        async with gateway(make_settings(db_url, replica_id=replica, **settings)) as (_, c):
            done = await c.wait_for(created.id, key=KEY_B)
            budget = await c.stub.GetBudget(batch_pb2.GetBudgetRequest(), metadata=md(KEY_B))
    assert done.status == "completed"
    assert budget.reserved == pytest.approx(0.0, abs=1e-12)
    assert budget.spent == pytest.approx(done.usage.total_cost) and budget.limit == 1.0
    assert budget.remaining == pytest.approx(1.0 - done.usage.total_cost)
    err = await _budget_month(db_url, "2025-13")
    assert err.envelope["code"] == "invalid_month"


async def _budget_month(db_url: str, month: str) -> Any:
    async with gateway(make_settings(db_url)) as (_, c):
        return await expect_error(c.stub.GetBudget(batch_pb2.GetBudgetRequest(month=month), metadata=md()),
                                  grpc.StatusCode.INVALID_ARGUMENT)



def test_budget_and_limit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.providers.registry import ConfigError
    from service.runtime.config import Settings, parse_budgets

    assert parse_budgets(" default=25, team-b=0.5 ,") == {"default": 25.0, "team-b": 0.5}
    for bad in ("default", "default=", "=5", "default=-1", "default=lots"):
        with pytest.raises(ConfigError, match="SLUICE_BUDGETS"):
            parse_budgets(bad)
    monkeypatch.setenv("SLUICE_BUDGETS", "alpha=10")
    monkeypatch.setenv("SLUICE_MAX_BATCH_REQUESTS", "200000")
    monkeypatch.setenv("SLUICE_MAX_FILE_BYTES", str(1 << 30))
    settings = Settings.from_env()
    assert settings.budgets == {"alpha": 10.0}
    assert (settings.limits.max_requests, settings.limits.max_file_bytes) == (200_000, 1 << 30)
    monkeypatch.delenv("SLUICE_MAX_BATCH_REQUESTS")
    monkeypatch.delenv("SLUICE_MAX_FILE_BYTES")
    assert Settings.from_env().limits == Limits()  # unchanged defaults: OpenAI's 50,000 lines, 200 MB
    assert (Limits().max_requests, Limits().max_file_bytes) == (50_000, 200 * 2**20)
    monkeypatch.setenv("SLUICE_MAX_BATCH_REQUESTS", "0")
    with pytest.raises(ConfigError, match="SLUICE_MAX_BATCH_REQUESTS"):
        Settings.from_env()


async def test_raised_limits_take_more_lines_inline_and_in_files(sqlite_url: str) -> None:
    many = [chat_line(f"r{i}") for i in range(12)]
    async with gateway(make_settings(sqlite_url, max_batch_requests=10)) as (_, c):
        err = await expect_error(c.create(many), grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["code"] == "too_many_requests" and "at most 10" in err.message
    async with gateway(make_settings(sqlite_url, max_batch_requests=12)) as (_, c):
        assert (await c.wait_for((await c.create(many)).id)).request_counts.completed == 12
