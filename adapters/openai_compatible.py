"""`OpenAICompatibleExecutor`: Ollama, vLLM (`vllm serve`) or any OpenAI-compatible endpoint without
a batch API. Sluice runs each line itself; the engine bounds concurrency and retries.

Each line's body is POSTed to `{base_url}{url}`, where a `/v1` the base URL already ends with is not
repeated (`http://host:11434/v1` + `/v1/chat/completions` → `http://host:11434/v1/chat/completions`).

- 2xx: a completed result with the body, its normalised usage and the `x-request-id` if any;
- other 4xx: a failed result carrying the provider's body as `{"error": {...}}` (the request itself
  is wrong; retrying would not help);
- 408/425/429, 5xx, timeouts, unreachable: `ProviderError(retryable=True)` with `Retry-After`, so the
  engine backs off and tries again.

Options: `concurrency` (default 8), `timeout` (seconds per request, default 600), `headers` (extra).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx

from adapters.base import LineError, LineExecutor, LineResult, RequestLine
from adapters.http import RETRYABLE, HttpClient
from adapters.openai_format import error_body, usage_of_body

DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT_SECONDS = 600.0


class _LineClient(HttpClient):
    """`HttpClient` that raises only for retryable statuses: a per-request 4xx is a result."""

    def raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code in RETRYABLE or response.status_code >= 500:
            super().raise_for_status(response)


def request_path(base_url: str, url: str) -> str:
    """The path to POST to, relative to `base_url`, without a doubled `/v1`."""
    if base_url.rstrip("/").endswith("/v1") and url.startswith("/v1/"):
        return url[len("/v1"):]
    return url


class OpenAICompatibleExecutor(LineExecutor):
    kind = "openai_compatible"

    def __init__(self, name: str, *, base_url: str = "", api_key: str = "",
                 options: Mapping[str, Any] | None = None) -> None:
        super().__init__(name, base_url=base_url, api_key=api_key, options=options)
        self.concurrency = max(int(self.options.get("concurrency", DEFAULT_CONCURRENCY)), 1)
        self.timeout = float(self.options.get("timeout", DEFAULT_TIMEOUT_SECONDS))

    def headers(self) -> dict[str, str]:
        headers = {str(k): str(v) for k, v in (self.options.get("headers") or {}).items()}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def new_http_client(self) -> HttpClient:
        return _LineClient(self.name, self.base_url, self.headers(),
                           timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)))

    async def execute(self, line: RequestLine) -> LineResult:
        response = await self.http.request("POST", request_path(self.base_url, line.url), json=line.body)
        request_id = response.headers.get("x-request-id") or None
        try:
            body: Any = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = response.text
        status = response.status_code
        if 200 <= status < 300:
            if not isinstance(body, dict):
                return LineResult(index=line.index, status_code=status, request_id=request_id,
                                  error=LineError(code="invalid_provider_response",
                                                  message=f"{self.name} answered HTTP {status} without a JSON object."))
            return LineResult(index=line.index, status_code=status, body=body, usage=usage_of_body(body),
                              request_id=request_id)
        return LineResult(index=line.index, status_code=status, body=error_body(body, status), request_id=request_id)
