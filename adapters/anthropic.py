"""Anthropic Message Batches (`/v1/messages/batches`).

Requests go inline in one JSON body `{"requests": [{custom_id, params}]}`: the body is built on a
spool (memory, then a temporary file) one line at a time and uploaded from there, so a large
batch is never held as Python objects. OpenAI chat bodies are translated to Messages params
(system messages → `system`, required `max_tokens`, tools, tool_choice, stop sequences) and
Messages back to `chat.completion` bodies. The params are checked against the official SDK's
types (anthropic 2.14.0, `BatchCreateParams`): that SDK declares no sampling parameters
(`temperature`, `top_p`, `top_k` are gone from the Messages API since SDK 1.0), so an OpenAI
body's `temperature`/`top_p` are dropped rather than sent to be refused. The `anthropic-version`
header is the one that SDK sends (option `anthropic_version` overrides it).

Status: `in_progress` → in_progress, `canceling` → cancelling, `ended` → cancelled when a cancel
was initiated, expired when every request expired, completed otherwise. Request counts other
than `processing` are 0 until the batch ends (the provider's own behaviour).

Anthropic is eventually consistent right after a create: a GET can answer 404 for a moment. A
404 within `options.not_found_grace_seconds` (default 60) of this process submitting the batch,
or one of the first `options.not_found_retries` (default 3) 404s for a batch this process did
not submit (after a restart), is retryable; later 404s are real and fail the batch.

Lost submissions (`find_submitted`). Anthropic batches carry no metadata or name, the create call
takes no idempotency key, and a batch's requests can be read back only once it has ended (its
results). What the API does allow: listing batches (newest first, with `created_at` and
`request_counts`) and reading an ended batch's results. So each request's `custom_id` carries a
tag of Sluice's batch id (`sl-<index>-<tag>`, tag = 12 hex digits of SHA-256 of the id), and after a
crash during submit Sluice lists the batches created since it started submitting (less
`options.find_skew_seconds`, default 120, for clock skew) with exactly the batch's request count:
- an ended candidate whose results carry the tag is the lost submission: it is adopted;
- a candidate still in progress cannot be told apart from another batch of the same size, so the
  answer is a retryable "not decided yet" error (the engine backs off and asks again) until every
  such candidate has ended, rather than adopting a stranger or creating a duplicate;
- no candidate (left): the create never reached Anthropic, and Sluice submits.
The remaining cost is time, not money or correctness: a recovered batch waits while a same-size
batch created after its submit started is still running (at most Anthropic's 24 h expiry). Lost
submissions older than `options.find_pages` (default 10) pages of 100 batches are not found.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Any

from adapters.base import (
    BatchJob,
    Capabilities,
    LineError,
    LineResult,
    NativeBatchAdapter,
    ProviderError,
    ProviderState,
    ProviderStatus,
    RequestLine,
    TokenUsage,
    provider_line_id,
)
from adapters.chat_format import (
    CHAT_ENDPOINT,
    UnsupportedRequest,
    append_turn,
    assistant_message,
    chat_completion,
    content_parts,
    content_text,
    function_of,
    image_url_of,
    json_array_body,
    max_output_tokens,
    openai_error,
    parse_data_url,
    reject_n,
    stop_list,
    submit_error,
    tool_arguments,
    tool_call,
)
from adapters.openai_format import as_int, iter_jsonl, spool_jsonl

log = logging.getLogger(__name__)

API_VERSION = "2026-10-21"  # what the official SDK the adapter is checked against sends (anthropic 2.14.0)
BATCHES = "/v1/messages/batches"
DEFAULT_MAX_TOKENS = 4096

# Anthropic error type -> HTTP status (the Errors page of Anthropic's API docs, platform.claude.com)
ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429, "api_error": 500,
    "timeout_error": 504, "overloaded_error": 529,
}
CUSTOM_ID = re.compile(r"^sl-(\d+)(?:-([0-9a-f]+))?$")


def batch_tag(batch_id: str) -> str:
    """12 hex digits naming a Sluice batch inside Anthropic's custom_ids (`^[a-zA-Z0-9_-]{1,64}$`)."""
    return hashlib.sha256(batch_id.encode()).hexdigest()[:12]


def custom_id(index: int, batch_id: str) -> str:
    return f"{provider_line_id(index)}-{batch_tag(batch_id)}"


