"""Two replicas on one database share the work without losing or duplicating any of it."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

from sqlalchemy import func, select

from adapters.openai import OpenAIAdapter
from adapters.sim import SimProvider
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from service.storage.tables import ResultRow
from tests.harness import chat_line, gateway, make_settings
from tests.native_scenarios import Flavor, make_router
from tests.provider_fake import ProviderFake


def sim_router(latency_ms: float) -> tuple[Router, SimProvider]:
    sim = SimProvider(SIM, options={"latency_ms": latency_ms, "concurrency": 2})
    sim.executions = Counter()
    return Router({SIM: ProviderEntry(provider=sim, default_price=DEFAULT_SIM_PRICE)}), sim


async def test_two_replicas_finish_every_batch_exactly_once(db_url: str) -> None:
    """Each line is executed exactly once, counted where it is executed (each replica's own sim),
    and both replicas take part: each may drive one batch at a time, so neither can take it all."""
    (router_a, sim_a), (router_b, sim_b) = sim_router(20), sim_router(20)
    async with gateway(make_settings(db_url), router_a) as (app_a, client_a), \
            gateway(make_settings(db_url, replica_id="replica-b"), router_b) as (app_b, client_b):
        for app in (app_a, app_b):
            app.engine.settings = replace(app.engine.settings, max_parallel_batches=1)
        created = []
        for n in range(6):
            client = client_a if n % 2 else client_b
            created.append(await client.create([chat_line(f"b{n}-r{i}", f"question {i}") for i in range(8)]))
        finished = await asyncio.gather(*(client_a.wait_for(b.id) for b in created))

        for batch in finished:
            assert batch.status == "completed"
            counts = batch.request_counts
            assert (counts.total, counts.completed, counts.failed) == (8, 8, 0)
            results = await client_b.results(batch.id)
            assert len(results) == 8 and len({r.custom_id for r in results}) == 8
            # Usage is summed once per result: 8 results, 8 output tokens each.
            assert batch.usage.output_tokens == 8 * 8

        async with app_a.store.sessions() as session:
            stored = await session.scalar(select(func.count()).select_from(ResultRow))
        assert stored == 6 * 8

    assert sim_a.executions is not None and sim_b.executions is not None
    executed = sim_a.executions + sim_b.executions
    expected = {f"b{n}-r{i}" for n in range(6) for i in range(8)}
    assert set(executed) == expected
    twice = {cid: k for cid, k in executed.items() if k != 1}
    assert not twice, f"lines executed more than once: {twice}"
    assert sim_a.executions and sim_b.executions, "one replica did all the work"
    assert not set(sim_a.executions) & set(sim_b.executions)


async def test_two_replicas_submit_each_native_batch_once(db_url: str) -> None:
    """Both replicas drive OpenAI batches against the provider fake: every batch is created at
    the provider exactly once and completes with all its results."""
    with ProviderFake() as fake:
        flavor = Flavor("openai", OpenAIAdapter, "gpt-4o-mini", detailed_usage=True)
        async with gateway(make_settings(db_url, poll_seconds=0.02), make_router(fake, flavor)) as (_, client_a), \
                gateway(make_settings(db_url, poll_seconds=0.02, replica_id="replica-b"),
                        make_router(fake, flavor)) as (_, client_b):
            created = [await (client_a if n % 2 else client_b).create(
                [chat_line(f"r{i}", f"question {i}", model=flavor.sluice_model) for i in range(3)])
                for n in range(6)]
            finished = await asyncio.gather(*(client_a.wait_for(b.id) for b in created))
        assert [b.status for b in finished] == ["completed"] * 6
        assert all(b.request_counts.completed == 3 for b in finished)
        state = fake.state()
        assert state["batch_creates"]["openai"] == 6
        assert len({b.provider_batch_id for b in finished}) == 6
