"""The repository: every read and write of batches, requests, results, files and keys.

Each public method is one transaction (its own unit of work), so callers never see or leave
half-written state. Writes that race between replicas are compare-and-set on the row
(`status`, lease owner), never read-modify-write in Python. Results are inserted with
"on conflict do nothing" and the batch counters move only by what was really inserted, so
storing the same result twice (a retry, a second replica) counts it once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from service.domain.errors import Conflict, NotFound
from service.domain.model import CANCELLABLE, BatchStatus, LineOutcome, ResultStatus, Usage, can_transition, now
from service.storage.tables import ApiKeyRow, BatchRow, FileChunkRow, FileRow, RequestRow, ResultRow

INSERT_CHUNK = 500
UPLOADING = "uploading"


def new_id(prefix: str) -> str:
    """Time-ordered (nanosecond clock first, then randomness), so ids sort in creation order even
    between objects created in the same second."""
    return f"{prefix}{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class NewRequest:
    custom_id: str
    model: str
    body: dict[str, Any]


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._dialect = engine.dialect.name

    async def close(self) -> None:
        await self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    # --- API keys -------------------------------------------------------------------------

    async def put_api_keys(self, hashed: dict[str, str]) -> None:
        if not hashed:
            return
        async with self.sessions.begin() as s:
            rows = [{"key_hash": h, "project": p, "created_at": now()} for h, p in hashed.items()]
            stmt = self._insert(ApiKeyRow).values(rows)
            await s.execute(stmt.on_conflict_do_update(index_elements=["key_hash"],
                                                       set_={"project": stmt.excluded.project}))

    async def project_for_key_hash(self, key_hash: str) -> str | None:
        async with self.sessions() as s:
            return await s.scalar(select(ApiKeyRow.project).where(ApiKeyRow.key_hash == key_hash))

    # --- batches: API side ----------------------------------------------------------------

    async def create_batch(self, batch: BatchRow,
                           requests: Iterable[NewRequest] | AsyncIterable[NewRequest]) -> BatchRow:
        """Insert the batch and its lines in one transaction: all or nothing. `requests` may be
        an async iterable (lines streamed from a file), inserted 500 at a time."""
        async with self.sessions.begin() as s:
            s.add(batch)
            await s.flush()
            chunk: list[dict[str, Any]] = []
            count = 0
            async for req in _aiter(requests):
                chunk.append({"batch_id": batch.id, "idx": count, "custom_id": req.custom_id,
                              "model": req.model, "body_json": json.dumps(req.body, separators=(",", ":"))})
                count += 1
                if len(chunk) >= INSERT_CHUNK:
                    await s.execute(self._insert(RequestRow), chunk)
                    chunk = []
            if chunk:
                await s.execute(self._insert(RequestRow), chunk)
            batch.total = count
        return batch

    async def get_batch(self, project: str | None, batch_id: str) -> BatchRow:
        """`project=None` is the engine's view (all projects); callers always pass theirs."""
        async with self.sessions() as s:
            query = select(BatchRow).where(BatchRow.id == batch_id)
            if project is not None:
                query = query.where(BatchRow.project == project)
            row = await s.scalar(query)
        if row is None:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="id", code="batch_not_found")
        return row

    async def list_batches(self, project: str, limit: int, after: str) -> tuple[list[BatchRow], bool]:
        """Newest first; `after` is the id of the last batch of the previous page."""
        query = select(BatchRow).where(BatchRow.project == project)
        if after:
            try:
                anchor = await self.get_batch(project, after)
            except NotFound:
                raise NotFound(f"No batch found with id '{after}' to list after.", param="after",
                               code="cursor_not_found") from None
            query = query.where(or_(BatchRow.created_at < anchor.created_at,
                                    and_(BatchRow.created_at == anchor.created_at, BatchRow.id < anchor.id)))
        query = query.order_by(BatchRow.created_at.desc(), BatchRow.id.desc()).limit(limit + 1)
        async with self.sessions() as s:
            rows = list((await s.scalars(query)).all())
        return rows[:limit], len(rows) > limit

    async def request_cancel(self, project: str, batch_id: str) -> BatchRow:
        """validating/in_progress → cancelling in one conditional UPDATE (so an engine moving the
        batch meanwhile cannot make a cancellable batch look uncancellable); cancelling/cancelled
        stay as they are (a repeated cancel is not an error); any other status is a conflict."""
        await self.get_batch(project, batch_id)
        async with self.sessions.begin() as s:
            await s.execute(update(BatchRow).where(
                BatchRow.id == batch_id, BatchRow.project == project,
                BatchRow.status.in_([st.value for st in CANCELLABLE]),
            ).values(status=BatchStatus.CANCELLING.value, cancelling_at=now()))
        batch = await self.get_batch(project, batch_id)
        if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return batch
        raise Conflict(f"Cannot cancel a batch with status '{batch.status}'.", param="id",
                       code="batch_not_cancellable")

    # --- results ----------------------------------------------------------------------------

    async def list_results(self, project: str, batch_id: str, limit: int,
                           after: str) -> tuple[list[tuple[RequestRow, ResultRow]], bool]:
        await self.get_batch(project, batch_id)
        query = (
            select(RequestRow, ResultRow)
            .join(ResultRow, and_(ResultRow.batch_id == RequestRow.batch_id, ResultRow.idx == RequestRow.idx))
            .where(RequestRow.batch_id == batch_id)
        )
        async with self.sessions() as s:
            if after:
                anchor = await s.scalar(select(RequestRow.idx).where(
                    RequestRow.batch_id == batch_id, RequestRow.custom_id == after))
                if anchor is None:
                    raise NotFound(f"No request with custom_id '{after}' in batch '{batch_id}'.",
                                   param="after", code="cursor_not_found")
                query = query.where(RequestRow.idx > anchor)
            result = await s.execute(query.order_by(RequestRow.idx).limit(limit + 1))
            rows = [(req, res) for req, res in result.all()]
        return rows[:limit], len(rows) > limit

    async def get_result(self, project: str, batch_id: str,
                         custom_id: str) -> tuple[BatchRow, RequestRow, ResultRow | None]:
        batch = await self.get_batch(project, batch_id)
        async with self.sessions() as s:
            req = await s.scalar(select(RequestRow).where(RequestRow.batch_id == batch_id,
                                                          RequestRow.custom_id == custom_id))
            if req is None:
                raise NotFound(f"No request with custom_id '{custom_id}' in batch '{batch_id}'.",
                               param="custom_id", code="result_not_found")
            res = await s.get(ResultRow, (batch_id, req.idx))
        return batch, req, res

    async def iter_results(self, batch_id: str, page: int = 1000) -> AsyncIterator[ResultRow]:
        """Every stored result in request order, a page at a time (for output files)."""
        last = -1
        while True:
            async with self.sessions() as s:
                rows = list((await s.scalars(select(ResultRow).where(
                    ResultRow.batch_id == batch_id, ResultRow.idx > last).order_by(ResultRow.idx).limit(page))).all())
            for row in rows:
                yield row
            if len(rows) < page:
                return
            last = rows[-1].idx

    # --- engine side ------------------------------------------------------------------------

    async def claim(self, owner: str, lease_seconds: float, limit: int) -> list[str]:
        """Lease up to `limit` unfinished batches that are due, for this replica only."""
        t = time.time()
        terminal = [s.value for s in BatchStatus if s.terminal]
        free = or_(BatchRow.lease_owner.is_(None), BatchRow.lease_owner == owner, BatchRow.lease_until < t)
        due = or_(BatchRow.next_poll_at.is_(None), BatchRow.next_poll_at <= t)
        async with self.sessions() as s:
            candidates = list((await s.scalars(
                select(BatchRow.id).where(BatchRow.status.not_in(terminal), free, due)
                .order_by(BatchRow.created_at).limit(limit))).all())
        claimed = []
        for batch_id in candidates:
            # Status and due time are checked again in the UPDATE itself: a batch that ended since
            # the SELECT (another replica finished it) must never be leased, or it would be finalized
            # twice; one whose step just ended asking to wait (backoff, Retry-After) is not due.
            async with self.sessions.begin() as s:
                res = await s.execute(update(BatchRow).where(
                    BatchRow.id == batch_id, BatchRow.status.not_in(terminal), free, due).values(
                    lease_owner=owner, lease_until=t + lease_seconds))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                claimed.append(batch_id)
        return claimed

    async def renew(self, batch_id: str, owner: str, lease_seconds: float) -> bool:
        async with self.sessions.begin() as s:
            res = await s.execute(update(BatchRow).where(BatchRow.id == batch_id, BatchRow.lease_owner == owner)
                                  .values(lease_until=time.time() + lease_seconds))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def release(self, batch_id: str, owner: str, next_poll_at: float | None = None) -> None:
        async with self.sessions.begin() as s:
            await s.execute(update(BatchRow).where(BatchRow.id == batch_id, BatchRow.lease_owner == owner)
                            .values(lease_owner=None, lease_until=None, next_poll_at=next_poll_at))

    async def transition(self, batch_id: str, src: BatchStatus, dst: BatchStatus, **fields: Any) -> bool:
        """Move `src → dst` if the batch is still in `src`; stamps `<dst>_at`. False if it moved
        meanwhile (another replica, or a cancel): the caller re-reads and decides again."""
        if not can_transition(src, dst):
            raise ValueError(f"illegal batch transition {src} -> {dst}")
        stamp = dst.timestamp_field
        values = {"status": dst.value, **({stamp: now()} if stamp else {}), **fields}
        async with self.sessions.begin() as s:
            res = await s.execute(update(BatchRow).where(BatchRow.id == batch_id, BatchRow.status == src.value)
                                  .values(**values))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def set_fields(self, batch_id: str, **fields: Any) -> None:
        async with self.sessions.begin() as s:
            await s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(**fields))

    async def pending_requests(self, batch_id: str, limit: int, after_idx: int = -1) -> list[RequestRow]:
        """Lines with no stored result yet, in order."""
        async with self.sessions() as s:
            query = (select(RequestRow)
                     .outerjoin(ResultRow, and_(ResultRow.batch_id == RequestRow.batch_id,
                                                ResultRow.idx == RequestRow.idx))
                     .where(RequestRow.batch_id == batch_id, RequestRow.idx > after_idx, ResultRow.idx.is_(None))
                     .order_by(RequestRow.idx).limit(limit))
            return list((await s.scalars(query)).all())

    async def iter_requests(self, batch_id: str, page: int = 1000) -> AsyncIterator[RequestRow]:
        last = -1
        while True:
            async with self.sessions() as s:
                rows = list((await s.scalars(select(RequestRow).where(
                    RequestRow.batch_id == batch_id, RequestRow.idx > last)
                    .order_by(RequestRow.idx).limit(page))).all())
            for row in rows:
                yield row
            if len(rows) < page:
                return
            last = rows[-1].idx

    async def request_keys(self, batch_id: str, indexes: Sequence[int]) -> dict[int, tuple[str, str]]:
        """index -> (custom_id, model) for the given lines."""
        async with self.sessions() as s:
            rows = (await s.execute(select(RequestRow.idx, RequestRow.custom_id, RequestRow.model).where(
                RequestRow.batch_id == batch_id, RequestRow.idx.in_(list(indexes))))).all()
        return {idx: (cid, model) for idx, cid, model in rows}

    async def store_results(self, batch_id: str, results: Sequence[LineOutcome]) -> int:
        """Insert results not stored yet and add them to the batch's counts and usage, in one
        transaction. Returns how many were new."""
        if not results:
            return 0
        t = now()
        by_index = {r.index: r for r in results}
        rows = [_result_row(batch_id, r, t) for r in by_index.values()]
        async with self.sessions.begin() as s:
            stmt = self._insert(ResultRow).on_conflict_do_nothing(index_elements=["batch_id", "idx"])
            inserted = [i for (i,) in (await s.execute(stmt.returning(ResultRow.idx), rows)).all()]
            if not inserted:
                return 0
            new = [by_index[i] for i in inserted]
            usage = sum((r.usage for r in new), Usage())
            await s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(
                completed=BatchRow.completed + sum(1 for r in new if r.status is ResultStatus.COMPLETED),
                failed=BatchRow.failed + sum(1 for r in new if r.status is ResultStatus.FAILED),
                input_tokens=BatchRow.input_tokens + usage.input_tokens,
                cached_tokens=BatchRow.cached_tokens + usage.cached_tokens,
                output_tokens=BatchRow.output_tokens + usage.output_tokens,
                reasoning_tokens=BatchRow.reasoning_tokens + usage.reasoning_tokens,
                input_cost=BatchRow.input_cost + usage.input_cost,
                output_cost=BatchRow.output_cost + usage.output_cost,
            ))
        return len(inserted)

    # --- files ------------------------------------------------------------------------------

    async def begin_file(self, row: FileRow) -> FileRow:
        """Register an upload in `uploading` status (invisible to the API until `finish_file`).
        Content goes in chunk by chunk, each in its own short transaction, so a slow 200 MB
        upload never holds the database's write lock."""
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def add_file_chunk(self, file_id: str, seq: int, data: bytes) -> None:
        async with self.sessions.begin() as s:
            await s.execute(self._insert(FileChunkRow).values(file_id=file_id, seq=seq, data=data))

    async def finish_file(self, file_id: str, size: int, line_count: int, status: str = "processed") -> FileRow:
        async with self.sessions.begin() as s:
            await s.execute(update(FileRow).where(FileRow.id == file_id).values(
                bytes=size, line_count=line_count, status=status))
        return await self.get_file(None, file_id)

    async def discard_file(self, file_id: str) -> None:
        """Remove a file and its content whatever its status (failed uploads, rewritten outputs)."""
        async with self.sessions.begin() as s:
            await s.execute(delete(FileChunkRow).where(FileChunkRow.file_id == file_id))
            await s.execute(delete(FileRow).where(FileRow.id == file_id))

    async def get_file(self, project: str | None, file_id: str) -> FileRow:
        async with self.sessions() as s:
            query = select(FileRow).where(FileRow.id == file_id, FileRow.status != UPLOADING)
            if project is not None:
                query = query.where(FileRow.project == project)
            row = await s.scalar(query)
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
        return row

    async def list_files(self, project: str, purpose: str, limit: int, after: str,
                         ascending: bool) -> tuple[list[FileRow], bool]:
        query = select(FileRow).where(FileRow.project == project, FileRow.status != UPLOADING)
        if purpose:
            query = query.where(FileRow.purpose == purpose)
        if after:
            a = await self.get_file(project, after)
            key = (FileRow.created_at, FileRow.id)
            query = query.where(or_(key[0] > a.created_at, and_(key[0] == a.created_at, key[1] > a.id))
                                if ascending else
                                or_(key[0] < a.created_at, and_(key[0] == a.created_at, key[1] < a.id)))
        order = (FileRow.created_at.asc(), FileRow.id.asc()) if ascending else (
            FileRow.created_at.desc(), FileRow.id.desc())
        async with self.sessions() as s:
            rows = list((await s.scalars(query.order_by(*order).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def delete_file(self, project: str, file_id: str) -> None:
        await self.get_file(project, file_id)
        await self.discard_file(file_id)

    async def iter_file_chunks(self, file_id: str) -> AsyncIterator[bytes]:
        """The content, one stored chunk (≤1 MiB) at a time, each read in its own query."""
        seq = -1
        while True:
            async with self.sessions() as s:
                row = (await s.execute(select(FileChunkRow.seq, FileChunkRow.data).where(
                    FileChunkRow.file_id == file_id, FileChunkRow.seq > seq)
                    .order_by(FileChunkRow.seq).limit(1))).first()
            if row is None:
                return
            seq = row[0]
            yield bytes(row[1])

    async def count_batches(self, project: str) -> int:
        async with self.sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(BatchRow)
                                      .where(BatchRow.project == project)) or 0)


def _result_row(batch_id: str, res: LineOutcome, t: int) -> dict[str, Any]:
    return {
        "batch_id": batch_id, "idx": res.index, "custom_id": res.custom_id, "status": res.status.value,
        "status_code": res.status_code, "request_id": res.request_id,
        "response_json": json.dumps(res.body, separators=(",", ":")) if res.body is not None else None,
        "error_code": res.error.code if res.error else None,
        "error_message": res.error.message if res.error else None,
        "error_type": res.error.type if res.error else None,
        "input_tokens": res.usage.input_tokens, "cached_tokens": res.usage.cached_tokens,
        "output_tokens": res.usage.output_tokens, "reasoning_tokens": res.usage.reasoning_tokens,
        "input_cost": res.usage.input_cost, "output_cost": res.usage.output_cost, "created_at": t,
    }


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