def parse_custom_id(value: Any) -> tuple[int, str | None] | None:
    """(line index, batch tag or None for the untagged `sl-<index>` of older submissions)."""
    m = CUSTOM_ID.match(value) if isinstance(value, str) else None
    return (int(m.group(1)), m.group(2)) if m else None


def _epoch(value: Any) -> float | None:
    try:
        return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


FINISH_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "pause_turn": "stop", "refusal": "content_filter", "model_context_window_exceeded": "length",
}


# --- OpenAI chat -> Messages params ---------------------------------------------------------------


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in content_parts(content):
        kind = part.get("type", "text")
        if kind in ("text", "input_text"):
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = image_url_of(part)
            data = parse_data_url(url)
            source = ({"type": "base64", "media_type": data[0], "data": data[1]} if data
                      else {"type": "url", "url": url})
            blocks.append({"type": "image", "source": source})
        else:
            raise UnsupportedRequest(f"message content part of type {kind!r} is not supported by Anthropic")
    return blocks


def _tool(tool: Any) -> dict[str, Any]:
    fn = function_of(tool, "Anthropic")
    out: dict[str, Any] = {"name": fn.get("name"),
                           "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if fn.get("description"):
        out["description"] = fn["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any]
    if choice is None:
        if parallel is False:
            return {"type": "auto", "disable_parallel_tool_use": True}
        return None
    if choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise UnsupportedRequest(f"tool_choice {choice!r} is not supported by Anthropic")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def to_messages_params(body: dict[str, Any], default_max_tokens: int = DEFAULT_MAX_TOKENS) -> dict[str, Any]:
    """An OpenAI chat.completions body as Anthropic Messages create params (raises
    `UnsupportedRequest` for what Anthropic cannot do)."""
    reject_n(body, "Anthropic")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
        raise UnsupportedRequest(f"response_format {fmt.get('type')!r} is not supported by the Anthropic adapter")
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise UnsupportedRequest("messages must be a non-empty list")
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for m in raw_messages:
        if not isinstance(m, dict):
            raise UnsupportedRequest("every message must be an object")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(content_text(m.get("content")))
        elif role == "user":
            append_turn(messages, "user", _user_blocks(m.get("content")), "content")
        elif role == "assistant":
            blocks: list[dict[str, Any]] = []
            text = content_text(m.get("content"))
            if text:
                blocks.append({"type": "text", "text": text})
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": tool_arguments(fn.get("arguments"))})
            append_turn(messages, "assistant", blocks, "content")
        elif role == "tool":
            append_turn(messages, "user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                                        "content": content_text(m.get("content"))}], "content")
        else:
            raise UnsupportedRequest(f"message role {role!r} is not supported by Anthropic")
    params: dict[str, Any] = {"model": body.get("model"), "max_tokens": max_output_tokens(body) or default_max_tokens,
                              "messages": messages}
    if system:
        params["system"] = "\n\n".join(system)
    stops = stop_list(body.get("stop"))
    if stops:
        params["stop_sequences"] = stops
    if body.get("tools"):
        params["tools"] = [_tool(t) for t in body["tools"]]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and body.get("tools"):
        params["tool_choice"] = choice
    if isinstance(body.get("user"), str):
        params["metadata"] = {"user_id": body["user"]}
    return params


# --- Message -> chat.completion -------------------------------------------------------------------


def usage_of(raw: Any) -> TokenUsage:
    """Messages usage → OpenAI semantics (Anthropic's prompt caching docs): `input_tokens` excludes
    cache reads and writes, so prompt = input + cache_creation + cache_read and cached = cache_read."""
    raw = raw if isinstance(raw, dict) else {}
    cache_read = as_int(raw.get("cache_read_input_tokens"))
    prompt = as_int(raw.get("input_tokens")) + as_int(raw.get("cache_creation_input_tokens")) + cache_read
    return TokenUsage(input_tokens=prompt, cached_tokens=cache_read, output_tokens=as_int(raw.get("output_tokens")))


def to_chat_completion(message: dict[str, Any]) -> tuple[dict[str, Any], TokenUsage]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append(tool_call(str(block.get("id")), str(block.get("name")), block.get("input")))
        # thinking / redacted_thinking / server tool blocks have no chat.completion equivalent
    finish = FINISH_REASONS.get(str(message.get("stop_reason")), "stop")
    if calls and finish == "stop":
        finish = "tool_calls"
    usage = usage_of(message.get("usage"))
    body = chat_completion(str(message.get("id", "")), str(message.get("model", "")),
                           [{"message": assistant_message("".join(texts) or None, calls), "finish_reason": finish}],
                           usage)
    return body, usage


def to_line_result(index: int, result: dict[str, Any]) -> LineResult:
    """One `MessageBatchIndividualResponse.result` as a LineResult."""
    kind = result.get("type")
    if kind == "succeeded" and isinstance(result.get("message"), dict):
        body, usage = to_chat_completion(result["message"])
        return LineResult(index=index, status_code=200, body=body, usage=usage, request_id=body["id"] or None)
    if kind == "errored":
        envelope: dict[str, Any] = result["error"] if isinstance(result.get("error"), dict) else {}
        inner: dict[str, Any] = envelope["error"] if isinstance(envelope.get("error"), dict) else envelope
        error_type = str(inner.get("type") or "api_error")
        return LineResult(index=index, status_code=ERROR_STATUS.get(error_type, 500),
                          body=openai_error(str(inner.get("message") or "request failed"), error_type, error_type),
                          request_id=envelope.get("request_id"))
    if kind in ("canceled", "expired"):
        code = "batch_cancelled" if kind == "canceled" else "batch_expired"
        return LineResult(index=index, status_code=0, error=LineError(
            code=code, message=f"Anthropic {kind} this request before it ran.", type="batch_error"))
    return LineResult(index=index, status_code=0, error=LineError(
        code="provider_error", message=f"Anthropic returned a result of unknown type {kind!r}."))


def batch_status(batch: dict[str, Any]) -> ProviderStatus:
    raw = str(batch.get("processing_status"))
    counts = batch.get("request_counts") or {}
    succeeded, errored = as_int(counts.get("succeeded")), as_int(counts.get("errored"))
    canceled, expired = as_int(counts.get("canceled")), as_int(counts.get("expired"))
    total = as_int(counts.get("processing")) + succeeded + errored + canceled + expired
    if raw == "ended":
        if batch.get("cancel_initiated_at"):
            status = ProviderState.CANCELLED
        elif total and expired == total:
            status = ProviderState.EXPIRED
        else:
            status = ProviderState.COMPLETED
    elif raw == "canceling":
        status = ProviderState.CANCELLING
    else:
        status = ProviderState.IN_PROGRESS
    # failed = errored only: canceled/expired lines count as neither, as in the engine's own counts.
    return ProviderStatus(status=status, raw_status=raw, total=total, completed=succeeded, failed=errored)


class AnthropicAdapter(NativeBatchAdapter):
    kind = "anthropic"
    capabilities = Capabilities(endpoints=frozenset({CHAT_ENDPOINT}), max_lines=100_000, max_bytes=256 * 2**20,
                                finds_lost_submissions=True)  # by request count, time and a tag in custom_id

    def __init__(self, name: str, *, base_url: str = "https://api.anthropic.com", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        options = self.options
        self.default_max_tokens = int(options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
        self.not_found_grace = float(options.get("not_found_grace_seconds", 60.0))
        self.not_found_retries = int(options.get("not_found_retries", 3))
        self.find_skew = float(options.get("find_skew_seconds", 120.0))
        self.find_pages = int(options.get("find_pages", 10))
        self._submitted_at: dict[str, float] = {}  # provider id -> monotonic time we created it
        self._not_found: dict[str, int] = {}

    def headers(self) -> dict[str, str]:
        headers = {"x-api-key": self.api_key,
                   "anthropic-version": str(self.options.get("anthropic_version", API_VERSION))}
        if self.options.get("anthropic_beta"):
            headers["anthropic-beta"] = str(self.options["anthropic_beta"])
        return headers

    async def submit(self, job: BatchJob, lines: AsyncIterable[RequestLine]) -> str:
        def encode(line: RequestLine) -> dict[str, Any]:
            try:
                params = to_messages_params(line.body, self.default_max_tokens)
            except UnsupportedRequest as exc:
                raise submit_error(self.name, line.index, line.custom_id, str(exc)) from None
            return {"custom_id": custom_id(line.index, job.batch_id), "params": params}

        spool, count = await spool_jsonl(lines, encode)
        try:
            if not count:
                raise ProviderError(f"{self.name}: the batch has no requests", provider=self.name, retryable=False)
            size, chunks = json_array_body(spool, b'{"requests":[', b"]}")
            data = await self.http.json("POST", BATCHES, content=chunks(),
                                        headers={"content-type": "application/json", "content-length": str(size)})
        finally:
            spool.close()
        batch_id = str(data["id"])
        self._submitted_at[batch_id] = time.monotonic()
        return batch_id

    async def _get(self, provider_batch_id: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = await self.http.json("GET", f"{BATCHES}/{provider_batch_id}")
        except ProviderError as exc:
            if exc.status_code == 404 and self._young(provider_batch_id):
                raise ProviderError(f"{self.name}: batch {provider_batch_id} not visible yet (404 right after "
                                    "create)", provider=self.name, status_code=404, retryable=True,
                                    code="not_found_yet") from None
            raise
        self._submitted_at.pop(provider_batch_id, None)
        self._not_found.pop(provider_batch_id, None)
        return data

    def _young(self, provider_batch_id: str) -> bool:
        """Whether a 404 for this batch may still be Anthropic's eventual consistency."""
        created = self._submitted_at.get(provider_batch_id)
        if created is not None:
            return time.monotonic() - created < self.not_found_grace
        seen = self._not_found.get(provider_batch_id, 0) + 1
        self._not_found[provider_batch_id] = seen
        return seen <= self.not_found_retries

    async def poll(self, provider_batch_id: str) -> ProviderStatus:
        return batch_status(await self._get(provider_batch_id))

    async def results(self, provider_batch_id: str) -> AsyncIterator[LineResult]:
        batch = await self._get(provider_batch_id)
        url = batch.get("results_url")
        if not url:
            raise ProviderError(f"{self.name}: batch {provider_batch_id} has no results_url yet",
                                provider=self.name, retryable=True, code="results_not_ready")
        async for row in iter_jsonl(self.http, str(url)):
            if not isinstance(row, dict):
                continue
            parsed = parse_custom_id(row.get("custom_id"))
            result = row.get("result")
            if parsed is None or not isinstance(result, dict):
                log.warning("%s: ignoring a result line for unknown custom_id %r", self.name, row.get("custom_id"))
                continue
            yield to_line_result(parsed[0], result)

    async def find_submitted(self, batch_id: str, job: BatchJob | None = None,
                             since: int | None = None) -> str | None:
        """The batch a crashed submit created, told by request count, creation time and (once it
        has ended) the batch tag in its results' custom_ids; see the module docstring."""
        if job is None or since is None:
            return None
        earliest = since - self.find_skew
        undecided: list[str] = []
        async for batch in self._batches_since(earliest):
            counts = batch.get("request_counts")
            total = sum(as_int(v) for v in counts.values()) if isinstance(counts, Mapping) else -1
            if total != job.line_count or not batch.get("id"):
                continue
            if batch.get("processing_status") != "ended":
                undecided.append(str(batch["id"]))
            elif await self._tagged(batch, batch_tag(batch_id)):
                return str(batch["id"])
        if undecided:
            raise ProviderError(
                f"{self.name}: cannot tell yet whether batch {batch_id} was created before the crash: "
                f"{', '.join(undecided)} (same request count, created since the submit started) must end "
                "first", provider=self.name, retryable=True, code="submission_undecided")
        return None

    async def _batches_since(self, earliest: float) -> AsyncIterator[Mapping[str, Any]]:
        """Batches created at or after `earliest` (unix seconds), newest first, for `find_pages` pages."""
        after: str | None = None
        for _ in range(self.find_pages):
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after_id"] = after
            page = await self.http.json("GET", BATCHES, params=params)
            data = page.get("data") if isinstance(page, Mapping) else None
            if not isinstance(data, list) or not data:
                return
            for batch in data:
                if not isinstance(batch, Mapping):
                    continue
                created = _epoch(batch.get("created_at"))
                if created is not None and created < earliest:
                    return
                yield batch
            last = page.get("last_id") or data[-1].get("id")
            if not page.get("has_more") or not last:
                return
            after = str(last)

    async def _tagged(self, batch: Mapping[str, Any], tag: str) -> bool:
        """Whether an ended batch's results carry Sluice batch `tag` (its first result line tells)."""
        url = batch.get("results_url")
        if not url:
            return False
        async with contextlib.aclosing(iter_jsonl(self.http, str(url))) as rows:
            async for row in rows:
                parsed = parse_custom_id(row.get("custom_id") if isinstance(row, Mapping) else None)
                return parsed is not None and parsed[1] == tag
        return False

    async def send_cancel(self, provider_batch_id: str) -> None:
        await self.http.json("POST", f"{BATCHES}/{provider_batch_id}/cancel")


__all__ = ["AnthropicAdapter", "batch_status", "to_chat_completion", "to_line_result",
           "to_messages_params", "usage_of"]
