"""An ended batch stays ended: no replica leases it again, and nothing rewrites its output files.

The defect these tests pin (issue 14): `Store.claim` chose its candidates in one statement and
leased them in another whose WHERE did not re-check the status, so a batch that ended between
the two was leased again; the new owner then finalized it a second time, discarding and
rewriting its output and error files before the transition failed with "illegal batch
transition completed -> completed". The interleaving is forced here, not hoped for: a hook on
the database connection runs just before the lease UPDATE is sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from sqlalchemy import delete, select
from sqlalchemy.util import await_only

from adapters.openai import OpenAIAdapter
from service.domain.model import BatchStatus
from service.storage.db import create_engine, migrate
from service.storage.repository import Store
from service.storage.tables import BatchRow, FileChunkRow, FileRow, ResultRow
from tests.db_hooks import before_lease_update
from tests.harness import chat_line, gateway, make_settings, until
from tests.native_scenarios import Flavor, make_router
from tests.provider_fake import ProviderFake
from tests.test_store import new_batch

OPENAI = Flavor("openai", OpenAIAdapter, "gpt-4o-mini", detailed_usage=True)


async def test_claim_never_leases_a_batch_that_ended_after_it_was_chosen(db_url: str) -> None:
    """The batch ends (another replica completes it) after the claim chose it and before the
    lease is written: the claim must not return it, and the lease columns stay empty."""
    await migrate(db_url)
    store = Store(create_engine(db_url))
    try:
        batch_id = await new_batch(store, 1)
        fired: list[str] = []

        def complete_it(conn: Any, leased: str) -> None:
            if leased == batch_id and not fired:
                fired.append(leased)
                conn.exec_driver_sql(f"UPDATE batches SET status = 'completed' WHERE id = '{batch_id}'")

        remove = before_lease_update(store.engine, complete_it)
        try:
            claimed = await store.claim("replica-b", 30, 10)
        finally:
            remove()
        assert fired == [batch_id], "the claim never tried to lease the batch: the hook needs updating"
        assert claimed == [], "a batch that had ended was leased again"
        row = await store.engine_batch(batch_id)
        assert row.status == "completed" and row.lease_owner is None
    finally:
        await store.close()


async def _file_rows(store: Store, file_ids: list[str]) -> dict[str, tuple[Any, ...] | None]:
    """Each file's row and content, exactly as stored (a rewrite changes at least the chunks'
    identity, so content is compared together with the row)."""
    out: dict[str, tuple[Any, ...] | None] = {}
    async with store.sessions() as s:
        for file_id in file_ids:
            row = await s.scalar(select(FileRow).where(FileRow.id == file_id))
            if row is None:  # discarded (a rewrite in progress, or lost)
                out[file_id] = None
                continue
            chunks = (await s.execute(select(FileChunkRow.seq, FileChunkRow.data)
                                      .where(FileChunkRow.file_id == file_id).order_by(FileChunkRow.seq))).all()
            out[file_id] = (row.status, row.bytes, row.line_count, row.created_at,
                            tuple((seq, bytes(data)) for seq, data in chunks))
    return out


@pytest.mark.timeout(900)  # 50 native batches on two replicas: about a minute idle, minutes under load
async def test_a_second_replica_never_refinalizes_an_ended_native_batch(
        db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Replica A drives the batches; replica B's lease UPDATE of a batch it chose is held until
    that batch has ended (the widest form of the race). B must then take nothing: no ERROR line,
    the provider's results fetched once per batch, and every output/error file byte-identical to
    what it was when its batch ended."""
    caplog.set_level(logging.INFO)
    n = 50
    with ProviderFake() as fake:
        router_a, router_b = make_router(fake, OPENAI), make_router(fake, OPENAI)
        watcher = Store(create_engine(db_url))
        async with gateway(make_settings(db_url, poll_seconds=0.02, replica_id="replica-a"), router_a) as (_, c), \
                gateway(make_settings(db_url, poll_seconds=0.02, replica_id="replica-b"), router_b) as (app_b, _):
            at_end: dict[str, dict[str, tuple[Any, ...] | None]] = {}

            async def ended(batch_id: str) -> BatchRow | None:
                row = await watcher.engine_batch(batch_id)
                return row if BatchStatus(row.status).terminal else None

            async def files_when_ended(batch_id: str) -> None:
                row = await until(f"{batch_id} to end", lambda: ended(batch_id), 600)
                at_end[batch_id] = await _file_rows(watcher, [f for f in (row.output_file_id, row.error_file_id)
                                                              if f])

            def hold_until_ended(_: Any, batch_id: str) -> None:
                if batch_id not in at_end:
                    await_only(files_when_ended(batch_id))

            remove = before_lease_update(app_b.store.engine, hold_until_ended)
            try:
                created = [await c.create([chat_line(f"r{i}", "please FAIL" if i == 2 else f"question {i}",
                                                     model=OPENAI.sluice_model) for i in range(3)])
                           for _ in range(n)]
                finished = await asyncio.gather(*(c.wait_for(b.id, timeout=600) for b in created))
                assert [b.status for b in finished] == ["completed"] * n
                # B tries to lease, one after the other, every batch its claim chose; let it.
                await until("replica B to try a lease", lambda: _true(bool(at_end)), 60)
                settle = time.monotonic()
                await until("a few more claim rounds of B", lambda: _true(time.monotonic() - settle > 1.0), 10)
            finally:
                remove()
            after = {batch_id: await _file_rows(watcher, list(files)) for batch_id, files in at_end.items()}
            leased_by_b = await _leased_by(watcher, "replica-b")
        await watcher.close()

    assert at_end, "replica B never tried to lease an ended batch: the race was not exercised"
    assert after == at_end, "an ended batch's output or error file was rewritten"
    assert leased_by_b == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    downloads = [r for r in fake.state()["requests"] if r["method"] == "GET" and r["path"].endswith("/content")]
    # One output and one error file per batch at the provider, each downloaded exactly once.
    assert len(downloads) == 2 * n and len({r["path"] for r in downloads}) == 2 * n, len(downloads)


async def _true(value: bool) -> bool:
    return value


async def _leased_by(store: Store, owner: str) -> list[str]:
    async with store.sessions() as s:
        return list((await s.scalars(select(BatchRow.id).where(BatchRow.lease_owner == owner))).all())


async def test_the_finalizer_leaves_an_ended_batchs_files_alone(db_url: str) -> None:
    """OutputFiles called again for a batch that has ended (a late step of a replica whose lease
    ran out) answers with the files the batch has and writes nothing."""
    from service.engine.output_files import OutputFiles
    from service.storage.repository import OutputFileIds

    async with gateway(make_settings(db_url)) as (app, c):
        batch = await c.wait_for((await c.create([chat_line("a"), chat_line("b", "SIM_FAIL")])).id)
        assert batch.status == "completed"
        files = [batch.output_file_id, batch.error_file_id]
        before = await _file_rows(app.store, files)
        row = await app.store.engine_batch(batch.id)
        async with app.store.sessions.begin() as s:  # so that a rewrite could not look like the original
            await s.execute(delete(ResultRow).where(ResultRow.batch_id == batch.id))
        fields = await OutputFiles(app.store)(row)
        assert fields == OutputFileIds(output_file_id=batch.output_file_id, error_file_id=batch.error_file_id)
        assert await _file_rows(app.store, files) == before
