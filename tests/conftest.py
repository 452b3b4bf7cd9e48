"""Shared fixtures: databases (SQLite and a real PostgreSQL) and an in-process gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from service.storage.db import create_engine, migrate
from service.storage.repository import Store
from tests.harness import Client, gateway, make_settings
from tests.pg_fixtures import postgres_server, postgres_url  # noqa: F401
from tests.provider_fake.server import live_fakes
from tests.s3_server import s3_env, s3_server  # noqa: F401


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every storage-touching test runs on both backends, so no SQLite-only habit creeps in."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/sluice.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path}/sluice.db"


@pytest.fixture
async def sluice(sqlite_url: str) -> AsyncIterator[Client]:
    """A gateway on SQLite with the sim provider answering at once."""
    async with gateway(make_settings(sqlite_url)) as (_, c):
        yield c


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated, empty store on each backend."""
    await migrate(db_url)
    s = Store(create_engine(db_url))
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(autouse=True)
def provider_fake_conformance() -> Iterator[None]:
    """Fail any test during which a provider fake saw a request, or sent an answer, that breaks the
    provider's official spec (tests/provider_fake/conformance.py). A test that breaks one on purpose
    takes its violations with `fake.take_violations()` and asserts on them."""
    yield
    found: dict[str, int] = {}
    for fake in live_fakes():
        for v in fake.take_violations():
            found[str(v)] = found.get(str(v), 0) + 1
    if found:
        lines = [f"  - {text}" + (f" (x{n})" if n > 1 else "") for text, n in found.items()]
        pytest.fail("the provider fake saw spec violations:\n" + "\n".join(lines), pytrace=False)
