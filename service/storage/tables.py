"""The database schema (SQLAlchemy 2). Alembic migrations in service/storage/migrations/ create it.

Each request line and each result is its own row, so a 50,000-line batch is never one blob and
results can be stored one by one as they arrive. Counters and usage sums live on the batch row
and are bumped in the same transaction that inserts results, so reading a batch stays O(1).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ApiKeyRow(Base):
    """An API key, stored as its SHA-256 only, and the project (tenant) it belongs to."""

    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[int] = mapped_column(BigInteger)
    # `config` (SLUICE_API_KEY[S], synchronised at every start: removed there, removed here) or
    # `api` (created later; revoked one by one, never touched by the start-up sync).
    source: Mapped[str] = mapped_column(String(16), default="config", server_default="config")


class BatchRow(Base):
    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    endpoint: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(8))
    input_file_id: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str | None] = mapped_column(String(256))
    provider: Mapped[str] = mapped_column(String(64))
    metadata_json: Mapped[str | None] = mapped_column(Text)
    errors_json: Mapped[str | None] = mapped_column(Text)
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
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    input_cost: Mapped[float] = mapped_column(Float, default=0.0)
    output_cost: Mapped[float] = mapped_column(Float, default=0.0)

    # Engine bookkeeping, never shown to callers.
    provider_batch_id: Mapped[str | None] = mapped_column(String(256))
    provider_status: Mapped[str | None] = mapped_column(String(64))
    # The provider's live counts while it runs (native batches store results only at the end).
    provider_completed: Mapped[int | None] = mapped_column(Integer)
    provider_failed: Mapped[int | None] = mapped_column(Integer)
    submit_started_at: Mapped[int | None] = mapped_column(BigInteger)
    cancel_sent_at: Mapped[int | None] = mapped_column(BigInteger)
    next_poll_at: Mapped[float | None] = mapped_column(Float)
    poll_failures: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_until: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_batches_project_created", "project", "created_at", "id"),
        Index("ix_batches_status", "status"),
    )


class RequestRow(Base):
    __tablename__ = "batch_requests"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(256))
    body_json: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ux_batch_requests_custom_id", "batch_id", "custom_id", unique=True),)


class ResultRow(Base):
    __tablename__ = "batch_results"
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int] = mapped_column(Integer, default=0)
    request_id: Mapped[str | None] = mapped_column(String(256))
    response_json: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(128))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(64))
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reasoning_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    input_cost: Mapped[float] = mapped_column(Float, default=0.0)
    output_cost: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_batch_results_custom_id", "batch_id", "custom_id"),)


class FileRow(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(128))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int | None] = mapped_column(BigInteger)
    # Last sign of life of an upload (each stored chunk), or when a file was deleted. NULL for
    # files the engine writes. The sweeper removes stale uploads and deleted files by it.
    updated_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_files_project_created", "project", "created_at", "id"),
                      Index("ix_files_status_updated", "status", "updated_at"))


class FileChunkRow(Base):
    """File content in pieces of at most 1 MiB, so uploads and downloads stream."""

    __tablename__ = "file_chunks"
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
