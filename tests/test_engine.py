"""Engine behaviour that no single RPC shows: a batch whose provider is not configured on this
replica waits, with a log line saying why, and finishes once a replica has the provider."""

from __future__ import annotations

import logging

import pytest

from adapters.sim import SimProvider
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from tests.harness import chat_line, gateway, make_settings, until


def router_with(*names: str) -> Router:
    return Router({name: ProviderEntry(provider=SimProvider(name), models={"local-model"} if name != SIM else set(),
                                       default_price=DEFAULT_SIM_PRICE) for name in names})


async def test_batch_for_an_unconfigured_provider_waits_then_finishes(db_url: str,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(db_url)
    async with gateway(settings, router_with(SIM, "local")) as (app, client):
        await app.engine.stop()  # accept the batch, run nothing
        batch = await client.create([chat_line("a", model="local/local-model")])
    assert batch.provider == "local"

    caplog.set_level(logging.WARNING, logger="service.engine.engine")
    async with gateway(make_settings(db_url), router_with(SIM)) as (_, client):
        async def warned() -> bool:
            return "is not configured now" in caplog.text
        await until("a log line about the missing provider", warned, 10)
        assert (await client.get(batch.id)).status == "validating"

    async with gateway(make_settings(db_url), router_with(SIM, "local")) as (app, client):
        # The previous replica pushed the batch's next look a minute out; make it due now.
        await app.store.make_due(batch.id)
        app.engine.wake()
        done = await client.wait_for(batch.id)
    assert done.status == "completed"
    assert done.request_counts.completed == 1


async def test_an_accepted_batch_keeps_the_route_it_was_accepted_with(sqlite_url: str) -> None:
    """The route is resolved once, at intake: editing the providers file (here, an alias) after a
    batch was accepted does not change which model its lines run on, nor the batch's provider."""
    def router(alias_target: str) -> Router:
        local = ProviderEntry(provider=SimProvider("local"), aliases={"fast": alias_target},
                              default_price=DEFAULT_SIM_PRICE)
        return Router({SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
                       "local": local})

    async with gateway(make_settings(sqlite_url), router("model-one")) as (app, client):
        await app.engine.stop()  # accept the batch, run nothing
        batch = await client.create([chat_line("a", model="fast"), chat_line("b", model="fast")])
    assert batch.provider == "local"

    async with gateway(make_settings(sqlite_url), router("model-two")) as (_, client):
        done = await client.wait_for(batch.id)
        results = await client.results(batch.id)
    assert done.status == "completed"
    assert [r.response["model"] for r in results] == ["model-one", "model-one"]
