"""The database schema (SQLAlchemy 2). Alembic migrations in service/storage/migrations/ create it.

Each request line and each result is its own row, so a 50,000-line batch is never one blob and
results can be stored one by one as they arrive. Counters and usage sums live on the batch row
and are bumped in the same transaction that inserts results, so reading a batch stays O(1).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Boolean, Dialect, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, composite, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from service.domain.model import COMPLETION_WINDOWS, BatchError, BatchStatus, FileStatus, ResultStatus, Usage


class Base(DeclarativeBase):
    pass


class StatusType(TypeDecorator[StrEnum]):
    """A status enum stored as its plain string (no database enum type, so adding a status needs no
    migration); rows come back typed, and a value outside the enum is refused on the way in."""

    impl = String(16)
    cache_ok = True

    def __init__(self, enum: type[StrEnum]) -> None:
        super().__init__()
        self.enum = enum

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> StrEnum | None:
        return None if value is None else self.enum(value)


class BatchErrorsType(TypeDecorator[list[BatchError]]):
    """A batch's `errors` as one typed value, stored in OpenAI's shape `{"object": "list", "data": [...]}`."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if not value:
            return None
        return json.dumps({"object": "list", "data": [dataclasses.asdict(e) for e in value]})

    def process_result_value(self, value: Any, dialect: Dialect) -> list[BatchError] | None:
        if not value:
            return None
        return [BatchError(**item) for item in json.loads(value)["data"]]


class _UsageColumns:
    """Token and cost sums, read and written as one `Usage` (the `usage` composite)."""

    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    input_cost: Mapped[float] = mapped_column(Float, default=0.0)
    output_cost: Mapped[float] = mapped_column(Float, default=0.0)


def new_key_id() -> str:
    """A key's public id (`key_...`): random, unrelated to the key or its hash."""
    return "key_" + secrets.token_hex(12)


class ApiKeyRow(Base):
    """An API key, stored as its SHA-256 only, and the project (tenant) it belongs to."""

    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    # `config` (SLUICE_API_KEY[S], synchronised at every start: removed there, removed here) or
    # `admin`/`api` (created later; revoked one by one, never touched by the start-up sync).
    source: Mapped[str] = mapped_column(String(16), default="config", server_default="config")
    # The admin API's view (migration 0007): a public id, a label, and when it was last used
    # (updated at most once a minute) or revoked (refused from then on; the row stays for the record).
    id: Mapped[str] = mapped_column(String(64), default=new_key_id)
    name: Mapped[str | None] = mapped_column(String(256))
    redacted_value: Mapped[str | None] = mapped_column(String(32))
    last_used_at: Mapped[int | None] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("ux_api_keys_id", "id", unique=True),)


class ProjectRow(Base):
    """A project (tenant). Configured projects (named in SLUICE_API_KEYS) get a row at start-up;
    the admin API creates `proj_...` ones. A project without a row (older data) still works."""

    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger)
    # Set once, never cleared: every key of the project is refused from then on.
    archived_at: Mapped[int | None] = mapped_column(BigInteger)
    # USD per calendar month (UTC); NULL: no budget. Read with `AdminStore.project_budget`.
    monthly_budget_usd: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16), default="admin")

    __table_args__ = (Index("ix_projects_created", "created_at", "id"),)


