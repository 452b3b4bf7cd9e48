"""The batch's vocabulary: statuses and their state machine, limits, usage arithmetic.

No I/O here: storage, the engine and the API all speak these types.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL

    @property
    def timestamp_field(self) -> str | None:
        """The `Batch` field stamped when a batch enters this status."""
        return None if self is BatchStatus.VALIDATING else f"{self.value}_at"


TERMINAL = frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})

# Only the server moves a batch, and only along these edges. `cancelling -> completed` is the
# cancel race: the provider finished before it saw the cancel.
TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    BatchStatus.VALIDATING: frozenset({BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.CANCELLING,
                                       BatchStatus.EXPIRED}),
    BatchStatus.IN_PROGRESS: frozenset({BatchStatus.FINALIZING, BatchStatus.FAILED, BatchStatus.CANCELLING,
                                        BatchStatus.EXPIRED}),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED,
                                       BatchStatus.CANCELLED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED, BatchStatus.COMPLETED, BatchStatus.FAILED,
                                       BatchStatus.EXPIRED}),
    BatchStatus.COMPLETED: frozenset(),
    BatchStatus.FAILED: frozenset(),
    BatchStatus.EXPIRED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}

CANCELLABLE = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS})


def can_transition(src: BatchStatus, dst: BatchStatus) -> bool:
    return dst in TRANSITIONS[src]


def request_counts(status: BatchStatus, total: int, completed: int, failed: int,
                   provider_completed: int | None = None, provider_failed: int | None = None) -> tuple[int, int]:
    """The (completed, failed) counts a caller sees. They never contradict `total`
    (completed + failed <= total), whatever a provider reports. While a native batch runs, its results
    are stored only at the end, so the provider's live counts show progress; once the batch has ended
    only the stored results count, so the counts agree with the per-line results a caller can page."""
    if not status.terminal:
        completed = max(completed, provider_completed or 0)
        failed = max(failed, provider_failed or 0)
    completed = min(max(completed, 0), total)
    failed = min(max(failed, 0), total - completed)
    return completed, failed


class ResultStatus(StrEnum):
    """A request line's own status (Sail's lookup): pending until a result is stored."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


# What `RetryBatch` retries when the caller names no outcomes, and what it may retry at all.
DEFAULT_RETRY_OUTCOMES = frozenset({ResultStatus.FAILED, ResultStatus.EXPIRED})
RETRYABLE_OUTCOMES = frozenset({ResultStatus.FAILED, ResultStatus.EXPIRED, ResultStatus.CANCELLED})


class FileStatus(StrEnum):
    """A stored file's status. `uploading` files are invisible to the API until the upload ends."""

    UPLOADING = "uploading"
    PROCESSED = "processed"
    DELETED = "deleted"  # hidden at once; its content is kept a grace period for readers in flight
    PURGING = "purging"  # claimed by a sweep that is removing its content, then its row


@dataclass(frozen=True)
class BatchError:
    """One entry of a batch's `errors` list (OpenAI's `Batch.errors.data[]`): why a batch failed,
    with the 1-based input line where a line is at fault."""

    code: str
    message: str
    param: str | None = None
    line: int | None = None


SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses")
COMPLETION_WINDOWS = {"24h": 24 * 3600}
# Sluice's own per-batch limits (OpenAI's). They are defaults: `Limits` carries the configured ones
# (SLUICE_MAX_BATCH_REQUESTS, SLUICE_MAX_FILE_BYTES); a provider's smaller per-batch limit only
# makes Sluice submit a batch as several provider batches.
MAX_REQUESTS = 50_000
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LEN = 64
MAX_METADATA_VALUE_LEN = 512

