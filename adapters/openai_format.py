"""OpenAI-shaped wire formats shared by every adapter that speaks them (OpenAI, Azure, Groq,
Together, OpenAI-compatible executors): usage normalisation, batch output line → `LineResult`,
batch status maps, batch `errors` lists, JSONL spooling and streaming.

No provider specifics here beyond the status tables; everything is pure and unit-tested, except the
two I/O helpers at the bottom (spool a JSONL body to a temporary file, stream a JSONL response).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import IO, Any

from adapters.base import (
    BatchErrorItem,
    LineError,
    LineResult,
    ProviderState,
    ProviderStatus,
    RequestLine,
    TokenUsage,
    parse_line_id,
    provider_line_id,
)
from adapters.http import HttpClient

log = logging.getLogger(__name__)

# Lines are spooled in memory up to this size, then to a temporary file on disk.
SPOOL_MAX_MEMORY = 8 * 1024 * 1024
# Codes of the top-level `error` of an output line that mean "the batch ended before this ran".
BATCH_END_CODES = frozenset({"batch_expired", "batch_cancelled"})

# --------------------------------------------------------------------------- statuses

# OpenAI, Groq and Azure (lower-cased first: older Azure previews say "Validating").
OPENAI_STATUSES: dict[str, ProviderState] = {s.value: s for s in ProviderState} | {
    "canceling": ProviderState.CANCELLING,
    "canceled": ProviderState.CANCELLED,
}

# Together: UPPERCASE, no `finalizing`, legacy `CANCELING`.
TOGETHER_STATUSES: dict[str, ProviderState] = {
    "VALIDATING": ProviderState.VALIDATING,
    "IN_PROGRESS": ProviderState.IN_PROGRESS,
    "COMPLETED": ProviderState.COMPLETED,
    "FAILED": ProviderState.FAILED,
    "EXPIRED": ProviderState.EXPIRED,
    "CANCELLING": ProviderState.CANCELLING,
    "CANCELING": ProviderState.CANCELLING,
    "CANCELLED": ProviderState.CANCELLED,
    "CANCELED": ProviderState.CANCELLED,
}


def map_status(raw: Any, table: Mapping[str, ProviderState], *,
               fold: Callable[[str], str] = str.lower) -> ProviderState:
    """A provider status through `table` after case folding. An unknown value is logged and read
    as `in_progress`: the engine keeps polling rather than ending a batch on a word it can't read."""
    key = fold(str(raw or "").strip())
    status = table.get(key)
    if status is None:
        log.warning("unknown provider batch status %r; treating it as in_progress", raw)
        return ProviderState.IN_PROGRESS
    return status


def openai_status(raw: Any) -> ProviderState:
    return map_status(raw, OPENAI_STATUSES)


def together_status(raw: Any) -> ProviderState:
    return map_status(raw, TOGETHER_STATUSES, fold=str.upper)


# --------------------------------------------------------------------------- numbers and usage


