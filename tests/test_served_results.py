"""Results kept in the form they are served, and the hot reads that skip the ORM (issue #13, item 3/4).

What a caller sees must not change: a page built from a result's stored served form
(`batch_results.response_pb`) is the page built from its JSON, an output file line written from the
stored text is the line `json.dumps` would print, and a batch read in one statement (on SQLite
without leaving the event loop's thread) is the batch the ORM loads.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from service.domain.model import LineOutcome, ResultError, ResultStatus, Usage
from service.edge import convert
from service.engine.output_files import output_bytes, output_line
from service.storage.repository import Store, new_id
from service.storage.tables import BatchRow, ResultRow
from sluice.v1 import batch_pb2
from tests.test_store import batch_row, new_batch

# JSON values as providers send them: text beyond ASCII, floats printed with exponents, nesting.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
bodies = st.dictionaries(st.text(max_size=8), json_values, max_size=5)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(st.none(), bodies, json_values), custom_id=st.text(min_size=1, max_size=10),
       status_code=st.sampled_from([0, 200, 400, 500]), request_id=st.one_of(st.none(), st.text(max_size=6)),
       error=st.one_of(st.none(), st.tuples(st.text(min_size=1, max_size=6), st.one_of(st.none(), st.text()))),
       served=st.booleans())
def test_an_output_line_from_the_stored_text_is_the_line_json_prints(
        body: Any, custom_id: str, status_code: int, request_id: str | None,
        error: tuple[str, str | None] | None, served: bool) -> None:
    # Results stored with their served form keep compact json.dumps text, used as it is; older
    # ones (response_pb NULL) may hold other separators and are printed again.
    text = None if body is None else json.dumps(body, separators=(",", ":")) if served else json.dumps(body)
    row = ResultRow(batch_id="batch_x", idx=7, custom_id=custom_id, status="completed", status_code=status_code,
                    request_id=request_id, response_json=text, response_pb=b"" if served else None,
                    error_code=error[0] if error else None, error_message=error[1] if error else None)
    expected = json.dumps(output_line("batch_x", row), separators=(",", ":")).encode() + b"\n"
    assert output_bytes("batch_x", row) == expected


OUTCOMES = [
    LineOutcome(0, "r0", ResultStatus.COMPLETED, 200,
                {"id": "chatcmpl-1", "choices": [{"message": {"content": "héllo ✓", "role": "assistant"}}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 1e-07}, "n": None, "ok": True},
                None, Usage(input_tokens=3, cached_tokens=1, output_tokens=4, reasoning_tokens=2, input_cost=0.5,
                            output_cost=0.25), "req-0"),
    LineOutcome(1, "r1", ResultStatus.FAILED, 429, {"error": {"message": "slow down", "type": "rate", "code": "r"}}),
    LineOutcome(2, "r2", ResultStatus.FAILED, 400, {"error": {}}, ResultError("bad", "no", "invalid_request_error")),
    LineOutcome(3, "r3", ResultStatus.EXPIRED, 0, None, ResultError("batch_expired", "late", "batch_error")),
    LineOutcome(4, "r4", ResultStatus.COMPLETED, 200, {}),
    LineOutcome(5, "r5", ResultStatus.COMPLETED, 200, ["not", "an", "object"]),  # type: ignore[arg-type]
    LineOutcome(6, "r6", ResultStatus.COMPLETED, 200, {"nested": {"list": [1, 2.5, "x", {"deep": []}]}}),
]


@pytest.mark.parametrize("encoded", [True, False], ids=["served-form", "json-only"])
async def test_a_results_page_is_the_messages_result_message_builds(store: Store, encoded: bool) -> None:
    """Stored with the served form (a server) or without it (results from before migration 0011):
    the page `ListBatchResults` builds in place equals one `result_message` per stored result."""
    store.encode_response = convert.response_bytes if encoded else None
    batch_id = await new_batch(store, len(OUTCOMES) + 1, project="p")
    await store.store_results(batch_id, OUTCOMES)
    async with store.sessions() as s:
        served = [r for (r,) in (await s.execute(select(ResultRow.response_pb).where(
            ResultRow.batch_id == batch_id).order_by(ResultRow.idx))).all()]
    assert [r is not None for r in served] == [encoded, encoded, encoded, False, False, False, encoded]

    batch = await store.get_batch("p", batch_id)
    for limit, after in ((100, ""), (3, ""), (3, "r2"), (2, "r5")):
        rows, more = await store.result_page(batch, limit, after)
        pairs, more_too = await store.list_results("p", batch_id, limit, after)
        page = batch_pb2.ListBatchResultsResponse()
        convert.add_results(page, batch, rows, {r.idx: 1 for r in rows})
        assert list(page.data) == [convert.result_message(batch, req, res, 1) for req, res in pairs]
        assert more == more_too


async def test_a_batch_read_in_one_statement_is_the_batch_the_orm_loads(store: Store) -> None:
    batch_id = await new_batch(store, 3, project="p")
    await store.store_results(batch_id, OUTCOMES[:2])
    async with store.sessions() as s:
        loaded = await s.scalar(select(BatchRow).where(BatchRow.id == batch_id))
    assert loaded is not None
    read, retries = await store.get_batch_with_retries("p", batch_id)
    columns = [c.key for c in BatchRow.__mapper__.column_attrs]
    assert {c: getattr(read, c) for c in columns} == {c: getattr(loaded, c) for c in columns}
    assert read.usage == loaded.usage and retries == []
    part_columns = [c.key for c in loaded.parts[0].__mapper__.column_attrs]
    assert [[getattr(p, c) for c in part_columns] for p in read.parts] == [
        [getattr(p, c) for c in part_columns] for p in loaded.parts]
    assert convert.batch_message(read) == convert.batch_message(loaded)

    retry = await store.create_batch(batch_row(project="p", id=new_id("batch_"), retry_of=batch_id,
                                               chain_id=batch_id), [])
    assert (await store.get_batch_with_retries("p", batch_id))[1] == [retry.id]
    assert (await store.engine_batch(batch_id)).id == batch_id
    with pytest.raises(Exception, match="No batch found"):
        await store.get_batch("someone-else", batch_id)


async def test_a_busy_sqlite_read_takes_the_asynchronous_path(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    batch_id = await new_batch(store, 2, project="p")

    def busy() -> sqlite3.Connection:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store._reads, "_sqlite3", busy)
    assert (await store.get_batch("p", batch_id)).total == 2
    await store.transition(batch_id, *_validating_to_in_progress())
    assert (await store.get_batch("p", batch_id)).status == "in_progress"


def _validating_to_in_progress() -> tuple[Any, Any]:
    from service.domain.model import BatchStatus
    return BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS
