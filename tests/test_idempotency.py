"""CreateBatch with an `idempotency-key` (gRPC metadata; REST's `Idempotency-Key` header arrives the
same way through Envoy: tests/test_capabilities_e2e.py): one batch per key and project for 24
hours, the same batch for the same body, a clear error for another body, on every replica."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy import update

from service.domain.model import now
from service.storage.db import create_engine, migrate
from service.storage.repository import IdempotencyClaim, KeyTaken, NewRequest, Store, new_id
from service.storage.tables import BatchRow, IdempotencyRow
from sluice.v1 import batch_pb2
from tests.harness import KEY_A, KEY_B, Client, chat_line, gateway, make_settings, md
from tests.rpc_errors import expect_error


def create(c: Client, key: str, lines: list[batch_pb2.BatchRequestLine], api_key: str = KEY_A,
           **fields: Any) -> Any:
    request = batch_pb2.CreateBatchRequest(endpoint="/v1/chat/completions", requests=lines, **fields)
    return c.stub.CreateBatch(request, metadata=(*md(api_key), ("idempotency-key", key)))


async def test_the_same_key_and_body_give_the_same_batch(db_url: str) -> None:
    lines = [chat_line("a"), chat_line("b")]
    async with gateway(make_settings(db_url)) as (app, c):
        first = await create(c, "key-1", lines)
        again = await create(c, "key-1", lines)
        assert again.id == first.id
        assert await app.store.count_batches("alpha") == 1
        # A different key is a different batch; no key at all too.
        other = await create(c, "key-2", lines)
        plain = await c.create(lines)
        assert len({first.id, other.id, plain.id}) == 3
        # Keys belong to a project: another project's same key makes its own batch.
        theirs = await create(c, "key-1", lines, api_key=KEY_B)
        assert theirs.id != first.id
        assert (await c.get(theirs.id, key=KEY_B)).id == theirs.id
        assert await app.store.count_batches("alpha") == 3 and await app.store.count_batches("beta") == 1


async def test_the_same_key_with_another_body_is_refused_and_stores_nothing(sqlite_url: str) -> None:
    async with gateway(make_settings(sqlite_url)) as (app, c):
        first = await create(c, "k", [chat_line("a")])
        for changed in ([chat_line("a", "other text")], [chat_line("a"), chat_line("b")]):
            err = await expect_error(create(c, "k", changed), grpc.StatusCode.INVALID_ARGUMENT)
            assert err.envelope["code"] == "idempotency_key_reused" and err.envelope["param"] == "Idempotency-Key"
            assert err.trailers["x-http-status"] == "422"
            assert first.id in err.message
        err = await expect_error(create(c, "k", [chat_line("a")], metadata=_struct({"x": "1"})),
                                 grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["code"] == "idempotency_key_reused"
        assert await app.store.count_batches("alpha") == 1
        err = await expect_error(create(c, "", [chat_line("z")]), grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["code"] == "invalid_idempotency_key"


async def test_a_key_is_remembered_for_24_hours(sqlite_url: str) -> None:
    lines = [chat_line("a")]
    async with gateway(make_settings(sqlite_url)) as (app, c):
        first = await create(c, "daily", lines)
        async with app.store.sessions.begin() as s:  # a day and a second later
            await s.execute(update(IdempotencyRow).values(created_at=IdempotencyRow.created_at - 24 * 3600 - 1))
        later = await create(c, "daily", [chat_line("other")])
        assert later.id != first.id
        assert (await create(c, "daily", [chat_line("other")])).id == later.id


async def test_a_key_raced_from_two_clients_on_two_replicas_makes_one_batch(db_url: str) -> None:
    """Both creates run at once on two servers sharing the database: each checks its (many) lines
    before either commits, yet one batch is made and both callers get it."""
    lines = [chat_line(f"r{i}", f"question {i}") for i in range(400)]
    async with gateway(make_settings(db_url)) as (app, a), \
            gateway(make_settings(db_url, replica_id="replica-b")) as (_, b):
        for attempt in range(3):
            key = f"race-{attempt}"
            got = await asyncio.gather(create(a, key, lines), create(b, key, lines), create(a, key, lines))
            assert len({batch.id for batch in got}) == 1, got
        assert await app.store.count_batches("alpha") == 3
        done = await a.wait_for(got[0].id)
        assert done.status == "completed" and done.request_counts.completed == 400


def _struct(value: dict[str, str]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def test_a_duplicate_key_waits_for_the_first_transaction_and_stores_nothing(db_url: str) -> None:
    """The key's row is written first in the transaction that writes the batch: a second create
    with the key, started while the first is still inserting its lines, cannot commit a batch of
    its own; it fails with KeyTaken once the first has committed, and the service answers with
    the first batch."""
    await migrate(db_url)
    store = Store(create_engine(db_url))
    claim = IdempotencyClaim("same", "digest")
    claimed = asyncio.Event()

    async def slow_lines() -> AsyncIterator[NewRequest]:
        for i in range(3):
            yield NewRequest(custom_id=f"r{i}", model="sim/m", body={"model": "sim/m"})
            claimed.set()
            await asyncio.sleep(0.05)  # keeps the first transaction open while the second starts

    def row() -> BatchRow:
        batch = BatchRow.new(id=new_id("batch_"), project="alpha", endpoint="/v1/chat/completions",
                             completion_window="24h", created_at=now())
        batch.provider = "sim"
        return batch

    try:
        first = asyncio.create_task(store.create_batch(row(), slow_lines(), idempotency=claim))
        await claimed.wait()
        with pytest.raises(KeyTaken):
            await store.create_batch(row(), [NewRequest("x", "sim/m", {"model": "sim/m"})], idempotency=claim)
        winner = await first
        assert await store.count_batches("alpha") == 1
        found = await store.find_idempotency_key("alpha", "same")
        assert found is not None and found.batch_id == winner.id and found.request_hash == "digest"
    finally:
        await store.close()
