"""The store on both backends (SQLite and a real PostgreSQL, via `db_url`): migrations, atomic
creates, idempotent result storage, exclusive leases and the compare-and-set state machine."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from service.domain.errors import Conflict, NotFound
from service.domain.model import (
    CANCELLABLE,
    TERMINAL,
    TRANSITIONS,
    BatchStatus,
    LineOutcome,
    ResultError,
    ResultStatus,
    Usage,
    can_transition,
    now,
)
from service.storage.db import alembic_config, create_engine, migrate
from service.storage.repository import NewRequest, Store, new_id
from service.storage.tables import BatchRow, RequestRow, ResultRow
from tests.db_hooks import before_lease_update
from tests.harness import ROOT

TABLES = {"api_keys", "batches", "batch_requests", "batch_results", "files", "file_chunks"}


def batch_row(project: str = "alpha", **fields: Any) -> BatchRow:
    row = BatchRow.new(id=new_id("batch_"), project=project, endpoint="/v1/chat/completions",
                       completion_window="24h", created_at=now())
    row.model, row.provider = "sim/m", "sim"
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def requests(n: int) -> Iterator[NewRequest]:
    for i in range(n):
        yield NewRequest(custom_id=f"r{i}", model="sim/m", body={"model": "sim/m", "prompt": f"line {i}"})


async def new_batch(store: Store, n: int = 3, **fields: Any) -> str:
    row = await store.create_batch(batch_row(**fields), requests(n))
    return row.id


def ok(idx: int, tokens: int = 5) -> LineOutcome:
    usage = Usage(input_tokens=tokens, output_tokens=8, input_cost=tokens * 1e-7, output_cost=8e-7)
    return LineOutcome(idx, f"r{idx}", ResultStatus.COMPLETED, 200, body={"object": "chat.completion"}, usage=usage)


def failed(idx: int) -> LineOutcome:
    return LineOutcome(idx, f"r{idx}", ResultStatus.FAILED, 500, error=ResultError(code="boom", message="no"))


async def count(store: Store, table: Any, batch_id: str | None = None) -> int:
    query = select(func.count()).select_from(table)
    if batch_id is not None:
        query = query.where(table.batch_id == batch_id)
    async with store.sessions() as s:
        return int(await s.scalar(query) or 0)


# --------------------------------------------------------------------------- schema


@pytest.mark.empty_database
async def test_migrations_apply_twice_idempotently(db_url: str) -> None:
    await migrate(db_url)
    await migrate(db_url)
    head = ScriptDirectory.from_config(alembic_config(db_url)).get_current_head()
    engine = create_engine(db_url)
    try:
        async with engine.connect() as conn:
            versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars().all()
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert versions == [head]
        assert TABLES <= tables
    finally:
        await engine.dispose()
    s = Store(create_engine(db_url))
    try:
        await new_batch(s)  # and the schema is usable
        await migrate(db_url)  # a third run with data in place changes nothing
        assert await count(s, BatchRow) == 1
    finally:
        await s.close()


def test_concurrent_migrations_on_postgres(postgres_url: str) -> None:
    """Replicas starting together serialise on an advisory lock (PostgreSQL only: SQLite is one
    node). Each replica is its own process, as in production: Alembic's context is per process."""
    env = {**os.environ, "SLUICE_DATABASE_URL": postgres_url, "SLUICE_API_KEY": ""}
    procs = [subprocess.Popen([sys.executable, "-m", "service.runtime.cli", "migrate"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs


async def test_request_and_result_indexes(store: Store) -> None:
    async with store.engine.connect() as conn:
        req_indexes = await conn.run_sync(lambda c: inspect(c).get_indexes("batch_requests"))
        res_indexes = await conn.run_sync(lambda c: inspect(c).get_indexes("batch_results"))
        req_pk = await conn.run_sync(lambda c: inspect(c).get_pk_constraint("batch_requests"))
        res_pk = await conn.run_sync(lambda c: inspect(c).get_pk_constraint("batch_results"))
    assert any(ix["column_names"] == ["batch_id", "custom_id"] and ix["unique"] for ix in req_indexes), req_indexes
    # Results are read by (batch_id, idx) only; a custom_id is looked up among the requests.
    assert res_indexes == [], res_indexes
    assert req_pk["constrained_columns"] == ["batch_id", "idx"]
    assert res_pk["constrained_columns"] == ["batch_id", "idx"]

    # The unique index is enforced by the database itself (the validator is not the only guard).
    dup = [NewRequest("same", "sim/m", {"model": "sim/m"}), NewRequest("same", "sim/m", {"model": "sim/m"})]
    with pytest.raises(IntegrityError):
        await store.create_batch(batch_row(), dup)
    assert await count(store, BatchRow) == 0 and await count(store, RequestRow) == 0
    # ... and only within a batch: two batches may reuse a custom_id.
    a, b = await new_batch(store, 2), await new_batch(store, 2)
    assert a != b and await count(store, RequestRow) == 4


# --------------------------------------------------------------------------- create


async def test_create_batch_stores_every_line_as_a_row(store: Store) -> None:
    batch_id = await new_batch(store, 1203)  # more than two insert chunks
    assert (await store.get_batch("alpha", batch_id)).total == 1203
    assert await count(store, RequestRow, batch_id) == 1203
    seen = [r.custom_id async for r in store.iter_requests(batch_id, page=500)]
    assert seen == [f"r{i}" for i in range(1203)]


@pytest.mark.parametrize("fail_after", [0, 1, 700])
async def test_create_batch_is_all_or_nothing(store: Store, fail_after: int) -> None:
    def broken() -> Iterator[NewRequest]:
        yield from itertools.islice(requests(10_000), fail_after)  # 700 > one flushed chunk of 500
        raise RuntimeError("the upload broke")

    async def broken_async() -> AsyncIterator[NewRequest]:
        for req in itertools.islice(requests(10_000), fail_after):
            yield req
        raise RuntimeError("the upload broke")

    for source in (broken(), broken_async()):
        with pytest.raises(RuntimeError):
            await store.create_batch(batch_row(), source)
    assert await count(store, BatchRow) == 0
    assert await count(store, RequestRow) == 0
    assert await store.count_batches("alpha") == 0


# --------------------------------------------------------------------------- results


async def test_store_results_counts_each_result_once(store: Store) -> None:
    batch_id = await new_batch(store, 4)
    assert await store.store_results(batch_id, [ok(0), ok(1, tokens=7), failed(2)]) == 3
    assert await store.store_results(batch_id, [ok(0), ok(1, tokens=7), failed(2)]) == 0
    # A retry that overlaps: only the new one counts; a different outcome for a stored line is ignored.
    assert await store.store_results(batch_id, [failed(0), ok(3)]) == 1
    assert await store.store_results(batch_id, []) == 0

    batch = await store.get_batch("alpha", batch_id)
    assert (batch.completed, batch.failed, batch.total) == (3, 1, 4)
    assert batch.input_tokens == 5 + 7 + 5 and batch.output_tokens == 24
    assert batch.input_cost == pytest.approx((5 + 7 + 5) * 1e-7) and batch.output_cost == pytest.approx(3 * 8e-7)
    assert await count(store, ResultRow, batch_id) == 4
    _, _, first = await store.get_result("alpha", batch_id, "r0")
    assert first is not None and first.status == "completed"  # the first stored outcome stays


async def test_store_results_concurrently_from_two_replicas(store: Store, db_url: str) -> None:
    batch_id = await new_batch(store, 40)
    other = Store(create_engine(db_url))
    try:
        everything = [ok(i) for i in range(40)]
        halves = [everything[:25], everything[15:], everything, everything[::-1]]
        inserted = await asyncio.gather(*(s.store_results(batch_id, part)
                                          for s, part in zip([store, other, store, other], halves, strict=True)))
    finally:
        await other.close()
    assert sum(inserted) == 40
    batch = await store.get_batch("alpha", batch_id)
    assert (batch.completed, batch.failed) == (40, 0)
    assert batch.input_tokens == 40 * 5 and batch.output_tokens == 40 * 8
    assert batch.input_cost == pytest.approx(40 * 5e-7)
    assert await count(store, ResultRow, batch_id) == 40
    assert await store.pending_requests(batch_id, 100) == []


async def test_pending_requests_are_those_without_a_result(store: Store) -> None:
    batch_id = await new_batch(store, 5)
    await store.store_results(batch_id, [ok(1), failed(3)])
    assert [r.idx for r in await store.pending_requests(batch_id, 10)] == [0, 2, 4]
    assert [r.idx for r in await store.pending_requests(batch_id, 2)] == [0, 2]


# --------------------------------------------------------------------------- leases


async def test_claim_leases_are_exclusive(store: Store) -> None:
    ids = {await new_batch(store, 1) for _ in range(6)}
    a, b = await asyncio.gather(store.claim("replica-a", 30, 10), store.claim("replica-b", 30, 10))
    assert not set(a) & set(b), "a batch leased to two replicas"
    assert set(a) | set(b) == ids
    # Nobody else gets them while the leases hold; the owner may re-claim its own.
    assert await store.claim("replica-c", 30, 10) == []
    assert set(await store.claim("replica-a", 30, 10)) == set(a)
    assert set(await store.claim("replica-b", 30, 10)) == set(b)


async def test_renew_and_release_are_for_the_owner_only(store: Store) -> None:
    batch_id = await new_batch(store, 1)
    assert await store.claim("replica-a", 30, 10) == [batch_id]
    assert await store.renew(batch_id, "replica-a", 30)
    assert not await store.renew(batch_id, "replica-b", 30)
    await store.release(batch_id, "replica-b")  # not the owner: changes nothing
    assert await store.claim("replica-c", 30, 10) == []
    row = await store.engine_batch(batch_id)
    assert row.lease_owner == "replica-a" and row.lease_until is not None and row.lease_until > time.time() + 20
    # A release hands the batch back at once, with the next look it asked for.
    await store.release(batch_id, "replica-a", next_poll_at=time.time() - 1)
    row = await store.engine_batch(batch_id)
    assert row.lease_owner is None and row.lease_until is None
    assert not await store.renew(batch_id, "replica-a", 30), "a released lease cannot be renewed"
    assert await store.claim("replica-c", 30, 10) == [batch_id]
    assert (await store.engine_batch(batch_id)).lease_owner == "replica-c"


async def test_claim_takes_at_most_the_limit(store: Store) -> None:
    ids = {await new_batch(store, 1) for _ in range(5)}
    first = await store.claim("r", 30, 2)
    assert len(first) == 2 and set(first) <= ids
    assert set(await store.claim("other", 30, 10)) == ids - set(first)


async def test_claim_lease_expires(store: Store) -> None:
    batch_id = await new_batch(store, 1)
    assert await store.claim("dead", -1, 10) == [batch_id]  # a lease already in the past
    assert await store.claim("alive", 30, 10) == [batch_id]
    assert await store.claim("dead", 30, 10) == []

    # And a lease running out in real time, observed by bounded polling.
    other = await new_batch(store, 1)
    assert await store.claim("short", 0.3, 10) == [other]
    assert await store.claim("waiting", 30, 10) == []
    deadline = time.monotonic() + 5
    while not (got := await store.claim("waiting", 30, 10)):
        assert time.monotonic() < deadline, "lease never expired"
        await asyncio.sleep(0.05)
    assert got == [other]


async def test_claim_never_leases_a_batch_that_stopped_being_due_after_it_was_chosen(store: Store) -> None:
    """A step that just ended asked to be left alone for a while (backoff, Retry-After) between
    the claim's choice and its lease: the lease is not taken."""
    batch_id = await new_batch(store, 1)
    fired: list[str] = []

    def push_back(conn: Any, leased: str) -> None:
        if leased == batch_id and not fired:
            fired.append(leased)
            conn.exec_driver_sql(f"UPDATE batches SET next_poll_at = {time.time() + 3600} WHERE id = '{batch_id}'")

    remove = before_lease_update(store.engine, push_back)
    try:
        claimed = await store.claim("r", 30, 10)
    finally:
        remove()
    assert fired == [batch_id] and claimed == []
    assert (await store.engine_batch(batch_id)).lease_owner is None


async def test_claim_skips_terminal_and_not_yet_due_batches(store: Store) -> None:
    done = await new_batch(store, 1, status=BatchStatus.COMPLETED.value)
    later = await new_batch(store, 1, next_poll_at=time.time() + 3600)
    due = await new_batch(store, 1, next_poll_at=time.time() - 1)
    claimed = await store.claim("r", 30, 10)
    assert due in claimed and done not in claimed and later not in claimed
    await store.release(due, "r", next_poll_at=time.time() + 3600)
    assert await store.claim("r2", 30, 10) == []


# --------------------------------------------------------------------------- state machine


# The documented state machine (README "The API": validating -> in_progress -> finalizing ->
# completed, or failed, expired, cancelling -> cancelled; docs/architecture.md: a cancel that
# loses the race to the provider's completion ends `completed`), written out edge by edge so that
# a wrong edge added to (or one removed from) service/domain/model.py fails here.
DOCUMENTED_EDGES = {
    ("validating", "in_progress"), ("validating", "failed"), ("validating", "cancelling"),
    ("validating", "expired"),
    ("in_progress", "finalizing"), ("in_progress", "failed"), ("in_progress", "cancelling"),
    ("in_progress", "expired"),
    ("finalizing", "completed"), ("finalizing", "failed"), ("finalizing", "expired"), ("finalizing", "cancelled"),
    ("cancelling", "cancelled"), ("cancelling", "completed"), ("cancelling", "failed"), ("cancelling", "expired"),
}
STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")


def test_transition_table_is_the_documented_state_machine() -> None:
    assert {s.value for s in BatchStatus} == set(STATUSES)
    table = {(src.value, dst.value) for src, dsts in TRANSITIONS.items() for dst in dsts}
    assert table == DOCUMENTED_EDGES, (sorted(table - DOCUMENTED_EDGES), sorted(DOCUMENTED_EDGES - table))
    for src, dst in itertools.product(STATUSES, STATUSES):
        assert can_transition(BatchStatus(src), BatchStatus(dst)) == ((src, dst) in DOCUMENTED_EDGES), (src, dst)
    assert {s.value for s in TERMINAL} == {"completed", "failed", "expired", "cancelled"}
    assert {s.value for s in BatchStatus if s.terminal} == {"completed", "failed", "expired", "cancelled"}
    assert {s.value for s in CANCELLABLE} == {"validating", "in_progress"}


async def test_transition_is_compare_and_set(store: Store) -> None:
    batch_id = await new_batch(store, 1)
    assert await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert not await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)  # moved already
    row = await store.engine_batch(batch_id)
    assert row.status == "in_progress" and row.in_progress_at is not None
    stamped = row.in_progress_at

    # Two racing writers from the same state: exactly one wins.
    wins = await asyncio.gather(store.transition(batch_id, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING),
                                store.transition(batch_id, BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING))
    assert sorted(wins) == [False, True]
    row = await store.engine_batch(batch_id)
    assert row.status in {"finalizing", "cancelling"} and row.in_progress_at == stamped
    assert (row.finalizing_at is None) != (row.cancelling_at is None)
    assert not await store.transition("batch_unknown", BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)


async def test_transition_follows_the_documented_edges_only(store: Store) -> None:
    """Every pair of statuses against the literal table: an edge moves the batch and stamps
    `<dst>_at`; anything else is refused and changes nothing."""
    for src, dst in itertools.product(STATUSES, STATUSES):
        batch_id = await new_batch(store, 1, status=src)
        if (src, dst) in DOCUMENTED_EDGES:
            assert await store.transition(batch_id, BatchStatus(src), BatchStatus(dst)), (src, dst)
            row = await store.engine_batch(batch_id)
            assert row.status == dst and getattr(row, f"{dst}_at") is not None, (src, dst)
        else:
            with pytest.raises(ValueError, match="illegal"):
                await store.transition(batch_id, BatchStatus(src), BatchStatus(dst))
            assert (await store.engine_batch(batch_id)).status == src, (src, dst)


async def test_request_cancel_follows_the_state_machine(store: Store) -> None:
    for status in STATUSES:
        project = f"p-{uuid.uuid4().hex[:6]}"
        batch_id = await new_batch(store, 1, status=status, project=project)
        if status in ("validating", "in_progress"):
            row = await store.request_cancel(project, batch_id)
            assert row.status == "cancelling" and row.cancelling_at is not None
        elif status in ("cancelling", "cancelled"):  # a repeated cancel is not an error and changes nothing
            row = await store.request_cancel(project, batch_id)
            assert row.status == status and row.cancelling_at is None
        else:
            with pytest.raises(Conflict, match=f"status '{status}'"):
                await store.request_cancel(project, batch_id)
            assert (await store.engine_batch(batch_id)).status == status
        with pytest.raises(NotFound):
            await store.request_cancel("someone-else", batch_id)
        assert (await store.engine_batch(batch_id)).project == project


async def test_api_keys_are_stored_hashed_only(store: Store) -> None:
    """README: keys are stored only as SHA-256 hashes. Read the table itself."""
    from service.edge.auth import Authenticator

    keys = {"sk-live-aaaaaaaaaaaaaaaaaaaaaaaa": "alpha", "sk-live-bbbbbbbbbbbbbbbbbbbbbbbb": "beta"}
    auth = Authenticator(store)
    await auth.register(keys)
    await auth.register(keys)  # idempotent
    async with store.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM api_keys"))).mappings().all()
    assert len(rows) == 2
    dump = repr([dict(r) for r in rows])
    for key in keys:
        assert key not in dump and key.removeprefix("sk-live-") not in dump
    assert {r["key_hash"]: r["project"] for r in rows} == {
        hashlib.sha256(k.encode()).hexdigest(): p for k, p in keys.items()}
    assert await auth.project((("authorization", "Bearer sk-live-aaaaaaaaaaaaaaaaaaaaaaaa"),)) == "alpha"
