"""An executor provider's capacity (providers file `capacity`), shared by every batch on every
replica through the database: two in-process replicas (real gRPC, one database) run three batches
of two projects against a loopback OpenAI-compatible server that records how many requests it
had in flight at once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from adapters.openai_compatible import OpenAICompatibleExecutor
from adapters.sim import SimProvider
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, CapacityLimits, ProviderEntry, Router
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
        stub.throttle(3)

        async def lowered() -> float | None:
            limit = await app.store.capacity_limit("local")
            return limit if limit is not None and limit < LIMIT else None

        backed_off = await until("the shared limit to drop after 429s", lowered, 30)
        assert backed_off <= LIMIT / 2
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
