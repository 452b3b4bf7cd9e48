"""The engine: drives every unfinished batch to a terminal status, in the background.

Replicas share the work through leases on batch rows (`Store.claim`): a batch is driven by one
replica at a time, and a replica that dies loses its leases after `lease_seconds`. Every step
is written so that running it again after a crash is harmless:

- executor providers (sim, OpenAI-compatible endpoints): only lines without a stored result
  are run; results are stored as they arrive; storing one twice counts it once.
- native batch APIs: `submit_started_at` is persisted before the provider is called and the
  provider's batch id right after; a batch found with the first and not the second asks the
  adapter whether the provider already has it (`find_submitted`) before submitting again.
  Results are stored before the batch is marked terminal, and lines the provider did not
  return get an explicit error result, so none goes missing silently.

Every provider call of a native batch (find_submitted, submit, cancel, poll, results) goes through
one policy: a retryable failure (429, 5xx, timeouts, a body the adapter cannot read) slows the batch
down with exponential backoff and jitter, up to a ceiling; a non-retryable one ends the batch as
`failed` with the reason in its `errors`. Whatever the provider does (an unknown status forever, a
results download that keeps failing, no answer at all), a watchdog ends the batch as `expired` once
`expires_at + expiry_grace_seconds` has passed. Whenever Sluice gives up on a batch it has
submitted, it first asks the provider to cancel it, so nothing keeps running (and billing) there.
The engine knows nothing of gRPC or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from adapters.base import (
    BatchJob,
    LineExecutor,
    LineResult,
    NativeBatchAdapter,
    ProviderError,
    ProviderState,
    ProviderStatus,
    RequestLine,
)
from adapters.base import LineError as AdapterLineError
from service.domain import telemetry
from service.domain.model import BatchError, BatchStatus, LineOutcome, Price, ResultError, ResultStatus, Usage, now
from service.providers.routing import Router, UnknownModel
from service.storage.repository import OutputFileIds, Store
from service.storage.tables import BatchRow, RequestRow

log = logging.getLogger(__name__)

STORE_CHUNK = 500
CHECK_SECONDS = 0.5
PROGRESS_LOG_SECONDS = 10.0
UNROUTABLE_RETRY_SECONDS = 60.0
EXECUTOR_RETRIES = 3
# A provider's own "the batch ended before this ran" line (OpenAI's output-line error codes) gets
# the same status as a line the provider did not return at all.
_ENDED_BY_BATCH = {"batch_cancelled": ResultStatus.CANCELLED, "batch_expired": ResultStatus.EXPIRED}


@dataclass(frozen=True)
class EngineSettings:
    replica_id: str
    tick_seconds: float = 0.5
    lease_seconds: float = 30.0
    poll_seconds: float = 5.0
    max_backoff_seconds: float = 300.0
    max_parallel_batches: int = 32
    # How long after its window a native batch may wait for the provider to report the end before
    # the watchdog gives up on it (the provider normally expires it itself at the window's end).
    expiry_grace_seconds: float = 2 * 3600.0


# Called once a batch's results are all stored, before it is marked terminal: writes the
# output and error files and returns their ids.
Finalizer = Callable[[BatchRow], Awaitable[OutputFileIds]]


async def _no_files(_: BatchRow) -> OutputFileIds:
    return OutputFileIds()


def outcome(result: LineResult, custom_id: str, status: ResultStatus, price: Price) -> LineOutcome:
    """An adapter's result as the service keeps it: with its line's identity and priced."""
    tokens = result.usage
    usage = price.cost(Usage(tokens.input_tokens, tokens.cached_tokens, tokens.output_tokens, tokens.reasoning_tokens))
    error = ResultError(result.error.code, result.error.message, result.error.type) if result.error else None
    return LineOutcome(result.index, custom_id, status, result.status_code, result.body, error, usage,
                       result.request_id)


class Engine:
    def __init__(self, store: Store, router: Router, settings: EngineSettings,
                 finalizer: Finalizer = _no_files) -> None:
        self.store = store
        self.router = router
        self.settings = settings
        self.finalizer = finalizer
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="sluice-engine")

    def wake(self) -> None:
        """Look for work now rather than at the next tick (a batch was created or cancelled)."""
        self._wake.set()

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stop claiming work, give running steps a moment to reach a stored state, cancel the
        rest and hand their leases back so another replica can pick them up at once."""
        self._stopping = True
        self._wake.set()
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        tasks = list(self._running.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                free = self.settings.max_parallel_batches - len(self._running)
                if free > 0:
                    for batch_id in await self.store.claim(self.settings.replica_id,
                                                           self.settings.lease_seconds, free + len(self._running)):
                        if batch_id not in self._running:
                            self._running[batch_id] = asyncio.create_task(self._drive(batch_id))
            except Exception:
                log.exception("engine: claiming work failed; retrying at the next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.tick_seconds)
            self._wake.clear()

    async def _drive(self, batch_id: str) -> None:
        next_poll: float | None = None
        renewer = asyncio.create_task(self._renew(batch_id))
        try:
            # The claim may have returned a lease this replica already held for a step that has
            # just ended and handed it back: step only while the lease is really ours.
            if not await self.store.renew(batch_id, self.settings.replica_id, self.settings.lease_seconds):
                return
            batch = await self.store.engine_batch(batch_id)
            with telemetry.current().batch_work(batch.id, batch.trace_parent):
                entry = self.router.entry(batch.provider)
                if isinstance(entry.provider, LineExecutor):
                    await self._run_executor(batch, entry.provider)
                elif isinstance(entry.provider, NativeBatchAdapter):
                    next_poll = await self._step_native(batch, entry.provider)
        except asyncio.CancelledError:
            raise
        except UnknownModel as exc:
            log.warning("batch %s needs provider or model %r, which is not configured now (is its API key set?); "
                        "it waits until a replica that has it picks it up", batch_id, str(exc))
            next_poll = time.time() + UNROUTABLE_RETRY_SECONDS
        except Exception:
            log.exception("engine: batch %s step failed; retrying later", batch_id)
            next_poll = time.time() + self.settings.poll_seconds
        finally:
            renewer.cancel()
            # Release before forgetting the task: until the lease is handed back, the loop must not
            # start a second step for this batch on this replica.
            try:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.store.release(batch_id, self.settings.replica_id, next_poll))
            finally:
                self._running.pop(batch_id, None)
            if not self._stopping:
                self._wake.set()

    async def _renew(self, batch_id: str) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            if not await self.store.renew(batch_id, self.settings.replica_id, self.settings.lease_seconds):
                log.warning("engine: lost the lease on %s", batch_id)

    # --- shared helpers ---------------------------------------------------------------------

    def _provider_model(self, req: RequestRow) -> str:
        """The provider model intake resolved; rows stored before routes were kept (migration 0002)
        are routed now, once more."""
        return req.provider_model or self.router.resolve(req.model).model

    def _price(self, batch: BatchRow, req: RequestRow) -> Price:
        return self.router.entry(batch.provider).price(self._provider_model(req))

    def _line(self, req: RequestRow, batch: BatchRow) -> RequestLine:
        body = json.loads(req.body_json)
        body["model"] = self._provider_model(req)
        return RequestLine(index=req.idx, custom_id=req.custom_id, url=batch.endpoint, body=body)

    async def _close_unfinished(self, batch: BatchRow, status: ResultStatus, code: str, message: str) -> None:
        """Give every line without a result an explicit error result (cancelled/expired/lost)."""
        while pending := await self.store.pending_requests(batch.id, STORE_CHUNK):
            await self.store.store_results(batch.id, [
                LineOutcome(r.idx, r.custom_id, status, error=ResultError(code, message, type="batch_error"))
                for r in pending])

    async def _finish(self, batch: BatchRow, src: BatchStatus, dst: BatchStatus,
                      errors: Sequence[BatchError] = ()) -> None:
        fresh = await self.store.engine_batch(batch.id)
        if src.terminal or fresh.status is not src:
            return  # ended or moved meanwhile: an ended batch's files are never touched again
        files = await self.finalizer(fresh)
        if await self.store.transition(batch.id, src, dst, files=files, errors=errors):
            log.info("batch %s %s: %d completed, %d failed of %d", batch.id, dst.value,
                     fresh.completed, fresh.failed, fresh.total)

    async def _end_early(self, batch: BatchRow, status: BatchStatus) -> bool:
        """Handle cancel and expiry; True when the batch is done."""
        if status is BatchStatus.CANCELLING:
            await self._close_unfinished(batch, ResultStatus.CANCELLED, "batch_cancelled",
                                         "The batch was cancelled before this request ran.")
            await self._finish(batch, BatchStatus.CANCELLING, BatchStatus.CANCELLED)
            return True
        if now() >= batch.expires_at and status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            await self._close_unfinished(batch, ResultStatus.EXPIRED, "batch_expired",
                                         "The batch expired before this request ran.")
            await self._finish(batch, status, BatchStatus.EXPIRED)
            return True
        return False

    # --- executor providers -------------------------------------------------------------------

    async def _run_executor(self, batch: BatchRow, provider: LineExecutor) -> None:
        status = BatchStatus(batch.status)
        if status is BatchStatus.VALIDATING:
            await self.store.transition(batch.id, status, BatchStatus.IN_PROGRESS)
            status = BatchStatus.IN_PROGRESS
        if status is BatchStatus.IN_PROGRESS and not await self._end_early(batch, status):
            if not await self._execute_pending(batch, provider):
                status = (await self.store.engine_batch(batch.id)).status
            elif await self.store.transition(batch.id, status, BatchStatus.FINALIZING):
                status = BatchStatus.FINALIZING
        if self._stopping:
            return
        if status is BatchStatus.FINALIZING:
            await self._finish(batch, status, BatchStatus.COMPLETED)
        elif not status.terminal:
            await self._end_early(batch, status)

    async def _pending_lines(self, batch_id: str) -> AsyncIterator[RequestRow]:
        after = -1
        while page := await self.store.pending_requests(batch_id, STORE_CHUNK, after):
            for req in page:
                yield req
            after = page[-1].idx

    async def _execute_one(self, batch: BatchRow, provider: LineExecutor, req: RequestRow) -> LineOutcome:
        result = await self._execute_with_retries(provider, self._line(req, batch))
        status = ResultStatus.COMPLETED if result.ok else ResultStatus.FAILED
        return outcome(result, req.custom_id, status, self._price(batch, req))

    async def _execute_pending(self, batch: BatchRow, provider: LineExecutor) -> bool:
        """Run every line without a result, `provider.concurrency` at a time, starting the next
        line as soon as one finishes (a slow line never holds the others back). Results are stored
        in groups, at least every `CHECK_SECONDS`. Returns False if it stopped early: the batch
        left in_progress meanwhile (a cancel, from any replica) or the engine is shutting down;
        lines still running then stay pending and run again later."""
        lines = self._pending_lines(batch.id)
        running: set[asyncio.Task[LineOutcome]] = set()
        finished: list[LineOutcome] = []
        more = True
        last_check = last_log = time.monotonic()
        try:
            while more or running:
                while more and len(running) < provider.concurrency:
                    req = await anext(lines, None)
                    if req is None:
                        more = False
                    else:
                        running.add(asyncio.create_task(self._execute_one(batch, provider, req)))
                if running:
                    done, running = await asyncio.wait(running, timeout=CHECK_SECONDS,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    finished.extend(task.result() for task in done)
                checking = time.monotonic() - last_check >= CHECK_SECONDS
                if len(finished) >= STORE_CHUNK or checking:
                    await self.store.store_results(batch.id, finished)
                    finished = []
                if checking:
                    last_check = time.monotonic()
                    fresh = await self.store.engine_batch(batch.id)
                    if self._stopping or fresh.status != BatchStatus.IN_PROGRESS or now() >= fresh.expires_at:
                        return False
                    if last_check - last_log >= PROGRESS_LOG_SECONDS:
                        last_log = last_check
                        log.info("batch %s: %d of %d requests done (%d failed)", batch.id,
                                 fresh.completed + fresh.failed, fresh.total, fresh.failed)
            return not self._stopping
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            finished.extend(t.result() for t in running if not t.cancelled() and t.exception() is None)
            await self.store.store_results(batch.id, finished)

    async def _execute_with_retries(self, provider: LineExecutor, line: RequestLine) -> LineResult:
        for attempt in range(EXECUTOR_RETRIES + 1):
            try:
                return await provider.execute(line)
            except ProviderError as exc:
                if not exc.retryable or attempt == EXECUTOR_RETRIES:
                    return LineResult(index=line.index, status_code=exc.status_code or 0,
                                      error=AdapterLineError(code=exc.code or "provider_error", message=exc.message))
                delay = self._backoff(attempt, exc.retry_after, base=0.5)
                telemetry.current().retry(provider.name, "execute", delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff(self, failures: int, retry_after: float | None, base: float | None = None) -> float:
        """Exponential backoff with full jitter, never shorter than the provider asked."""
        base = self.settings.poll_seconds if base is None else base
        delay = min(base * 2 ** failures, self.settings.max_backoff_seconds)
        delay = delay / 2 + random.uniform(0, delay / 2)
        return float(max(delay, retry_after or 0.0))

    # --- native batch APIs ----------------------------------------------------------------------

    def _deadline(self, batch: BatchRow) -> float:
        return batch.expires_at + self.settings.expiry_grace_seconds

    async def _step_native(self, batch: BatchRow, adapter: NativeBatchAdapter) -> float | None:
        """One step under the one retry policy; returns when to look at the batch again (None: done)."""
        if time.time() >= self._deadline(batch):
            await self._give_up(batch, adapter, BatchStatus.EXPIRED, BatchError(
                "batch_expired", f"{adapter.name} did not report the end of this batch within its completion "
                f"window and {self.settings.expiry_grace_seconds:.0f} s of grace (last status: "
                f"{batch.provider_status or 'none'}); Sluice asked {adapter.name} to cancel it and kept what was "
                "done."))
            return None
        try:
            return await self._advance_native(batch, adapter)
        except ProviderError as exc:
            if not exc.retryable:
                await self._give_up(batch, adapter, BatchStatus.FAILED,
                                    BatchError(exc.code or "provider_error", f"{adapter.name}: {exc.message}"))
                return None
            return await self._retry_later(batch, f"{adapter.name} answered {exc.status_code or 'nothing'} "
                                                  f"({exc.message})", exc.retry_after)
        except Exception as exc:  # a body the adapter could not read, a database hiccup: retry, bounded
            log.exception("engine: batch %s step failed", batch.id)
            return await self._retry_later(batch, f"{type(exc).__name__}: {exc}", None)

    async def _retry_later(self, batch: BatchRow, reason: str, retry_after: float | None) -> float:
        """Back off after a failure, but look again by the watchdog's deadline at the latest."""
        failures = await self.store.record_poll_failure(batch.id)
        delay = self._backoff(failures, retry_after)
        telemetry.current().retry(batch.provider, "step", delay)
        log.warning("batch %s: %s; next try in %.1fs", batch.id, reason, delay)
        return min(time.time() + delay, max(self._deadline(batch), time.time() + self.settings.tick_seconds))

    async def _give_up(self, batch: BatchRow, adapter: NativeBatchAdapter, dst: BatchStatus,
                       error: BatchError) -> None:
        """End a batch Sluice can no longer drive: first ask the provider to cancel what it was sent
        (best effort, once), then end the batch with the reason. An expired batch keeps its stored
        results and gets its output files; its other lines are expired."""
        if batch.provider_batch_id and batch.cancel_sent_at is None:
            try:
                await adapter.cancel(batch.provider_batch_id)
                await self.store.mark_cancel_sent(batch.id)
                log.info("batch %s: giving up; cancel sent to %s", batch.id, adapter.name)
            except Exception as exc:  # the batch ends anyway; say what is left at the provider
                log.warning("batch %s: giving up; could not cancel %s at %s (%s): cancel it there by hand",
                            batch.id, batch.provider_batch_id, adapter.name, exc)
        status = (await self.store.engine_batch(batch.id)).status
        if status.terminal:
            return
        if dst is BatchStatus.FAILED:
            await self._fail(batch, status, error.code, error.message)
            return
        await self._close_unfinished(batch, ResultStatus.EXPIRED, "batch_expired",
                                     "The batch expired before this request ran.")
        await self._finish(batch, status, dst, errors=[error])

    async def _advance_native(self, batch: BatchRow, adapter: NativeBatchAdapter) -> float | None:
        status = batch.status
        if batch.provider_batch_id is None:
            if await self._end_early(batch, status):
                return None
            await self._submit(batch, adapter)
            return time.time() + self.settings.poll_seconds
        if status is BatchStatus.CANCELLING and batch.cancel_sent_at is None:
            await adapter.cancel(batch.provider_batch_id)
            await self.store.mark_cancel_sent(batch.id)
            log.info("batch %s: cancel sent to %s", batch.id, adapter.name)
        state = await adapter.poll(batch.provider_batch_id)
        if state.raw_status != batch.provider_status:
            log.info("batch %s: %s reports %s (%s of %s requests done)", batch.id, adapter.name, state.raw_status,
                     (state.completed or 0) + (state.failed or 0), state.total if state.total is not None else "?")
        await self.store.record_provider_status(batch.id, state.raw_status, state.completed, state.failed)
        if not state.ended:
            if status is BatchStatus.VALIDATING and state.status is not ProviderState.VALIDATING:
                await self.store.transition(batch.id, status, BatchStatus.IN_PROGRESS)
            return time.time() + self.settings.poll_seconds
        await self._collect(batch, adapter, status, state)
        return None

    async def _submit(self, batch: BatchRow, adapter: NativeBatchAdapter) -> None:
        provider_id = None
        job = BatchJob(batch_id=batch.id, endpoint=batch.endpoint, model=batch.provider_model or "",
                       completion_window=batch.completion_window, line_count=batch.total)
        if batch.submit_started_at is not None:
            provider_id = await adapter.find_submitted(batch.id, job=job, since=batch.submit_started_at)
            if provider_id:
                log.info("batch %s: found earlier submission %s at %s", batch.id, provider_id, adapter.name)
        if provider_id is None:
            await self.store.mark_submit_started(batch.id)
            provider_id = await adapter.submit(job, self._lines(batch))
            log.info("batch %s: submitted to %s as %s (%d lines)", batch.id, adapter.name, provider_id, batch.total)
        await self.store.record_provider_batch_id(batch.id, provider_id)
        await self.store.transition(batch.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)

    async def _lines(self, batch: BatchRow) -> AsyncIterator[RequestLine]:
        async for req in self.store.iter_requests(batch.id):
            yield self._line(req, batch)

    async def _fail(self, batch: BatchRow, status: BatchStatus, code: str, message: str,
                    errors: Sequence[BatchError] = ()) -> None:
        errors = errors or [BatchError(code, message)]
        if not status.terminal and await self.store.transition(batch.id, status, BatchStatus.FAILED, errors=errors):
            log.warning("batch %s failed: %s", batch.id, message)

    async def _collect(self, batch: BatchRow, adapter: NativeBatchAdapter, status: BatchStatus,
                       state: ProviderStatus) -> None:
        """The provider says the batch ended: store every result, then mark it terminal."""
        assert batch.provider_batch_id is not None
        if state.status is ProviderState.FAILED:
            await self._fail(batch, status, "provider_error", f"{adapter.name} rejected the batch",
                             [BatchError(e.code, e.message, e.param, e.line) for e in state.errors])
            return
        final = BatchStatus(state.status.value)  # completed, expired or cancelled
        early = status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
        if early and final in (BatchStatus.COMPLETED, BatchStatus.CANCELLED):
            step = BatchStatus.FINALIZING if final is BatchStatus.COMPLETED else BatchStatus.CANCELLING
            if not await self.store.transition(batch.id, status, step):
                return  # moved meanwhile (a cancel): decide again at the next step
            status = step
        buffer: list[LineResult] = []
        async for result in adapter.results(batch.provider_batch_id):
            buffer.append(result)
            if len(buffer) >= STORE_CHUNK:
                await self._store_native(batch, buffer)
                buffer = []
        await self._store_native(batch, buffer)
        code, result_status = {
            BatchStatus.EXPIRED: ("batch_expired", ResultStatus.EXPIRED),
            BatchStatus.CANCELLED: ("batch_cancelled", ResultStatus.CANCELLED),
        }.get(final, ("missing_result", ResultStatus.FAILED))
        await self._close_unfinished(batch, result_status, code,
                                     f"{adapter.name} returned no result for this request ({state.raw_status}).")
        await self._finish(batch, status, final)

    async def _store_native(self, batch: BatchRow, results: list[LineResult]) -> None:
        if not results:
            return
        keys = await self.store.request_keys(batch.id, [r.index for r in results])
        stored = []
        for r in results:
            if r.index not in keys:
                log.warning("batch %s: %s returned a result for unknown line %d; ignored",
                            batch.id, batch.provider, r.index)
                continue
            req = keys[r.index]
            status = ResultStatus.COMPLETED if r.ok else _ENDED_BY_BATCH.get(
                r.error.code if r.error else "", ResultStatus.FAILED)
            stored.append(outcome(r, req.custom_id, status, self._price(batch, req)))
        await self.store.store_results(batch.id, stored)