# Budgets on what one request may make the server hold (README: "Limits"). Each is checked at
# intake, before anything is stored, the same way for gRPC and REST, SQLite and PostgreSQL.
MAX_LINE_BYTES = 16 * 1024 * 1024  # one JSONL line of an uploaded file
MAX_LINE_VALUES = 500_000  # JSON values (objects, arrays, strings, numbers, ...) in one request line
MAX_JSON_DEPTH = 32  # nesting of one request line: the line object is level 1, its body level 2
MAX_INLINE_BYTES = 16 * 1024 * 1024  # a CreateBatch request with inline `requests` (JSON or protobuf)
MAX_CUSTOM_ID_LEN = 512  # columns: batch_requests.custom_id
MAX_MODEL_LEN = 256  # batch_requests.model, batches.model
MAX_OBJECT_ID_LEN = 64  # batch_..., file-... ids




@dataclass(frozen=True)
class Limits:
    """Sluice's own limits on one batch and one uploaded file, as configured."""

    max_requests: int = MAX_REQUESTS
    max_file_bytes: int = MAX_FILE_BYTES


DEFAULT_LIMITS = Limits()


def now() -> int:
    return int(time.time())


def month_of(timestamp: int) -> str:
    """The calendar month (UTC) a spend belongs to, e.g. `2025-07`: budgets are per month."""
    return time.strftime("%Y-%m", time.gmtime(timestamp))


def final_status(parts: Sequence[BatchStatus]) -> BatchStatus:
    """The status a batch ends with once every one of its parts (one provider batch, or the lines
    Sluice runs itself on one provider) has ended.

    Every part failed: `failed` (nothing ran). Otherwise a part that expired makes the batch
    `expired`, a cancelled one `cancelled`; a batch whose parts all completed is `completed` even if
    a cancel was asked for (the providers finished first: the cancel race). A part that failed
    while others ran leaves the batch `completed` (or expired/cancelled): its lines carry the
    failure, and the batch's `errors` say why."""
    ended = [p for p in parts if p.terminal]
    if len(ended) != len(parts):
        raise ValueError("a batch ends only once all its parts have ended")
    if all(p is BatchStatus.FAILED for p in parts):
        return BatchStatus.FAILED
    if BatchStatus.EXPIRED in parts:
        return BatchStatus.EXPIRED
    if BatchStatus.CANCELLED in parts:
        return BatchStatus.CANCELLED
    return BatchStatus.COMPLETED


@dataclass(frozen=True)
class Usage:
    """Token usage of one request or a sum of them, normalised to OpenAI's batch usage."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    input_cost: float = 0.0
    output_cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def total_cost(self) -> float:
        return self.input_cost + self.output_cost

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.cached_tokens + other.cached_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.input_cost + other.input_cost,
            self.output_cost + other.output_cost,
        )


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens at the provider's list price, and its batch discount."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    batch_discount: float = 0.5

    def cost(self, usage: Usage) -> Usage:
        return Usage(
            usage.input_tokens, usage.cached_tokens, usage.output_tokens, usage.reasoning_tokens,
            input_cost=self._usd(usage.input_tokens, self.input_per_mtok),
            output_cost=self._usd(usage.output_tokens, self.output_per_mtok),
        )

    def total_cost(self, input_tokens: int, output_tokens: int = 0) -> float:
        """`cost(Usage(input_tokens=..., output_tokens=...)).total_cost`, without building the
        Usages (estimates price every line of a batch)."""
        return self._usd(input_tokens, self.input_per_mtok) + self._usd(output_tokens, self.output_per_mtok)

    def _usd(self, tokens: int, per_mtok: float) -> float:
        return round(tokens * per_mtok * ((1.0 - self.batch_discount) / 1_000_000), 10)


@dataclass(frozen=True)
class ResultError:
    """Why a line has no usable response (OpenAI output line `error`): a cancelled, expired or
    lost line, or a provider failure without an HTTP answer."""

    code: str
    message: str
    type: str = "provider_error"


@dataclass(frozen=True)
class LineOutcome:
    """One request line's final result, priced: what storage keeps and the API serves.

    `body` is the OpenAI-shaped response body for an HTTP answer (success or `{"error": ...}`)."""

    index: int
    custom_id: str
    status: ResultStatus
    status_code: int = 0
    body: dict[str, Any] | None = None
    error: ResultError | None = None
    usage: Usage = field(default_factory=Usage)
    request_id: str | None = None
