"""How much an executor provider (one Sluice runs each line on itself: Ollama, vLLM, any
OpenAI-compatible URL) is sent at once, by all batches on all replicas together.

Without a `capacity` section in the providers file each batch has its own bound
(`provider.concurrency`), as before: ten batches put ten times that on the provider. With one
(`concurrency`, `requests_per_minute`, `tokens_per_minute`), `SharedCapacity` holds every call to the
provider to it, coordinated through the database so replicas share one budget:

- **Concurrency**: a call holds one of the provider's slot rows (`capacity_slots`) while it runs,
  taken by compare-and-set; a replica that dies lets its slots run out after `lease_seconds`
  (running calls renew theirs).
- **Adaptive**: only the first `limit` slots may be taken, and `limit` (shared, `capacity_state`)
  halves when a call gets a 429, a 5xx or a timeout (at most once a second for all replicas), then
  grows back by one slot per `limit` calls that succeed, up to `concurrency` (AIMD, as TCP does).
- **Per minute**: requests and tokens (the input estimate plus the output bound of
  `service.domain.tokens`, corrected to what the call used) are counted in fixed one-minute
  windows; a call waits for the next window when its own would pass a limit.
- **Fair share**: each batch runs at most `limit / projects / its project's batches` lines at
  once, so the projects with work on the provider share it equally, whatever their batch counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from adapters.base import LineExecutor, ProviderError, RequestLine
from service.domain.tokens import line_tokens
from service.providers.routing import CapacityLimits, Router, UnknownModel
from service.storage.repository import Store

log = logging.getLogger(__name__)

BACKOFF_FACTOR = 0.5
BACKOFF_COOLDOWN = 1.0  # seconds: one overload, one backoff
RECOVER_EVERY = 0.5  # seconds between flushes of this replica's successes
REFRESH_EVERY = 0.5  # seconds a replica trusts its copy of the shared limit and of the fair shares
WAIT_STEP = (0.01, 0.2)  # how long a call waits before asking for a slot again: first, at most


@dataclass
class Ticket:
    """Handed to the caller of `request`: report the tokens the call really used."""

    used_tokens: int | None = None

    def used(self, tokens: int) -> None:
        self.used_tokens = tokens


class Capacity(Protocol):
    async def width(self, provider: LineExecutor, project: str) -> int:
        """How many lines of one batch of `project` may be in flight at once on `provider`."""

    def request(self, provider: LineExecutor, project: str,
                line: RequestLine) -> AbstractAsyncContextManager[Ticket]:
        """Held around one call to the provider: waits for room, learns how the call went."""


class Unlimited:
    """Each batch has its own bound, `provider.concurrency`."""

    async def width(self, provider: LineExecutor, project: str) -> int:
        return provider.concurrency

    @asynccontextmanager
    async def request(self, provider: LineExecutor, project: str, line: RequestLine) -> AsyncIterator[Ticket]:
        yield Ticket()


@dataclass
class _Provider:
    """This replica's view of one provider's shared capacity."""

    limits: CapacityLimits
    concurrency: int
    limit: float = 0.0
    limit_read_at: float = 0.0
    shares: dict[str, int] = field(default_factory=dict)
    shares_read_at: float = 0.0
    successes: int = 0
    flushed_at: float = 0.0
    ready: bool = False


class SharedCapacity:
    def __init__(self, store: Store, router: Router, replica_id: str, lease_seconds: float = 30.0,
                 fallback: Capacity | None = None) -> None:
        self.store = store
        self.router = router
        self.replica_id = replica_id
        self.lease_seconds = lease_seconds
        self.fallback = fallback or Unlimited()
        self._providers: dict[str, _Provider] = {}
        self._held: set[str] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._freed = asyncio.Event()

    def _state(self, provider: LineExecutor) -> _Provider | None:
        try:
            limits = self.router.entry(provider.name).capacity
        except UnknownModel:
            return None
        if limits is None:
            return None
        state = self._providers.get(provider.name)
        if state is None:
            concurrency = limits.concurrency or provider.concurrency
            state = self._providers[provider.name] = _Provider(limits, concurrency, limit=float(concurrency))
        return state

    async def _ready(self, name: str, state: _Provider) -> None:
        if not state.ready:
            await self.store.ensure_capacity(name, state.concurrency, float(state.concurrency))
            state.ready = True
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(), name="sluice-capacity-renew")

    async def _limit(self, name: str, state: _Provider) -> int:
        """The slots usable now: the shared adaptive limit, read at most every REFRESH_EVERY."""
        if time.monotonic() - state.limit_read_at >= REFRESH_EVERY:
            shared = await self.store.capacity_limit(name)
            state.limit = min(shared if shared is not None else state.concurrency, state.concurrency)
            state.limit_read_at = time.monotonic()
        return max(1, math.floor(state.limit))

    async def width(self, provider: LineExecutor, project: str) -> int:
        state = self._state(provider)
        if state is None:
            return await self.fallback.width(provider, project)
        await self._ready(provider.name, state)
        limit = await self._limit(provider.name, state)
        if time.monotonic() - state.shares_read_at >= REFRESH_EVERY:
            state.shares = await self.store.running_parts(provider.name)
            state.shares_read_at = time.monotonic()
        projects = max(len(state.shares), 1)
        batches = max(state.shares.get(project, 1), 1)
        return max(1, min(provider.concurrency, math.ceil(limit / projects / batches)))

    @asynccontextmanager
    async def request(self, provider: LineExecutor, project: str, line: RequestLine) -> AsyncIterator[Ticket]:
        state = self._state(provider)
        if state is None:
            async with self.fallback.request(provider, project, line) as ticket:
                yield ticket
            return
        name = provider.name
        await self._ready(name, state)
        tokens = line_tokens(line.url, line.body)
        counted = tokens.input_estimate + tokens.output_max
        minute = await self._count(name, state, counted)
        holder = f"{self.replica_id}:{uuid.uuid4().hex}"
        ticket = Ticket()
        self._held.add(holder)  # renewed from the moment it may hold a slot, until it is freed
        try:
            await self._take(name, state, holder)
            try:
                yield ticket
            except ProviderError as exc:
                if exc.retryable:
                    await self._back_off(name, state, exc)
                raise
            else:
                await self._succeeded(name, state)
        finally:
            self._held.discard(holder)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.free_slot(name, holder))
            self._freed.set()
            if minute is not None and ticket.used_tokens is not None:
                with contextlib.suppress(Exception):
                    await self.store.correct_tokens(name, minute, ticket.used_tokens - counted)

    async def _count(self, name: str, state: _Provider, tokens: int) -> int | None:
        """Wait for a minute window with room for this request; returns the window counted in."""
        rpm, tpm = state.limits.requests_per_minute, state.limits.tokens_per_minute
        if rpm is None and tpm is None:
            return None
        while True:
            now = time.time()
            minute = int(now // 60)
            if await self.store.count_request(name, minute, tokens, rpm, tpm):
                return minute
            await asyncio.sleep((minute + 1) * 60 - now + 0.01)

    async def _take(self, name: str, state: _Provider, holder: str) -> int:
        """A slot under the current limit; waits (woken early by a slot this replica frees)."""
        delay = WAIT_STEP[0]
        while True:
            limit = await self._limit(name, state)
            slot = await self.store.take_slot(name, limit, holder, time.time() + self.lease_seconds)
            if slot is not None:
                return slot
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), delay)
            delay = min(delay * 2, WAIT_STEP[1])

    async def _back_off(self, name: str, state: _Provider, exc: ProviderError) -> None:
        if await self.store.back_off(name, BACKOFF_FACTOR, 1.0, BACKOFF_COOLDOWN):
            log.warning("capacity: %s answered %s (%s); concurrency halved for every replica", name,
                        exc.status_code or "nothing", exc.message)
        state.limit_read_at = 0.0  # read the lowered limit at once
        state.successes = 0

    async def _succeeded(self, name: str, state: _Provider) -> None:
        state.successes += 1
        if time.monotonic() - state.flushed_at >= RECOVER_EVERY and state.limit < state.concurrency:
            successes, state.successes = state.successes, 0
            state.flushed_at = time.monotonic()
            await self.store.recover(name, successes / max(state.limit, 1.0), float(state.concurrency))
            state.limit_read_at = 0.0

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                await self.store.renew_slots(sorted(self._held), time.time() + self.lease_seconds)
            except Exception:
                log.exception("capacity: renewing this replica's slots failed; retrying")

    async def aclose(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
