"""The one error an adapter may raise. Its own module so that `adapters/http.py` (which raises it)
and `adapters/base.py` (the port, which re-exports it and uses the HTTP client) need not import each
other."""

from __future__ import annotations


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
