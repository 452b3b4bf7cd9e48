"""How much an executor provider (one Sluice runs each line on itself) may be sent at once.

`Unlimited` is each batch's own bound (`provider.concurrency`), as without a capacity section in
the providers file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from adapters.base import LineExecutor, RequestLine


class Capacity(Protocol):
    def width(self, provider: LineExecutor, project: str) -> int:
        """How many lines of one batch of `project` may be in flight at once on `provider`."""

    def request(self, provider: LineExecutor, project: str,
                line: RequestLine) -> AbstractAsyncContextManager[None]:
        """Held around one call to the provider: waits for room, learns how the call went."""


class Unlimited:
    def width(self, provider: LineExecutor, project: str) -> int:
        return provider.concurrency

    @asynccontextmanager
    async def request(self, provider: LineExecutor, project: str, line: RequestLine) -> AsyncIterator[None]:
        yield
