"""The built-in `sim` provider: no network, deterministic, plausible OpenAI-shaped answers.

It lets a new user (and the test suite) run whole batches with nothing configured. Output depends
only on the request, so two runs of a batch give the same bodies and usage:
- tokens in = words in the request's text (at least 1), tokens out = 8 for chat/completions/
  responses, 0 for embeddings;
- a request fails with a 500 `provider_error` body when its text contains `SIM_FAIL`, or when a
  stable hash of its `custom_id` falls under the configured failure rate.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from adapters.base import LineExecutor, LineResult, RequestLine, TokenUsage

FAIL_MARKER = "SIM_FAIL"
OUTPUT_TOKENS = 8
EMBEDDING_DIMENSIONS = 8


def _strings(value: Any) -> list[str]:
    """The text in a prompt, input or message list: strings, and the `content`/`text` of
    messages and content parts (not JSON keys, roles or part types)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for key in ("content", "text") for s in _strings(value.get(key))]
    return []


def _text_of(body: dict[str, Any]) -> str:
    """All text the request carries, wherever the endpoint puts it."""
    parts: list[str] = []
    for key in ("messages", "input", "prompt"):
        parts.extend(_strings(body.get(key)))
    return " ".join(parts)


def _unit(seed: str) -> float:
    """A stable number in [0, 1) from a string."""
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64


def _request_id(line: RequestLine) -> str:
    return "req_sim_" + hashlib.sha256(f"{line.custom_id}:{line.index}".encode()).hexdigest()[:20]


class SimProvider(LineExecutor):
    kind = "sim"

    def __init__(self, name: str = "sim", *, base_url: str = "", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        """Options: `latency_ms` per request (0), `failure_rate` in [0, 1] (0), `concurrency` (64)."""
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        self.latency_s = max(float(self.options.get("latency_ms", 0.0)), 0.0) / 1000
        self.failure_rate = float(self.options.get("failure_rate", 0.0))
        self.concurrency = int(self.options.get("concurrency", 64))
        # custom_id -> how many times this instance executed it, once a test sets a Counter here to
        # check "exactly once" (off by default: a long-running demo server keeps no per-line state).
        self.executions: Counter[str] | None = None

    async def execute(self, line: RequestLine) -> LineResult:
        if self.executions is not None:
            self.executions[line.custom_id] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        text = _text_of(line.body)
        request_id = _request_id(line)
        if FAIL_MARKER in text or _unit(line.custom_id) < self.failure_rate:
            return LineResult(
                index=line.index, status_code=500, request_id=request_id,
                body={"error": {"message": "The simulated provider failed this request.",
                                "type": "provider_error", "param": None, "code": "sim_failure"}},
            )
        input_tokens = max(len(text.split()), 1)
        output_tokens = 0 if line.url == "/v1/embeddings" else OUTPUT_TOKENS
        usage = TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
        body = _BODIES[line.url](line, text, usage, request_id)
        return LineResult(index=line.index, status_code=200, body=body, usage=usage, request_id=request_id)


def _answer(text: str) -> str:
    return "Simulated answer " + hashlib.sha256(text.encode()).hexdigest()[:8] + "."


def _chat(line: RequestLine, text: str, usage: TokenUsage, request_id: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + request_id[8:], "object": "chat.completion", "created": 1_700_000_000,
        "model": line.body.get("model", ""),
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": _answer(text), "refusal": None}}],
        "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                  "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }


def _completion(line: RequestLine, text: str, usage: TokenUsage, request_id: str) -> dict[str, Any]:
    return {
        "id": "cmpl-" + request_id[8:], "object": "text_completion", "created": 1_700_000_000,
        "model": line.body.get("model", ""),
        "choices": [{"index": 0, "text": _answer(text), "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                  "total_tokens": usage.total_tokens},
    }


def _embeddings(line: RequestLine, text: str, usage: TokenUsage, request_id: str) -> dict[str, Any]:
    raw = line.body.get("input", "")
    inputs = raw if isinstance(raw, list) else [raw]
    data = []
    for i, item in enumerate(inputs):
        digest = hashlib.sha256(json.dumps(item).encode()).digest()
        vector = [round(b / 255 * 2 - 1, 4) for b in digest[:EMBEDDING_DIMENSIONS]]
        data.append({"object": "embedding", "index": i, "embedding": vector})
    return {"object": "list", "data": data, "model": line.body.get("model", ""),
            "usage": {"prompt_tokens": usage.input_tokens, "total_tokens": usage.total_tokens}}


def _response(line: RequestLine, text: str, usage: TokenUsage, request_id: str) -> dict[str, Any]:
    return {
        "id": "resp_" + request_id[8:], "object": "response", "created_at": 1_700_000_000,
        "status": "completed", "model": line.body.get("model", ""),
        "output": [{"type": "message", "id": "msg_" + request_id[8:], "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": _answer(text), "annotations": []}]}],
        "usage": {"input_tokens": usage.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": usage.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": usage.total_tokens},
    }


_BODIES = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/embeddings": _embeddings,
    "/v1/responses": _response,
}
