"""The small interface between the engine and providers.

Two kinds of provider exist, and the engine drives each the way it works:

- `NativeBatchAdapter`: the provider has its own batch API (OpenAI, Anthropic, Gemini, ...).
  The engine submits all lines once, polls, fetches every result when the provider says the
  batch ended, and propagates cancels.
- `LineExecutor`: no batch API (the built-in `sim`, Ollama, vLLM, any OpenAI-compatible
  endpoint). The engine runs each line itself, with bounded concurrency, storing every result
  as it arrives.

Lines are identified towards providers by `provider_line_id(index)`, not by the caller's
`custom_id`: providers restrict ids (Anthropic `^[a-zA-Z0-9_-]{1,64}$`, Together 64 chars) and
Gemini inline results come back by position. Deriving the id from the line's index needs no
stored map and survives restarts; adapters return results by `index`.

Adapters raise `service.domain.errors.ProviderError` for provider failures (`retryable=True` for
429/5xx/timeouts, with `retry_after` when the provider said so); nothing else may escape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

LINE_ID_PREFIX = "sl-"


class ProviderError(Exception):
    """An upstream provider failed. `retryable` errors slow the engine down; others end the step.

    `message` is safe to store on a batch: it never carries credentials."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status_code: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status_code = status_code
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code


class ProviderState(StrEnum):
    """A native batch's state at the provider, in OpenAI's batch vocabulary (which Sluice's own
    statuses share, so the engine maps one onto the other by value)."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (ProviderState.COMPLETED, ProviderState.FAILED, ProviderState.EXPIRED,
                        ProviderState.CANCELLED)


@dataclass(frozen=True)
class TokenUsage:
    """Token counts of one request, normalised to OpenAI's batch usage (prices are the service's)."""

    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


def provider_line_id(index: int) -> str:
    return f"{LINE_ID_PREFIX}{index}"


def parse_line_id(line_id: str) -> int | None:
    """The index encoded by `provider_line_id`, or None for an id Sluice did not make."""
    if not line_id.startswith(LINE_ID_PREFIX):
        return None
    digits = line_id[len(LINE_ID_PREFIX):]
    return int(digits) if digits.isdigit() else None


@dataclass(frozen=True)
class RequestLine:
    """One request, as the engine hands it to a provider.

    `body["model"]` is already the provider's own model name (prefix stripped, alias resolved).
    """

    index: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineError:
    """A failure without a usable HTTP response (OpenAI output line `error`)."""

    code: str
    message: str
    type: str = "provider_error"


@dataclass(frozen=True)
class LineResult:
    """One request's outcome, normalised to OpenAI's batch output line.

    `body` is the OpenAI-shaped response body (chat.completion, embeddings list, response) for
    a success, or `{"error": {...}}` for a request the provider answered with an HTTP error.
    """

    index: int
    status_code: int
    body: dict[str, Any] | None = None
    error: LineError | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    request_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class BatchJob:
    """What a native adapter needs to know about the batch it submits."""

    batch_id: str  # Sluice's id: adapters pass it as idempotency key / provider metadata
    endpoint: str
    model: str  # the provider model of the lines (native batches are single-provider)
    completion_window: str
    line_count: int


@dataclass(frozen=True)
class BatchErrorItem:
    code: str
    message: str
    line: int | None = None
    param: str | None = None


@dataclass(frozen=True)
class ProviderStatus:
    """A native batch's state at the provider, mapped to Sluice's statuses."""

    status: ProviderState
    raw_status: str
    total: int | None = None
    completed: int | None = None
    failed: int | None = None
    errors: tuple[BatchErrorItem, ...] = ()

    @property
    def ended(self) -> bool:
        return self.status.ended


class Provider(ABC):  # noqa: B024 - shared base of the two abstract kinds
    """Common ground: a name (as in `provider/model`) and a way to release connections."""

    kind: str = ""

    def __init__(self, name: str) -> None:
        self.name = name

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections (HTTP clients)."""


class NativeBatchAdapter(Provider):
    """A provider with its own batch API. Every method must be safe to call again after a crash."""

    @abstractmethod
    async def submit(self, job: BatchJob, lines: AsyncIterable[RequestLine]) -> str:
        """Create the batch at the provider and return its id. Called at most once per batch
        unless `find_submitted` said the provider never got it."""

    async def find_submitted(self, batch_id: str, job: BatchJob | None = None,
                             since: int | None = None) -> str | None:
        """After a crash between 'about to submit' and 'submitted': the provider batch created
        for Sluice's `batch_id`, if any, so it is not submitted twice. `job` is the batch as it
        would be submitted (line count, endpoint, model) and `since` when Sluice last started
        submitting it (unix seconds), for providers that can only recognise a batch by its shape
        and creation time (Anthropic). Default: cannot tell."""
        return None

    @abstractmethod
    async def poll(self, provider_batch_id: str) -> ProviderStatus:
        """The provider's current status and counts."""

    @abstractmethod
    def results(self, provider_batch_id: str) -> AsyncIterator[LineResult]:
        """Every result of an ended batch, success and failure alike, by line index."""

    @abstractmethod
    async def cancel(self, provider_batch_id: str) -> None:
        """Ask the provider to cancel; the engine waits for `poll` to confirm."""


class LineExecutor(Provider):
    """A provider without a batch API: Sluice runs each line itself."""

    concurrency: int = 8

    @abstractmethod
    async def execute(self, line: RequestLine) -> LineResult:
        """Run one request. Per-request HTTP failures are results (status_code >= 400), not
        exceptions; raise ProviderError(retryable=True) only for failures worth a retry."""
