"""Migration 0005 on both backends: the schema it builds is the one `tables.py` declares, and a
batch submitted to a provider before the upgrade (its provider state on the batch row) carries on
after it as the batch's part 0: same provider batch, polled to the end, nothing submitted again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from adapters.base import BatchJob, RequestLine
from adapters.openai import OpenAIAdapter
from service.storage.db import alembic_config, create_engine
from service.storage.tables import Base
from tests.harness import gateway, make_settings
from tests.native_scenarios import Flavor, make_router
from tests.provider_fake import ProviderFake

pytestmark = pytest.mark.empty_database  # these tests run the migrations themselves, from the first


async def upgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(url), revision)


async def test_the_migrated_schema_is_the_declared_one(db_url: str) -> None:
    await upgrade(db_url, "head")
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
    finally:
        await engine.dispose()
    # Only differences a database cannot express the way SQLAlchemy writes them are allowed.
    assert diff == [], diff


async def test_a_batch_in_flight_across_the_upgrade_finishes_as_its_part_0(db_url: str) -> None:
    flavor = Flavor("openai", OpenAIAdapter, "gpt-4o-mini", detailed_usage=True)
    with ProviderFake() as fake:
        # A batch as revision 0004 stored it: submitted to OpenAI, its id on the batch row.
        adapter = OpenAIAdapter("openai", base_url=fake.url("openai"), api_key=fake.key("openai"))
        async def one_line() -> AsyncIterator[RequestLine]:
            yield RequestLine(0, "a", "/v1/chat/completions",
                              {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]})

        pid = await adapter.submit(BatchJob("batch_old", "/v1/chat/completions", "gpt-4o-mini", "24h", 1), one_line())
        await adapter.aclose()
        await upgrade(db_url, "0004")
        engine = create_engine(db_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(
                    "INSERT INTO batches (id, project, status, endpoint, completion_window, input_file_id, model, "
                    "provider, provider_model, created_at, expires_at, in_progress_at, total, completed, failed, "
                    "input_tokens, cached_tokens, output_tokens, reasoning_tokens, input_cost, output_cost, "
                    "provider_batch_id, provider_status, submit_started_at, poll_failures) VALUES "
                    "('batch_old', 'alpha', 'in_progress', '/v1/chat/completions', '24h', '', 'openai/gpt-4o-mini', "
                    "'openai', 'gpt-4o-mini', 1700000000, 4102444800, 1700000001, 1, 0, 0, 0, 0, 0, 0, 0, 0, "
                    ":pid, 'validating', 1700000000, 2)"), {"pid": pid})
                await conn.execute(text(
                    "INSERT INTO batch_requests (batch_id, idx, custom_id, model, provider_model, body_json) VALUES "
                    "('batch_old', 0, 'a', 'openai/gpt-4o-mini', 'gpt-4o-mini', :body)"), {"body": json.dumps(
                        {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]})})
        finally:
            await engine.dispose()

        async with gateway(make_settings(db_url, poll_seconds=0.02), make_router(fake, flavor)) as (_, c):
            before = await c.get("batch_old")
            assert [(p.part, p.provider, p.provider_batch_id, p.status, p.request_counts.total)
                    for p in before.parts] == [(0, "openai", pid, "in_progress", 1)]
            done = await c.wait_for("batch_old")
            (result,) = await c.results("batch_old")
        assert done.status == "completed" and done.provider_batch_id == pid
        assert result.status == "completed" and result.provider == "openai"
        assert fake.state()["batch_creates"]["openai"] == 1  # the one made before the upgrade
