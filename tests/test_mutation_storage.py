"""Fast checks of the Store's contracts (service/storage/repository.py) on SQLite, written against
the mutants the fast selection let live (docs/mutation.md): lines stored by reference into their
input file, bulk inserts, results in served form, the sweeper, retries, capacity and parts. Each
pins what a caller relies on: what is stored, exact errors, boundaries, order and cursors."""

from __future__ import annotations

from service.storage.repository import RUN_BYTES, RUN_GAP, line_runs


def test_line_runs_group_nearby_lines_in_file_order_within_the_span() -> None:
    assert line_runs([]) == []
    # out of order in, file order out; a gap of exactly RUN_GAP still joins, one byte more splits
    a, b = (0, 100, 10), (1, 0, 10)
    c = (2, 110 + RUN_GAP, 5)
    d = (3, 115 + 2 * RUN_GAP + 1, 5)
    assert line_runs([a, b, c, d]) == [[b, a, c], [d]]
    # a run spans at most RUN_BYTES: exactly RUN_BYTES joins, one byte more starts a new run
    e, f = (0, 0, RUN_BYTES - 10), (1, RUN_BYTES - 10, 10)
    assert line_runs([e, f]) == [[e, f]]
    g = (1, RUN_BYTES - 10, 11)
    assert line_runs([e, g]) == [[e], [g]]
    # a line longer than RUN_BYTES is a run of its own
    h, i = (0, 0, RUN_BYTES + 5), (1, RUN_BYTES + 5, 1)
    assert line_runs([h, i]) == [[h], [i]]
    # the end of a run is the furthest end seen, not the last line's
    j, k, m = (0, 0, 1000), (1, 10, 10), (2, 1000 + RUN_GAP, 1)
    assert line_runs([j, k, m]) == [[j, k, m]]


# --------------------------------------------------------------------------- shared helpers

import json  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from sqlalchemy import func, select, update  # noqa: E402

from service.domain import codec  # noqa: E402
from service.domain.errors import Internal, InsufficientQuota, NotFound  # noqa: E402
from service.domain.model import (  # noqa: E402
    BatchError,
    BatchStatus,
    FileStatus,
    LineOutcome,
    ResultError,
    ResultStatus,
    Usage,
    month_of,
    now,
)
from service.storage import repository  # noqa: E402
from service.storage.repository import (  # noqa: E402
    IDEMPOTENCY_TTL,
    INSERT_CHUNK,
    IdempotencyClaim,
    KeyTaken,
    NewPart,
    NewRequest,
    OutputFileIds,
    Reservation,
    Store,
    UploadGone,
)
from service.storage.tables import (  # noqa: E402
    ApiKeyRow,
    BatchRow,
    ChargeRow,
    FileRow,
    PartRow,
    ProjectRow,
    RequestRow,
    ResultRow,
    SpendRow,
    WebhookEventRow,
)
from tests.test_store import batch_row, new_batch  # noqa: E402

T0 = 1_800_000_000


