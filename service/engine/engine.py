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
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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
from service.domain.codec import loads
from service.domain.model import (
    BatchError,
    BatchStatus,
    LineOutcome,
    Price,
    ResultError,
    ResultStatus,
    Usage,
    final_status,
    now,
)
from service.engine.capacity import Capacity, Unlimited
from service.providers.routing import Router, UnknownModel
from service.storage.repository import OutputFileIds, Store
from service.storage.tables import BatchRow, PartRow, RequestRow

log = logging.getLogger(__name__)

STORE_CHUNK = 500
CHECK_SECONDS = 0.5
PROGRESS_LOG_SECONDS = 10.0
# When a step stops running lines early (a cancel, the window's end, the engine stopping), lines in
# flight get this long to answer before they are cancelled: an answer already on its way is kept
# rather than thrown away after the provider did (and billed) the work. Later lines run again, or
# are closed as cancelled/expired.
IN_FLIGHT_GRACE_SECONDS = 0.5
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
                 finalizer: Finalizer = _no_files, capacity: Capacity | None = None) -> None:
        self.store = store
        self.router = router
        self.settings = settings
        self.finalizer = finalizer
        self.capacity = capacity or Unlimited()
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
                next_poll = await self._advance(batch)
        except asyncio.CancelledError:
            raise
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

    # --- one batch: its parts, concurrently ---------------------------------------------------

    async def _advance(self, batch: BatchRow) -> float | None:
        """Drive every part of the batch that has not ended, at once: executor parts run their lines
        (until done, cancelled, expired or the engine stops) while native parts are stepped whenever
        they are due. Once every part has ended, the batch ends. Returns when to look again."""
        if batch.status.terminal:
            return None
        executors: list[tuple[PartRow, LineExecutor]] = []
        natives: dict[int, NativeBatchAdapter] = {}
        waiting: float | None = None
        for part in batch.parts:
            if part.status.terminal:
                continue
            try:
                provider = self.router.entry(part.provider).provider
            except UnknownModel:
                log.warning("batch %s needs provider %r, which is not configured now (is its API key set?); its "
                            "part %d waits until a replica that has it picks it up", batch.id, part.provider,
                            part.part_no)
                waiting = time.time() + UNROUTABLE_RETRY_SECONDS
                continue
            if isinstance(provider, LineExecutor):
                executors.append((part, provider))
            elif isinstance(provider, NativeBatchAdapter):
                natives[part.part_no] = provider
        tasks = {asyncio.create_task(self._run_executor_part(batch, part, provider)) for part, provider in executors}
        next_at: dict[int, float | None] = {}
        try:
            while True:
                if natives and not self._stopping:
                    batch = await self.store.engine_batch(batch.id)
                    await self._step_due_parts(batch, natives, next_at)
                if not tasks:
                    break  # a stopping engine lets executor parts reach a stored state (they see it)
                due = [t for t in next_at.values() if t is not None]
                timeout = max(min([*due, time.time() + CHECK_SECONDS]) - time.time(), 0.01)
                done, tasks = await asyncio.wait(tasks, timeout=min(timeout, CHECK_SECONDS),
                                                 return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and (exc := task.exception()) is not None:
                        log.error("engine: batch %s: running a part failed; retrying later", batch.id,
                                  exc_info=exc)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._stopping:
            return None
        fresh = await self.store.engine_batch(batch.id)
        if all(part.status.terminal for part in fresh.parts):
            await self._finalize(fresh)
            return None
        later = [t for t in (*next_at.values(), waiting) if t is not None]
        later += [p.next_poll_at or time.time() for p in fresh.parts
                  if not p.status.terminal and p.part_no in natives and p.part_no not in next_at]
        return min(later) if later else time.time() + self.settings.poll_seconds

    async def _step_due_parts(self, batch: BatchRow, natives: dict[int, NativeBatchAdapter],
                              next_at: dict[int, float | None]) -> None:
        """Step each native part that is due (a cancel not yet sent makes a part due at once)."""
        t = time.time()
        steps = []
        for part in batch.parts:
            adapter = natives.get(part.part_no)
            if part.status.terminal:
                next_at.pop(part.part_no, None)
                continue
            if adapter is None:
                continue
            when = next_at.get(part.part_no, part.next_poll_at)
            cancel_due = batch.status is BatchStatus.CANCELLING and part.cancel_sent_at is None
            if when is None or when <= t or cancel_due:
                steps.append((part, adapter))
        results = await asyncio.gather(*(self._step_native(batch, part, adapter) for part, adapter in steps))
        for (part, _), at in zip(steps, results, strict=True):
            next_at[part.part_no] = at
            if at is not None:
                await self.store.schedule_part(batch.id, part.part_no, at)

    async def _finalize(self, batch: BatchRow) -> None:
        """Every part has ended: end the batch, once, with the status its parts give it (see
        `final_status`). Lines of a part that failed while others ran get a failed result each, so
        every line has an outcome (and can be retried); the output and error files are written
        before the batch is marked ended, and a batch that has ended is never finalized again."""
        if batch.status.terminal:
            return
        parts = batch.parts
        dst = final_status([p.status for p in parts]) if parts else BatchStatus.COMPLETED
        errors = self._part_errors(batch)
        src = batch.status
        if dst is BatchStatus.FAILED:
            # Like OpenAI: a batch that failed as a whole has no per-request results and no files.
            if await self.store.transition(batch.id, src, dst, errors=errors):
                log.warning("batch %s failed: %s", batch.id, "; ".join(e.message for e in errors))
            return
        for part in parts:
            if part.status is BatchStatus.FAILED:
                reason = (part.errors or [BatchError("provider_error", f"{part.provider} failed this part")])[0]
                await self._close_unfinished(batch, part, ResultStatus.FAILED, reason.code, reason.message)
        if src in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS) and dst is not BatchStatus.EXPIRED:
            if not await self.store.transition(batch.id, src, BatchStatus.FINALIZING):
                return  # moved meanwhile (a cancel): decide again at the next step
            src = BatchStatus.FINALIZING
        fresh = await self.store.engine_batch(batch.id)
        if fresh.status is not src:
            return  # moved meanwhile (another replica finished it): never rewrite an ended batch's files
        files = await self.finalizer(fresh)
        if await self.store.transition(batch.id, src, dst, files=files, errors=errors):
            log.info("batch %s %s: %d completed, %d failed of %d", batch.id, dst.value,
                     fresh.completed, fresh.failed, fresh.total)

    @staticmethod
    def _part_errors(batch: BatchRow) -> list[BatchError]:
        """The batch's `errors`: each part's, naming the part when there are several."""
        several = len(batch.parts) > 1
        out = []
        for part in batch.parts:
            for e in part.errors or ():
                param = e.param if e.param or not several else f"parts[{part.part_no}]"
                out.append(BatchError(e.code, e.message, param, e.line))
        return out

    # --- shared helpers ---------------------------------------------------------------------

    def _provider_of(self, req: RequestRow, part: PartRow) -> str:
        return req.provider or part.provider

    def _provider_model(self, req: RequestRow) -> str:
        """The provider model intake resolved; rows stored before routes were kept (migration 0002)
        are routed now, once more."""
        return req.provider_model or self.router.resolve(req.model).model

    def _price(self, req: RequestRow, part: PartRow) -> Price:
        return self.router.entry(self._provider_of(req, part)).price(self._provider_model(req))

    def _line(self, req: RequestRow, batch: BatchRow) -> RequestLine:
        body = loads(req.body_json)  # parsed once, here, as the line is sent
        body["model"] = self._provider_model(req)
        return RequestLine(index=req.idx, custom_id=req.custom_id, url=batch.endpoint, body=body)

    async def _close_unfinished(self, batch: BatchRow, part: PartRow, status: ResultStatus, code: str,
                                message: str) -> None:
        """Give every line of the part without a result an explicit error result (cancelled/expired/lost)."""
        while pending := await self.store.pending_requests(batch.id, STORE_CHUNK, part_no=part.part_no, bodies=False):
            await self.store.store_results(batch.id, [
                LineOutcome(r.idx, r.custom_id, status, error=ResultError(code, message, type="batch_error"))
                for r in pending], part_no=part.part_no)

    async def _start(self, batch: BatchRow, part: PartRow) -> None:
        """The part runs (submitted, or its lines started): so does the batch."""
        await self.store.start_part(batch.id, part.part_no)
        await self.store.transition(batch.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)

    async def _end_part_early(self, batch: BatchRow, part: PartRow) -> bool:
        """A part that cannot run any more (the batch is cancelling, or its window has passed):
        its lines without a result are closed and the part ends. True when it ended."""
        if batch.status is BatchStatus.CANCELLING:
            await self._close_unfinished(batch, part, ResultStatus.CANCELLED, "batch_cancelled",
                                         "The batch was cancelled before this request ran.")
            await self.store.end_part(batch.id, part.part_no, BatchStatus.CANCELLED)
            return True
        if now() >= batch.expires_at:
            await self._close_unfinished(batch, part, ResultStatus.EXPIRED, "batch_expired",
                                         "The batch expired before this request ran.")
            await self.store.end_part(batch.id, part.part_no, BatchStatus.EXPIRED)
            return True
        return False

    # --- executor providers -------------------------------------------------------------------

    async def _run_executor_part(self, batch: BatchRow, part: PartRow, provider: LineExecutor) -> None:
        """Run the part's lines that have no result yet; end the part when all have one, or when the
        batch is cancelled or expires (the rest are closed). A stopping engine leaves it as it is."""
        if batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS) and now() < batch.expires_at:
            await self._start(batch, part)
            if await self._execute_pending(batch, part, provider):
                await self.store.end_part(batch.id, part.part_no, BatchStatus.COMPLETED)
                return
        if self._stopping:
            return
        await self._end_part_early(await self.store.engine_batch(batch.id), part)

    async def _pending_lines(self, batch_id: str, part_no: int) -> AsyncIterator[RequestRow]:
        after = -1
        while page := await self.store.pending_requests(batch_id, STORE_CHUNK, after, part_no=part_no):
            for req in page:
                yield req
            after = page[-1].idx

    async def _execute_one(self, batch: BatchRow, part: PartRow, provider: LineExecutor,
                           req: RequestRow) -> LineOutcome:
        result = await self._execute_with_retries(batch, provider, self._line(req, batch))
        status = ResultStatus.COMPLETED if result.ok else ResultStatus.FAILED
        return outcome(result, req.custom_id, status, self._price(req, part))

    async def _execute_pending(self, batch: BatchRow, part: PartRow, provider: LineExecutor) -> bool:
        """Run every line of the part without a result, `provider.concurrency` at a time (within
        the provider's shared capacity), starting the next line as soon as one finishes (a slow
        line never holds the others back). Results are stored in groups, at least every
        `CHECK_SECONDS`. Returns False if it stopped early: the batch left in_progress meanwhile (a
        cancel, from any replica), its window passed, or the engine is shutting down; lines still
        running then stay pending and run again later."""
        lines = self._pending_lines(batch.id, part.part_no)
        running: set[asyncio.Task[LineOutcome]] = set()
        finished: list[LineOutcome] = []
        more = True
        last_check = last_log = time.monotonic()
        width = await self.capacity.width(provider, batch.project)
        try:
            while more or running:
                while more and len(running) < width:
                    req = await anext(lines, None)
                    if req is None:
                        more = False
                    else:
                        running.add(asyncio.create_task(self._execute_one(batch, part, provider, req)))
                if running:
                    done, running = await asyncio.wait(running, timeout=CHECK_SECONDS,
                                                       return_when=asyncio.FIRST_COMPLETED)
                    finished.extend(task.result() for task in done)
                checking = time.monotonic() - last_check >= CHECK_SECONDS
                if len(finished) >= STORE_CHUNK or checking:
                    await self.store.store_results(batch.id, finished, part_no=part.part_no)
                    finished = []
                if checking:
                    last_check = time.monotonic()
                    width = await self.capacity.width(provider, batch.project)
                    fresh = await self.store.engine_batch(batch.id)
                    if self._stopping or fresh.status != BatchStatus.IN_PROGRESS or now() >= fresh.expires_at:
                        return False
                    if last_check - last_log >= PROGRESS_LOG_SECONDS:
                        last_log = last_check
                        log.info("batch %s: %d of %d requests done (%d failed)", batch.id,
                                 fresh.completed + fresh.failed, fresh.total, fresh.failed)
            return not self._stopping
        finally:
            if running:  # a line whose answer is arriving keeps it: the provider did the work
                done, running = await asyncio.wait(running, timeout=IN_FLIGHT_GRACE_SECONDS)
                finished.extend(t.result() for t in done if not t.cancelled() and t.exception() is None)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            finished.extend(t.result() for t in running if not t.cancelled() and t.exception() is None)
            await self.store.store_results(batch.id, finished, part_no=part.part_no)

    async def _execute_with_retries(self, batch: BatchRow, provider: LineExecutor, line: RequestLine) -> LineResult:
        for attempt in range(EXECUTOR_RETRIES + 1):
            try:
                async with self.capacity.request(provider, batch.project, line) as ticket:
                    result = await provider.execute(line)
                    ticket.used(result.usage.total_tokens)
                    return result
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

    async def _step_native(self, batch: BatchRow, part: PartRow, adapter: NativeBatchAdapter) -> float | None:
        """One step of one part under the one retry policy; returns when to look at the part again
        (None: it ended)."""
        if time.time() >= self._deadline(batch):
            await self._give_up(batch, part, adapter, BatchStatus.EXPIRED, BatchError(
                "batch_expired", f"{adapter.name} did not report the end of this batch within its completion "
                f"window and {self.settings.expiry_grace_seconds:.0f} s of grace (last status: "
                f"{part.provider_status or 'none'}); Sluice asked {adapter.name} to cancel it and kept what was "
                "done."))
            return None
        try:
            return await self._advance_native(batch, part, adapter)
        except ProviderError as exc:
            if not exc.retryable:
                await self._give_up(batch, part, adapter, BatchStatus.FAILED,
                                    BatchError(exc.code or "provider_error", f"{adapter.name}: {exc.message}"))
                return None
            return await self._retry_later(batch, part, f"{adapter.name} answered {exc.status_code or 'nothing'} "
                                                        f"({exc.message})", exc.retry_after)
        except Exception as exc:  # a body the adapter could not read, a database hiccup: retry, bounded
            log.exception("engine: batch %s part %d step failed", batch.id, part.part_no)
            return await self._retry_later(batch, part, f"{type(exc).__name__}: {exc}", None)

    async def _retry_later(self, batch: BatchRow, part: PartRow, reason: str, retry_after: float | None) -> float:
        """Back off after a failure, but look again by the watchdog's deadline at the latest."""
        failures = await self.store.record_poll_failure(batch.id, part.part_no)
        delay = self._backoff(failures, retry_after)
        telemetry.current().retry(part.provider, "step", delay)
        log.warning("batch %s part %d: %s; next try in %.1fs", batch.id, part.part_no, reason, delay)
        return min(time.time() + delay, max(self._deadline(batch), time.time() + self.settings.tick_seconds))

    async def _give_up(self, batch: BatchRow, part: PartRow, adapter: NativeBatchAdapter, dst: BatchStatus,
                       error: BatchError) -> None:
        """End a part Sluice can no longer drive: first ask the provider to cancel what it was sent
        (best effort, once), then end the part with the reason. An expired part keeps its stored
        results; its other lines are expired."""
        if part.provider_batch_id and part.cancel_sent_at is None:
            try:
                await adapter.cancel(part.provider_batch_id)
                await self.store.mark_cancel_sent(batch.id, part.part_no)
                log.info("batch %s part %d: giving up; cancel sent to %s", batch.id, part.part_no, adapter.name)
            except Exception as exc:  # the part ends anyway; say what is left at the provider
                log.warning("batch %s part %d: giving up; could not cancel %s at %s (%s): cancel it there by hand",
                            batch.id, part.part_no, part.provider_batch_id, adapter.name, exc)
        if dst is BatchStatus.EXPIRED:
            await self._close_unfinished(batch, part, ResultStatus.EXPIRED, "batch_expired",
                                         "The batch expired before this request ran.")
        await self.store.end_part(batch.id, part.part_no, dst, [error])

    async def _advance_native(self, batch: BatchRow, part: PartRow, adapter: NativeBatchAdapter) -> float | None:
        if part.provider_batch_id is None:
            if await self._end_part_early(batch, part):
                return None
            await self._submit(batch, part, adapter)
            return time.time() + self.settings.poll_seconds
        if batch.status is BatchStatus.CANCELLING and part.cancel_sent_at is None:
            await adapter.cancel(part.provider_batch_id)
            await self.store.mark_cancel_sent(batch.id, part.part_no)
            log.info("batch %s part %d: cancel sent to %s", batch.id, part.part_no, adapter.name)
        state = await adapter.poll(part.provider_batch_id)
        if state.raw_status != part.provider_status:
            log.info("batch %s part %d: %s reports %s (%s of %s requests done)", batch.id, part.part_no, adapter.name,
                     state.raw_status, (state.completed or 0) + (state.failed or 0),
                     state.total if state.total is not None else "?")
        await self.store.record_provider_status(batch.id, part.part_no, state.raw_status, state.completed,
                                                state.failed)
        if not state.ended:
            started = BatchStatus.VALIDATING not in (part.status, batch.status)
            if not started and state.status is not ProviderState.VALIDATING:
                await self._start(batch, part)
            return time.time() + self.settings.poll_seconds
        await self._collect(batch, part, adapter, state)
        return None

    async def _submit(self, batch: BatchRow, part: PartRow, adapter: NativeBatchAdapter) -> None:
        provider_id = None
        job = BatchJob(batch_id=part.job_id, endpoint=batch.endpoint, model=part.provider_model or "",
                       completion_window=batch.completion_window, line_count=part.total)
        if part.submit_started_at is not None:
            provider_id = await adapter.find_submitted(part.job_id, job=job, since=part.submit_started_at)
            if provider_id:
                log.info("batch %s part %d: found earlier submission %s at %s", batch.id, part.part_no, provider_id,
                         adapter.name)
        if provider_id is None:
            await self.store.mark_submit_started(batch.id, part.part_no)
            provider_id = await adapter.submit(job, self._lines(batch, part))
            log.info("batch %s part %d: submitted to %s as %s (%d lines)", batch.id, part.part_no, adapter.name,
                     provider_id, part.total)
        await self.store.record_provider_batch_id(batch.id, part.part_no, provider_id)
        await self.store.transition(batch.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)

    async def _lines(self, batch: BatchRow, part: PartRow) -> AsyncIterator[RequestLine]:
        async for req in self.store.iter_requests(batch.id, part_no=part.part_no):
            yield self._line(req, batch)

    async def _collect(self, batch: BatchRow, part: PartRow, adapter: NativeBatchAdapter,
                       state: ProviderStatus) -> None:
        """The provider says the part ended: store every result, then end the part. While the
        results of the batch's last running part are stored, the batch shows `finalizing`."""
        assert part.provider_batch_id is not None
        if state.status is ProviderState.FAILED:
            errors = [BatchError(e.code, e.message, e.param, e.line) for e in state.errors]
            await self.store.end_part(batch.id, part.part_no, BatchStatus.FAILED,
                                      errors or [BatchError("provider_error", f"{adapter.name} rejected the batch")])
            return
        final = BatchStatus(state.status.value)  # completed, expired or cancelled
        await self.store.part_finalizing(batch.id, part.part_no)
        others_done = all(p.status.terminal or p.status is BatchStatus.FINALIZING
                          for p in batch.parts if p.part_no != part.part_no)
        if others_done and batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            # Still validating only after a crash between storing the provider's id and leaving
            # validating: pass through in_progress (validating -> finalizing is no edge). A batch that
            # moved meanwhile (a cancel) fails both compare-and-sets and is decided again.
            if batch.status is BatchStatus.VALIDATING:
                await self._start(batch, part)
            await self.store.transition(batch.id, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
        buffer: list[LineResult] = []
        async for result in adapter.results(part.provider_batch_id):
            buffer.append(result)
            if len(buffer) >= STORE_CHUNK:
                await self._store_native(batch, part, buffer)
                buffer = []
        await self._store_native(batch, part, buffer)
        code, result_status = {
            BatchStatus.EXPIRED: ("batch_expired", ResultStatus.EXPIRED),
            BatchStatus.CANCELLED: ("batch_cancelled", ResultStatus.CANCELLED),
        }.get(final, ("missing_result", ResultStatus.FAILED))
        await self._close_unfinished(batch, part, result_status, code,
                                     f"{adapter.name} returned no result for this request ({state.raw_status}).")
        await self.store.end_part(batch.id, part.part_no, final)

    async def _store_native(self, batch: BatchRow, part: PartRow, results: list[LineResult]) -> None:
        if not results:
            return
        keys = await self.store.request_keys(batch.id, [r.index for r in results])
        stored = []
        for r in results:
            req = keys.get(r.index)
            if req is None or req.part_no != part.part_no:
                log.warning("batch %s part %d: %s returned a result for unknown line %d; ignored",
                            batch.id, part.part_no, part.provider, r.index)
                continue
            status = ResultStatus.COMPLETED if r.ok else _ENDED_BY_BATCH.get(
                r.error.code if r.error else "", ResultStatus.FAILED)
            stored.append(outcome(r, req.custom_id, status, self._price(req, part)))
        await self.store.store_results(batch.id, stored, part_no=part.part_no)