class BatchRow(_UsageColumns, Base):
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    status: Mapped[BatchStatus] = mapped_column(StatusType(BatchStatus))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(8))
    input_file_id: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str | None] = mapped_column(String(256))
    provider: Mapped[str] = mapped_column(String(64))
    # The provider's own model name when every line has the same one (resolved once, at intake).
    provider_model: Mapped[str | None] = mapped_column(String(256))
    metadata_json: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list[BatchError] | None] = mapped_column("errors_json", BatchErrorsType)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))

    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger)
    in_progress_at: Mapped[int | None] = mapped_column(BigInteger)
    finalizing_at: Mapped[int | None] = mapped_column(BigInteger)
    completed_at: Mapped[int | None] = mapped_column(BigInteger)
    failed_at: Mapped[int | None] = mapped_column(BigInteger)
    expired_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelling_at: Mapped[int | None] = mapped_column(BigInteger)
    cancelled_at: Mapped[int | None] = mapped_column(BigInteger)

    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    usage: Mapped[Usage] = composite("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
                                     "input_cost", "output_cost")

    # A retry (RetryBatch): the batch it retries, and the first batch of its chain (NULL on a
    # batch that is not a retry: it heads its own chain).
    retry_of: Mapped[str | None] = mapped_column(String(64))
    chain_id: Mapped[str | None] = mapped_column(String(64))
    # On a retry, once ended: the latest attempt of every line of the chain, as output/error files.
    merged_output_file_id: Mapped[str | None] = mapped_column(String(64))
    merged_error_file_id: Mapped[str | None] = mapped_column(String(64))

    # Engine bookkeeping, never shown to callers. What a provider knows about the batch lives on
    # its parts (`PartRow`); the lease and the next look are the batch's.
    next_poll_at: Mapped[float | None] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[float | None] = mapped_column(Float)
    # `output_expires_after[seconds]` given at create: the output and error files expire this long
    # after they are written (None: the default, 30 days).
    output_expires_after: Mapped[int | None] = mapped_column(BigInteger)

    # W3C traceparent of the request that created the batch (traces on): the engine's work on the
    # batch joins that trace (service/runtime/tracing.py).
    trace_parent: Mapped[str | None] = mapped_column(String(64))

    # One part per provider batch (or per provider Sluice runs itself), always loaded with the batch.
    parts: Mapped[list[PartRow]] = relationship(lazy="selectin", order_by="PartRow.part_no",
                                                cascade="all, delete-orphan")

    __table_args__ = (
        Index("ix_batches_project_created", "project", "created_at", "id"),
        Index("ix_batches_status", "status"),
        Index("ix_batches_retry_of", "retry_of"),
        Index("ix_batches_chain_id", "chain_id"),
        Index("ix_batches_input_file", "input_file_id"),
    )

    @classmethod
    def new(cls, *, id: str, project: str, endpoint: str, completion_window: str, created_at: int,
            input_file_id: str = "", metadata: dict[str, str] | None = None) -> BatchRow:
        """A batch as CreateBatch makes it: `validating`, nothing counted yet. The one place a
        batch row is built (code and tests), so no column is forgotten or set by hand."""
        return cls(
            id=id, project=project, status=BatchStatus.VALIDATING, endpoint=endpoint,
            completion_window=completion_window, input_file_id=input_file_id, provider="",
            metadata_json=json.dumps(metadata) if metadata else None, created_at=created_at,
            expires_at=created_at + COMPLETION_WINDOWS[completion_window],
            total=0, completed=0, failed=0, usage=Usage(),
        )


class RequestRow(Base):
    """One request line. Its body is `body_json`, or, for a line of a batch created from an uploaded
    file (migration 0010), the `body` of the `line_length` bytes at `line_offset` in the batch's
    input file (`body_json` is then ""): the file already holds it, so it is not stored twice. The
    store fills `body_json` from the file when it reads such a line with its body; before a file's
    content is purged, the sweeper copies the bodies of every line still pointing into it here
    (`Store.sweep_files`)."""

    __tablename__ = "batch_requests"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(256))
    # The provider's own name for `model`, resolved once at intake (NULL only on rows from before
    # migration 0002); a later edit of the providers file never re-routes an accepted line.
    provider_model: Mapped[str | None] = mapped_column(String(256))
    body_json: Mapped[str] = mapped_column(Text)
    # The part (`PartRow.part_no`) that runs this line, and its provider (NULL on rows from before
    # migration 0005: the batch's provider).
    part_no: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    provider: Mapped[str | None] = mapped_column(String(64))
    # On a retry: the line's index in the first batch of the chain, so every attempt of a line is
    # found from any batch of the chain.
    origin_idx: Mapped[int | None] = mapped_column(Integer)
    line_offset: Mapped[int | None] = mapped_column(BigInteger)
    line_length: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (Index("ux_batch_requests_custom_id", "batch_id", "custom_id", unique=True),
                      Index("ix_batch_requests_part", "batch_id", "part_no", "idx"))