def freeze(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """The store's clock (`now()`, and `time.time()` for leases and capacity) stopped at `at`."""
    monkeypatch.setattr(repository, "now", lambda: at)
    monkeypatch.setattr(repository, "time", SimpleNamespace(time=lambda: float(at), time_ns=time.time_ns))


async def _chunks(*pieces: bytes) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


async def add_file(store: Store, file_id: str, content: bytes = b"a\n", project: str = "p",
                   status: str = FileStatus.PROCESSED, created_at: int | None = None,
                   updated_at: int | None = None, expires_at: int | None = None, purpose: str = "batch") -> None:
    await store.begin_file(FileRow(id=file_id, project=project, filename=f"{file_id}.jsonl", purpose=purpose,
                                   bytes=0, line_count=0, status=FileStatus.UPLOADING,
                                   created_at=now() if created_at is None else created_at, updated_at=updated_at))
    await store.blobs.put(file_id, _chunks(content))
    async with store.sessions.begin() as s:
        await s.execute(update(FileRow).where(FileRow.id == file_id).values(
            status=status, expires_at=expires_at, updated_at=updated_at, bytes=len(content)))


async def file_ids(store: Store) -> set[str]:
    async with store.sessions() as s:
        return set((await s.scalars(select(FileRow.id))).all())


async def stored_lines(store: Store, batch_id: str) -> list[tuple[int, str, int | None, int | None]]:
    async with store.sessions() as s:
        return [tuple(r) for r in (await s.execute(  # type: ignore[misc]
            select(RequestRow.idx, RequestRow.body_json, RequestRow.line_offset, RequestRow.line_length)
            .where(RequestRow.batch_id == batch_id).order_by(RequestRow.idx))).all()]


def jsonl_lines(bodies: list[dict[str, Any]], pad: dict[int, int] | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """An input file of these lines ({"custom_id", "body"}), and each line's (offset, length);
    `pad` puts a filler line of that many bytes before the line of that index."""
    out, spans = b"", []
    for i, body in enumerate(bodies):
        if pad and i in pad:
            out += b'{"custom_id":"pad","body":{"x":"' + b"y" * pad[i] + b'"}}\n'
        line = json.dumps({"custom_id": f"r{i}", "method": "POST", "body": body}).encode()
        spans.append((len(out), len(line)))
        out += line + b"\n"
    return out, spans


async def by_reference(store: Store, file_id: str, bodies: list[dict[str, Any]], project: str = "p",
                       pad: dict[int, int] | None = None, inline: frozenset[int] = frozenset(),
                       status: str = FileStatus.PROCESSED) -> str:
    """A batch whose lines point into `file_id` (uploaded here with these bodies), except the
    lines in `inline`, stored with their bodies."""
    content, spans = jsonl_lines(bodies, pad)
    await add_file(store, file_id, content, project=project, status=status)
    row = batch_row(project=project, input_file_id=file_id)
    lines = [NewRequest(f"r{i}", "sim/m", body, line_offset=None if i in inline else off,
                        line_length=None if i in inline else length)
             for i, (body, (off, length)) in enumerate(zip(bodies, spans, strict=True))]
    return (await store.create_batch(row, lines)).id


BODIES = [{"model": "sim/m", "n": i, "text": "é \u2028" * i} for i in range(5)]


# --------------------------------------------------------------------------- lines stored by reference


async def test_lines_by_reference_store_no_body_and_read_their_own_from_the_file(store: Store) -> None:
    batch_id = await by_reference(store, "file-in", BODIES, inline=frozenset({2}))
    content, spans = jsonl_lines(BODIES)
    stored = await stored_lines(store, batch_id)
    assert stored == [(i, codec.dumps(b) if i == 2 else "", None if i == 2 else spans[i][0],
                       None if i == 2 else spans[i][1]) for i, b in enumerate(BODIES)]
    assert spans[0][0] == 0  # a line at offset 0 is by reference too
    want = [codec.dumps(b) for b in BODIES]
    assert [r.body_json for r in await store.pending_requests(batch_id, 10)] == want
    assert [(r.idx, r.custom_id) for r in await store.pending_requests(batch_id, 10)] == [
        (i, f"r{i}") for i in range(5)]
    assert [r.body_json for r in await store.pending_requests(batch_id, 10, bodies=False)] == [
        "", "", want[2], "", ""]
    assert [r.body_json async for r in store.iter_requests(batch_id, page=2)] == want
    batch = await store.engine_batch(batch_id)
    await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.FAILED)
    batch = await store.engine_batch(batch_id)
    retried = [r async for r in store.iter_retry_lines(batch, frozenset({ResultStatus.FAILED}), None, page=2)]
    assert [(r.idx, r.body_json) for r in retried] == list(enumerate(want))


async def test_lines_far_apart_in_the_file_are_read_in_separate_runs(store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines more than RUN_GAP apart: two range reads, each line cut at its own offset."""
    batch_id = await by_reference(store, "file-far", BODIES[:3], pad={1: repository.RUN_GAP + 10})
    reads: list[tuple[int, int]] = []
    real = store.blobs.get_range

    async def get_range(key: str, start: int, end: int) -> bytes | None:
        reads.append((start, end))
        return await real(key, start, end)

    monkeypatch.setattr(store.blobs, "get_range", get_range)
    assert [r.body_json for r in await store.pending_requests(batch_id, 10)] == [codec.dumps(b) for b in BODIES[:3]]
    _, spans = jsonl_lines(BODIES[:3], pad={1: repository.RUN_GAP + 10})
    assert reads == [(spans[0][0], spans[0][0] + spans[0][1]), (spans[1][0], spans[2][0] + spans[2][1])]


async def test_the_input_file_must_still_hold_its_content_at_create(store: Store) -> None:
    for status in (FileStatus.PROCESSED, FileStatus.DELETED):  # deleted: hidden, content kept a grace period
        assert await by_reference(store, f"file-{status}", BODIES[:1], status=status)
    for status in (FileStatus.PURGING, FileStatus.UPLOADING):
        with pytest.raises(NotFound) as info:
            await by_reference(store, f"file-{status}", BODIES[:1], status=status)
        assert info.value.message == (f"No such File object: file-{status} (it was deleted while the batch was "
                                      "being created)")
        assert (info.value.param, info.value.code) == ("input_file_id", "file_not_found")
    with pytest.raises(NotFound):
        await store.create_batch(batch_row(project="p", input_file_id="file-none"),
                                 [NewRequest("a", "sim/m", {}, line_offset=0, line_length=2)])
    async with store.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(BatchRow)) == 2


async def test_copy_bodies_in_stores_every_readers_bodies_and_leaves_others(store: Store) -> None:
    a = await by_reference(store, "file-a", BODIES, inline=frozenset({1}))
    content, spans = jsonl_lines(BODIES)
    b = (await store.create_batch(batch_row(project="p", input_file_id="file-a"), [
        NewRequest("x", "sim/m", {}, line_offset=spans[3][0], line_length=spans[3][1])])).id
    other = await by_reference(store, "file-o", BODIES[:2])
    assert await store.copy_bodies_in("file-a", page=2) == 5
    want = [codec.dumps(x) for x in BODIES]
    assert await stored_lines(store, a) == [(i, w, None, None) for i, w in enumerate(want)]
    assert await stored_lines(store, b) == [(0, want[3], None, None)]
    assert [(o, length is not None) for _, _, o, length in await stored_lines(store, other)] == [
        (0, True), (jsonl_lines(BODIES[:2])[1][1][0], True)]
    assert await store.copy_bodies_in("file-a") == 0  # nothing left by reference
    assert await store.copy_bodies_in("file-unread") == 0
    await store.blobs.delete(["file-a"])  # copied in: the content is no longer needed
    assert [r.body_json for r in await store.pending_requests(a, 10)] == want


async def test_bodies_whose_content_is_gone_are_lost_with_a_clear_error(store: Store) -> None:
    batch_id = await by_reference(store, "file-l", BODIES[:2])
    await store.blobs.delete(["file-l"])
    for read in (store.pending_requests(batch_id, 10), store.copy_bodies_in("file-l")):
        with pytest.raises(Internal) as info:
            await read
        assert info.value.message == (f"The request bodies of batch {batch_id} are no longer available: the "
                                      "content of its input file file-l is gone.")
        assert (info.value.param, info.value.code) == ("id", "file_content_lost")
    # lines closed without running need no body
    assert [r.idx for r in await store.pending_requests(batch_id, 10, bodies=False)] == [0, 1]


async def test_lines_read_before_the_sweeper_copied_them_in_get_the_copied_bodies(store: Store) -> None:
    """The race `_fill_bodies` covers: rows read while they still pointed into the file, whose
    content a sweep removed after copying their bodies in, get those bodies (each its own); a
    row the sweep did not copy is lost."""
    batch_id = await by_reference(store, "file-m", BODIES[:3], inline=frozenset({1}))
    stale = await store.pending_requests(batch_id, 10, bodies=False)
    assert [r.line_offset is None for r in stale] == [False, True, False]
    async with store.sessions.begin() as s:  # what copy_bodies_in does, for line 2 only
        await s.execute(update(RequestRow).where(RequestRow.batch_id == batch_id, RequestRow.idx == 2).values(
            body_json=codec.dumps(BODIES[2]), line_offset=None, line_length=None))
    await store.blobs.delete(["file-m"])
    filled = await store._fill_bodies(batch_id, stale[1:])
    assert [(r.idx, r.body_json) for r in filled] == [(1, codec.dumps(BODIES[1])), (2, codec.dumps(BODIES[2]))]
    with pytest.raises(Internal) as info:
        await store._fill_bodies(batch_id, stale)
    assert "file-m" in info.value.message and batch_id in info.value.message
    async with store.sessions.begin() as s:  # a body stored but the offset kept is not a copy
        await s.execute(update(RequestRow).where(RequestRow.batch_id == batch_id, RequestRow.idx == 0).values(
            body_json=codec.dumps(BODIES[0])))
    with pytest.raises(Internal):
        await store._fill_bodies(batch_id, stale)


@pytest.mark.logs_errors(r"sweep: The request bodies of batch .* file-gone is gone")
async def test_the_sweeper_copies_bodies_in_before_it_purges_an_input_file(store: Store) -> None:
    running = await by_reference(store, "file-in", BODIES[:3])
    await store.mark_file_deleted("p", "file-in")
    lost = await by_reference(store, "file-gone", BODIES[:1])
    await store.mark_file_deleted("p", "file-gone")
    await store.blobs.delete(["file-gone"])  # removed behind Sluice's back: logged, swept anyway
    swept = await store.sweep_files(stale_upload_before=0, deleted_before=now() + 1)
    assert sorted(swept.deleted) == ["file-gone", "file-in"]
    assert await file_ids(store) == set()
    assert [r.body_json for r in await store.pending_requests(running, 10)] == [codec.dumps(b) for b in BODIES[:3]]
    assert [(o, length) for _, _, o, length in await stored_lines(store, running)] == [(None, None)] * 3
    with pytest.raises(Internal):
        await store.pending_requests(lost, 10)


# --------------------------------------------------------------------------- creating a batch


def _spy_inserts(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The line indexes of each INSERT (chunk) create_batch issues."""
    chunks: list[list[int]] = []
    real = store._insert_requests

    async def insert(s: Any, rows: list[dict[str, Any]]) -> None:
        chunks.append([r["idx"] for r in rows])
        await real(s, rows)

    monkeypatch.setattr(store, "_insert_requests", insert)
    return chunks


async def test_lines_are_inserted_500_at_a_time(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = _spy_inserts(store, monkeypatch)
    lines = [NewRequest(f"r{i}", "sim/m", {"i": i}, "m", "sim") for i in range(2 * INSERT_CHUNK + 1)]
    batch = await store.create_batch(batch_row(project="p"), lines)
    assert INSERT_CHUNK == 500
    assert [(c[0], len(c)) for c in chunks] == [(0, 500), (500, 500), (1000, 1)]
    assert batch.total == 1001 and (await store.get_batch("p", batch.id)).total == 1001
    chunks.clear()
    await store.create_batch(batch_row(project="p"), lines[:INSERT_CHUNK])
    assert [len(c) for c in chunks] == [500]
    chunks.clear()
    await store.create_batch(batch_row(project="p"), [])
    assert chunks == []


async def test_a_chunk_is_flushed_at_8_mib_of_bodies(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = _spy_inserts(store, monkeypatch)
    mib4 = 4 * 1024 * 1024
    wrap = len(codec.dumps({"t": ""}))

    def line(i: int, size: int) -> NewRequest:
        return NewRequest(f"r{i}", "sim/m", {"t": "x" * (size - wrap)})

    # two bodies of exactly 4 MiB reach 8 MiB: flushed; then 4 MiB + (4 MiB - 1) stay under it
    lines = [line(0, mib4), line(1, mib4), line(2, mib4), line(3, mib4 - 1), line(4, 10)]
    batch = await store.create_batch(batch_row(project="p"), lines)
    assert chunks == [[0, 1], [2, 3, 4]]
    assert [len(r.body_json) async for r in store.iter_requests(batch.id)] == [mib4, mib4, mib4, mib4 - 1, 10]


async def test_parts_as_given_or_one_on_the_batchs_provider(store: Store) -> None:
    row = batch_row(project="p", provider="sim", provider_model="pm")
    batch = await store.create_batch(row, [NewRequest(f"r{i}", "sim/m", {}) for i in range(3)])
    (part,) = (await store.get_batch("p", batch.id)).parts
    assert (part.part_no, part.provider, part.provider_model, part.status, part.total, part.completed,
            part.failed, part.bytes, part.poll_failures) == (0, "sim", "pm", BatchStatus.VALIDATING, 3, 0, 0, 0, 0)
    empty = await store.create_batch(batch_row(project="p"), [])
    assert (await store.get_batch("p", empty.id)).parts == []
    lines = [NewRequest("a", "x/m", {}, "mx", "x", part_no=0), NewRequest("b", "y/m", {}, "my", "y", part_no=1)]
    given = await store.create_batch(batch_row(project="p"), lines, [NewPart(0, "x", "mx", 1, 10),
                                                                     NewPart(1, "y", None, 1, 20)])
    parts = (await store.get_batch("p", given.id)).parts
    assert [(p.part_no, p.provider, p.provider_model, p.total, p.bytes, p.status) for p in parts] == [
        (0, "x", "mx", 1, 10, BatchStatus.VALIDATING), (1, "y", None, 1, 20, BatchStatus.VALIDATING)]
    rows = [r async for r in store.iter_requests(given.id)]
    assert [(r.custom_id, r.model, r.provider_model, r.provider, r.part_no, r.origin_idx) for r in rows] == [
        ("a", "x/m", "mx", "x", 0, None), ("b", "y/m", "my", "y", 1, None)]
    assert [r.idx async for r in store.iter_requests(given.id, part_no=1)] == [1]
    assert [r.idx for r in await store.pending_requests(given.id, 10, part_no=0)] == [0]
    retry = await store.create_batch(batch_row(project="p"), [NewRequest("a", "x/m", {"k": 1}, origin_idx=7)])
    assert [(r.origin_idx, r.body_json) async for r in store.iter_requests(retry.id)] == [(7, '{"k":1}')]


async def test_a_batch_keeps_its_trace_parent(store: Store) -> None:
    row = batch_row(project="p", trace_parent="00-abc-def-01")
    assert (await store.create_batch(row, [])).trace_parent == "00-abc-def-01"
    assert (await store.get_batch("p", row.id)).trace_parent == "00-abc-def-01"
    assert (await store.create_batch(batch_row(project="p"), [])).trace_parent is None


async def test_a_batch_failed_at_creation_has_its_ended_event(store: Store) -> None:
    failed = await store.create_batch(batch_row(project="p", status=BatchStatus.FAILED), [])
    running = await store.create_batch(batch_row(project="p"), [NewRequest("a", "sim/m", {})])
    async with store.sessions() as s:
        events = (await s.execute(select(WebhookEventRow.batch_id, WebhookEventRow.type))).all()
    assert [tuple(e) for e in events] == [(failed.id, "batch.failed")]
    assert running.status == BatchStatus.VALIDATING


async def test_a_reservation_is_taken_only_for_a_batch_with_lines_and_within_the_limit(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    month = month_of(T0)

    def row() -> BatchRow:
        return batch_row(project="p", created_at=T0)

    await store.create_batch(row(), [], reservation=Reservation(5.0, 10.0))
    assert await store.spend("p", month) == repository.Spend("p", month)  # no lines: nothing reserved
    first = await store.create_batch(row(), [NewRequest("a", "sim/m", {})], reservation=Reservation(6.0, 10.0))
    assert await store.spend("p", month) == repository.Spend("p", month, 6.0, 0.0)
    exact = await store.create_batch(row(), [NewRequest("a", "sim/m", {})], reservation=Reservation(4.0, 10.0))
    assert (await store.spend("p", month)).reserved == 10.0  # exactly the limit is allowed
    with pytest.raises(InsufficientQuota) as info:
        await store.create_batch(row(), [NewRequest("a", "sim/m", {})], reservation=Reservation(0.5, 10.0))
    assert info.value.message == (
        "This batch could cost up to $0.5000, and project 'p' has $0.0000 left of its $10.00 limit for "
        f"{month} ($10.0000 spent or reserved by running batches). Lower max_tokens, split the batch, "
        "or wait for running batches to end.")
    assert info.value.code == "insufficient_quota"
    unlimited = await store.create_batch(row(), [NewRequest("a", "sim/m", {})], reservation=Reservation(100.0, None))
    assert (await store.spend("p", month)).reserved == 110.0
    assert await store.spend("other", month) == repository.Spend("other", month, 0.0, 0.0)
    async with store.sessions() as s:
        charges = {c.batch_id: (c.project, c.month, c.reserved, c.actual) for c in
                   (await s.scalars(select(ChargeRow))).all()}
        batches = int(await s.scalar(select(func.count()).select_from(BatchRow)) or 0)
    assert charges == {first.id: ("p", month, 6.0, None), exact.id: ("p", month, 4.0, None),
                       unlimited.id: ("p", month, 100.0, None)}
    assert batches == 4  # the refused one left nothing
    with pytest.raises(InsufficientQuota) as info:
        await store.create_batch(batch_row(project="q", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(3.0, 2.0))
    assert "project 'q' has $2.0000 left of its $2.00 limit" in info.value.message
    assert "($0.0000 spent or reserved" in info.value.message


async def test_ending_a_batch_settles_its_reservation_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    month = month_of(T0)
    a = await store.create_batch(batch_row(project="p", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(5.0, None))
    b = await store.create_batch(batch_row(project="p", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(2.0, None))
    await store.store_results(a.id, [LineOutcome(0, "a", ResultStatus.COMPLETED, 200, {"x": 1}, None,
                                                 Usage(input_cost=0.25, output_cost=0.5))])
    assert await store.transition(a.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert await store.spend("p", month) == repository.Spend("p", month, 7.0, 0.0)  # not ended: still reserved
    assert await store.transition(a.id, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    assert await store.spend("p", month) == repository.Spend("p", month, 7.0, 0.0)
    assert await store.transition(a.id, BatchStatus.FINALIZING, BatchStatus.COMPLETED)
    assert await store.spend("p", month) == repository.Spend("p", month, 2.0, 0.75)
    async with store.sessions() as s:
        charge = await s.get(ChargeRow, a.id)
    assert charge is not None and (charge.actual, charge.settled_at) == (0.75, T0)
    async with store.sessions.begin() as s:  # a second settle (cannot happen by transition) changes nothing
        await store._settle(s, a.id)
    assert await store.spend("p", month) == repository.Spend("p", month, 2.0, 0.75)
    assert await store.transition(b.id, BatchStatus.VALIDATING, BatchStatus.EXPIRED)
    assert await store.spend("p", month) == repository.Spend("p", month, 0.0, 0.75)
    plain = await store.create_batch(batch_row(project="p"), [NewRequest("a", "sim/m", {})])
    assert await store.transition(plain.id, BatchStatus.VALIDATING, BatchStatus.FAILED)  # no charge: nothing


async def test_idempotency_keys_last_24_hours(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    claim = IdempotencyClaim("key-1", "hash-1")
    first = await store.create_batch(batch_row(project="p"), [], idempotency=claim)
    row = await store.find_idempotency_key("p", "key-1")
    assert row is not None and (row.project, row.key, row.request_hash, row.batch_id, row.created_at) == (
        "p", "key-1", "hash-1", first.id, T0)
    assert await store.find_idempotency_key("other", "key-1") is None
    assert await store.find_idempotency_key("p", "key-2") is None
    with pytest.raises(KeyTaken):
        await store.create_batch(batch_row(project="p"), [], idempotency=claim)
    other = await store.create_batch(batch_row(project="other"), [], idempotency=claim)  # per project
    freeze(monkeypatch, T0 + IDEMPOTENCY_TTL - 1)
    assert (await store.find_idempotency_key("p", "key-1")) is not None
    with pytest.raises(KeyTaken):
        await store.create_batch(batch_row(project="p"), [], idempotency=claim)
    freeze(monkeypatch, T0 + IDEMPOTENCY_TTL)  # exactly 24 hours: expired, usable again
    assert await store.find_idempotency_key("p", "key-1") is None
    again = await store.create_batch(batch_row(project="p"), [], idempotency=IdempotencyClaim("key-1", "hash-2"))
    row = await store.find_idempotency_key("p", "key-1")
    assert row is not None and (row.batch_id, row.request_hash) == (again.id, "hash-2")
    kept = await store.find_idempotency_key("other", "key-1")
    assert kept is None  # other's key is as old: expired for reads, but not dropped by p's create
    async with store.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(repository.IdempotencyRow)) == 2
    assert other.id != again.id


# --------------------------------------------------------------------------- API keys


async def keys(store: Store) -> dict[str, tuple[str, str, int | None]]:
    async with store.sessions() as s:
        return {k.key_hash: (k.project, k.source, k.revoked_at) for k in (await s.scalars(select(ApiKeyRow))).all()}


async def test_configured_keys_are_synchronised_and_other_keys_kept(store: Store) -> None:
    await store.put_api_keys({})
    assert await keys(store) == {}
    await store.put_api_keys({"h1": "p1", "h2": "p2"})
    await store.put_api_keys({"h1": "p9"})
    assert await keys(store) == {"h1": ("p9", "config", None), "h2": ("p2", "config", None)}
    await store.add_api_key("h-api", "pa")
    await store.add_api_key("h-admin", "pb", source="admin")
    assert await store.sync_config_api_keys({"h1": "p1", "h3": "p3"}) == 1  # h2 no longer configured
    assert await keys(store) == {"h1": ("p1", "config", None), "h3": ("p3", "config", None),
                                 "h-api": ("pa", "api", None), "h-admin": ("pb", "admin", None)}
    async with store.sessions.begin() as s:
        await s.execute(update(ApiKeyRow).where(ApiKeyRow.key_hash.in_(["h1", "h-api"])).values(revoked_at=5))
    assert await store.project_for_key_hash("h1") is None
    assert await store.sync_config_api_keys({"h1": "p1", "h-api": "px"}) == 1  # configured again: not revoked
    assert await keys(store) == {"h1": ("p1", "config", None), "h-api": ("px", "config", None),
                                 "h-admin": ("pb", "admin", None)}
    assert await store.sync_config_api_keys({}) == 2
    assert await keys(store) == {"h-admin": ("pb", "admin", None)}
    assert await store.revoke_api_key("h-admin") is True
    assert await store.revoke_api_key("h-admin") is False
    assert await keys(store) == {}


async def test_a_key_lookup_and_its_last_use_at_most_once_a_minute(store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    await store.put_api_keys({"h1": "p1", "h-arch": "archived"})
    async with store.sessions.begin() as s:
        s.add(ProjectRow(id="archived", name="a", created_at=T0, archived_at=T0))
        s.add(ProjectRow(id="p1", name="one", created_at=T0))

    async def last_used() -> int | None:
        async with store.sessions() as s:
            return await s.scalar(select(ApiKeyRow.last_used_at).where(ApiKeyRow.key_hash == "h1"))

    assert await store.project_for_key_hash("h-arch") is None
    assert await store.project_for_key_hash("nope") is None
    assert await store.project_for_key_hash("h1") == "p1"
    assert await last_used() == T0
    freeze(monkeypatch, T0 + repository.KEY_USE_EVERY - 1)
    assert await store.project_for_key_hash("h1") == "p1"
    assert await last_used() == T0
    freeze(monkeypatch, T0 + repository.KEY_USE_EVERY)
    assert await store.project_for_key_hash("h1") == "p1"
    assert await last_used() == T0 + repository.KEY_USE_EVERY
    async with store.sessions() as s:
        arch = await s.scalar(select(ApiKeyRow.last_used_at).where(ApiKeyRow.key_hash == "h-arch"))
    assert arch is None
