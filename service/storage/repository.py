"""The repository: every read and write of batches, requests, results, files and keys.

Each public method is one transaction (its own unit of work), so callers never see or leave
half-written state. Writes that race between replicas are compare-and-set on the row
(`status`, lease owner), never read-modify-write in Python. Results are inserted with
"on conflict do nothing" and the batch counters move only by what was really inserted, so
storing the same result twice (a retry, a second replica) counts it once.

Callers speak in intents (`record_provider_batch_id`, `mark_cancel_sent`, ...), never in column
names. Reads come in two kinds that cannot be confused: a tenant's (`get_batch(project, id)`,
`get_file(project, id)`: another project's objects are not found) and the engine's
(`engine_batch(id)`: any project, for background work only).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import namedtuple
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import defer

from service.domain import codec, telemetry
from service.domain.errors import Conflict, InsufficientQuota, Internal, NotFound
from service.domain.model import (
    CANCELLABLE,
    TERMINAL,
    BatchError,
    BatchStatus,
    FileStatus,
    LineOutcome,
    ResultStatus,
    Usage,
    can_transition,
    month_of,
    now,
)
from service.storage.blobs import BlobStore, DatabaseBlobs, pieces
from service.storage.db import Sessions, insert_for
from service.storage.reads import Reads
from service.storage.tables import (
    ApiKeyRow,
    BatchRow,
    CapacitySlotRow,
    CapacityStateRow,
    CapacityWindowRow,
    ChargeRow,
    FileLineIndexRow,
    FileRow,
    IdempotencyRow,
    PartRow,
    ProjectRow,
    RequestRow,
    ResultRow,
    SpendRow,
)
from service.storage.webhooks import record_batch_ended, record_progress

log = logging.getLogger(__name__)
INSERT_CHUNK = 500
INSERT_CHUNK_BYTES = 8 * 1024 * 1024  # a chunk of request rows is flushed at 500 rows or 8 MiB of bodies
PAGE_BYTES = 8 * 1024 * 1024  # request bodies read per page (engine), whatever the page's line count
UPLOADING = FileStatus.UPLOADING
DELETED = FileStatus.DELETED  # hidden at once; content kept a grace period for downloads in flight, then swept
PURGING = FileStatus.PURGING  # claimed by a sweep: content being removed, then the row
HIDDEN_FILE_STATUSES = (UPLOADING, DELETED, PURGING)
KEY_USE_EVERY = 60  # seconds: how stale a key's `last_used_at` may get before a use rewrites it
SWEEP_CHUNK = 100  # files claimed and removed per transaction by `sweep_files`
ABANDONED_PURGE_SECONDS = 3600  # a claim this old belongs to a sweep that died: taken over

# Turns a result's body (a JSON object) into the form the API serves it in: the edge's serialized
# protobuf Struct (`BatchResult.response`), stored beside the JSON (`batch_results.response_pb`).
ResponseEncoder = Callable[[dict[str, Any]], bytes]

# A batch read by id: its columns and its parts' (LEFT JOIN, parts in order) in one statement.
_BATCHES, _PARTS, _RESULTS, _REQUESTS = (BatchRow.__table__, PartRow.__table__, ResultRow.__table__,
                                         RequestRow.__table__)
_BATCH_KEYS = [BatchRow.__mapper__.get_property_by_column(c).key for c in _BATCHES.columns]
_PART_KEYS = [PartRow.__mapper__.get_property_by_column(c).key for c in _PARTS.columns]
_RETRIES = _BATCHES.alias("retry")
_BATCH_BY_ID = (select(*_BATCHES.columns, *_PARTS.columns,
                       select(_RETRIES.c.id).where(_RETRIES.c.retry_of == _BATCHES.c.id).exists())
                .select_from(_BATCHES.outerjoin(_PARTS, _PARTS.c.batch_id == _BATCHES.c.id))
                .where(_BATCHES.c.id == bindparam("batch_id")).order_by(_PARTS.c.part_no))
_TENANT_BATCH_BY_ID = _BATCH_BY_ID.where(_BATCHES.c.project == bindparam("project"))
# A page of results as served: the request's fields and the result's, one plain row per line.
_RESULT_PAGE = select(
    _REQUESTS.c.custom_id, _REQUESTS.c.idx, _REQUESTS.c.model, _REQUESTS.c.provider, _REQUESTS.c.origin_idx,
    _RESULTS.c.status, _RESULTS.c.status_code, _RESULTS.c.response_json, _RESULTS.c.response_pb,
    _RESULTS.c.error_code, _RESULTS.c.error_message, _RESULTS.c.error_type, _RESULTS.c.input_tokens,
    _RESULTS.c.cached_tokens, _RESULTS.c.output_tokens, _RESULTS.c.reasoning_tokens, _RESULTS.c.input_cost,
    _RESULTS.c.output_cost,
).join(_RESULTS, and_(_RESULTS.c.batch_id == _REQUESTS.c.batch_id, _RESULTS.c.idx == _REQUESTS.c.idx))


class UploadGone(Exception):
    """The upload's row is no longer `uploading` (swept as stale, or discarded)."""


def file_gone(file_id: str) -> NotFound:
    """A batch's input file that went away (deleted and swept) while the batch was being created."""
    return NotFound(f"No such File object: {file_id} (it was deleted while the batch was being created)",
                    param="input_file_id", code="file_not_found")


def lines_lost(batch_id: str, file_id: str) -> Internal:
    """Lines stored by reference whose input file content is gone without their bodies copied in
    (the sweeper copies them before purging a file, so only content removed behind Sluice's back)."""
    return Internal(f"The request bodies of batch {batch_id} are no longer available: the content of its input file "
                    f"{file_id} is gone.", param="id", code="file_content_lost")


def new_id(prefix: str) -> str:
    """Time-ordered (nanosecond clock first, then randomness), so ids sort in creation order even
    between objects created in the same second."""
    return f"{prefix}{time.time_ns():016x}{uuid.uuid4().hex[:16]}"


IDEMPOTENCY_TTL = 24 * 3600


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a microsecond per field, per line
class NewRequest:
    """A validated request line, with the route intake resolved it to: the provider, its model
    name, and the part (provider batch) the line goes into. `origin_idx`: on a retry, the line's
    index in the first batch of the chain. With `line_offset`, the line is `line_length` bytes at
    that offset of the batch's input file, which holds its body (`body` is then ignored): stored
    by reference, never twice."""

    custom_id: str
    model: str
    body: dict[str, Any]
    provider_model: str | None = None
    provider: str | None = None
    part_no: int = 0
    origin_idx: int | None = None
    line_offset: int | None = None
    line_length: int | None = None


@dataclass(frozen=True)
class NewPart:
    """A part as intake planned it: the lines of one provider batch (or of one executor provider)."""

    part_no: int
    provider: str
    provider_model: str | None
    total: int
    bytes: int = 0


@dataclass(frozen=True)
class IdempotencyClaim:
    """CreateBatch's `Idempotency-Key` and a digest of the request it came with."""

    key: str
    request_hash: str


@dataclass(frozen=True)
class Reservation:
    """What a new batch may cost at most (USD), against the project's monthly limit (None: none)."""

    amount: float
    limit: float | None


class KeyTaken(Exception):
    """The idempotency key was recorded by another request meanwhile (it committed first)."""


@dataclass(frozen=True)
class Spend:
    """A project's spend in one month: reservations of running batches, cost of ended ones."""

    project: str
    month: str
    reserved: float = 0.0
    spent: float = 0.0


@dataclass(frozen=True)
class SweptFiles:
    """What one `sweep_files` removed, by reason (file ids)."""

    stale_uploads: list[str]
    deleted: list[str]
    expired: list[str]

    @property
    def total(self) -> int:
        return len(self.stale_uploads) + len(self.deleted) + len(self.expired)


@dataclass(frozen=True)
class OutputFileIds:
    output_file_id: str | None = None
    error_file_id: str | None = None
    merged_output_file_id: str | None = None
    merged_error_file_id: str | None = None