class PartRow(Base):
    """One part of a batch: the lines that go to one provider batch (a provider's per-batch limits
    can make several parts of one provider), or that Sluice runs itself on one executor provider.
    Everything a provider knows of the batch is kept here, per part, so submit, lost-submission
    recovery, polling, cancel and expiry each hold per part. Only the engine writes it."""

    __tablename__ = "batch_parts"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    part_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(String(64))
    # The provider's model name when every line of the part has the same one.
    provider_model: Mapped[str | None] = mapped_column(String(256))
    # validating (not submitted, or the provider is validating it), in_progress, finalizing (the
    # provider ended it; results are being stored), then completed, failed, expired or cancelled.
    status: Mapped[BatchStatus] = mapped_column(StatusType(BatchStatus))
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[list[BatchError] | None] = mapped_column("errors_json", BatchErrorsType)
    ended_at: Mapped[int | None] = mapped_column(BigInteger)

    provider_batch_id: Mapped[str | None] = mapped_column(String(256))
    provider_status: Mapped[str | None] = mapped_column(String(64))
    # The provider's live counts while it runs (native batches store results only at the end).
    provider_completed: Mapped[int | None] = mapped_column(Integer)
    provider_failed: Mapped[int | None] = mapped_column(Integer)
    submit_started_at: Mapped[int | None] = mapped_column(BigInteger)
    cancel_sent_at: Mapped[int | None] = mapped_column(BigInteger)
    next_poll_at: Mapped[float | None] = mapped_column(Float)
    poll_failures: Mapped[int] = mapped_column(Integer, default=0)

    @property
    def job_id(self) -> str:
        """Sluice's name for this part at the provider (metadata, file names): the batch id for the
        first part, so batches submitted before parts existed are still recognised."""
        return self.batch_id if self.part_no == 0 else f"{self.batch_id}-p{self.part_no}"


class ResultRow(_UsageColumns, Base):
    __tablename__ = "batch_results"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    status: Mapped[ResultStatus] = mapped_column(StatusType(ResultStatus))
    status_code: Mapped[int] = mapped_column(Integer, default=0)
    request_id: Mapped[str | None] = mapped_column(String(256))
    response_json: Mapped[str | None] = mapped_column(Text)
    # The same body as the API serves it (a serialized google.protobuf.Struct), written once when the
    # result is stored so that result pages are not rebuilt from JSON at every read (migration 0011;
    # NULL before it, and for a body that is not a JSON object: built from `response_json` then).
    response_pb: Mapped[bytes | None] = mapped_column(LargeBinary)
    error_code: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(64))
    usage: Mapped[Usage] = composite("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens",
                                     "input_cost", "output_cost")
    created_at: Mapped[int] = mapped_column(BigInteger)


class IdempotencyRow(Base):
    """An `Idempotency-Key` a project used on CreateBatch: inserted in the transaction that inserts
    the batch, so a key names at most one batch, on every replica. Kept 24 hours."""

    __tablename__ = "idempotency_keys"
    project: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    batch_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)


class SpendRow(Base):
    """A project's spend in one calendar month (UTC): what batches still running have reserved (the
    upper bound of their estimate) and what ended batches actually cost. Both move only in the
    transactions that create a batch and end it, so nothing is counted twice."""

    __tablename__ = "project_spend"
    project: Mapped[str] = mapped_column(String(128), primary_key=True)
    month: Mapped[str] = mapped_column(String(7), primary_key=True)
    reserved: Mapped[float] = mapped_column(Float, default=0.0)
    spent: Mapped[float] = mapped_column(Float, default=0.0)


class ChargeRow(Base):
    """One batch's reservation, settled once (to what it cost) when the batch ends."""

    __tablename__ = "batch_charges"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    month: Mapped[str] = mapped_column(String(7))
    reserved: Mapped[float] = mapped_column(Float, default=0.0)
    actual: Mapped[float | None] = mapped_column(Float)
    settled_at: Mapped[int | None] = mapped_column(BigInteger)


