"""HTTP plumbing every remote adapter shares: one httpx client per provider, and the one place
where transport failures and HTTP error statuses become `ProviderError`.

429, 408, 5xx and transport errors are retryable (the engine backs off); other 4xx are not.
Credentials live only in the client's default headers: they are never logged or put in errors.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from adapters.errors import ProviderError

# httpx logs every request URL at INFO; keep provider traffic out of the logs by default.
logging.getLogger("httpx").setLevel(logging.WARNING)

RETRYABLE = {408, 425, 429}
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=10.0)


def retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):  # neither seconds nor an HTTP date: ignore it, back off as usual
        return None


def error_message(response: httpx.Response) -> str:
    """The provider's own error message, whatever its envelope (OpenAI, Anthropic, Google, Mistral)."""
    try:
        data: Any = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:500] or f"HTTP {response.status_code}"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, str) and err:  # Together's BatchErrorResponse: {"error": "<message>"}
            return err
        if isinstance(err, dict):
            inner = err.get("error")
            if isinstance(inner, dict) and inner.get("message"):
                return str(inner["message"])
            if err.get("message"):
                return str(err["message"])
        if isinstance(data.get("detail"), list | str):
            return json.dumps(data["detail"])[:500] if isinstance(data["detail"], list) else str(data["detail"])
        if data.get("message"):
            return str(data["message"])
    return json.dumps(data)[:500]


class HttpClient:
    """An httpx.AsyncClient for one provider plus error translation."""

    def __init__(self, provider: str, base_url: str, headers: dict[str, str],
                 timeout: httpx.Timeout = DEFAULT_TIMEOUT, params: dict[str, str] | None = None) -> None:
        self.provider = provider
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                        params=params)

    async def aclose(self) -> None:
        await self.client.aclose()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """httpx's transport failures as retryable ProviderErrors: the one place they are mapped."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise ProviderError(f"{self.provider} timed out ({type(exc).__name__})", provider=self.provider,
                                retryable=True, code="provider_timeout") from None
        except httpx.TransportError as exc:
            raise ProviderError(f"{self.provider} is unreachable ({type(exc).__name__})", provider=self.provider,
                                retryable=True, code="provider_unreachable") from None

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send a request; return the response only if it succeeded (2xx)."""
        with self._translated():
            response = await self.client.request(method, url, **kwargs)
        self.raise_for_status(response)
        return response

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """`request`, with the body streamed: the same translation, including failures that happen
        while the body is being read."""
        with self._translated():
            async with self.client.stream(method, url, **kwargs) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self.raise_for_status(response)
                yield response

    def raise_for_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status < 400:
            return
        retryable = status in RETRYABLE or status >= 500
        raise ProviderError(
            f"{self.provider} answered HTTP {status}: {error_message(response)}",
            provider=self.provider, status_code=status, retryable=retryable,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
            code="rate_limited" if status == 429 else f"http_{status}",
        )

    async def json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = await self.request(method, url, **kwargs)
        try:
            return response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProviderError(f"{self.provider} sent a response that is not JSON", provider=self.provider,
                                status_code=response.status_code, retryable=True) from None