def as_int(value: Any) -> int:
    """A token count from JSON: ints, floats, numeric strings (int64 as string); anything else 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0)
    if isinstance(value, str):
        try:
            return max(int(float(value)), 0)
        except ValueError:
            return 0
    return 0


def opt_int(value: Any) -> int | None:
    return None if value is None else as_int(value)


def _detail(usage: Mapping[str, Any], key: str, field: str) -> int:
    details = usage.get(key)
    return as_int(details.get(field)) if isinstance(details, Mapping) else 0


def usage_from_openai(usage: Any) -> TokenUsage:
    """OpenAI `usage` of any endpoint → `Usage` (fields as OpenAI's API reference names them per endpoint).

    - chat / completions: `prompt_tokens`, `completion_tokens` (reasoning included),
      `prompt_tokens_details.cached_tokens`, `completion_tokens_details.reasoning_tokens`;
    - responses (and `Batch.usage`): `input_tokens`, `output_tokens`, `input_tokens_details.cached_tokens`,
      `output_tokens_details.reasoning_tokens`;
    - embeddings: `prompt_tokens` only (output 0).
    """
    if not isinstance(usage, Mapping):
        return TokenUsage()
    if "input_tokens" in usage or "output_tokens" in usage:
        return TokenUsage(input_tokens=as_int(usage.get("input_tokens")),
                     cached_tokens=_detail(usage, "input_tokens_details", "cached_tokens"),
                     output_tokens=as_int(usage.get("output_tokens")),
                     reasoning_tokens=_detail(usage, "output_tokens_details", "reasoning_tokens"))
    return TokenUsage(input_tokens=as_int(usage.get("prompt_tokens")),
                 cached_tokens=_detail(usage, "prompt_tokens_details", "cached_tokens"),
                 output_tokens=as_int(usage.get("completion_tokens")),
                 reasoning_tokens=_detail(usage, "completion_tokens_details", "reasoning_tokens"))


def usage_of_body(body: Any) -> TokenUsage:
    return usage_from_openai(body.get("usage")) if isinstance(body, Mapping) else TokenUsage()


# --------------------------------------------------------------------------- errors


def line_error(raw: Any, default_code: str = "provider_error") -> LineError:
    """An output line's top-level `error`: `{code, message}` (OpenAI), or a plain string (vLLM)."""
    if isinstance(raw, Mapping):
        inner = raw.get("error")
        if isinstance(inner, Mapping):  # an {"error": {...}} envelope in the error slot
            raw = inner
        code = str(raw.get("code") or raw.get("type") or default_code)
        message = str(raw.get("message") or code)
    else:
        code, message = default_code, str(raw)
    kind = "batch_error" if code in BATCH_END_CODES else "provider_error"
    return LineError(code=code, message=message, type=kind)


def error_body(body: Any, status_code: int) -> dict[str, Any]:
    """A failed request's body as OpenAI's `{"error": {...}}`, whatever the provider sent."""
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        return dict(body)
    if isinstance(body, Mapping) and body:
        message = str(body.get("message") or body.get("detail") or json.dumps(body)[:500])
    elif isinstance(body, str) and body:
        message = body[:2000]
    else:
        message = f"The provider answered HTTP {status_code}."
    return {"error": {"message": message, "type": "provider_error", "param": None, "code": str(status_code)}}


def _line_number(value: Any) -> int | None:
    """A batch error's `line`: an integer (OpenAI), or a numeric string (Azure 2024-10-21 types it string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def batch_errors(raw: Any) -> tuple[BatchErrorItem, ...]:
    """A batch's `errors` → error items, in every documented shape:

    - OpenAI `Batch.errors`: `{object, data: [{code, message, param, line}]}` (or a bare list of those);
    - Azure OpenAI 2024-10-21 `BatchErrors`: `{object, data: {code, message, param, line}}`, `data` ONE
      object and `line` a string;
    - Mistral `[{message, count}]`; Together's plain-string `error`.
    """
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (BatchErrorItem(code="provider_error", message=raw),) if raw else ()
    items = raw.get("data") if isinstance(raw, Mapping) else raw
    if isinstance(items, Mapping):
        items = [items]
    if not isinstance(items, list):
        return ()
    out = []
    for item in items:
        if isinstance(item, Mapping):
            out.append(BatchErrorItem(code=str(item.get("code") or "provider_error"),
                                      message=str(item.get("message") or item.get("code") or ""),
                                      line=_line_number(item.get("line")),
                                      param=str(item["param"]) if item.get("param") is not None else None))
        elif item:
            out.append(BatchErrorItem(code="provider_error", message=str(item)))
    return tuple(out)


def openai_batch_status(batch: Mapping[str, Any]) -> ProviderStatus:
    """An OpenAI/Azure/Groq `Batch` object → `ProviderStatus` (status, request_counts, errors)."""
    raw = batch.get("status")
    counts = batch.get("request_counts")
    counts = counts if isinstance(counts, Mapping) else {}
    return ProviderStatus(status=openai_status(raw), raw_status=str(raw), total=opt_int(counts.get("total")),
                          completed=opt_int(counts.get("completed")), failed=opt_int(counts.get("failed")),
                          errors=batch_errors(batch.get("errors")))


def together_job_status(job: Mapping[str, Any]) -> ProviderStatus:
    """A Together batch job → `ProviderStatus`. Together exposes no per-request counts (only
    `progress`), so the counts stay unknown; a failed job carries a plain-string `error`."""
    raw = job.get("status")
    return ProviderStatus(status=together_status(raw), raw_status=str(raw), errors=batch_errors(job.get("error")))


# --------------------------------------------------------------------------- output lines


def result_from_output_line(obj: Any) -> LineResult | None:
    """One OpenAI batch output/error line `{id, custom_id, response:{status_code, request_id, body},
    error}` → `LineResult` by index; None for a line whose `custom_id` Sluice did not make."""
    if not isinstance(obj, Mapping):
        return None
    custom_id = obj.get("custom_id")
    index = parse_line_id(custom_id) if isinstance(custom_id, str) else None
    if index is None:
        log.warning("provider output line with an unknown custom_id %r; ignored", custom_id)
        return None
    response = obj.get("response")
    raw_error = obj.get("error")
    if isinstance(response, Mapping):
        status_code = as_int(response.get("status_code"))
        body = response.get("body")
        request_id = response.get("request_id")
        request_id = str(request_id) if request_id else None
        error = line_error(raw_error) if raw_error else None
        if 200 <= status_code < 300 and isinstance(body, Mapping):
            return LineResult(index=index, status_code=status_code, body=dict(body), error=error,
                              usage=usage_of_body(body), request_id=request_id)
        if status_code < 400 and error is None:  # a 2xx without a usable body, or no status at all
            error = LineError(code="invalid_provider_response",
                              message=f"The provider returned status {status_code} without a response body.")
        return LineResult(index=index, status_code=status_code,
                          body=error_body(body, status_code) if status_code >= 400 else None,
                          error=error, request_id=request_id)
    return LineResult(index=index, status_code=0,
                      error=line_error(raw_error or {"code": "missing_response",
                                                     "message": "The provider returned neither a response "
                                                                "nor an error for this request."}))


# --------------------------------------------------------------------------- JSONL I/O


def openai_input_line(line: RequestLine, url: str | None = None) -> dict[str, Any]:
    """OpenAI `BatchRequestInput` for one line, with Sluice's index-derived custom_id."""
    return {"custom_id": provider_line_id(line.index), "method": "POST", "url": url or line.url, "body": line.body}


async def spool_jsonl(lines: AsyncIterable[RequestLine], encode: Callable[[RequestLine], dict[str, Any]],
                      check: Callable[[RequestLine], None] | None = None) -> tuple[IO[bytes], int]:
    """Write the lines as JSONL into a SpooledTemporaryFile (memory up to `SPOOL_MAX_MEMORY`, then
    disk) and rewind it. Returns the file (the caller closes it) and the number of lines."""
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_MEMORY, mode="w+b")
    count = 0
    try:
        chunk: list[bytes] = []
        size = 0
        async for line in lines:
            if check is not None:
                check(line)
            data = json.dumps(encode(line), separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
            chunk.append(data)
            size += len(data)
            count += 1
            if size >= 256 * 1024:
                spool.write(b"".join(chunk))
                chunk, size = [], 0
        spool.write(b"".join(chunk))
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool, count


async def iter_jsonl(http: HttpClient, url: str, **kwargs: Any) -> AsyncGenerator[Any, None]:
    """Parsed objects of a JSONL download, line by line. Blank lines (a zero-byte file included)
    yield nothing; a line that is not JSON is logged and skipped."""
    async with http.stream("GET", url, **kwargs) as response:
        async for text in response.aiter_lines():
            if not text.strip():
                continue
            try:
                yield json.loads(text)
            except json.JSONDecodeError:
                log.warning("%s: skipped an output line that is not JSON: %.200s", http.provider, text)


async def results_from_files(http: HttpClient, file_ids: Iterable[Any]) -> AsyncIterator[LineResult]:
    """Every result in a provider's OpenAI-format output and error files (either may be absent)."""
    for file_id in file_ids:
        if not file_id:
            continue
        async for obj in iter_jsonl(http, f"/files/{file_id}/content"):
            result = result_from_output_line(obj)
            if result is not None:
                yield result
