"""Builds the Router from settings: the built-in sim provider, plus configured providers."""

from __future__ import annotations

from adapters.sim import SimProvider
from service.config import Settings
from service.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router


def build_router(settings: Settings) -> Router:
    sim = SimProvider(SIM, latency_ms=settings.sim_latency_ms, failure_rate=settings.sim_failure_rate,
                      concurrency=settings.executor_concurrency)
    entries = {SIM: ProviderEntry(provider=sim, default_price=DEFAULT_SIM_PRICE)}
    return Router(entries)
