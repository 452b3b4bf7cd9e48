"""Chat-format pieces shared by the native adapters that do not speak OpenAI on the wire
(Anthropic, Gemini; Mistral uses the OpenAI line shapes of `adapters.openai_format`):

- reading OpenAI chat requests: message text and parts, data URLs, tool-call arguments, `stop`,
  `max_tokens`, and the `UnsupportedRequest` they raise for what a provider cannot express;
- `chat.completion` assembly (message, tool calls, OpenAI `usage` block), so every adapter
  returns the same OpenAI body for the same answer;
- OpenAI-shaped error bodies, HTTP statuses for google.rpc codes;
- a JSON body streamed from a JSONL spool (`json_array_body`), for providers that take the
  requests inline in one JSON document.

Usage normalisation, JSONL spooling and streaming live in `adapters.openai_format` and are reused.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import IO, Any

from adapters.base import ProviderError, TokenUsage

CHUNK_BYTES = 256 * 1024
CHAT_ENDPOINT = "/v1/chat/completions"
EMBEDDINGS_ENDPOINT = "/v1/embeddings"
ChunkFactory = Callable[[], AsyncIterator[bytes]]


class UnsupportedRequest(ValueError):
    """A request the provider cannot express. Adapters turn it into a non-retryable submit error
    naming the line, so the batch fails with a clear `errors` entry rather than half-running."""


def submit_error(provider: str, index: int, custom_id: str, problem: str) -> ProviderError:
    return ProviderError(f"line {index} (custom_id {custom_id!r}): {problem}", provider=provider,
                         retryable=False, code="unsupported_request")


# --- reading OpenAI chat requests -------------------------------------------------------------


def content_text(content: Any) -> str:
    """The text of an OpenAI message `content` (string, or a list of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content
                       if not isinstance(p, dict) or p.get("type", "text") in ("text", "input_text"))
    return str(content)


def content_parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI `content` as a list of parts (`{"type": "text", ...}`, `{"type": "image_url", ...}`)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [p if isinstance(p, dict) else {"type": "text", "text": str(p)} for p in content]
    return [{"type": "text", "text": str(content)}]


def image_url_of(part: dict[str, Any]) -> str:
    raw = part.get("image_url")
    url = raw.get("url") if isinstance(raw, dict) else raw
    if not isinstance(url, str) or not url:
        raise UnsupportedRequest("an image_url part has no url")
    return url


def parse_data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:<type>;base64,<data>` URL, else None."""
    if not url.startswith("data:"):
        return None
    head, sep, data = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise UnsupportedRequest("only base64 data URLs are supported for images")
    return head[: -len(";base64")] or "application/octet-stream", data


def tool_arguments(raw: Any) -> dict[str, Any]:
    """An OpenAI tool call's `function.arguments` (a JSON string) as an object."""
    if isinstance(raw, dict):
        return raw
    if raw in (None, ""):
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        raise UnsupportedRequest("a tool call's function.arguments is not valid JSON") from None
    if not isinstance(value, dict):
        raise UnsupportedRequest("a tool call's function.arguments must be a JSON object")
    return value


def function_of(tool: Any, provider: str) -> dict[str, Any]:
    """The `function` of an OpenAI tool: the only kind of tool the other providers take."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(
            tool.get("function"), dict):
        raise UnsupportedRequest(f"only tools of type 'function' are supported by {provider}")
    fn: dict[str, Any] = tool["function"]
    return fn


def append_turn(turns: list[dict[str, Any]], role: str, items: list[dict[str, Any]], key: str) -> None:
    """Add a turn's items (`key`: `content` blocks or `parts`), merging with the previous turn of
    the same role: Anthropic and Gemini want roles to alternate, OpenAI chats need not."""
    if not items:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(items)
    else:
        turns.append({"role": role, key: items})


def stop_list(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise UnsupportedRequest("stop must be a string or a list of strings")


def max_output_tokens(body: dict[str, Any]) -> int | None:
    value = body.get("max_completion_tokens", body.get("max_tokens"))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedRequest("max_tokens / max_completion_tokens must be a positive integer")
    return value


def reject_n(body: dict[str, Any], provider: str) -> None:
    n = body.get("n")
    if n not in (None, 1):
        raise UnsupportedRequest(f"n={n} is not supported by {provider} (one choice per request)")


# --- usage and chat.completion assembly ---------------------------------------------------------


def usage_block(usage: TokenUsage) -> dict[str, Any]:
    """An OpenAI chat `usage` object."""
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}}


def assistant_message(text: str | None, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text if (text or not tool_calls) else None,
                               "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def tool_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {})
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def chat_completion(completion_id: str, model: str, choices: list[dict[str, Any]], usage: TokenUsage,
                    created: int | None = None) -> dict[str, Any]:
    """A `chat.completion` body; `choices` are `{message, finish_reason}` (index added here)."""
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": i, "message": c["message"], "finish_reason": c["finish_reason"], "logprobs": None}
                    for i, c in enumerate(choices)],
        "usage": usage_block(usage),
    }


def openai_error(message: str, type_: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# google.rpc.Code -> HTTP status (google/rpc/code.proto)
GRPC_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
             11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
GRPC_NAMES = {1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
              6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
              10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
              15: "DATA_LOSS", 16: "UNAUTHENTICATED"}


# --- JSONL plumbing -----------------------------------------------------------------------------


def json_array_body(spool: IO[bytes], head: bytes, tail: bytes,
                    transform: Callable[[bytes], bytes] | None = None) -> tuple[int, ChunkFactory]:
    """A JSON document `head + line1,line2,... + tail` made from a JSONL spool without loading it:
    returns its size (for Content-Length) and a factory of async chunk iterators (one per attempt)."""

    def pieces() -> Iterator[bytes]:
        spool.seek(0)
        yield head
        first = True
        buffer: list[bytes] = []
        size = 0
        for raw in spool:
            line = raw.rstrip(b"\n")
            if not line:
                continue
            if transform is not None:
                line = transform(line)
            buffer.append(line if first else b"," + line)
            size += len(line) + 1
            first = False
            if size >= CHUNK_BYTES:
                yield b"".join(buffer)
                buffer, size = [], 0
        buffer.append(tail)
        yield b"".join(buffer)

    total = sum(len(piece) for piece in pieces())

    async def chunks() -> AsyncIterator[bytes]:
        for piece in pieces():
            yield piece

    return total, chunks