@dataclass(frozen=True)
class Attempt:
    """One run of a line: the batch of the retry chain that ran it, its request and result (None
    while it has not finished), and which attempt it is (1: the first batch)."""

    batch: BatchRow
    request: RequestRow
    result: ResultRow | None
    number: int


def usage_values(usage: Usage) -> dict[str, Any]:
    """A `Usage` as the six columns every usage-carrying table has."""
    return {"input_tokens": usage.input_tokens, "cached_tokens": usage.cached_tokens,
            "output_tokens": usage.output_tokens, "reasoning_tokens": usage.reasoning_tokens,
            "input_cost": usage.input_cost, "output_cost": usage.output_cost}


class Store:
    def __init__(self, engine: AsyncEngine, blobs: BlobStore | None = None,
                 encode_response: ResponseEncoder | None = None) -> None:
        self.engine = engine
        self.sessions = Sessions(engine)
        self._dialect = engine.dialect.name
        # File content: the database's `file_chunks` unless object storage is configured.
        self.blobs: BlobStore = blobs or DatabaseBlobs(self.sessions, self._dialect)
        self.encode_response = encode_response
        self._reads = Reads(engine)  # hot reads: no session, no transaction, on SQLite no thread hand-off
        self._batch_by_id = self._reads.prepare(_BATCH_BY_ID)
        self._tenant_batch_by_id = self._reads.prepare(_TENANT_BATCH_BY_ID)
        self._result_page = self._reads.prepare(
            _RESULT_PAGE.where(_REQUESTS.c.batch_id == bindparam("batch_id"), _REQUESTS.c.idx > bindparam("after_idx"))
            .order_by(_REQUESTS.c.idx).limit(bindparam("limit")))

    async def close(self) -> None:
        self._reads.close()
        await self.blobs.close()
        await self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        return insert_for(self._dialect, table)

    # --- API keys -------------------------------------------------------------------------

    async def put_api_keys(self, hashed: dict[str, str]) -> None:
        if not hashed:
            return
        async with self.sessions.begin() as s:
            rows = [{"key_hash": h, "project": p, "created_at": now()} for h, p in hashed.items()]
            stmt = self._insert(ApiKeyRow).values(rows)
            await s.execute(stmt.on_conflict_do_update(index_elements=["key_hash"],
                                                       set_={"project": stmt.excluded.project}))

    async def sync_config_api_keys(self, hashed: dict[str, str]) -> int:
        """Make the configured keys (hash -> project) exactly the keys whose source is `config`:
        upsert them, delete configured keys no longer configured. Keys from other sources
        (`api`) are left alone. One transaction; returns how many keys were removed."""
        async with self.sessions.begin() as s:
            if hashed:
                rows = [{"key_hash": h, "project": p, "created_at": now(), "source": "config"}
                        for h, p in hashed.items()]
                stmt = self._insert(ApiKeyRow).values(rows)
                await s.execute(stmt.on_conflict_do_update(  # configured again: revoked no more
                    index_elements=["key_hash"],
                    set_={"project": stmt.excluded.project, "source": "config", "revoked_at": None}))
            gone = delete(ApiKeyRow).where(ApiKeyRow.source == "config")
            if hashed:
                gone = gone.where(ApiKeyRow.key_hash.not_in(list(hashed)))
            res = await s.execute(gone)
        return int(res.rowcount or 0)  # type: ignore[attr-defined]

    async def add_api_key(self, key_hash: str, project: str, source: str = "api") -> None:
        """A key created after start-up (not from configuration): the start-up sync never removes it."""
        async with self.sessions.begin() as s:
            s.add(ApiKeyRow(key_hash=key_hash, project=project, created_at=now(), source=source))

    async def revoke_api_key(self, key_hash: str) -> bool:
        async with self.sessions.begin() as s:
            res = await s.execute(delete(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash))
        return bool(res.rowcount)  # type: ignore[attr-defined]

    async def project_for_key_hash(self, key_hash: str) -> str | None:
        """The key's project; None when the key is unknown, revoked, or its project archived.
        Notes the key's use at most once a minute (`last_used_at`), whatever the traffic: a
        guarded UPDATE, so replicas do not each write it."""
        async with self.sessions() as s:
            row = (await s.execute(
                select(ApiKeyRow.project, ApiKeyRow.last_used_at)
                .outerjoin(ProjectRow, ProjectRow.id == ApiKeyRow.project)
                .where(ApiKeyRow.key_hash == key_hash, ApiKeyRow.revoked_at.is_(None),
                       ProjectRow.archived_at.is_(None)))).first()
        if row is None:
            return None
        t = now()
        if row.last_used_at is None or row.last_used_at <= t - KEY_USE_EVERY:
            stale = or_(ApiKeyRow.last_used_at.is_(None), ApiKeyRow.last_used_at <= t - KEY_USE_EVERY)
            async with self.sessions.begin() as s:
                await s.execute(update(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash, stale).values(last_used_at=t))
        return str(row.project)

    # --- batches: API side ----------------------------------------------------------------

    async def create_batch(self, batch: BatchRow,
                           requests: Iterable[NewRequest] | AsyncIterable[NewRequest],
                           parts: Sequence[NewPart] | None = None, *,
                           idempotency: IdempotencyClaim | None = None,
                           reservation: Reservation | None = None) -> BatchRow:
        """Insert the batch, its parts and its lines in one transaction: all or nothing. `requests`
        may be an async iterable (lines streamed from a file), inserted 500 at a time. Without
        `parts`, a batch with lines gets one part on its own provider.

        `idempotency` is recorded in the same transaction, first: a concurrent create with the same
        key waits on it (PostgreSQL's unique index; SQLite's single writer) and then raises
        `KeyTaken`. `reservation` moves the project's spend for the month by a conditional UPDATE in
        the same transaction, and raises `InsufficientQuota` (nothing stored) if it would pass the
        limit."""
        batch.trace_parent = batch.trace_parent or telemetry.current().trace_parent()
        async with self.sessions.begin() as s:
            if idempotency is not None:
                await self._claim_key(s, batch, idempotency)
            batch.parts = []  # a new collection: appending to it below loads nothing
            s.add(batch)
            await s.flush()
            chunk: list[dict[str, Any]] = []
            count = chunk_bytes = 0
            holding = False
            async for req in _aiter(requests):
                if req.line_offset is None:
                    body_json = codec.dumps(req.body)
                else:
                    body_json = ""
                    if not holding:
                        await self._hold_file(s, batch.input_file_id)
                        holding = True
                chunk.append({"batch_id": batch.id, "idx": count, "custom_id": req.custom_id,
                              "model": req.model, "provider_model": req.provider_model,
                              "provider": req.provider, "part_no": req.part_no, "origin_idx": req.origin_idx,
                              "body_json": body_json, "line_offset": req.line_offset,
                              "line_length": req.line_length})
                count += 1
                chunk_bytes += len(body_json)
                if len(chunk) >= INSERT_CHUNK or chunk_bytes >= INSERT_CHUNK_BYTES:
                    await self._insert_requests(s, chunk)
                    chunk, chunk_bytes = [], 0
            if chunk:
                await self._insert_requests(s, chunk)
            batch.total = count
            if parts is None and count:
                parts = [NewPart(0, batch.provider, batch.provider_model, count)]
            for part in parts or ():
                batch.parts.append(PartRow(
                    batch_id=batch.id, part_no=part.part_no, provider=part.provider,
                    provider_model=part.provider_model, status=BatchStatus.VALIDATING, total=part.total,
                    completed=0, failed=0, bytes=part.bytes, poll_failures=0))
            if reservation is not None and count:
                await self._reserve(s, batch, reservation)
            if BatchStatus(batch.status).terminal:  # failed at creation: its webhook event, atomically
                await record_batch_ended(s, batch.id, BatchStatus(batch.status))
        return batch

    async def _insert_requests(self, s: AsyncSession, rows: list[dict[str, Any]]) -> None:
        """One chunk of request rows, one statement (Core: the ORM's bulk path costs more than
        the database's work); on PostgreSQL one COPY, in the same transaction."""
        conn = await s.connection()
        if self._dialect != "postgresql":
            await conn.execute(_INSERT_REQUESTS, rows)
            return
        import asyncpg  # the PostgreSQL driver (only installed pieces are imported on SQLite)

        driver: Any = (await conn.get_raw_connection()).driver_connection
        try:
            await driver.copy_records_to_table("batch_requests", columns=_REQUEST_COLUMNS,
                                               records=[tuple(row[c] for c in _REQUEST_COLUMNS) for row in rows])
        except asyncpg.IntegrityConstraintViolationError as exc:  # as an INSERT reports it
            raise IntegrityError("COPY batch_requests", None, exc) from exc

    async def _hold_file(self, s: AsyncSession, file_id: str) -> None:
        """Inside the create's transaction: the input file its lines point into still has its
        content, and keeps it until the commit. A sweep claims a file (status `purging`) in a
        write of its own before it copies the bodies of the lines that point into it and removes
        its content: on SQLite that write waits for this transaction (one writer at a time); on
        PostgreSQL for the share lock taken here. So the sweep either claimed the file before
        (and the create fails, nothing stored) or sees these lines and copies their bodies."""
        query = select(FileRow.id).where(FileRow.id == file_id,
                                         FileRow.status.in_([FileStatus.PROCESSED, DELETED]))
        if self._dialect == "postgresql":
            query = query.with_for_update(read=True)
        if await s.scalar(query) is None:
            raise file_gone(file_id)

    async def _claim_key(self, s: AsyncSession, batch: BatchRow, claim: IdempotencyClaim) -> None:
        t = now()
        # An expired key may be used again: drop it first (in this transaction).
        await s.execute(delete(IdempotencyRow).where(
            IdempotencyRow.project == batch.project, IdempotencyRow.key == claim.key,
            IdempotencyRow.created_at <= t - IDEMPOTENCY_TTL))
        try:
            async with s.begin_nested():
                await s.execute(self._insert(IdempotencyRow).values(
                    project=batch.project, key=claim.key, request_hash=claim.request_hash, batch_id=batch.id,
                    created_at=t))
        except IntegrityError:
            raise KeyTaken(claim.key) from None

    async def find_idempotency_key(self, project: str, key: str) -> IdempotencyRow | None:
        """The batch a project's key named within the last 24 hours, if any."""
        async with self.sessions() as s:
            return await s.scalar(select(IdempotencyRow).where(
                IdempotencyRow.project == project, IdempotencyRow.key == key,
                IdempotencyRow.created_at > now() - IDEMPOTENCY_TTL))

    async def _reserve(self, s: AsyncSession, batch: BatchRow, reservation: Reservation) -> None:
        month = month_of(batch.created_at)
        await s.execute(self._insert(SpendRow).values(project=batch.project, month=month, reserved=0.0, spent=0.0)
                        .on_conflict_do_nothing(index_elements=["project", "month"]))
        query = update(SpendRow).where(SpendRow.project == batch.project, SpendRow.month == month)
        if reservation.limit is not None:
            query = query.where(SpendRow.reserved + SpendRow.spent + reservation.amount <= reservation.limit)
        res = await s.execute(query.values(reserved=SpendRow.reserved + reservation.amount))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            spend = await s.scalar(select(SpendRow).where(SpendRow.project == batch.project, SpendRow.month == month))
            used = (spend.reserved + spend.spent) if spend else 0.0
            raise InsufficientQuota(
                f"This batch could cost up to ${reservation.amount:.4f}, and project '{batch.project}' has "
                f"${max((reservation.limit or 0.0) - used, 0.0):.4f} left of its ${reservation.limit:.2f} limit for "
                f"{month} (${used:.4f} spent or reserved by running batches). Lower max_tokens, split the batch, "
                "or wait for running batches to end.", code="insufficient_quota")
        s.add(ChargeRow(batch_id=batch.id, project=batch.project, month=month, reserved=reservation.amount))

    async def spend(self, project: str, month: str) -> Spend:
        async with self.sessions() as s:
            row = await s.scalar(select(SpendRow).where(SpendRow.project == project, SpendRow.month == month))
        return Spend(project, month, row.reserved, row.spent) if row else Spend(project, month)

    async def get_batch(self, project: str, batch_id: str) -> BatchRow:
        """A tenant's batch: another project's is not found, exactly like an unknown id."""
        return (await self._batch(batch_id, project))[0]

    async def get_batch_with_retries(self, project: str, batch_id: str) -> tuple[BatchRow, list[str]]:
        """A tenant's batch and the batches that retry it (oldest first), as every read shows it:
        one statement, and a second one only when the batch has been retried."""
        batch, retried = await self._batch(batch_id, project)
        return batch, (await self.retries_of([batch_id])).get(batch_id, []) if retried else []

    async def engine_batch(self, batch_id: str) -> BatchRow:
        """Any project's batch, for the engine's background work (never for a caller's request)."""
        return (await self._batch(batch_id))[0]

    async def _batch(self, batch_id: str, project: str | None = None) -> tuple[BatchRow, bool]:
        """One batch by id (and project) with its parts, and whether any batch retries it: the most
        frequent read of all (every GetBatch, every engine step), so one statement without an ORM
        session (`Reads`), its rows filled into detached instances."""
        if project is None:
            rows = await self._reads.prepared(self._batch_by_id, {"batch_id": batch_id})
        else:
            rows = await self._reads.prepared(self._tenant_batch_by_id, {"batch_id": batch_id, "project": project})
        if not rows:
            raise NotFound(f"No batch found with id '{batch_id}'.", param="id", code="batch_not_found")
        width = len(_BATCH_KEYS)
        batch: BatchRow = _detached(BatchRow, _BATCH_KEYS, rows[0][:width])
        batch.__dict__["parts"] = [_detached(PartRow, _PART_KEYS, row[width:-1])
                                   for row in rows if row[width] is not None]
        return batch, bool(rows[0][-1])

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
                BatchRow.status.in_(CANCELLABLE),
            ).values(status=BatchStatus.CANCELLING, cancelling_at=now(), next_poll_at=None))
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
        if after:
            query = query.where(RequestRow.idx > await self._anchor(batch_id, after))
        async with self.sessions() as s:
            result = await s.execute(query.order_by(RequestRow.idx).limit(limit + 1))
            rows = [(req, res) for req, res in result.all()]
        return rows[:limit], len(rows) > limit

    async def result_page(self, batch: BatchRow, limit: int, after: str) -> tuple[Sequence[Any], bool]:
        """One page of a (tenant's, already read) batch's stored results in request order, as plain
        rows of `_RESULT_PAGE`'s columns (the request's custom_id, idx, model, provider and
        origin_idx, the result's columns): one statement, no ORM instances."""
        anchor = await self._anchor(batch.id, after) if after else -1
        rows = await self._reads.prepared(self._result_page, {"batch_id": batch.id, "after_idx": anchor,
                                                              "limit": limit + 1})
        return rows[:limit], len(rows) > limit

    async def _anchor(self, batch_id: str, after: str) -> int:
        """The index of the line a page starts after (its custom_id): the cursor."""
        found = await self._reads.all(select(_REQUESTS.c.idx).where(
            _REQUESTS.c.batch_id == batch_id, _REQUESTS.c.custom_id == after))
        if not found:
            raise NotFound(f"No request with custom_id '{after}' in batch '{batch_id}'.",
                           param="after", code="cursor_not_found")
        return int(found[0][0])

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

    async def iter_results(self, batch_id: str, page: int = 1000) -> AsyncIterator[Any]:
        """Every stored result in request order, a page at a time (for output files), as plain rows
        with ResultRow's column names (no ORM instances: 50,000 of them cost more than the query)."""
        last = -1
        # Not the served form itself, only whether there is one (`output_files`: the JSON is verbatim).
        columns = [*(c for c in _RESULTS.columns if c.name != "response_pb"),
                   _RESULTS.c.response_pb.is_not(None).label("verbatim")]
        while True:
            rows = await self._reads.all(select(*columns).where(
                _RESULTS.c.batch_id == batch_id, _RESULTS.c.idx > last).order_by(_RESULTS.c.idx).limit(page))
            for row in rows:
                yield row
            if len(rows) < page:
                return
            last = rows[-1].idx

    # --- retries -----------------------------------------------------------------------------

    async def retries_of(self, batch_ids: Sequence[str]) -> dict[str, list[str]]:
        """The batches that retry each given batch, oldest first."""
        if not batch_ids:
            return {}
        rows = await self._reads.all(select(_BATCHES.c.retry_of, _BATCHES.c.id).where(
            _BATCHES.c.retry_of.in_(list(batch_ids))).order_by(_BATCHES.c.created_at, _BATCHES.c.id))
        out: dict[str, list[str]] = {}
        for row in rows:
            out.setdefault(str(row.retry_of), []).append(str(row.id))
        return out

    async def chain(self, project: str, batch_id: str) -> list[BatchRow]:
        """Every batch of the retry chain `batch_id` belongs to (the caller's project only), the
        first batch first, then its retries in the order they were made."""
        batch = await self.get_batch(project, batch_id)
        root = batch.chain_id or batch.id
        async with self.sessions() as s:
            rows = list((await s.scalars(select(BatchRow).where(
                BatchRow.project == project, or_(BatchRow.id == root, BatchRow.chain_id == root))
                .order_by(BatchRow.created_at, BatchRow.id))).all())
        rows.sort(key=lambda b: (b.id != root, b.created_at, b.id))
        return rows

    async def iter_retry_lines(self, batch: BatchRow, outcomes: frozenset[ResultStatus],
                               custom_ids: frozenset[str] | None, page: int = 1000) -> AsyncIterator[RequestRow]:
        """The lines of an ended batch to run again: those whose outcome is in `outcomes` (a line
        of a batch that failed as a whole has no result: it counts as failed), or exactly the
        `custom_ids` given."""
        last = -1
        while True:
            query = (select(RequestRow, ResultRow.status)
                     .outerjoin(ResultRow, and_(ResultRow.batch_id == RequestRow.batch_id,
                                                ResultRow.idx == RequestRow.idx))
                     .where(RequestRow.batch_id == batch.id, RequestRow.idx > last))
            async with self.sessions() as s:
                rows = (await s.execute(query.order_by(RequestRow.idx).limit(page))).all()
            chosen = []
            for req, status in rows:
                outcome = status if status is not None else (
                    ResultStatus.FAILED if batch.status is BatchStatus.FAILED else None)
                if (req.custom_id in custom_ids) if custom_ids is not None else (outcome in outcomes):
                    chosen.append(req)
            chosen = await self._fill_bodies(batch.id, chosen, batch.input_file_id)
            for req in chosen:
                yield req
            if len(rows) < page:
                return
            last = rows[-1][0].idx

    async def known_custom_ids(self, batch_id: str, custom_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        ids = list(custom_ids)
        for start in range(0, len(ids), INSERT_CHUNK):
            async with self.sessions() as s:
                found.update((await s.scalars(select(RequestRow.custom_id).where(
                    RequestRow.batch_id == batch_id, RequestRow.custom_id.in_(ids[start:start + INSERT_CHUNK])))).all())
        return found

    async def latest_attempts(self, chain: Sequence[BatchRow], after: str, limit: int) -> tuple[list[Attempt], bool]:
        """One page of the chain's lines (the first batch's, in order, after the custom_id
        `after`), each with its latest attempt: the newest batch of the chain that ran it."""
        root = chain[0]
        async with self.sessions() as s:
            query = select(RequestRow).where(RequestRow.batch_id == root.id)
            if after:
                anchor = await s.scalar(select(RequestRow.idx).where(RequestRow.batch_id == root.id,
                                                                     RequestRow.custom_id == after))
                if anchor is None:
                    raise NotFound(f"No request with custom_id '{after}' in batch '{root.id}'.",
                                   param="after", code="cursor_not_found")
                query = query.where(RequestRow.idx > anchor)
            firsts = list((await s.scalars(query.order_by(RequestRow.idx).limit(limit + 1))).all())
        page = firsts[:limit]
        attempts = await self._attempts(chain, {r.idx: [(root, r)] for r in page})
        return [runs[-1] for runs in attempts.values()], len(firsts) > limit

    async def line_attempts(self, chain: Sequence[BatchRow], custom_id: str) -> list[Attempt]:
        """Every attempt of one line across the chain, oldest first."""
        root = chain[0]
        async with self.sessions() as s:
            first = await s.scalar(select(RequestRow).where(RequestRow.batch_id == root.id,
                                                            RequestRow.custom_id == custom_id))
        if first is None:
            raise NotFound(f"No request with custom_id '{custom_id}' in batch '{root.id}'.",
                           param="custom_id", code="result_not_found")
        return (await self._attempts(chain, {first.idx: [(root, first)]}))[first.idx]

    async def attempt_numbers(self, chain: Sequence[BatchRow], batch: BatchRow,
                              requests: Sequence[Any]) -> dict[int, int]:
        """idx -> the attempt a line of `batch` is, across the chain (1 on the first batch).
        `requests`: request rows, or any rows with their `idx` and `origin_idx`."""
        ids = [b.id for b in chain]  # by id: `batch` is never the chain's own instance (another read)
        earlier = ids[1:ids.index(batch.id)] if batch.id in ids else []
        origins = {r.idx: r.origin_idx if r.origin_idx is not None else r.idx for r in requests}
        if batch.chain_id is None:
            return dict.fromkeys(origins, 1)
        counts: dict[int, int] = {}
        if earlier and origins:
            async with self.sessions() as s:
                counts = {int(origin or 0): int(n) for origin, n in (await s.execute(
                    select(RequestRow.origin_idx, func.count()).where(
                        RequestRow.batch_id.in_(earlier), RequestRow.origin_idx.in_(list(set(origins.values()))))
                    .group_by(RequestRow.origin_idx))).all()}
        return {idx: 2 + counts.get(origin, 0) for idx, origin in origins.items()}

    async def _attempts(self, chain: Sequence[BatchRow],
                        runs: dict[int, list[tuple[BatchRow, RequestRow]]]) -> dict[int, list[Attempt]]:
        order = {b.id: n for n, b in enumerate(chain)}
        by_id = {b.id: b for b in chain}
        retries = [b.id for b in chain[1:]]
        async with self.sessions() as s:
            if retries and runs:
                for retried in (await s.scalars(select(RequestRow).where(
                        RequestRow.batch_id.in_(retries), RequestRow.origin_idx.in_(list(runs))))).all():
                    runs[retried.origin_idx or 0].append((by_id[retried.batch_id], retried))
            wanted: dict[str, list[int]] = {}
            for attempts in runs.values():
                attempts.sort(key=lambda a: order[a[0].id])
                for batch, req in attempts:
                    wanted.setdefault(batch.id, []).append(req.idx)
            results: dict[tuple[str, int], ResultRow] = {}
            for batch_id, idxs in wanted.items():
                for result in (await s.scalars(select(ResultRow).where(ResultRow.batch_id == batch_id,
                                                                       ResultRow.idx.in_(idxs)))).all():
                    results[(batch_id, result.idx)] = result
        return {origin: [Attempt(batch, req, results.get((batch.id, req.idx)), n + 1)
                         for n, (batch, req) in enumerate(attempts)] for origin, attempts in runs.items()}

    # --- engine side ------------------------------------------------------------------------

    async def claim(self, owner: str, lease_seconds: float, limit: int) -> list[str]:
        """Lease up to `limit` unfinished batches that are due, for this replica only. The UPDATE
        re-checks every condition, the status included: a batch that ended between the SELECT and
        the UPDATE (another replica finished it) is never leased again."""
        t = time.time()
        free = or_(BatchRow.lease_owner.is_(None), BatchRow.lease_owner == owner, BatchRow.lease_until < t)
        due = or_(BatchRow.next_poll_at.is_(None), BatchRow.next_poll_at <= t)
        unfinished = BatchRow.status.not_in(TERMINAL)
        async with self.sessions() as s:
            candidates = list((await s.scalars(
                select(BatchRow.id).where(unfinished, free, due)
                .order_by(BatchRow.created_at).limit(limit))).all())
        claimed = []
        for batch_id in candidates:
            # Status and due time are checked again in the UPDATE itself: a batch that ended since the
            # SELECT must never be leased (it would be finalized twice), and one whose step just ended
            # asking to wait (backoff, Retry-After) is not due yet.
            async with self.sessions.begin() as s:
                res = await s.execute(update(BatchRow).where(BatchRow.id == batch_id, unfinished, free, due).values(
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

    async def transition(self, batch_id: str, src: BatchStatus, dst: BatchStatus, *,
                         errors: Sequence[BatchError] = (), files: OutputFileIds | None = None) -> bool:
        """Move `src → dst` if the batch is still in `src`; stamps `<dst>_at`, and records why it
        failed (`errors`) or the files it ended with. False if it moved meanwhile (another replica,
        or a cancel): the caller re-reads and decides again. The move that ends a batch also settles
        its spend reservation to what it cost, in the same transaction: exactly once."""
        if not can_transition(src, dst):
            raise ValueError(f"illegal batch transition {src} -> {dst}")
        stamp = dst.timestamp_field
        values: dict[str, Any] = {"status": dst, **({stamp: now()} if stamp else {})}
        if errors:
            values["errors"] = list(errors)
        if files is not None:
            values.update(output_file_id=files.output_file_id, error_file_id=files.error_file_id)
            if files.merged_output_file_id or files.merged_error_file_id:
                values.update(merged_output_file_id=files.merged_output_file_id,
                              merged_error_file_id=files.merged_error_file_id)
        async with self.sessions.begin() as s:
            res = await s.execute(update(BatchRow).where(BatchRow.id == batch_id, BatchRow.status == src)
                                  .values(**values))
            moved = bool(res.rowcount == 1)  # type: ignore[attr-defined]
            if moved and dst.terminal:
                await self._settle(s, batch_id)
                await record_batch_ended(s, batch_id, dst)  # the webhook outbox, in the same transaction
        return moved

    async def _settle(self, s: AsyncSession, batch_id: str) -> None:
        """Replace an ended batch's reservation by its actual cost (the batch's usage, which only
        stored results move). The charge row's settled_at is the compare-and-set."""
        charge = await s.scalar(select(ChargeRow).where(ChargeRow.batch_id == batch_id,
                                                        ChargeRow.settled_at.is_(None)))
        if charge is None:
            return
        cost = float(await s.scalar(select(BatchRow.input_cost + BatchRow.output_cost)
                                    .where(BatchRow.id == batch_id)) or 0.0)
        res = await s.execute(update(ChargeRow).where(ChargeRow.batch_id == batch_id, ChargeRow.settled_at.is_(None))
                              .values(actual=cost, settled_at=now()))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            await s.execute(update(SpendRow).where(SpendRow.project == charge.project, SpendRow.month == charge.month)
                            .values(reserved=SpendRow.reserved - charge.reserved, spent=SpendRow.spent + cost))

    async def _update_part(self, batch_id: str, part_no: int, *where: Any, **values: Any) -> bool:
        async with self.sessions.begin() as s:
            res = await s.execute(update(PartRow).where(PartRow.batch_id == batch_id, PartRow.part_no == part_no,
                                                        *where).values(**values))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def make_due(self, batch_id: str) -> None:
        """Look at this batch, and each of its parts, at the engine's next tick, whatever backoff it
        was in (a cancel)."""
        async with self.sessions.begin() as s:
            await s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(next_poll_at=None))
            await s.execute(update(PartRow).where(PartRow.batch_id == batch_id).values(next_poll_at=None))

    async def schedule_part(self, batch_id: str, part_no: int, at: float | None) -> None:
        """When the engine looks at this part again (after a poll, or a backoff)."""
        await self._update_part(batch_id, part_no, next_poll_at=at)

    async def mark_submit_started(self, batch_id: str, part_no: int = 0) -> None:
        """Persisted before the provider is called: after a crash, `find_submitted` is asked first."""
        await self._update_part(batch_id, part_no, submit_started_at=now())

    async def record_provider_batch_id(self, batch_id: str, part_no: int, provider_batch_id: str) -> None:
        """The provider has the part: it runs there from now on."""
        await self._update_part(batch_id, part_no, provider_batch_id=provider_batch_id)
        await self.start_part(batch_id, part_no)

    async def start_part(self, batch_id: str, part_no: int) -> None:
        """validating → in_progress (submitted, or its lines started running)."""
        await self._update_part(batch_id, part_no, PartRow.status == BatchStatus.VALIDATING,
                                status=BatchStatus.IN_PROGRESS)

    async def mark_cancel_sent(self, batch_id: str, part_no: int = 0) -> None:
        await self._update_part(batch_id, part_no, cancel_sent_at=now())

    async def record_poll_failure(self, batch_id: str, part_no: int = 0) -> int:
        """Count one more failed provider call in a row; returns the count (for the backoff)."""
        async with self.sessions.begin() as s:
            count = await s.scalar(update(PartRow).where(PartRow.batch_id == batch_id, PartRow.part_no == part_no)
                                   .values(poll_failures=PartRow.poll_failures + 1)
                                   .returning(PartRow.poll_failures))
        return int(count or 0)

    async def record_provider_status(self, batch_id: str, part_no: int, raw_status: str, completed: int | None,
                                     failed: int | None) -> None:
        """What the provider last said about a part; a successful poll ends a failure streak."""
        async with self.sessions.begin() as s:
            await s.execute(update(PartRow).where(PartRow.batch_id == batch_id, PartRow.part_no == part_no).values(
                poll_failures=0, provider_status=raw_status, provider_completed=completed, provider_failed=failed))
            await record_progress(s, batch_id)  # thresholds its counts passed: webhook events, atomically

    async def part_finalizing(self, batch_id: str, part_no: int) -> None:
        """The provider ended the part; its results are being stored."""
        await self._update_part(batch_id, part_no, PartRow.status.not_in(TERMINAL), status=BatchStatus.FINALIZING)

    async def end_part(self, batch_id: str, part_no: int, status: BatchStatus,
                       errors: Sequence[BatchError] = ()) -> bool:
        """The part's end, once (compare-and-set on a status that has not ended)."""
        values: dict[str, Any] = {"status": status, "ended_at": now()}
        if errors:
            values["errors"] = list(errors)
        return await self._update_part(batch_id, part_no, PartRow.status.not_in(TERMINAL), **values)

    async def pending_requests(self, batch_id: str, limit: int, after_idx: int = -1,
                               part_no: int | None = None, max_bytes: int = PAGE_BYTES,
                               bodies: bool = True) -> list[Any]:
        """Lines with no stored result yet, in order (of one part, or of the whole batch): at most
        `limit`, and no more bodies than `max_bytes` (at least one line), so 500 lines of 500 KB are
        never loaded at once. Without `bodies`, lines stored by reference are not read from their
        input file (closing lines that will not run needs none)."""
        async with self.sessions() as s:
            query = (select(RequestRow.idx, _BODY_SIZE)
                     .outerjoin(ResultRow, and_(ResultRow.batch_id == RequestRow.batch_id,
                                                ResultRow.idx == RequestRow.idx))
                     .where(RequestRow.batch_id == batch_id, RequestRow.idx > after_idx, ResultRow.idx.is_(None)))
            if part_no is not None:
                query = query.where(RequestRow.part_no == part_no)
            sizes = (await s.execute(query.order_by(RequestRow.idx).limit(limit))).all()
            rows = await _rows_within(s, batch_id, sizes, max_bytes)
        return await self._fill_bodies(batch_id, rows) if bodies else rows

    async def iter_requests(self, batch_id: str, page: int = 1000, part_no: int | None = None,
                            max_bytes: int = PAGE_BYTES) -> AsyncIterator[Any]:
        """Every line in order (of one part, or of the whole batch), a page at a time (at most
        `page` lines and `max_bytes` of bodies), as plain rows with RequestRow's column names."""
        last = -1
        while True:
            query = (select(RequestRow.idx, _BODY_SIZE)
                     .where(RequestRow.batch_id == batch_id, RequestRow.idx > last))
            if part_no is not None:
                query = query.where(RequestRow.part_no == part_no)
            async with self.sessions() as s:
                sizes = (await s.execute(query.order_by(RequestRow.idx).limit(page))).all()
                rows = await _rows_within(s, batch_id, sizes, max_bytes)
            rows = await self._fill_bodies(batch_id, rows)
            for row in rows:
                yield row
            if not rows:
                return
            last = rows[-1].idx

    async def _fill_bodies(self, batch_id: str, rows: Sequence[Any], file_id: str | None = None) -> list[Any]:
        """Give the rows of lines stored by reference their `body_json`, read from the batch's input
        file: one range read per run of nearby lines (`line_runs`), never one per line. Should the
        file's content be gone meanwhile, the sweeper copied those bodies into the rows before it
        removed it: they are read again from there."""
        refs = [r for r in rows if r.line_offset is not None]
        if not refs:
            return list(rows)
        if file_id is None:
            async with self.sessions() as s:
                file_id = str(await s.scalar(select(BatchRow.input_file_id).where(BatchRow.id == batch_id)) or "")
        bodies = await self._bodies_from_file(file_id, [(r.idx, r.line_offset or 0, r.line_length or 0)
                                                        for r in refs])
        missing = [r for r in refs if r.idx not in bodies]
        if missing:
            async with self.sessions() as s:
                copied = {idx: body for idx, body, offset in (await s.execute(
                    select(RequestRow.idx, RequestRow.body_json, RequestRow.line_offset).where(
                        RequestRow.batch_id == batch_id, RequestRow.idx.in_([r.idx for r in missing])))).all()
                    if offset is None}
            if len(copied) != len(missing):
                raise lines_lost(batch_id, file_id)
            bodies.update(copied)
        return [_with_body(r, bodies[r.idx]) if r.line_offset is not None else r for r in rows]

    async def _bodies_from_file(self, file_id: str, lines: Sequence[tuple[int, int, int]]) -> dict[int, str]:
        """idx -> body JSON of the given (idx, offset, length) lines of a stored file; the lines of a
        run whose content is gone are left out."""
        out: dict[int, str] = {}
        for run in line_runs(lines):
            start, end = run[0][1], max(offset + length for _, offset, length in run)
            data = await self.blobs.get_range(file_id, start, end)
            if data is None:
                continue
            for idx, offset, length in run:
                out[idx] = codec.dumps(codec.loads(data[offset - start:offset - start + length])["body"])
        return out

    async def request_keys(self, batch_id: str, indexes: Sequence[int]) -> dict[int, RequestRow]:
        """index -> request row (without its body) for the given lines."""
        async with self.sessions() as s:
            rows = (await s.scalars(select(RequestRow).options(defer(RequestRow.body_json)).where(
                RequestRow.batch_id == batch_id, RequestRow.idx.in_(list(indexes))))).all()
        return {row.idx: row for row in rows}

    async def store_results(self, batch_id: str, results: Sequence[LineOutcome], part_no: int | None = None) -> int:
        """Insert results not stored yet and add them to the batch's counts and usage (and to the
        part's counts, when they are all of one part), in one transaction. Returns how many were new."""
        if not results:
            return 0
        t = now()
        by_index = {r.index: r for r in results}
        rows = [_result_row(batch_id, r, t, self.encode_response) for r in by_index.values()]
        async with self.sessions.begin() as s:
            # Core, many rows a statement: not the ORM's bulk insert, which costs a third more.
            conn = await s.connection()
            stmt = self._insert(_RESULTS).on_conflict_do_nothing(index_elements=["batch_id", "idx"])
            inserted = [i for (i,) in (await conn.execute(stmt.returning(_RESULTS.c.idx), rows)).all()]
            if not inserted:
                return 0
            new = [by_index[i] for i in inserted]
            usage = sum((r.usage for r in new), Usage())
            added = {column: getattr(BatchRow, column) + value for column, value in usage_values(usage).items()}
            completed = sum(1 for r in new if r.status is ResultStatus.COMPLETED)
            failed = sum(1 for r in new if r.status is ResultStatus.FAILED)
            await s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(
                completed=BatchRow.completed + completed, failed=BatchRow.failed + failed, **added))
            if part_no is not None:
                await s.execute(update(PartRow).where(PartRow.batch_id == batch_id, PartRow.part_no == part_no)
                                .values(completed=PartRow.completed + completed, failed=PartRow.failed + failed))
            await record_progress(s, batch_id)  # thresholds these results passed: webhook events, atomically
            labelled = await _with_models(s, batch_id, new) if telemetry.current().counts_results else None
        for provider, stored in (labelled or {}).items():
            telemetry.current().results_stored(provider, stored)
        return len(inserted)

    # --- executor capacity (service/engine/capacity.py) -------------------------------------

    async def ensure_capacity(self, provider: str, slots: int, limit: float) -> None:
        """The provider's slot rows 0..slots-1 and its adaptive limit, created once (by any replica)."""
        async with self.sessions.begin() as s:
            await s.execute(self._insert(CapacitySlotRow).on_conflict_do_nothing(index_elements=["provider", "slot"]),
                            [{"provider": provider, "slot": n, "holder": None, "until": None} for n in range(slots)])
            await s.execute(self._insert(CapacityStateRow).values(provider=provider, limit=limit, backed_off_at=0.0)
                            .on_conflict_do_nothing(index_elements=["provider"]))

    async def take_slot(self, provider: str, below: int, holder: str, until: float) -> int | None:
        """One free slot (never held, or its holder's lease ran out) under `below`, for `holder`;
        None when all are taken. Compare-and-set per slot, so two replicas never share one."""
        t = time.time()
        free = or_(CapacitySlotRow.holder.is_(None), CapacitySlotRow.until < t)
        async with self.sessions() as s:
            candidates = list((await s.scalars(select(CapacitySlotRow.slot).where(
                CapacitySlotRow.provider == provider, CapacitySlotRow.slot < below, free)
                .order_by(CapacitySlotRow.slot).limit(4))).all())
        for slot in candidates:
            async with self.sessions.begin() as s:
                res = await s.execute(update(CapacitySlotRow).where(
                    CapacitySlotRow.provider == provider, CapacitySlotRow.slot == slot, free)
                    .values(holder=holder, until=until))
            if res.rowcount == 1:  # type: ignore[attr-defined]
                return slot
        return None

    async def free_slot(self, provider: str, holder: str) -> None:
        """Hand back the slot `holder` took, if it took one."""
        async with self.sessions.begin() as s:
            await s.execute(update(CapacitySlotRow).where(
                CapacitySlotRow.provider == provider, CapacitySlotRow.holder == holder).values(holder=None, until=None))

    async def renew_slots(self, holders: Sequence[str], until: float) -> None:
        """Keep slots held by requests still running (a replica that dies lets them run out)."""
        if holders:
            async with self.sessions.begin() as s:
                await s.execute(update(CapacitySlotRow).where(CapacitySlotRow.holder.in_(list(holders)))
                                .values(until=until))

    async def capacity_limit(self, provider: str) -> float | None:
        async with self.sessions() as s:
            return await s.scalar(select(CapacityStateRow.limit).where(CapacityStateRow.provider == provider))

    async def back_off(self, provider: str, factor: float, floor: float, cooldown: float) -> bool:
        """Lower the provider's limit after a 429/5xx/timeout, at most once per `cooldown` seconds
        across all replicas (one overload is one backoff, however many requests saw it)."""
        t = time.time()
        async with self.sessions.begin() as s:
            res = await s.execute(update(CapacityStateRow).where(
                CapacityStateRow.provider == provider, CapacityStateRow.backed_off_at < t - cooldown)
                .values(limit=func.max(CapacityStateRow.limit * factor, floor) if self._dialect == "sqlite"
                        else func.greatest(CapacityStateRow.limit * factor, floor), backed_off_at=t))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def recover(self, provider: str, increment: float, ceiling: float) -> None:
        """Raise the provider's limit after calls that went well, up to its configured concurrency."""
        async with self.sessions.begin() as s:
            await s.execute(update(CapacityStateRow).where(CapacityStateRow.provider == provider).values(
                limit=func.min(CapacityStateRow.limit + increment, ceiling) if self._dialect == "sqlite"
                else func.least(CapacityStateRow.limit + increment, ceiling)))

    async def count_request(self, provider: str, minute: int, tokens: int, rpm: int | None, tpm: int | None) -> bool:
        """Count one request (and its tokens) in this minute's window if it stays within both limits."""
        async with self.sessions.begin() as s:
            await s.execute(self._insert(CapacityWindowRow).values(provider=provider, minute=minute, requests=0,
                                                                   tokens=0)
                            .on_conflict_do_nothing(index_elements=["provider", "minute"]))
            query = update(CapacityWindowRow).where(CapacityWindowRow.provider == provider,
                                                    CapacityWindowRow.minute == minute)
            if rpm is not None:
                query = query.where(CapacityWindowRow.requests + 1 <= rpm)
            if tpm is not None:
                # A request larger than the whole budget still goes, alone in its window.
                query = query.where(or_(CapacityWindowRow.tokens + tokens <= tpm, CapacityWindowRow.tokens == 0))
            res = await s.execute(query.values(requests=CapacityWindowRow.requests + 1,
                                               tokens=CapacityWindowRow.tokens + tokens))
            await s.execute(delete(CapacityWindowRow).where(CapacityWindowRow.provider == provider,
                                                            CapacityWindowRow.minute < minute - 1))
        return bool(res.rowcount == 1)  # type: ignore[attr-defined]

    async def correct_tokens(self, provider: str, minute: int, delta: int) -> None:
        """The tokens a request really used, once known, instead of what was counted before it ran."""
        if delta:
            async with self.sessions.begin() as s:
                await s.execute(update(CapacityWindowRow).where(CapacityWindowRow.provider == provider,
                                                                CapacityWindowRow.minute == minute)
                                .values(tokens=CapacityWindowRow.tokens + delta))

    async def running_parts(self, provider: str) -> dict[str, int]:
        """project -> how many of its parts run (or wait to run) on the provider now."""
        async with self.sessions() as s:
            rows = (await s.execute(select(BatchRow.project, func.count()).join(
                PartRow, PartRow.batch_id == BatchRow.id).where(
                PartRow.provider == provider, PartRow.status.in_([BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]),
                BatchRow.status.not_in(TERMINAL)).group_by(BatchRow.project))).all()
        return {str(project): int(n) for project, n in rows}

    # --- files ------------------------------------------------------------------------------

    async def begin_file(self, row: FileRow) -> FileRow:
        """Register a file in `uploading` status (invisible to the API until `finish_file` or
        `finish_upload`). Its content goes to `self.blobs` under its id, after this row exists."""
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def finish_file(self, file_id: str, size: int, line_count: int) -> FileRow:
        """The content is stored: the file becomes visible, as `processed`."""
        async with self.sessions.begin() as s:
            row = await s.scalar(update(FileRow).where(FileRow.id == file_id).values(
                bytes=size, line_count=line_count, status=FileStatus.PROCESSED).returning(FileRow))
        if not isinstance(row, FileRow):
            raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
        return row

    async def add_file_index_block(self, file_id: str, seq: int, data: bytes) -> None:
        """One block of an uploading file's line index (service/intake/line_index.py), in its own
        short transaction, like the content's chunks."""
        async with self.sessions.begin() as s:
            await s.execute(self._insert(FileLineIndexRow).values(file_id=file_id, seq=seq, data=data))

    def file_index_blocks(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's line index, block by block (one block in memory)."""
        return pieces(self.sessions, FileLineIndexRow, file_id)

    async def last_file_index_block(self, file_id: str) -> bytes | None:
        async with self.sessions() as s:
            data = await s.scalar(select(FileLineIndexRow.data).where(FileLineIndexRow.file_id == file_id)
                                  .order_by(FileLineIndexRow.seq.desc()).limit(1))
        return None if data is None else bytes(data)

    async def copy_bodies_in(self, file_id: str, page: int = INSERT_CHUNK) -> int:
        """Store in `body_json` the bodies of every line, of any batch, that points into `file_id`
        (lines stored by reference, migration 0010), a page per transaction; returns how many. The
        sweeper calls this on a file it claimed, before it removes the content: what a batch still
        runs, or may retry, never loses its body. `lines_lost` if the content is gone already."""
        async with self.sessions() as s:
            readers = list((await s.scalars(select(BatchRow.id).where(BatchRow.input_file_id == file_id))).all())
        table: Any = RequestRow.__table__
        copy = (table.update().where(table.c.batch_id == bindparam("batch"), table.c.idx == bindparam("at"))
                .values(body_json=bindparam("body"), line_offset=None, line_length=None))
        copied = 0
        for batch_id in readers:
            last = -1
            while True:
                async with self.sessions() as s:
                    rows = (await s.execute(
                        select(RequestRow.idx, RequestRow.line_offset, RequestRow.line_length)
                        .where(RequestRow.batch_id == batch_id, RequestRow.idx > last,
                               RequestRow.line_offset.is_not(None))
                        .order_by(RequestRow.idx).limit(page))).all()
                if not rows:
                    break
                lines = [(int(idx), int(offset or 0), int(length or 0)) for idx, offset, length in rows]
                bodies = await self._bodies_from_file(file_id, lines)
                if len(bodies) != len(lines):
                    raise lines_lost(batch_id, file_id)
                async with self.sessions.begin() as s:
                    await (await s.connection()).execute(copy, [{"batch": batch_id, "at": idx, "body": body}
                                                                for idx, body in bodies.items()])
                copied += len(bodies)
                last = lines[-1][0]
        return copied

    async def discard_file(self, file_id: str) -> None:
        """Remove a file and its content whatever its status (failed uploads, rewritten outputs).
        Content first: a crash in between leaves a row the sweeper finds, never content without one."""
        await self.blobs.delete([file_id])
        async with self.sessions.begin() as s:
            await s.execute(delete(FileRow).where(FileRow.id == file_id))

    @staticmethod
    def _visible(project: str, t: int) -> Any:
        """A tenant's files the API shows: published, not deleted, not expired."""
        return and_(FileRow.project == project, FileRow.status.not_in(HIDDEN_FILE_STATUSES),
                    or_(FileRow.expires_at.is_(None), FileRow.expires_at > t))

    async def get_file(self, project: str, file_id: str) -> FileRow:
        """A tenant's file: another project's, one still uploading, and an expired one are not found."""
        async with self.sessions() as s:
            row = await s.scalar(select(FileRow).where(FileRow.id == file_id, self._visible(project, now())))
        if row is None:
            raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")
        return row

    async def list_files(self, project: str, purpose: str, limit: int, after: str,
                         ascending: bool) -> tuple[list[FileRow], bool]:
        query = select(FileRow).where(self._visible(project, now()))
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

    async def touch_upload(self, file_id: str, size: int) -> None:
        """Mark an upload alive (and how far it got). `UploadGone` if it was swept meanwhile
        (it stalled longer than the sweep bound) or discarded."""
        async with self.sessions.begin() as s:
            res = await s.execute(update(FileRow).where(FileRow.id == file_id, FileRow.status == UPLOADING)
                                  .values(updated_at=now(), bytes=size))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise UploadGone(file_id)

    async def finish_upload(self, file_id: str, *, size: int, line_count: int, purpose: str,
                            expires_at: int | None) -> FileRow:
        """`uploading` -> `processed`: the file becomes visible, all at once."""
        async with self.sessions.begin() as s:
            row = await s.scalar(update(FileRow).where(FileRow.id == file_id, FileRow.status == UPLOADING).values(
                bytes=size, line_count=line_count, purpose=purpose, expires_at=expires_at,
                status=FileStatus.PROCESSED, updated_at=now()).returning(FileRow))
        if not isinstance(row, FileRow):
            raise UploadGone(file_id)
        return row

    async def mark_file_deleted(self, project: str, file_id: str) -> None:
        """Hide a file at once (`deleted`); its content stays until `sweep_files`, so a download
        or a batch create already reading it sees the whole file."""
        async with self.sessions.begin() as s:
            res = await s.execute(update(FileRow).where(FileRow.id == file_id, self._visible(project, now()))
                                  .values(status=DELETED, updated_at=now()))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise NotFound(f"No such File object: {file_id}", param="id", code="file_not_found")

    async def sweep_files(self, stale_upload_before: int, deleted_before: int, expired_before: int | None = None,
                          chunk: int = SWEEP_CHUNK) -> SweptFiles:
        """Remove, rows and content:
        - uploads with no sign of life since `stale_upload_before` (a crash or a lost client left them);
        - files deleted before `deleted_before` (their readers' grace is over);
        - files whose `expires_at` is at or before `expired_before` (None: none), except an input
          file of a batch that has not ended: it goes once that batch has ended.

        `chunk` files at a time: they are claimed in one conditional UPDATE (status `purging`,
        re-checking why each goes, so an upload that came back to life stays), then their content
        is deleted, then their rows in one transaction. Replicas may sweep at the same time: a
        file is claimed by one of them only. A claim older than an hour (a sweep that crashed
        after it) is taken over and counted with the deleted files."""
        unfinished_input = select(BatchRow.id).where(BatchRow.input_file_id == FileRow.id,
                                                     BatchRow.status.not_in(TERMINAL)).exists()
        stale: list[str] = []
        gone: list[str] = []
        reasons: list[tuple[list[str], Any]] = [
            (stale, and_(FileRow.status == UPLOADING, FileRow.updated_at.is_not(None),
                               FileRow.updated_at < stale_upload_before)),
            (gone, or_(and_(FileRow.status == DELETED, FileRow.updated_at < deleted_before),
                             and_(FileRow.status == PURGING, FileRow.updated_at < now() - ABANDONED_PURGE_SECONDS))),
        ]
        expired: list[str] = []
        if expired_before is not None:
            reasons.append((expired, and_(FileRow.status == FileStatus.PROCESSED, FileRow.expires_at.is_not(None),
                                          FileRow.expires_at <= expired_before, ~unfinished_input)))
        for removed, doomed in reasons:
            while True:
                async with self.sessions() as s:
                    ids = list((await s.scalars(select(FileRow.id).where(doomed).limit(chunk))).all())
                if not ids:
                    break
                async with self.sessions.begin() as s:
                    claimed = list((await s.scalars(update(FileRow).where(FileRow.id.in_(ids), doomed)
                                                    .values(status=PURGING, updated_at=now())
                                                    .returning(FileRow.id))).all())
                for file_id in claimed:  # batches reading it by reference get their bodies first
                    try:
                        await self.copy_bodies_in(file_id)
                    except Internal as exc:  # its content was removed behind Sluice's back: nothing to save
                        log.error("sweep: %s", exc.message)
                await self.blobs.delete(claimed)
                async with self.sessions.begin() as s:
                    await s.execute(delete(FileRow).where(FileRow.id.in_(claimed), FileRow.status == PURGING))
                removed.extend(claimed)
                if len(ids) < chunk:
                    break
        return SweptFiles(stale_uploads=stale, deleted=gone, expired=expired)


    async def count_batches(self, project: str) -> int:
        async with self.sessions() as s:
            return int(await s.scalar(select(func.count()).select_from(BatchRow)
                                      .where(BatchRow.project == project)) or 0)


async def _with_models(s: Any, batch_id: str, outcomes: Sequence[LineOutcome]
                       ) -> dict[str, list[tuple[str, LineOutcome]]]:
    """Each stored line's provider (its part's) and provider model, grouped by provider, for
    metrics (read only when metrics are on; one indexed query per stored chunk)."""
    lines = {idx: (provider, model) for idx, provider, model in (await s.execute(
        select(RequestRow.idx, PartRow.provider, func.coalesce(RequestRow.provider_model, RequestRow.model))
        .join(PartRow, and_(PartRow.batch_id == RequestRow.batch_id, PartRow.part_no == RequestRow.part_no))
        .where(RequestRow.batch_id == batch_id, RequestRow.idx.in_([o.index for o in outcomes])))).all()}
    grouped: dict[str, list[tuple[str, LineOutcome]]] = {}
    for o in outcomes:
        provider, model = lines.get(o.index, ("", ""))
        grouped.setdefault(provider, []).append((model or "", o))
    return grouped


def _detached(cls: Any, keys: Sequence[str], values: Sequence[Any]) -> Any:
    """An instance of a mapped class from its table's row values, filled the way the ORM's loader
    fills one (straight into its __dict__), not attached to any session."""
    row = cls.__mapper__.class_manager.new_instance()
    row.__dict__.update(zip(keys, values, strict=True))
    return row


def _result_row(batch_id: str, res: LineOutcome, t: int, encode: ResponseEncoder | None) -> dict[str, Any]:
    served = None
    if encode is not None and isinstance(res.body, dict) and res.body:
        try:
            served = encode(res.body)
        except Exception:
            served = None
    return {
        "batch_id": batch_id, "idx": res.index, "custom_id": res.custom_id, "status": res.status,
        "status_code": res.status_code, "request_id": res.request_id,
        "response_json": json.dumps(res.body, separators=(",", ":")) if res.body is not None else None,
        "response_pb": served,
        "error_code": res.error.code if res.error else None,
        "error_message": res.error.message if res.error else None,
        "error_type": res.error.type if res.error else None,
        **usage_values(res.usage), "created_at": t,
    }


_INSERT_REQUESTS: Any = RequestRow.__table__.insert()  # type: ignore[attr-defined]
_REQUEST_COLUMNS = ("batch_id", "idx", "custom_id", "model", "provider_model", "provider", "part_no", "origin_idx",
                    "body_json", "line_offset", "line_length")
# A line's body size: its stored body, or for a line stored by reference its line in the input file.
_BODY_SIZE = func.coalesce(RequestRow.line_length, func.length(RequestRow.body_json))
RUN_BYTES = 8 * 1024 * 1024  # the most one range read of an input file spans
RUN_GAP = 1024 * 1024  # lines further apart than this are read separately


def line_runs(lines: Sequence[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """(idx, offset, length) lines grouped, in file order, into runs that one range read each
    fetches: lines at most `RUN_GAP` apart, spanning at most `RUN_BYTES` (a longer line alone).
    A page of a batch's lines is one run; a part whose lines interleave with another provider's
    reads a few lines more, not one request per line."""
    runs: list[list[tuple[int, int, int]]] = []
    start = end = 0
    for line in sorted(lines, key=lambda x: x[1]):
        _, offset, length = line
        if runs and offset - end <= RUN_GAP and offset + length - start <= RUN_BYTES:
            runs[-1].append(line)
            end = max(end, offset + length)
        else:
            runs.append([line])
            start, end = offset, offset + length
    return runs


RequestLine = namedtuple("RequestLine", [c.name for c in _REQUESTS.columns])  # type: ignore[misc]


def _with_body(row: Any, body: str) -> Any:
    """A request row (ORM or plain) with its body read from the input file: a plain row is
    immutable, so it becomes a RequestLine with the same fields."""
    if isinstance(row, RequestRow):
        row.body_json = body
        return row
    return RequestLine(**{**row._asdict(), "body_json": body})


async def _rows_within(s: Any, batch_id: str, sizes: Sequence[Any], max_bytes: int) -> list[Any]:
    """The request rows of `sizes` ((idx, body length) in order) up to `max_bytes` of bodies,
    at least one: plain rows with RequestRow's column names (no ORM instances: the engine reads
    50,000 of them for a batch, and building them cost more than the query)."""
    wanted: list[int] = []
    total = 0
    for idx, size in sizes:
        if wanted and total + (size or 0) > max_bytes:
            break
        wanted.append(idx)
        total += size or 0
    if not wanted:
        return []
    return list((await s.execute(select(*_REQUESTS.columns).where(_REQUESTS.c.batch_id == batch_id,
                                                                  _REQUESTS.c.idx.in_(wanted))
                                 .order_by(_REQUESTS.c.idx))).all())


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
