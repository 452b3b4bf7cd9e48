"""An executor provider's capacity (providers file `capacity`), shared by every batch on every
replica through the database: two in-process replicas (real gRPC, one database) run three batches
of two projects against a loopback OpenAI-compatible server that records how many requests it
had in flight at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event

from adapters.openai_compatible import OpenAICompatibleExecutor
from adapters.sim import SimProvider
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, CapacityLimits, ProviderEntry, Router
from service.storage.db import create_engine, migrate
from service.storage.repository import Store
from tests.compat_stub import CompatStub
from tests.harness import KEY_A, KEY_B, chat_line, gateway, make_settings, until

LIMIT = 4


@pytest.fixture
def stub() -> Iterator[CompatStub]:
    with CompatStub(latency=0.03) as server:
        yield server


def router(stub: CompatStub, **limits: int) -> Router:
    local = OpenAICompatibleExecutor("local", base_url=stub.url, options={"concurrency": 16})
    return Router({SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
                   "local": ProviderEntry(provider=local, models={"m"},
                                          capacity=CapacityLimits(concurrency=LIMIT, **limits))})


def lines(prefix: str, n: int) -> list:  # type: ignore[type-arg]
    return [chat_line(f"{prefix}{i}", f"question {i}", model="local/m") for i in range(n)]


async def test_two_replicas_and_three_batches_never_exceed_the_limit(stub: CompatStub, db_url: str) -> None:
    async with gateway(make_settings(db_url), router(stub)) as (_, a), \
            gateway(make_settings(db_url, replica_id="replica-b"), router(stub)) as (_, b):
        created = [await a.create(lines("a", 60), key=KEY_A), await b.create(lines("b", 60), key=KEY_A),
                   await a.create(lines("c", 60), key=KEY_B)]
        done = await asyncio.gather(*(a.wait_for(x.id, key=k, timeout=120)
                                      for x, k in zip(created, (KEY_A, KEY_A, KEY_B), strict=True)))
    assert [d.status for d in done] == ["completed"] * 3
    assert all(d.request_counts.completed == 60 for d in done)
    assert stub.served == 180
    assert stub.peak <= LIMIT, stub.peak
    assert stub.peak >= 2  # the capacity was used, not serialised to one
    # Fair share: beta's one batch got as much as alpha's two together, so it did not finish last.
    assert done[2].completed_at <= max(done[0].completed_at, done[1].completed_at)


async def test_429s_halve_the_shared_concurrency_then_it_recovers(stub: CompatStub, sqlite_url: str) -> None:
    async with gateway(make_settings(sqlite_url), router(stub)) as (app, c):
        first = await c.create(lines("w", 40))
        await c.wait_until(first.id, lambda b: b.request_counts.completed >= 8, timeout=60)
        # The limit as each backoff leaves it, read in the backoff's own transaction: polling it from
        # outside raced the first recovery, which can follow within milliseconds.
        backed_off: list[float] = []

        def after(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            flat = " ".join(statement.split()).lower()
            if flat.startswith("update capacity_state set current_limit") and "backed_off_at" in flat:
                backed_off.append(conn.exec_driver_sql(
                    "SELECT current_limit FROM capacity_state WHERE provider = 'local'").scalar())

        event.listen(app.store.engine.sync_engine, "after_cursor_execute", after)
        stub.throttle(3)

        async def lowered() -> list[float]:
            return backed_off

        assert (await until("the shared limit to drop after 429s", lowered, 30))[0] == LIMIT / 2
        stub.reset_peak()
        done = await c.wait_for(first.id, timeout=120)
        assert done.status == "completed" and done.request_counts.completed == 40  # the 429s were retried
        assert stub.throttled == 3

        second = await c.create(lines("r", 60))

        async def recovered() -> bool:
            return (await app.store.capacity_limit("local") or 0) >= LIMIT - 1e-9

        await until("the shared limit to grow back", recovered, 60)
        await c.wait_for(second.id, timeout=120)
    assert stub.peak <= LIMIT


async def test_requests_per_minute_hold_across_replicas(stub: CompatStub, sqlite_url: str) -> None:
    """With 10 requests a minute, two replicas send 10 in the first minute, not 10 each."""
    async with gateway(make_settings(sqlite_url), router(stub, requests_per_minute=10)) as (app, a), \
            gateway(make_settings(sqlite_url, replica_id="replica-b"), router(stub, requests_per_minute=10)) as (_, b):
        created = [await a.create(lines("x", 8)), await b.create(lines("y", 8))]

        async def ten_served() -> bool:
            return stub.served >= 10

        await until("ten requests", ten_served, 30)
        progress = [await a.get(x.id) for x in created]
        assert sum(p.request_counts.completed for p in progress) <= 10
        assert stub.served == 10  # the rest wait for the next minute
        await app.engine.stop()


async def test_minute_windows_count_requests_and_tokens(db_url: str) -> None:
    await migrate(db_url)
    store = Store(create_engine(db_url))
    try:
        minute = 29_000_000
        assert await store.count_request("p", minute, 100, None, 250)
        assert await store.count_request("p", minute, 100, None, 250)
        assert not await store.count_request("p", minute, 100, None, 250)  # 300 > 250
        await store.correct_tokens("p", minute, -150)  # the two used 50 in all
        assert await store.count_request("p", minute, 100, None, 250)
        assert await store.count_request("p", minute + 1, 1000, None, 250)  # alone in its window: goes
        assert not await store.count_request("p", minute + 1, 1, None, 250)
        assert await store.count_request("q", minute, 1, 2, None)
        assert await store.count_request("q", minute, 1, 2, None)
        assert not await store.count_request("q", minute, 1, 2, None)
        # Slots: compare-and-set per slot, a holder frees only its own.
        await store.ensure_capacity("p", 2, 2.0)
        await store.ensure_capacity("p", 2, 2.0)  # idempotent
        assert await store.take_slot("p", 2, "h1", 9e12) == 0
        assert await store.take_slot("p", 2, "h2", 9e12) == 1
        assert await store.take_slot("p", 2, "h3", 9e12) is None
        await store.free_slot("p", "h3")
        assert await store.take_slot("p", 2, "h3", 9e12) is None
        await store.free_slot("p", "h1")
        assert await store.take_slot("p", 2, "h3", 9e12) == 0
        assert await store.take_slot("p", 1, "h4", 0.0) is None  # under a lowered limit of 1
        # The adaptive limit: halved at most once per cooldown, grown back up to the ceiling.
        assert await store.back_off("p", 0.5, 1.0, cooldown=60)
        assert not await store.back_off("p", 0.5, 1.0, cooldown=60)
        assert await store.capacity_limit("p") == 1.0
        await store.recover("p", 0.5, 2.0)
        await store.recover("p", 5.0, 2.0)
        assert await store.capacity_limit("p") == 2.0
    finally:
        await store.close()
