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

import functools
import inspect
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

from adapters.errors import ProviderError as ProviderError  # re-exported: part of the port
from adapters.http import HttpClient

log = logging.getLogger(__name__)

LINE_ID_PREFIX = "sl-"


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


SUPPORTED_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses"})


@dataclass(frozen=True)
class Capabilities:
    """What one provider batch can hold. Intake checks every line against these when a batch is
    created, so a batch the provider cannot take is refused at once with the line at fault, instead
    of being accepted and failing at submit.

    `max_lines`/`max_bytes` are the provider's per-batch limits (None: no limit beyond Sluice's own);
    `finds_lost_submissions` says whether `find_submitted` can recognise a batch created before a
    crash (if not, a crash during create can leave a duplicate at the provider)."""

    endpoints: frozenset[str] = SUPPORTED_ENDPOINTS
    one_model_per_job: bool = False
    max_lines: int | None = None
    max_bytes: int | None = None
    finds_lost_submissions: bool = False


class CallObserver(Protocol):
    """Told about every call into a provider (metrics): which operation, how it ended (`ok`;
    `error_response` for a line the provider answered with an error; a `ProviderError`'s class,
    `retryable_error` or `error`; `exception` for anything else), how long it took."""

    def provider_call(self, provider: str, operation: str, outcome: str, seconds: float) -> None: ...


# The port's operations, observed by `Provider.observe_calls` (the name reported for each).
OBSERVED_OPERATIONS = {"execute": "execute", "submit": "submit", "find_submitted": "find_submitted",
                       "poll": "poll", "send_cancel": "cancel"}


def _call_outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, ProviderError):
        return "retryable_error" if exc.retryable else "error"
    return "exception"


class Provider(ABC):  # noqa: B024 - shared base of the two abstract kinds
    """Common ground: a name (as in `provider/model`), the one constructor every adapter takes
    (the providers file gives `base_url`, the key from `api_key_env`, and `options`), and the one
    HTTP-client lifecycle: created on first use from `headers()`/`query()`, closed by `aclose`."""

    kind: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, name: str, *, base_url: str = "", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.options: dict[str, Any] = dict(options or {})
        self._http: HttpClient | None = None

    def headers(self) -> dict[str, str]:
        """Headers on every request (credentials live only here, never in logs or errors)."""
        return {}

    def query(self) -> dict[str, str] | None:
        """Query parameters on every request (Azure's `api-version`)."""
        return None

    def new_http_client(self) -> HttpClient:
        return HttpClient(self.name, self.base_url, self.headers(), params=self.query())

    @property
    def http(self) -> HttpClient:
        """The provider's client, created on first use (and again after `aclose`)."""
        if self._http is None:
            self._http = self.new_http_client()
        return self._http

    def observe_calls(self, observer: CallObserver) -> None:
        """Report every call of this adapter's port operations (`execute`, `submit`, `find_submitted`,
        `poll`, `send_cancel` as `cancel`, and a whole `results` download) to `observer`, for every
        adapter at once and without the engine knowing. Wraps this instance's bound methods; a
        cancelled call (shutdown) is not reported. Called again, the new observer replaces the old."""
        for attr in (*OBSERVED_OPERATIONS, "results"):
            self.__dict__.pop(attr, None)  # the class's own methods again, if observed before
        for method, operation in OBSERVED_OPERATIONS.items():
            fn = getattr(self, method, None)
            if fn is not None and inspect.iscoroutinefunction(fn):
                setattr(self, method, _observed_call(fn, self.name, operation, observer))
        results = getattr(self, "results", None)
        if results is not None:
            setattr(self, "results", _observed_stream(results, self.name, "results", observer))  # noqa: B010

    async def aclose(self) -> None:
        """Release connections."""
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()


def _observed_call(fn: Callable[..., Awaitable[Any]], provider: str, operation: str,
                   observer: CallObserver) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def call(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            value = await fn(*args, **kwargs)
        except Exception as exc:
            observer.provider_call(provider, operation, _call_outcome(exc), time.monotonic() - started)
            raise
        # A line the provider answered with an error (LineResult not ok) is an answer, not a failure
        # of the call, but it is not an `ok` either.
        outcome = "error_response" if isinstance(value, LineResult) and not value.ok else "ok"
        observer.provider_call(provider, operation, outcome, time.monotonic() - started)
        return value
    return call


def _observed_stream(fn: Callable[..., AsyncIterator[Any]], provider: str, operation: str,
                     observer: CallObserver) -> Callable[..., AsyncIterator[Any]]:
    @functools.wraps(fn)
    async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        started = time.monotonic()
        try:
            async for item in fn(*args, **kwargs):
                yield item
        except Exception as exc:
            observer.provider_call(provider, operation, _call_outcome(exc), time.monotonic() - started)
            raise
        observer.provider_call(provider, operation, "ok", time.monotonic() - started)
    return stream


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
    async def send_cancel(self, provider_batch_id: str) -> None:
        """The provider's cancel call."""

    async def cancel(self, provider_batch_id: str) -> None:
        """Ask the provider to cancel; the engine waits for `poll` to confirm.

        The cancel race, written once for every adapter: a batch that ended (or is already
        cancelling) before the provider saw the cancel may refuse it with a 4xx. That is not a
        failure: the next poll says how it ended. Any other refusal is raised."""
        try:
            await self.send_cancel(provider_batch_id)
        except ProviderError as exc:
            if exc.retryable:
                raise
            state = await self.poll(provider_batch_id)
            if not (state.ended or state.status is ProviderState.CANCELLING):
                raise
            log.info("%s: cancel of %s refused (%s); it is already %s", self.name, provider_batch_id,
                     exc.message, state.raw_status)


class LineExecutor(Provider):
    """A provider without a batch API: Sluice runs each line itself."""

    concurrency: int = 8

    @abstractmethod
    async def execute(self, line: RequestLine) -> LineResult:
        """Run one request. Per-request HTTP failures are results (status_code >= 400), not
        exceptions; raise ProviderError(retryable=True) only for failures worth a retry."""