class CapacitySlotRow(Base):
    """One concurrent request to an executor provider (its `capacity.concurrency`), held by one
    replica until `until`: every replica running lines on the provider shares these rows."""

    __tablename__ = "capacity_slots"
    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(160))
    until: Mapped[float | None] = mapped_column(Float)


class CapacityWindowRow(Base):
    """Requests and tokens sent to an executor provider in one minute (fixed windows)."""

    __tablename__ = "capacity_windows"
    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class CapacityStateRow(Base):
    """The concurrency an executor provider is given now: lowered on 429/5xx/timeouts, raised back
    on success, shared by every replica."""

    __tablename__ = "capacity_state"
    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    limit: Mapped[float] = mapped_column("current_limit", Float)
    backed_off_at: Mapped[float] = mapped_column(Float, default=0.0)


class FileRow(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[FileStatus] = mapped_column(StatusType(FileStatus))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    # Last sign of life of an upload (each stored chunk), or when a file was deleted. NULL for
    # files the engine writes. The sweeper removes stale uploads and deleted files by it.
    updated_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_files_project_created", "project", "created_at", "id"),
                      Index("ix_files_status_updated", "status", "updated_at"),
                      Index("ix_files_status_expires", "status", "expires_at"))


class FileLineIndexRow(Base):
    """What the upload learnt of an uploaded file's lines (service/intake/line_index.py), in blocks
    written as it streamed: creating a batch from the file checks and stores its lines from this
    alone, without parsing a body again. Opaque to storage."""

    __tablename__ = "file_line_index"
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class FileChunkRow(Base):
    """File content in pieces of at most 1 MiB, so uploads and downloads stream."""

    __tablename__ = "file_chunks"
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class LeaseRow(Base):
    """A named lease on background work that one replica at a time should do (the file sweeper)."""

    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(128))
    until: Mapped[float] = mapped_column(Float, default=0.0)


class WebhookEndpointRow(Base):
    """A webhook destination of a project (from the webhooks file, `SLUICE_WEBHOOKS_FILE`).

    The signing secret is kept as given: Sluice must sign with it, so it cannot be hashed. An
    endpoint removed from the file is disabled, not deleted, so its delivery history stays."""

    __tablename__ = "webhook_endpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    url: Mapped[str] = mapped_column(Text)
    # Comma-separated event types, e.g. "batch.completed,batch.failed".
    event_types: Mapped[str] = mapped_column(String(256))
    # Comma-separated percents for `batch.progress` events, e.g. "25,50,75"; "" when none.
    progress_thresholds: Mapped[str] = mapped_column(String(256), default="", server_default="")
    secret: Mapped[str] = mapped_column(String(256))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    # `config` (the webhooks file, synchronised at start-up) or `admin` (the admin API; the
    # start-up sync leaves these alone). Migration 0007.
    source: Mapped[str] = mapped_column(String(16), default="config", server_default="config")

    __table_args__ = (Index("ix_webhook_endpoints_project", "project", "id"),)


class WebhookEventRow(Base):
    """The outbox: one row per batch that ended, written in the transaction that ends it, and one
    per progress threshold a running batch passed, written in the transaction that counted the lines."""

    __tablename__ = "webhook_events"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # evt_..., also the webhook-id
    project: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(32))
    batch_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    progress: Mapped[int | None] = mapped_column(Integer)  # the threshold (percent) of a batch.progress event

    __table_args__ = (Index("ix_webhook_events_batch", "batch_id"),)


class WebhookDeliveryRow(Base):
    """One event owed to one endpoint: pending until delivered or given up (`failed`).

    Delivery workers of every replica claim due rows with a compare-and-set on the lease."""

    __tablename__ = "webhook_deliveries"
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id", ondelete="CASCADE"), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
                                             primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[float | None] = mapped_column(Float)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint", "endpoint_id", "event_id"),
    )


class WebhookAttemptRow(Base):
    """One HTTP attempt of a delivery and what came of it."""

    __tablename__ = "webhook_attempts"
    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1-based
    attempted_at: Mapped[int] = mapped_column(BigInteger)
    status_code: Mapped[int | None] = mapped_column(Integer)  # None: no HTTP answer
    error: Mapped[str | None] = mapped_column(Text)  # None: delivered
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
