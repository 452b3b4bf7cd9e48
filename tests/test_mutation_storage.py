"""Fast checks of the Store's contracts (service/storage/repository.py) on SQLite, written against
the mutants the fast selection let live (docs/mutation.md): lines stored by reference into their
input file, bulk inserts, results in served form, the sweeper, retries, capacity and parts. Each
pins what a caller relies on: what is stored, exact errors, boundaries, order and cursors."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import func, select, update

from service.domain import codec
from service.domain.errors import Conflict, InsufficientQuota, Internal, NotFound
from service.domain.model import (
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
from service.storage import repository
from service.storage.repository import (
    IDEMPOTENCY_TTL,
    INSERT_CHUNK,
    RUN_BYTES,
    RUN_GAP,
    IdempotencyClaim,
    KeyTaken,
    NewPart,
    NewRequest,
    OutputFileIds,
    Reservation,
    Store,
    UploadGone,
    line_runs,
)
from service.storage.tables import (
    ApiKeyRow,
    BatchRow,
    ChargeRow,
    FileRow,
    IdempotencyRow,
    ProjectRow,
    RequestRow,
    ResultRow,
    WebhookEventRow,
)
from tests.test_store import batch_row, new_batch

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
    # the span is measured from the run's start, wherever in the file it is
    q, r = (0, RUN_BYTES, 10), (1, RUN_BYTES + 20, 10)
    assert line_runs([q, r]) == [[q, r]]
    # a line longer than RUN_BYTES is a run of its own
    h, i = (0, 0, RUN_BYTES + 5), (1, RUN_BYTES + 5, 1)
    assert line_runs([h, i]) == [[h], [i]]
    # the end of a run is the furthest end seen, not the last line's
    j, k, m = (0, 0, 1000), (1, 10, 10), (2, 1000 + RUN_GAP, 1)
    assert line_runs([j, k, m]) == [[j, k, m]]


# --------------------------------------------------------------------------- lines stored by reference


async def test_lines_by_reference_store_no_body_and_read_their_own_from_the_file(store: Store) -> None:
    batch_id = await by_reference(store, "file-in", BODIES, inline=frozenset({2}))
    _, spans = jsonl_lines(BODIES)
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
    _, spans = jsonl_lines(BODIES)
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


@pytest.mark.logs_errors(r"repository: sweep: The request bodies of batch .* file-gone is gone\.$")
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
    assert [(p.part_no, p.provider, p.provider_model, p.total, p.bytes, p.status, p.completed, p.failed,
             p.poll_failures) for p in parts] == [
        (0, "x", "mx", 1, 10, BatchStatus.VALIDATING, 0, 0, 0), (1, "y", None, 1, 20, BatchStatus.VALIDATING, 0, 0, 0)]
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

    last_month = month_of(T0 - 40 * 86400)
    assert last_month != month
    # p's spend of another month, and q's of this month: neither moves with p's reservations below
    await store.create_batch(batch_row(project="p", created_at=T0 - 40 * 86400), [NewRequest("a", "sim/m", {})],
                             reservation=Reservation(9.0, None))
    await store.create_batch(batch_row(project="q", created_at=T0), [NewRequest("a", "sim/m", {})],
                             reservation=Reservation(1.0, None))
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
    assert await store.spend("p", last_month) == repository.Spend("p", last_month, 9.0, 0.0)
    assert await store.spend("q", month) == repository.Spend("q", month, 1.0, 0.0)
    async with store.sessions() as s:
        charges = {c.batch_id: (c.project, c.month, c.reserved, c.actual) for c in
                   (await s.scalars(select(ChargeRow).where(ChargeRow.project == "p", ChargeRow.month == month)))}
        batches = int(await s.scalar(select(func.count()).select_from(BatchRow)) or 0)
    assert charges == {first.id: ("p", month, 6.0, None), exact.id: ("p", month, 4.0, None),
                       unlimited.id: ("p", month, 100.0, None)}
    assert batches == 6  # the refused one left nothing
    with pytest.raises(InsufficientQuota) as info:
        await store.create_batch(batch_row(project="r", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(3.0, 2.0))
    assert "project 'r' has $2.0000 left of its $2.00 limit" in info.value.message
    assert "($0.0000 spent or reserved" in info.value.message
    with pytest.raises(InsufficientQuota) as info:  # a limit of zero: nothing left
        await store.create_batch(batch_row(project="r", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(0.5, 0.0))
    assert "project 'r' has $0.0000 left of its $0.00 limit" in info.value.message


async def test_ending_a_batch_settles_its_reservation_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    month = month_of(T0)
    a = await store.create_batch(batch_row(project="p", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(5.0, None))
    b = await store.create_batch(batch_row(project="p", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(2.0, None))
    last_month = month_of(T0 - 40 * 86400)  # p's reservation of another month: settling this month's leaves it
    await store.create_batch(batch_row(project="p", created_at=T0 - 40 * 86400), [NewRequest("a", "sim/m", {})],
                             reservation=Reservation(9.0, None))
    await store.store_results(a.id, [LineOutcome(0, "a", ResultStatus.COMPLETED, 200, {"x": 1}, None,
                                                 Usage(input_cost=0.25, output_cost=0.5))])
    assert await store.transition(a.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert await store.spend("p", month) == repository.Spend("p", month, 7.0, 0.0)  # not ended: still reserved
    assert await store.transition(a.id, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    assert await store.spend("p", month) == repository.Spend("p", month, 7.0, 0.0)
    assert await store.transition(a.id, BatchStatus.FINALIZING, BatchStatus.COMPLETED)
    assert await store.spend("p", month) == repository.Spend("p", month, 2.0, 0.75)
    assert await store.spend("p", last_month) == repository.Spend("p", last_month, 9.0, 0.0)
    async with store.sessions() as s:
        charge = await s.get(ChargeRow, a.id)
    assert charge is not None and (charge.actual, charge.settled_at) == (0.75, T0)
    async with store.sessions.begin() as s:  # a second settle (cannot happen by transition) changes nothing
        await store._settle(s, a.id)
    assert await store.spend("p", month) == repository.Spend("p", month, 2.0, 0.75)
    # what was spent counts against the limit as much as what is reserved: 2 + 0.75 + 7.5 > 10
    with pytest.raises(InsufficientQuota) as info:
        await store.create_batch(batch_row(project="p", created_at=T0), [NewRequest("a", "sim/m", {})],
                                 reservation=Reservation(7.5, 10.0))
    assert "has $7.2500 left of its $10.00 limit" in info.value.message
    assert "($2.7500 spent or reserved" in info.value.message
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
    with pytest.raises(KeyTaken) as taken:
        await store.create_batch(batch_row(project="p"), [], idempotency=claim)
    assert taken.value.args == ("key-1",)
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
        assert await s.scalar(select(func.count()).select_from(IdempotencyRow)) == 2
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


# --------------------------------------------------------------------------- files


async def test_list_files_orders_by_creation_time_then_id_with_cursors(store: Store) -> None:
    """Files created in different seconds, whose ids sort the other way: the order and the cursor
    go by created_at first, by id only within a second."""
    for file_id, created in (("f-a", T0 + 30), ("f-b", T0 + 20), ("f-c", T0 + 20), ("f-d", T0 + 10)):
        await add_file(store, file_id, created_at=created)
    await add_file(store, "f-other", project="q", created_at=T0 + 15)

    async def page(limit: int, after: str, ascending: bool) -> tuple[list[str], bool]:
        rows, more = await store.list_files("p", "", limit, after, ascending)
        return [r.id for r in rows], more

    assert await page(10, "", False) == (["f-a", "f-c", "f-b", "f-d"], False)
    assert await page(10, "", True) == (["f-d", "f-b", "f-c", "f-a"], False)
    assert await page(1, "f-a", False) == (["f-c"], True)
    assert await page(1, "f-c", False) == (["f-b"], True)
    assert await page(5, "f-b", False) == (["f-d"], False)
    assert await page(1, "f-d", True) == (["f-b"], True)
    assert await page(1, "f-b", True) == (["f-c"], True)
    assert await page(2, "f-c", True) == (["f-a"], False)
    assert await page(2, "f-a", True) == ([], False)
    assert await page(4, "", False) == (["f-a", "f-c", "f-b", "f-d"], False)
    assert await page(3, "", True) == (["f-d", "f-b", "f-c"], True)


async def test_expired_files_are_not_found_from_their_expiry_second(store: Store,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    await add_file(store, "f-exp", expires_at=T0)
    await add_file(store, "f-later", expires_at=T0 + 1)
    freeze(monkeypatch, T0)
    assert (await store.get_file("p", "f-later")).id == "f-later"
    with pytest.raises(NotFound) as info:
        await store.get_file("p", "f-exp")
    assert (info.value.message, info.value.param, info.value.code) == (
        "No such File object: f-exp", "id", "file_not_found")
    assert [r.id for r in (await store.list_files("p", "", 10, "", True))[0]] == ["f-later"]
    with pytest.raises(NotFound) as info:
        await store.mark_file_deleted("p", "f-exp")
    assert (info.value.message, info.value.param, info.value.code) == (
        "No such File object: f-exp", "id", "file_not_found")


async def test_an_upload_is_touched_and_finished_once(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    for file_id in ("f-up", "f-other"):  # two uploads at once: each call moves its own only
        await store.begin_file(FileRow(id=file_id, project="p", filename="in.jsonl", purpose="", bytes=0,
                                       line_count=0, status=FileStatus.UPLOADING, created_at=T0, updated_at=T0 - 100))
    await store.touch_upload("f-up", 1234)
    async with store.sessions() as s:
        row = await s.get(FileRow, "f-up")
    assert row is not None and (row.bytes, row.updated_at, row.status) == (1234, T0, FileStatus.UPLOADING)
    freeze(monkeypatch, T0 + 5)
    done = await store.finish_upload("f-up", size=2000, line_count=7, purpose="batch", expires_at=T0 + 99)
    assert (done.id, done.bytes, done.line_count, done.purpose, done.expires_at, done.status, done.updated_at) == (
        "f-up", 2000, 7, "batch", T0 + 99, FileStatus.PROCESSED, T0 + 5)
    assert (await store.get_file("p", "f-up")).line_count == 7
    async with store.sessions() as s:
        other = await s.get(FileRow, "f-other")
    assert other is not None and (other.bytes, other.updated_at, other.status) == (0, T0 - 100, FileStatus.UPLOADING)
    with pytest.raises(UploadGone):
        await store.touch_upload("f-up", 1)
    with pytest.raises(UploadGone):
        await store.finish_upload("f-up", size=1, line_count=1, purpose="batch", expires_at=None)
    with pytest.raises(UploadGone) as gone:
        await store.touch_upload("f-none", 1)
    assert gone.value.args == ("f-none",)
    with pytest.raises(UploadGone) as gone:
        await store.finish_upload("f-none", size=1, line_count=1, purpose="batch", expires_at=None)
    assert gone.value.args == ("f-none",)
    with pytest.raises(NotFound) as info:
        await store.finish_file("f-none", 1, 1)
    assert (info.value.message, info.value.param, info.value.code) == (
        "No such File object: f-none", "id", "file_not_found")


async def test_a_files_line_index_blocks_in_order_and_the_last_one(store: Store) -> None:
    await add_file(store, "f-i", status=FileStatus.UPLOADING)
    await add_file(store, "f-j", status=FileStatus.UPLOADING)
    assert await store.last_file_index_block("f-i") is None
    for seq, data in ((0, b"zero"), (2, b"two"), (1, b"one")):
        await store.add_file_index_block("f-i", seq, data)
    await store.add_file_index_block("f-j", 5, b"other")
    assert [b async for b in store.file_index_blocks("f-i")] == [b"zero", b"one", b"two"]
    assert await store.last_file_index_block("f-i") == b"two"
    assert await store.last_file_index_block("f-j") == b"other"


async def test_discard_file_removes_that_file_only(store: Store) -> None:
    await add_file(store, "f-x", b"xx\n", status=FileStatus.UPLOADING)
    await add_file(store, "f-y", b"yy\n")
    await store.discard_file("f-x")
    assert await file_ids(store) == {"f-y"}
    assert [c async for c in store.blobs.get("f-x")] == []
    assert b"".join([c async for c in store.blobs.get("f-y")]) == b"yy\n"


async def test_the_sweeper_removes_what_is_due_at_its_exact_bounds(store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    abandoned = T0 - repository.ABANDONED_PURGE_SECONDS
    files = {
        "up-stale": dict(status=FileStatus.UPLOADING, updated_at=T0 - 901),
        "up-edge": dict(status=FileStatus.UPLOADING, updated_at=T0 - 900),  # not before the bound: stays
        "up-engine": dict(status=FileStatus.UPLOADING, updated_at=None),
        "del-old": dict(status=FileStatus.DELETED, updated_at=T0 - 3601),
        "del-edge": dict(status=FileStatus.DELETED, updated_at=T0 - 3600),
        "purge-dead": dict(status=FileStatus.PURGING, updated_at=abandoned - 1),
        "purge-edge": dict(status=FileStatus.PURGING, updated_at=abandoned),
        "exp-due": dict(expires_at=T0 - 10),
        "exp-edge": dict(expires_at=T0),
        "exp-later": dict(expires_at=T0 + 1),
        "exp-none": dict(expires_at=None),
        "exp-input-running": dict(expires_at=T0 - 10),
        "exp-input-ended": dict(expires_at=T0 - 10),
        "exp-deleted": dict(status=FileStatus.DELETED, updated_at=T0, expires_at=T0 - 10),
        "old-published": dict(updated_at=T0 - 7200),  # published long ago: not a purge to take over
    }
    for file_id, fields in files.items():
        await add_file(store, file_id, **fields)  # type: ignore[arg-type]
    await store.create_batch(batch_row(project="p", input_file_id="exp-input-running"), [])
    ended = await store.create_batch(batch_row(project="p", input_file_id="exp-input-ended"), [])
    assert await store.transition(ended.id, BatchStatus.VALIDATING, BatchStatus.FAILED)
    without_expiry = await store.sweep_files(T0 - 900, T0 - 3600)
    assert without_expiry.expired == []
    assert (sorted(without_expiry.stale_uploads), sorted(without_expiry.deleted)) == (
        ["up-stale"], ["del-old", "purge-dead"])
    swept = await store.sweep_files(T0 - 900, T0 - 3600, expired_before=T0)
    assert (swept.stale_uploads, swept.deleted) == ([], [])
    assert sorted(swept.expired) == ["exp-due", "exp-edge", "exp-input-ended"]
    assert swept.total == 3 and without_expiry.total == 3
    assert await file_ids(store) == {"up-edge", "up-engine", "del-edge", "purge-edge", "exp-later", "exp-none",
                                     "exp-input-running", "exp-deleted", "old-published"}
    for gone in ("up-stale", "del-old", "purge-dead", "exp-due"):
        assert [c async for c in store.blobs.get(gone)] == []
    assert b"".join([c async for c in store.blobs.get("exp-later")]) == b"a\n"


async def test_the_sweeper_goes_through_every_chunk(store: Store) -> None:
    for i in range(5):
        await add_file(store, f"del-{i}", status=FileStatus.DELETED, updated_at=T0 - 7200)
    await add_file(store, "keep", status=FileStatus.DELETED, updated_at=T0)
    swept = await store.sweep_files(0, T0 - 3600, chunk=2)
    assert sorted(swept.deleted) == [f"del-{i}" for i in range(5)]
    assert await file_ids(store) == {"keep"}
    for i in range(4):
        await add_file(store, f"up-{i}", status=FileStatus.UPLOADING, updated_at=T0 - 7200)
    assert len((await store.sweep_files(T0, 0, chunk=2)).stale_uploads) == 4
    assert await file_ids(store) == {"keep"}
    assert repository.SWEEP_CHUNK == 100


# --------------------------------------------------------------------------- engine side


async def test_claim_takes_due_free_unfinished_batches_oldest_first_up_to_the_limit(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    ids = [(await store.create_batch(batch_row(project="p", created_at=T0 - 10 * i), [])).id for i in range(4)]
    # ids[3] is the oldest
    assert await store.claim("r1", 30, 2) == [ids[3], ids[2]]
    assert await store.claim("r2", 30, 10) == [ids[1], ids[0]]
    async with store.sessions() as s:
        leases = {b.id: (b.lease_owner, b.lease_until) for b in (await s.scalars(select(BatchRow))).all()}
    assert leases == {ids[3]: ("r1", T0 + 30), ids[2]: ("r1", T0 + 30), ids[1]: ("r2", T0 + 30),
                      ids[0]: ("r2", T0 + 30)}
    assert await store.claim("r3", 30, 10) == []
    assert sorted(await store.claim("r1", 60, 10)) == sorted([ids[3], ids[2]])  # its own leases: renewed
    freeze(monkeypatch, T0 + 30)  # a lease ending now is still held
    assert await store.claim("r3", 30, 10) == []
    freeze(monkeypatch, T0 + 31)
    assert sorted(await store.claim("r3", 30, 10)) == sorted([ids[1], ids[0]])
    await store.release(ids[1], "r3", next_poll_at=T0 + 40)
    await store.release(ids[0], "r3", next_poll_at=T0 + 41)
    async with store.sessions() as s:
        row = await s.get(BatchRow, ids[1])
    assert row is not None and (row.lease_owner, row.lease_until, row.next_poll_at) == (None, None, T0 + 40)
    freeze(monkeypatch, T0 + 39)
    assert await store.claim("r4", 30, 10) == []
    freeze(monkeypatch, T0 + 40)  # due at exactly its time
    assert await store.claim("r4", 30, 10) == [ids[1]]
    await store.make_due(ids[0])
    assert await store.claim("r4", 30, 10) == [ids[1], ids[0]]
    assert await store.transition(ids[1], BatchStatus.VALIDATING, BatchStatus.FAILED)
    await store.release(ids[1], "r4")
    assert await store.claim("r5", 30, 10) == []  # ended: never leased again
    assert not await store.renew(ids[0], "r5", 10)
    assert await store.renew(ids[0], "r4", 100)
    assert (await store.engine_batch(ids[0])).lease_until == T0 + 140
    await store.release(ids[0], "r5")  # not its lease: nothing
    assert (await store.engine_batch(ids[0])).lease_owner == "r4"


async def test_part_updates_touch_only_their_part(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    lines = [NewRequest("a", "x/m", {}, part_no=0), NewRequest("b", "y/m", {}, part_no=1)]
    batch = await store.create_batch(batch_row(project="p"), lines,
                                     [NewPart(0, "x", None, 1), NewPart(1, "y", None, 1)])
    other = await new_batch(store, 1, project="p")

    async def parts() -> list[Any]:
        return (await store.engine_batch(batch.id)).parts

    await store.mark_submit_started(batch.id, 1)
    await store.record_provider_batch_id(batch.id, 1, "pb-1")
    await store.mark_cancel_sent(batch.id, 1)
    await store.schedule_part(batch.id, 1, T0 + 5.5)
    assert await store.record_poll_failure(batch.id, 1) == 1
    assert await store.record_poll_failure(batch.id, 1) == 2
    assert await store.record_poll_failure("batch_none", 1) == 0
    p0, p1 = await parts()
    assert (p1.submit_started_at, p1.provider_batch_id, p1.status, p1.cancel_sent_at, p1.next_poll_at,
            p1.poll_failures) == (T0, "pb-1", BatchStatus.IN_PROGRESS, T0, T0 + 5.5, 2)
    assert (p0.submit_started_at, p0.provider_batch_id, p0.status, p0.cancel_sent_at, p0.next_poll_at,
            p0.poll_failures) == (None, None, BatchStatus.VALIDATING, None, None, 0)
    await store.record_provider_status(batch.id, 1, "in_progress", 3, 1)
    _, p1 = await parts()
    assert (p1.poll_failures, p1.provider_status, p1.provider_completed, p1.provider_failed) == (
        0, "in_progress", 3, 1)
    await store.schedule_part(batch.id, 0, T0 + 9)
    async with store.sessions.begin() as s:
        await s.execute(update(BatchRow).where(BatchRow.id == batch.id).values(next_poll_at=T0 + 9))
    await store.make_due(batch.id)
    assert [p.next_poll_at for p in await parts()] == [None, None]
    assert (await store.engine_batch(batch.id)).next_poll_at is None
    await store.start_part(batch.id, 0)
    await store.part_finalizing(batch.id, 0)
    assert [p.status for p in await parts()] == [BatchStatus.FINALIZING, BatchStatus.IN_PROGRESS]
    why = [BatchError(code="provider_error", message="down")]
    assert await store.end_part(batch.id, 1, BatchStatus.FAILED, why)
    assert not await store.end_part(batch.id, 1, BatchStatus.COMPLETED)  # once
    await store.part_finalizing(batch.id, 1)  # an ended part stays ended
    await store.start_part(batch.id, 1)
    assert await store.end_part(batch.id, 0, BatchStatus.COMPLETED)
    p0, p1 = await parts()
    assert (p1.status, p1.errors, p1.ended_at) == (BatchStatus.FAILED, why, T0)
    assert (p0.status, p0.errors, p0.ended_at) == (BatchStatus.COMPLETED, None, T0)
    assert await store.record_poll_failure(batch.id) == 1  # part 0 by default
    assert [p.poll_failures for p in await parts()] == [1, 0]
    (untouched,) = (await store.engine_batch(other)).parts
    assert (untouched.status, untouched.provider_batch_id, untouched.poll_failures) == (
        BatchStatus.VALIDATING, None, 0)


async def test_transition_stamps_records_files_and_refuses_illegal_moves(store: Store,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    a = await new_batch(store, 1, project="p")
    with pytest.raises(ValueError, match="illegal batch transition validating -> completed"):
        await store.transition(a, BatchStatus.VALIDATING, BatchStatus.COMPLETED)
    assert await store.transition(a, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert not await store.transition(a, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)  # moved meanwhile
    assert await store.transition(a, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, errors=[])
    assert await store.transition(a, BatchStatus.FINALIZING, BatchStatus.COMPLETED,
                                  files=OutputFileIds("f-out", None))
    row = await store.engine_batch(a)
    assert (row.status, row.in_progress_at, row.finalizing_at, row.completed_at, row.errors, row.output_file_id,
            row.error_file_id, row.merged_output_file_id, row.merged_error_file_id) == (
        BatchStatus.COMPLETED, T0, T0, T0, None, "f-out", None, None, None)
    b = await new_batch(store, 1, project="p")
    await store.transition(b, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    await store.transition(b, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    assert await store.transition(b, BatchStatus.FINALIZING, BatchStatus.COMPLETED,
                                  files=OutputFileIds(None, "f-err", None, "f-merr"))
    row = await store.engine_batch(b)
    assert (row.output_file_id, row.error_file_id, row.merged_output_file_id, row.merged_error_file_id) == (
        None, "f-err", None, "f-merr")
    c = await new_batch(store, 1, project="p")
    await store.transition(c, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    await store.transition(c, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    assert await store.transition(c, BatchStatus.FINALIZING, BatchStatus.COMPLETED,
                                  files=OutputFileIds("o", "e", "mo", None))
    row = await store.engine_batch(c)
    assert (row.output_file_id, row.error_file_id, row.merged_output_file_id, row.merged_error_file_id) == (
        "o", "e", "mo", None)
    async with store.sessions() as s:
        events = sorted((await s.scalars(select(WebhookEventRow.batch_id))).all())
    assert events == sorted([a, b, c])  # one ended event each, none for the moves in between


async def test_stored_results_count_per_part_and_keep_the_served_form(store: Store) -> None:
    lines = [NewRequest(f"r{i}", "x/m", {}, part_no=i % 2) for i in range(4)]
    batch = await store.create_batch(batch_row(project="p"), lines,
                                     [NewPart(0, "x", None, 2), NewPart(1, "y", None, 2)])
    encoded: list[dict[str, Any]] = []

    def encode(body: dict[str, Any]) -> bytes:
        encoded.append(body)
        if "bad" in body:
            raise ValueError("not a struct")
        return b"pb:" + json.dumps(body).encode()

    store.encode_response = encode
    assert await store.store_results(batch.id, []) == 0
    stored = await store.store_results(batch.id, [
        LineOutcome(0, "r0", ResultStatus.COMPLETED, 200, {"b": [1, 2], "a": "é"}),
        LineOutcome(2, "r2", ResultStatus.FAILED, 500, {"bad": 1}, ResultError("x", "y")),
    ], part_no=0)
    assert stored == 2
    assert await store.store_results(batch.id, [LineOutcome(1, "r1", ResultStatus.COMPLETED, 200, {}),
                                                 LineOutcome(3, "r3", ResultStatus.EXPIRED, 0, None)]) == 2
    async with store.sessions() as s:
        rows = {r.idx: (r.response_json, r.response_pb) for r in (await s.scalars(select(ResultRow))).all()}
    assert rows == {0: ('{"b":[1,2],"a":"\\u00e9"}', b'pb:{"b": [1, 2], "a": "\\u00e9"}'), 2: ('{"bad":1}', None),
                    1: ("{}", None), 3: (None, None)}
    assert encoded == [{"b": [1, 2], "a": "é"}, {"bad": 1}]
    row = await store.engine_batch(batch.id)
    assert (row.completed, row.failed) == (2, 1)
    assert [(p.completed, p.failed) for p in row.parts] == [(1, 1), (0, 0)]  # only the named part's counts


async def test_results_stored_are_reported_by_provider_and_model(store: Store) -> None:
    from service.domain import telemetry

    class Counting(telemetry.Telemetry):
        counts_results = True

        def __init__(self) -> None:
            self.seen: list[tuple[str, list[tuple[str, int]]]] = []

        def results_stored(self, provider: str, stored: Any) -> None:
            self.seen.append((provider, [(model, o.index) for model, o in stored]))

    lines = [NewRequest("a", "x/m", {}, "xm", part_no=0), NewRequest("b", "y/m", {}, None, part_no=1),
             NewRequest("c", "x/m2", {}, "xm2", part_no=0)]
    batch = await store.create_batch(batch_row(project="p"), lines,
                                     [NewPart(0, "x", None, 2), NewPart(1, "y", None, 1)])
    # a later batch with lines at the same indexes, on other providers and models: never mixed in
    await store.create_batch(batch_row(project="p"), [NewRequest(c, "z/m", {}, "zm", part_no=0) for c in "abc"],
                             [NewPart(0, "z", None, 3)])
    counting = Counting()
    previous = telemetry.install(counting)
    try:
        await store.store_results(batch.id, [LineOutcome(i, c, ResultStatus.COMPLETED, 200, {})
                                             for i, c in enumerate("abc")])
        await store.store_results(batch.id, [LineOutcome(0, "a", ResultStatus.COMPLETED, 200, {})])  # again
    finally:
        telemetry.install(previous)
    assert sorted(counting.seen) == [("x", [("xm", 0), ("xm2", 2)]), ("y", [("y/m", 1)])]


async def test_pending_lines_stop_at_the_limit_and_the_byte_budget(store: Store) -> None:
    sizes = [100, 200, 300, 50]
    lines = [NewRequest(f"r{i}", "sim/m", {"t": "x" * (n - len(codec.dumps({"t": ""})))}) for i, n in enumerate(sizes)]
    batch = await store.create_batch(batch_row(project="p"), lines)
    assert [r.idx for r in await store.pending_requests(batch.id, 10, max_bytes=300)] == [0, 1]
    assert [r.idx for r in await store.pending_requests(batch.id, 10, max_bytes=299)] == [0]
    assert [r.idx for r in await store.pending_requests(batch.id, 10, max_bytes=10)] == [0]  # at least one
    assert [r.idx for r in await store.pending_requests(batch.id, 2)] == [0, 1]
    assert [r.idx for r in await store.pending_requests(batch.id, 10, after_idx=1, max_bytes=350)] == [2, 3]
    assert [len(r.body_json) for r in await store.pending_requests(batch.id, 10)] == sizes
    pages = []
    async for row in store.iter_requests(batch.id, page=10, max_bytes=300):
        pages.append(row.idx)
    assert pages == [0, 1, 2, 3]
    await store.store_results(batch.id, [LineOutcome(0, "r0", ResultStatus.COMPLETED, 200, {})])
    assert [r.idx for r in await store.pending_requests(batch.id, 10, max_bytes=500)] == [1, 2]
    empty = await store.create_batch(batch_row(project="p"), [])
    assert await store.pending_requests(empty.id, 10) == []
    assert [r async for r in store.iter_requests(empty.id)] == []


async def test_request_keys_and_results_are_per_batch(store: Store) -> None:
    # made first, with the same custom_ids at other indexes: a cursor is looked up in its own batch only
    await store.create_batch(batch_row(project="p"), [NewRequest(f"r{i}", "sim/m", {}) for i in (2, 1, 0)])
    a = await new_batch(store, 3, project="p")
    b = await new_batch(store, 3, project="p")
    assert set(await store.request_keys(a, [0, 2])) == {0, 2}
    keys_b = await store.request_keys(b, [1])
    assert [(i, r.batch_id, r.custom_id) for i, r in keys_b.items()] == [(1, b, "r1")]
    await store.store_results(a, [LineOutcome(i, f"r{i}", ResultStatus.COMPLETED, 200, {"a": i}) for i in range(3)])
    await store.store_results(b, [LineOutcome(i, f"r{i}", ResultStatus.COMPLETED, 200, {"b": i}) for i in range(3)])
    page, more = await store.list_results("p", b, 5, "r0")
    assert [(req.batch_id, res.batch_id, req.custom_id, res.response_json) for req, res in page] == [
        (b, b, "r1", '{"b":1}'), (b, b, "r2", '{"b":2}')] and not more
    row_b = await store.get_batch("p", b)
    rows, more = await store.result_page(row_b, 1, "r0")
    assert [(r.custom_id, r.response_json) for r in rows] == [("r1", '{"b":1}')] and more
    rows, more = await store.result_page(row_b, 5, "")
    assert [r.idx for r in rows] == [0, 1, 2] and not more
    rows, more = await store.result_page(row_b, 3, "")  # exactly the last page: nothing more
    assert [r.idx for r in rows] == [0, 1, 2] and not more
    with pytest.raises(NotFound) as info:
        await store.result_page(row_b, 5, "nope")
    assert info.value.message == f"No request with custom_id 'nope' in batch '{b}'."
    assert [r.response_json async for r in store.iter_results(b, page=2)] == ['{"b":0}', '{"b":1}', '{"b":2}']
    verbatim = [r.verbatim async for r in store.iter_results(b)]
    assert verbatim == [False, False, False]


# --------------------------------------------------------------------------- retries


async def _ended(store: Store, batch_id: str) -> BatchRow:
    await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    await store.transition(batch_id, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    await store.transition(batch_id, BatchStatus.FINALIZING, BatchStatus.COMPLETED)
    return await store.engine_batch(batch_id)


async def _chain(store: Store) -> tuple[BatchRow, BatchRow, BatchRow, BatchRow]:
    """root (r0 completed, r1 and r2 failed); retry1 of root (r1 completed, r2 failed); retry2 of
    retry1 (r2 pending); retry3 of root (r1 and r0 completed again); retry4 of retry3 (r0 pending)."""
    def ok(i: int, cid: str) -> LineOutcome:
        return LineOutcome(i, cid, ResultStatus.COMPLETED, 200, {"ok": cid})

    def bad(i: int, cid: str) -> LineOutcome:
        return LineOutcome(i, cid, ResultStatus.FAILED, 500, None, ResultError("boom", "no"))

    # an unrelated batch made first, with the same custom_ids at other indexes: never looked at
    await store.create_batch(batch_row(project="p", created_at=T0 - 5),
                             [NewRequest(f"r{i}", "sim/m", {"decoy": i}, origin_idx=i) for i in (2, 1, 0)])
    root = await store.create_batch(batch_row(project="p", created_at=T0),
                                    [NewRequest(f"r{i}", "sim/m", {"i": i}) for i in range(3)])
    await store.store_results(root.id, [ok(0, "r0"), bad(1, "r1"), bad(2, "r2")])

    async def retry(of: BatchRow, age: int, origins: list[int]) -> BatchRow:
        row = batch_row(project="p", created_at=T0 + age, chain_id=root.id, retry_of=of.id)
        return await store.create_batch(row, [NewRequest(f"r{o}", "sim/m", {"i": o}, origin_idx=o) for o in origins])

    r3 = await retry(root, 3, [1, 0])  # made first, but dated last: the chain goes by created_at, not by id
    r1 = await retry(root, 1, [1, 2])
    await store.store_results(r1.id, [ok(0, "r1"), bad(1, "r2")])
    r2 = await retry(r1, 2, [2])
    await retry(r3, 4, [0])  # retry4, of retry3: r0 a third time (pending)
    await store.store_results(r3.id, [ok(0, "r1"), ok(1, "r0")])
    return (await _ended(store, root.id), await _ended(store, r1.id), await store.engine_batch(r2.id),
            await store.engine_batch(r3.id))


async def test_a_retry_chain_its_attempts_and_their_numbers(store: Store) -> None:
    root, r1, r2, r3 = await _chain(store)
    assert await store.retries_of([]) == {}
    assert await store.retries_of([root.id, r1.id, r2.id]) == {root.id: [r1.id, r3.id], r1.id: [r2.id]}
    assert (await store.get_batch_with_retries("p", root.id))[1] == [r1.id, r3.id]
    assert (await store.get_batch_with_retries("p", r2.id))[1] == []
    with pytest.raises(NotFound):
        await store.get_batch_with_retries("q", root.id)
    chain = await store.chain("p", r2.id)
    r4 = chain[-1]
    assert [b.id for b in chain] == [root.id, r1.id, r2.id, r3.id, r4.id] and r4.retry_of == r3.id
    assert [b.id for b in await store.chain("p", root.id)] == [root.id, r1.id, r2.id, r3.id, r4.id]
    with pytest.raises(NotFound):
        await store.chain("q", root.id)
    rows = [r async for r in store.iter_requests(r3.id)]
    assert await store.attempt_numbers(chain, r3, rows) == {0: 3, 1: 2}  # r1: root, retry1, retry3; r0: root, retry3
    assert await store.attempt_numbers(chain, r2, [r async for r in store.iter_requests(r2.id)]) == {0: 3}
    assert await store.attempt_numbers(chain, r1, [r async for r in store.iter_requests(r1.id)]) == {0: 2, 1: 2}
    assert await store.attempt_numbers(chain, root, [r async for r in store.iter_requests(root.id)]) == {
        0: 1, 1: 1, 2: 1}
    assert await store.attempt_numbers(chain, r3, []) == {}
    # any rows with idx and origin_idx: origin 0 ran in retry3, origin 1 in retry1 and retry3, 2 in retry1 and 2
    rows = [SimpleNamespace(idx=i, origin_idx=o) for i, o in enumerate((0, 1, 2))]
    assert await store.attempt_numbers(chain, r4, rows) == {0: 3, 1: 4, 2: 4}

    latest, more = await store.latest_attempts(chain, "", 10)
    assert not more
    assert [(a.request.custom_id, a.batch.id, a.number, a.result.status if a.result else None) for a in latest] == [
        ("r0", r4.id, 3, None), ("r1", r3.id, 3, ResultStatus.COMPLETED),
        ("r2", r2.id, 3, None)]
    latest, more = await store.latest_attempts(chain, "r0", 1)
    assert [a.request.custom_id for a in latest] == ["r1"] and more
    latest, more = await store.latest_attempts(chain, "r1", 1)
    assert [a.request.custom_id for a in latest] == ["r2"] and not more
    with pytest.raises(NotFound) as info:
        await store.latest_attempts(chain, "r9", 1)
    assert (info.value.message, info.value.param, info.value.code) == (
        f"No request with custom_id 'r9' in batch '{root.id}'.", "after", "cursor_not_found")
    attempts = await store.line_attempts(chain, "r2")
    assert [(a.batch.id, a.number, a.request.idx, a.result.status if a.result else None) for a in attempts] == [
        (root.id, 1, 2, ResultStatus.FAILED), (r1.id, 2, 1, ResultStatus.FAILED), (r2.id, 3, 0, None)]
    assert [(a.batch.id, a.number, a.request.idx) for a in await store.line_attempts(chain, "r0")] == [
        (root.id, 1, 0), (r3.id, 2, 1), (r4.id, 3, 0)]
    with pytest.raises(NotFound) as info:
        await store.line_attempts(chain, "r9")
    assert (info.value.message, info.value.param, info.value.code) == (
        f"No request with custom_id 'r9' in batch '{root.id}'.", "custom_id", "result_not_found")
    single = await store.latest_attempts([root], "", 10)
    assert [(a.batch.id, a.number) for a in single[0]] == [(root.id, 1)] * 3


async def test_a_line_retried_twice_is_its_third_attempt_in_the_batch_as_a_caller_reads_it(store: Store) -> None:
    """GetBatchResult and ListBatchResults number a retry's lines with the batch they read
    (`get_batch`) and the chain (`chain`): two reads, two instances of each batch. Before the fix
    `attempt_numbers` looked the batch up in the chain by identity, never found it, and called
    every line of any retry its second attempt."""
    root, _, r2, _ = await _chain(store)
    batch = await store.get_batch("p", r2.id)
    rows, _ = await store.result_page(batch, 10, "")
    lines = [r async for r in store.iter_requests(r2.id)]
    assert await store.attempt_numbers(await store.chain("p", r2.id), batch, lines) == {0: 3}
    assert rows == []  # r2's line has no result yet: the numbers come from the request rows
    assert await store.attempt_numbers(await store.chain("p", root.id), await store.get_batch("p", root.id),
                                       lines) == {0: 1}


async def test_retries_made_in_the_same_second_are_listed_by_id(store: Store) -> None:
    root = await store.create_batch(batch_row(project="p", created_at=T0), [NewRequest("a", "sim/m", {})])
    for suffix in ("z", "a", "m"):  # stored in this order, listed by id within their second
        await store.create_batch(batch_row(project="p", created_at=T0 + 1, id=f"batch_retry_{suffix}",
                                           chain_id=root.id, retry_of=root.id), [NewRequest("a", "sim/m", {})])
    want = ["batch_retry_a", "batch_retry_m", "batch_retry_z"]
    assert await store.retries_of([root.id]) == {root.id: want}
    assert (await store.get_batch_with_retries("p", root.id))[1] == want
    assert [b.id for b in await store.chain("p", "batch_retry_z")] == [root.id, *want]


async def test_the_lines_a_retry_runs_again(store: Store) -> None:
    root, r1, _, _ = await _chain(store)
    failed = frozenset({ResultStatus.FAILED})
    assert [r.custom_id async for r in store.iter_retry_lines(root, failed, None, page=1)] == ["r1", "r2"]
    assert [r.custom_id async for r in store.iter_retry_lines(root, frozenset({ResultStatus.COMPLETED}), None)] == [
        "r0"]
    assert [r.custom_id async for r in store.iter_retry_lines(root, failed, frozenset({"r0", "r2"}), page=2)] == [
        "r0", "r2"]
    assert [(r.idx, r.body_json) async for r in store.iter_retry_lines(r1, failed, None)] == [(1, '{"i":2}')]
    whole = await new_batch(store, 5, project="p")  # failed as a whole: no results, every line failed
    await store.transition(whole, BatchStatus.VALIDATING, BatchStatus.FAILED)
    row = await store.engine_batch(whole)
    assert [r.idx async for r in store.iter_retry_lines(row, failed, None, page=3)] == [0, 1, 2, 3, 4]
    assert [r.idx async for r in store.iter_retry_lines(row, failed, None, page=5)] == [0, 1, 2, 3, 4]
    assert [r.idx async for r in store.iter_retry_lines(row, frozenset({ResultStatus.EXPIRED}), None)] == []
    expired = await new_batch(store, 2, project="p")
    await store.transition(expired, BatchStatus.VALIDATING, BatchStatus.EXPIRED)
    row = await store.engine_batch(expired)
    assert [r.idx async for r in store.iter_retry_lines(row, failed, None)] == []  # no result, not failed


async def test_retry_lines_whose_input_content_is_gone_name_their_batch(store: Store) -> None:
    batch_id = await by_reference(store, "file-r", BODIES[:2])
    await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.FAILED)
    await store.blobs.delete(["file-r"])
    row = await store.engine_batch(batch_id)
    with pytest.raises(Internal) as info:
        [r async for r in store.iter_retry_lines(row, frozenset({ResultStatus.FAILED}), None)]
    assert info.value.message == (f"The request bodies of batch {batch_id} are no longer available: the "
                                  "content of its input file file-r is gone.")


async def test_known_custom_ids_looks_up_more_than_one_chunk(store: Store) -> None:
    batch = await store.create_batch(batch_row(project="p"), [NewRequest(f"c{i}", "sim/m", {}) for i in range(4)])
    other = await store.create_batch(batch_row(project="p"), [NewRequest("c9", "sim/m", {})])
    asked = [f"x{i}" for i in range(2 * INSERT_CHUNK + 100)]  # c3 is not asked for
    asked[0], asked[INSERT_CHUNK - 1], asked[2 * INSERT_CHUNK + 50], asked[-1] = "c0", "c1", "c2", "c9"
    assert await store.known_custom_ids(batch.id, asked) == {"c0", "c1", "c2"}
    assert await store.known_custom_ids(other.id, asked) == {"c9"}
    assert await store.known_custom_ids(batch.id, []) == set()


# --------------------------------------------------------------------------- executor capacity


async def slots(store: Store, provider: str = "x") -> dict[int, tuple[str | None, float | None]]:
    from service.storage.tables import CapacitySlotRow

    async with store.sessions() as s:
        return {r.slot: (r.holder, r.until) for r in (await s.scalars(
            select(CapacitySlotRow).where(CapacitySlotRow.provider == provider))).all()}


async def test_capacity_slots_are_taken_once_and_run_out(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    await store.ensure_capacity("x", 3, 4.0)
    await store.ensure_capacity("x", 5, 9.0)  # more slots; the limit chosen first stays
    await store.ensure_capacity("y", 1, 1.0)
    assert await slots(store) == dict.fromkeys(range(5), (None, None))
    assert (await store.capacity_limit("x"), await store.capacity_limit("none")) == (4.0, None)
    assert await store.take_slot("x", 2, "h1", T0 + 10) == 0
    assert await store.take_slot("x", 2, "h2", T0 + 20) == 1
    assert await store.take_slot("x", 2, "h3", T0 + 20) is None
    assert await store.take_slot("y", 2, "hy", T0 + 20) == 0  # per provider
    assert await store.take_slot("x", 5, "h3", T0 + 20) == 2
    freeze(monkeypatch, T0 + 10)  # h1's lease runs out at T0 + 10: still held then
    assert await store.take_slot("x", 2, "h4", T0 + 30) is None
    await store.renew_slots([], T0 + 99)
    await store.renew_slots(["h2", "h3"], T0 + 50)
    freeze(monkeypatch, T0 + 11)
    assert await store.take_slot("x", 2, "h4", T0 + 30) == 0
    await store.free_slot("x", "h2")
    await store.free_slot("x", "nobody")
    assert await slots(store) == {0: ("h4", T0 + 30), 1: (None, None), 2: ("h3", T0 + 50), 3: (None, None),
                                  4: (None, None)}
    assert await store.take_slot("x", 5, "h5", T0 + 30) == 1
    assert await store.take_slot("x", 5, "h6", T0 + 30) == 3
    assert (await slots(store, "y")) == {0: ("hy", T0 + 20)}
    # x's slots 0-3 held, only 4 free, while z has four free slots 0-3: x gets its slot 4
    await store.ensure_capacity("z", 4, 1.0)
    assert await store.take_slot("x", 5, "h7", T0 + 30) == 4
    assert await store.take_slot("x", 5, "h8", T0 + 30) is None
    # a holder that took slots of two providers hands back only the one named
    assert await store.take_slot("z", 4, "h7", T0 + 30) == 0
    await store.free_slot("x", "h7")
    assert (await slots(store))[4] == (None, None) and (await slots(store, "z"))[0] == ("h7", T0 + 30)


async def test_the_adaptive_limit_backs_off_once_per_cooldown_and_recovers(store: Store,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    await store.ensure_capacity("x", 1, 8.0)
    await store.ensure_capacity("y", 1, 8.0)
    assert await store.back_off("x", 0.5, 1.5, cooldown=60)
    assert await store.capacity_limit("x") == 4.0
    assert not await store.back_off("x", 0.5, 1.5, cooldown=60)
    freeze(monkeypatch, T0 + 60)
    assert not await store.back_off("x", 0.5, 1.5, cooldown=60)
    freeze(monkeypatch, T0 + 61)
    assert await store.back_off("x", 0.5, 1.5, cooldown=60)
    assert await store.capacity_limit("x") == 2.0
    freeze(monkeypatch, T0 + 200)
    assert await store.back_off("x", 0.5, 1.5, cooldown=60)
    assert await store.capacity_limit("x") == 1.5  # never below the floor
    assert await store.capacity_limit("y") == 8.0
    await store.recover("x", 0.25, 10.0)
    assert await store.capacity_limit("x") == 1.75
    await store.recover("x", 5.0, 3.0)
    assert await store.capacity_limit("x") == 3.0  # never above the ceiling
    assert await store.capacity_limit("y") == 8.0


async def test_requests_and_tokens_are_counted_per_minute_within_the_limits(store: Store) -> None:
    from service.storage.tables import CapacityWindowRow

    async def windows() -> dict[tuple[str, int], tuple[int, int]]:
        async with store.sessions() as s:
            return {(w.provider, w.minute): (w.requests, w.tokens) for w in
                    (await s.scalars(select(CapacityWindowRow))).all()}

    assert await store.count_request("y", 100, 7, rpm=None, tpm=None)
    assert await store.count_request("x", 100, 10, rpm=2, tpm=25)
    assert await store.count_request("x", 100, 15, rpm=2, tpm=25)  # exactly the token budget
    assert not await store.count_request("x", 100, 0, rpm=2, tpm=None)  # a third request this minute
    assert await windows() == {("x", 100): (2, 25), ("y", 100): (1, 7)}
    assert await store.count_request("x", 101, 30, rpm=5, tpm=25)  # larger than the budget: alone
    assert await store.count_request("x", 101, 0, rpm=None, tpm=None)  # no limits: counted whatever the window
    assert await windows() == {("x", 100): (2, 25), ("x", 101): (2, 30), ("y", 100): (1, 7)}  # this minute's only
    assert not await store.count_request("x", 101, 1, rpm=5, tpm=25)
    assert await store.count_request("y", 101, 1000, rpm=None, tpm=None)
    await store.correct_tokens("x", 101, -10)  # x's window only
    assert not await store.count_request("x", 101, 6, rpm=5, tpm=25)  # 20 + 6 > 25
    assert await store.count_request("x", 101, 5, rpm=5, tpm=25)  # 20 + 5
    await store.correct_tokens("x", 101, 0)
    assert await windows() == {("x", 100): (2, 25), ("x", 101): (3, 25), ("y", 100): (1, 7), ("y", 101): (1, 1000)}
    assert await store.count_request("x", 102, 1, rpm=1, tpm=None)
    assert await windows() == {("x", 101): (3, 25), ("x", 102): (1, 1), ("y", 100): (1, 7),
                               ("y", 101): (1, 1000)}  # x's older windows dropped, not y's


async def test_running_parts_per_project(store: Store) -> None:
    def parts(*providers: str) -> tuple[list[NewRequest], list[NewPart]]:
        return ([NewRequest(f"r{i}", f"{p}/m", {}, part_no=i) for i, p in enumerate(providers)],
                [NewPart(i, p, None, 1) for i, p in enumerate(providers)])

    a = await store.create_batch(batch_row(project="p"), *parts("x", "y"))
    b = await store.create_batch(batch_row(project="p"), *parts("x", "x"))
    c = await store.create_batch(batch_row(project="q"), *parts("x"))
    d = await store.create_batch(batch_row(project="q"), *parts("x"))
    await store.start_part(b.id, 1)
    await store.end_part(a.id, 0, BatchStatus.COMPLETED)
    await store.part_finalizing(c.id, 0)
    await store.transition(d.id, BatchStatus.VALIDATING, BatchStatus.FAILED)
    assert await store.running_parts("x") == {"p": 2}
    assert await store.running_parts("y") == {"p": 1}
    assert await store.running_parts("z") == {}


# --------------------------------------------------------------------------- cancel, counts


async def test_cancel_moves_a_cancellable_batch_once_and_refuses_an_ended_one(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    freeze(monkeypatch, T0)
    a = await new_batch(store, 1, project="p")
    async with store.sessions.begin() as s:
        await s.execute(update(BatchRow).where(BatchRow.id == a).values(next_poll_at=T0 + 100))
    row = await store.request_cancel("p", a)
    assert (row.status, row.cancelling_at, row.next_poll_at) == (BatchStatus.CANCELLING, T0, None)
    freeze(monkeypatch, T0 + 5)
    assert (await store.request_cancel("p", a)).cancelling_at == T0  # a repeated cancel changes nothing
    await store.transition(a, BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    assert (await store.request_cancel("p", a)).status == BatchStatus.CANCELLED
    with pytest.raises(NotFound):
        await store.request_cancel("q", a)
    b = await new_batch(store, 1, project="p")
    await store.transition(b, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert (await store.request_cancel("p", b)).status == BatchStatus.CANCELLING
    c = await new_batch(store, 1, project="p")
    await store.transition(c, BatchStatus.VALIDATING, BatchStatus.EXPIRED)
    with pytest.raises(Conflict) as info:
        await store.request_cancel("p", c)
    assert info.value.message == "Cannot cancel a batch with status 'expired'."


async def test_lines_streamed_from_an_async_iterable_are_stored_in_order(store: Store) -> None:
    async def stream() -> AsyncIterator[NewRequest]:
        for i in range(3):
            yield NewRequest(f"s{i}", "sim/m", {"i": i})

    batch = await store.create_batch(batch_row(project="p"), stream())
    assert batch.total == 3
    assert [(r.idx, r.custom_id, r.body_json) async for r in store.iter_requests(batch.id)] == [
        (i, f"s{i}", f'{{"i":{i}}}') for i in range(3)]


def test_ids_carry_their_prefix_and_sort_in_creation_order() -> None:
    import re

    ids = [repository.new_id("batch_") for _ in range(50)]
    assert all(re.fullmatch(r"batch_[0-9a-f]{32}", i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert repository.new_id("file-").startswith("file-")
