"""BatchService: the RPCs, in terms of the store, the validator and the engine.

Only this module and service/edge/grpc_errors.py know the servicer side of gRPC; errors raised here
are `SluiceError`s and are turned into statuses by `translate_errors`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

from service.domain.errors import IdempotencyKeyReused, InvalidRequest, PayloadTooLarge
from service.domain.model import (
    DEFAULT_LIMITS,
    DEFAULT_RETRY_OUTCOMES,
    RETRYABLE_OUTCOMES,
    BatchStatus,
    Limits,
    ResultStatus,
    month_of,
    now,
)
from service.edge import convert, lookups
from service.edge.auth import Authenticator
from service.edge.grpc_errors import translate_errors
from service.edge.watch import batch_with_retries, watch_batch
from service.intake.estimate import METHOD, Estimator
from service.intake.file_inputs import BatchInputs
from service.intake.validation import (
    LineProblem,
    LineValidator,
    check_completion_window,
    check_endpoint,
    check_expires_after,
    check_metadata,
)
from service.providers.routing import Router
from service.storage.admin import AdminStore
from service.storage.repository import (
    Attempt,
    IdempotencyClaim,
    KeyTaken,
    NewRequest,
    Reservation,
    Store,
    new_id,
)
from service.storage.tables import BatchRow, IdempotencyRow, RequestRow
from sluice.v1 import batch_pb2, batch_pb2_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpcio ships no type stubs
CreateLike: TypeAlias = batch_pb2.CreateBatchRequest | batch_pb2.EstimateBatchRequest

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
DEFAULT_RESULTS_LIMIT, MAX_RESULTS_LIMIT = 100, 1000
IDEMPOTENCY_HEADER = "idempotency-key"
MAX_IDEMPOTENCY_KEY = 255


def page_size(limit: int | None, default: int, maximum: int, param: str = "limit") -> int:
    if limit is None:
        return default
    if not 1 <= limit <= maximum:
        raise InvalidRequest(f"{param} must be between 1 and {maximum}, got {limit}.", param=param,
                             code="invalid_limit")
    return limit


def _inline_line(line: Any) -> dict[str, Any]:
    return {"custom_id": line.custom_id, "method": line.method, "url": line.url,
            "body": convert.struct_to_dict(line.body) if line.HasField("body") else None}


def inline_requests(lines: Any, validator: LineValidator, max_requests: int) -> AsyncIterator[NewRequest]:
    """Check every inline line, then hand them to the store one at a time.

    Two passes over the protobuf message, converting one line to JSON at a time in each, so a
    16 MiB request never becomes a list of 50,000 dicts (several times its size) in memory."""
    if len(lines) > max_requests:
        raise PayloadTooLarge(f"A batch holds at most {max_requests} requests; got {len(lines)}.",
                              param="requests", code="too_many_requests")
    for i, line in enumerate(lines):
        try:
            validator.check(_inline_line(line), line.ByteSize())
        except LineProblem as p:
            where = f"requests[{i}]"
            error = PayloadTooLarge if p.code == "line_too_complex" else InvalidRequest
            raise error(f"{where}: {p.message}.", param=f"{where}.{p.field}" if p.field else where,
                        code=p.code) from None
    return _converted(lines, validator)


async def _converted(lines: Any, validator: LineValidator) -> AsyncIterator[NewRequest]:
    for i, line in enumerate(lines):
        raw = _inline_line(line)
        yield validator.again(i, raw["custom_id"], raw["body"])


def idempotency_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The `Idempotency-Key` header (REST, passed on by Envoy) or `idempotency-key` metadata."""
    key = next((v for k, v in metadata or () if k == IDEMPOTENCY_HEADER), None)
    if key is None:
        return None
    key = key.decode(errors="replace") if isinstance(key, bytes) else key
    if not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters.",
                             param="Idempotency-Key", code="invalid_idempotency_key")
    return key


def request_digest(request: batch_pb2.CreateBatchRequest) -> str:
    """The same body, however its JSON was ordered or spaced, gives the same digest."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


@translate_errors
class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, store: Store, auth: Authenticator, router: Router, on_change: Callable[[], None],
                 inputs: BatchInputs, limits: Limits = DEFAULT_LIMITS,
                 budgets: Mapping[str, float] | None = None, *, watch_poll_seconds: float = 0.25,
                 closing: asyncio.Event | None = None, admin: AdminStore | None = None) -> None:
        self.store = store
        self.auth = auth
        self.router = router
        self.on_change = on_change
        self.inputs = inputs
        self.limits = limits
        self.budgets = dict(budgets or {})  # from SLUICE_BUDGETS; a budget set through the admin API wins
        self.admin = admin
        self.watch_poll_seconds = watch_poll_seconds
        # Set when the server shuts down: watch streams end at once instead of holding it up.
        self.closing = closing or asyncio.Event()

    async def _project(self, context: Context) -> str:
        return await self.auth.project(context.invocation_metadata())

    async def _message(self, row: BatchRow) -> batch_pb2.Batch:
        return await batch_with_retries(self.store, row)

    # --- create -----------------------------------------------------------------------------

    def _new_row(self, project: str, request: CreateLike) -> tuple[BatchRow, LineValidator]:
        """Check the batch-level fields (exactly as create and estimate both do)."""
        if request.input_file_id and request.requests:
            raise InvalidRequest("Give either input_file_id or requests, not both.", param="input_file_id",
                                 code="conflicting_parameters")
        if not request.input_file_id and not request.requests:
            raise InvalidRequest("Missing required parameter: 'input_file_id' (or inline 'requests').",
                                 param="input_file_id", code="missing_required_parameter")
        endpoint = check_endpoint(request.endpoint)
        window = check_completion_window(request.completion_window)
        metadata = check_metadata(convert.struct_to_dict(request.metadata) if request.HasField("metadata") else None)
        validator = LineValidator(endpoint=endpoint, router=self.router, estimator=Estimator(self.router))
        row = BatchRow.new(id=new_id("batch_"), project=project, endpoint=endpoint, completion_window=window,
                           created_at=now(), input_file_id=request.input_file_id, metadata=metadata)
        if isinstance(request, batch_pb2.CreateBatchRequest) and request.HasField("output_expires_after"):
            row.output_expires_after = check_expires_after(
                request.output_expires_after.anchor, request.output_expires_after.seconds, "output_expires_after")
        return row, validator

    async def _lines(self, project: str, request: CreateLike, validator: LineValidator,
                     row: BatchRow) -> Iterable[NewRequest] | AsyncIterable[NewRequest]:
        """Every line checked; a file with bad lines marks `row` failed and gives no lines."""
        if request.input_file_id:
            lookups.file_id(request.input_file_id, param="input_file_id")
            return await self.inputs.prepare(project, request.input_file_id, validator, row) or ()
        return inline_requests(request.requests, validator, self.limits.max_requests)

    async def _budget(self, project: str) -> float | None:
        """The project's monthly spend limit: the one set through the admin API, else SLUICE_BUDGETS's."""
        stored = await self.admin.project_budget(project) if self.admin is not None else None
        return stored if stored is not None else self.budgets.get(project)

    async def _reservation(self, project: str, validator: LineValidator) -> Reservation:
        assert validator.estimator is not None
        return Reservation(amount=validator.estimator.cost_max, limit=await self._budget(project))

    async def CreateBatch(self, request: batch_pb2.CreateBatchRequest,
                          context: Context) -> batch_pb2.Batch:
        project = await self._project(context)
        key = idempotency_key(context.invocation_metadata())
        claim = IdempotencyClaim(key, request_digest(request)) if key else None
        if claim is not None and (earlier := await self.store.find_idempotency_key(project, claim.key)):
            return await self._replay(project, earlier, claim)
        row, validator = self._new_row(project, request)
        requests = await self._lines(project, request, validator, row)
        row.model, row.provider, row.provider_model = validator.model, validator.provider, validator.provider_model
        try:
            batch = await self.store.create_batch(row, requests, validator.parts, idempotency=claim,
                                                  reservation=await self._reservation(project, validator))
        except KeyTaken:
            # The same key was used by a request that committed while this one was checking its
            # lines (here or on another replica): answer as that request did.
            assert claim is not None
            earlier = await self.store.find_idempotency_key(project, claim.key)
            assert earlier is not None, "a committed key is found"
            return await self._replay(project, earlier, claim)
        self.on_change()
        return await self._message(batch)

    async def _replay(self, project: str, earlier: IdempotencyRow, claim: IdempotencyClaim) -> batch_pb2.Batch:
        if earlier.request_hash != claim.request_hash:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {claim.key!r} was used in the last 24 hours for a different request (batch "
                f"{earlier.batch_id}); use a new key for a new batch.", param="Idempotency-Key",
                code="idempotency_key_reused")
        return await self._message(await self.store.get_batch(project, earlier.batch_id))

    # --- read, cancel -------------------------------------------------------------------------

    async def GetBatch(self, request: batch_pb2.GetBatchRequest, context: Context) -> batch_pb2.Batch:
        project = await self._project(context)
        batch, retries = await self.store.get_batch_with_retries(project, lookups.batch_id(request.id))
        return convert.batch_message(batch, retries)

    async def ListBatches(self, request: batch_pb2.ListBatchesRequest,
                          context: Context) -> batch_pb2.ListBatchesResponse:
        project = await self._project(context)
        limit = page_size(request.limit if request.HasField("limit") else None, DEFAULT_LIMIT, MAX_LIMIT)
        rows, has_more = await self.store.list_batches(project, limit, lookups.cursor(request.after, "batch"))
        retries = await self.store.retries_of([r.id for r in rows])
        out = batch_pb2.ListBatchesResponse(object="list", has_more=has_more,
                                            data=[convert.batch_message(r, retries.get(r.id, ())) for r in rows])
        if rows:
            out.first_id, out.last_id = rows[0].id, rows[-1].id
        return out

    async def CancelBatch(self, request: batch_pb2.CancelBatchRequest,
                          context: Context) -> batch_pb2.Batch:
        project = await self._project(context)
        batch = await self.store.request_cancel(project, lookups.batch_id(request.id))
        self.on_change()
        return await self._message(batch)

    async def ListBatchResults(self, request: batch_pb2.ListBatchResultsRequest,
                               context: Context) -> batch_pb2.ListBatchResultsResponse:
        project = await self._project(context)
        limit = page_size(request.limit if request.HasField("limit") else None, DEFAULT_RESULTS_LIMIT,
                          MAX_RESULTS_LIMIT)
        batch = await self.store.get_batch(project, lookups.batch_id(request.id))
        after = lookups.custom_id(request.after, batch.id, param="after", code="cursor_not_found") \
            if request.after else ""
        if request.across_retries:
            chain = await self.store.chain(project, batch.id)
            attempts, has_more = await self.store.latest_attempts(chain, after, limit)
            out = batch_pb2.ListBatchResultsResponse(object="list", batch_id=chain[0].id, has_more=has_more,
                                                     data=[_attempt_message(a) for a in attempts])
        else:
            rows, has_more = await self.store.result_page(batch, limit, after)
            numbers = await self._attempt_numbers(project, batch, rows)
            out = batch_pb2.ListBatchResultsResponse(object="list", batch_id=batch.id, has_more=has_more)
            convert.add_results(out, batch, rows, numbers)
        data = out.data
        if data:
            out.first_id, out.last_id = data[0].custom_id, data[-1].custom_id
            if has_more:
                out.next_cursor = out.last_id
        return out

    async def _attempt_numbers(self, project: str, batch: BatchRow, requests: Sequence[Any]) -> dict[int, int]:
        """idx -> attempt number of each line (request rows, or result page rows: idx, origin_idx)."""
        if batch.chain_id is None:
            return {r.idx: 1 for r in requests}
        return await self.store.attempt_numbers(await self.store.chain(project, batch.id), batch, requests)

    async def GetBatchResult(self, request: batch_pb2.GetBatchResultRequest,
                             context: Context) -> batch_pb2.BatchResult:
        project = await self._project(context)
        batch_id = lookups.batch_id(request.batch_id)
        await self.store.get_batch(project, batch_id)  # an unknown batch is a 404 on the batch, first
        batch, req, res = await self.store.get_result(project, batch_id, lookups.custom_id(request.custom_id, batch_id))
        numbers = await self._attempt_numbers(project, batch, [req])
        return convert.result_message(batch, req, res, numbers[req.idx])

    async def WatchBatch(self, request: batch_pb2.WatchBatchRequest,
                         context: Context) -> AsyncIterator[batch_pb2.WatchBatchResponse]:
        project = await self._project(context)
        async for kind, batch in watch_batch(self.store, project, request.id, self.watch_poll_seconds, self.closing):
            yield batch_pb2.WatchBatchResponse(type=kind.value, batch=batch)

    # --- retries ------------------------------------------------------------------------------

    async def RetryBatch(self, request: batch_pb2.RetryBatchRequest, context: Context) -> batch_pb2.Batch:
        project = await self._project(context)
        source = await self.store.get_batch(project, lookups.batch_id(request.id))
        if not source.status.terminal:
            raise InvalidRequest(f"Batch {source.id} is {source.status}; only an ended batch can be retried "
                                 "(cancel it first, or wait for it to end).", param="id", code="batch_not_ended")
        outcomes, custom_ids = await self._what_to_retry(source, request)
        metadata = (check_metadata(convert.struct_to_dict(request.metadata)) if request.HasField("metadata")
                    else json.loads(source.metadata_json) if source.metadata_json else None)
        validator = LineValidator(endpoint=source.endpoint, router=self.router, estimator=Estimator(self.router))
        model = request.model.strip() or None
        chosen = self.store.iter_retry_lines(source, outcomes, custom_ids)
        count = 0
        async for req in chosen:  # first pass: every line checked (and routed) as at create
            try:
                validator.check(_retry_line(req, model, source.endpoint), len(req.body_json))
            except LineProblem as p:
                raise InvalidRequest(f"Line {req.custom_id!r} cannot be retried: {p.message}.",
                                     param="model" if p.field == "body.model" and model else "id",
                                     code=p.code) from None
            count += 1
        if count == 0:
            wanted = ", ".join(sorted(outcomes)) if custom_ids is None else "the given custom_ids"
            raise InvalidRequest(f"Batch {source.id} has no lines to retry ({wanted}).", param="outcomes",
                                 code="nothing_to_retry")
        row = BatchRow.new(id=new_id("batch_"), project=project, endpoint=source.endpoint,
                           completion_window=source.completion_window, created_at=now(), metadata=metadata)
        row.retry_of, row.chain_id = source.id, source.chain_id or source.id
        row.model, row.provider, row.provider_model = validator.model, validator.provider, validator.provider_model
        batch = await self.store.create_batch(row, self._retry_requests(source, outcomes, custom_ids, model, validator),
                                              validator.parts, reservation=await self._reservation(project, validator))
        self.on_change()
        return await self._message(batch)

    async def _what_to_retry(self, source: BatchRow, request: batch_pb2.RetryBatchRequest,
                             ) -> tuple[frozenset[ResultStatus], frozenset[str] | None]:
        if request.custom_ids:
            if request.outcomes:
                raise InvalidRequest("Give either outcomes or custom_ids, not both.", param="custom_ids",
                                     code="conflicting_parameters")
            wanted = list(dict.fromkeys(request.custom_ids))
            if len(wanted) > self.limits.max_requests:
                raise PayloadTooLarge(f"At most {self.limits.max_requests} custom_ids.", param="custom_ids",
                                      code="too_many_requests")
            known = await self.store.known_custom_ids(source.id, wanted)
            missing = [c for c in wanted if c not in known]
            if missing:
                i = list(request.custom_ids).index(missing[0])
                raise InvalidRequest(f"custom_ids[{i}]: batch {source.id} has no line {missing[0]!r}"
                                     + (f" (and {len(missing) - 1} more unknown)" if len(missing) > 1 else "") + ".",
                                     param=f"custom_ids[{i}]", code="result_not_found")
            return frozenset(), frozenset(wanted)
        outcomes: set[ResultStatus] = set()
        for i, name in enumerate(request.outcomes):
            try:
                outcome = ResultStatus(name)
            except ValueError:
                outcome = None
            if outcome not in RETRYABLE_OUTCOMES:
                raise InvalidRequest(f"outcomes[{i}]: {name!r} cannot be retried; use failed, expired or cancelled.",
                                     param=f"outcomes[{i}]", code="invalid_outcome")
            assert outcome is not None
            outcomes.add(outcome)
        return frozenset(outcomes) or DEFAULT_RETRY_OUTCOMES, None

    async def _retry_requests(self, source: BatchRow, outcomes: frozenset[ResultStatus],
                              custom_ids: frozenset[str] | None, model: str | None,
                              validator: LineValidator) -> AsyncIterator[NewRequest]:
        """Second pass: the lines as the first pass checked and routed them."""
        n = 0
        async for req in self.store.iter_retry_lines(source, outcomes, custom_ids):
            line = _retry_line(req, model, source.endpoint)
            route = validator.route_of(line["body"]["model"])
            yield NewRequest(custom_id=req.custom_id, model=line["body"]["model"], body=line["body"],
                             provider_model=route.model, provider=route.provider, part_no=validator.part_of(n),
                             origin_idx=req.origin_idx if req.origin_idx is not None else req.idx)
            n += 1

    async def ListResultAttempts(self, request: batch_pb2.ListResultAttemptsRequest,
                                 context: Context) -> batch_pb2.ListResultAttemptsResponse:
        project = await self._project(context)
        batch_id = lookups.batch_id(request.batch_id)
        chain = await self.store.chain(project, batch_id)
        attempts = await self.store.line_attempts(chain, lookups.custom_id(request.custom_id, batch_id))
        return batch_pb2.ListResultAttemptsResponse(object="list", custom_id=request.custom_id,
                                                    data=[_attempt_message(a) for a in attempts])

    # --- estimate and budget ------------------------------------------------------------------

    async def EstimateBatch(self, request: batch_pb2.EstimateBatchRequest,
                            context: Context) -> batch_pb2.EstimateBatchResponse:
        project = await self._project(context)
        row, validator = self._new_row(project, request)
        await self._lines(project, request, validator, row)  # every line checked; nothing is stored
        if row.status is BatchStatus.FAILED:
            errors = row.errors or []
            problems = "; ".join(f"line {e.line}: {e.message}" if e.line else e.message for e in errors)
            raise InvalidRequest(f"The input file has invalid lines: {problems}.", param="input_file_id",
                                 code=errors[0].code if errors else "invalid_file")
        estimator = validator.estimator
        assert estimator is not None
        out = batch_pb2.EstimateBatchResponse(object="batch.estimate", endpoint=row.endpoint,
                                              line_count=validator.lines, method=METHOD)
        total_min = total_est = total_max = 0
        for part in validator.parts:
            tally = estimator.parts[part.part_no]
            price = next(iter(tally.prices)) if len(tally.prices) == 1 else None
            msg = out.parts.add(part=part.part_no, provider=part.provider, line_count=tally.lines,
                                input_tokens=_tokens(tally.input_estimate, tally.input_min, tally.input_max),
                                output_tokens_max=convert.u32(tally.output_max),
                                lines_without_max_tokens=tally.unbounded, cost_min=tally.cost_min,
                                cost_max=tally.cost_max)
            if part.provider_model:
                msg.model = part.provider_model
            if price is not None:
                msg.input_per_mtok, msg.output_per_mtok = price.input_per_mtok, price.output_per_mtok
                msg.batch_discount = price.batch_discount
            total_min, total_est, total_max = (total_min + tally.input_min, total_est + tally.input_estimate,
                                               total_max + tally.input_max)
            out.output_tokens_max = convert.u32(out.output_tokens_max + tally.output_max)
            out.cost_min += tally.cost_min
            out.cost_max += tally.cost_max
        out.input_tokens.CopyFrom(_tokens(total_est, total_min, total_max))
        return out

    async def GetBudget(self, request: batch_pb2.GetBudgetRequest, context: Context) -> batch_pb2.GetBudgetResponse:
        project = await self._project(context)
        month = request.month or month_of(now())
        if not _is_month(month):
            raise InvalidRequest(f"month must look like 2025-07, got {month!r}.", param="month", code="invalid_month")
        spend = await self.store.spend(project, month)
        out = batch_pb2.GetBudgetResponse(object="budget", project=project, month=month, spent=round(spend.spent, 10),
                                          reserved=round(spend.reserved, 10))
        limit = await self._budget(project)
        if limit is not None:
            out.limit = limit
            out.remaining = round(max(limit - spend.spent - spend.reserved, 0.0), 10)
        return out


def _retry_line(req: RequestRow, model: str | None, endpoint: str) -> dict[str, Any]:
    body = json.loads(req.body_json)
    if model:
        body["model"] = model
    return {"custom_id": req.custom_id, "method": "POST", "url": endpoint, "body": body}


def _attempt_message(attempt: Attempt) -> batch_pb2.BatchResult:
    return convert.result_message(attempt.batch, attempt.request, attempt.result, attempt.number)


def _tokens(estimate: int, low: int, high: int) -> batch_pb2.TokenEstimate:
    return batch_pb2.TokenEstimate(estimate=convert.u32(estimate), min=convert.u32(low), max=convert.u32(high))


def _is_month(value: str) -> bool:
    year, sep, month = value.partition("-")
    return bool(sep) and len(year) == 4 and year.isdigit() and len(month) == 2 and month.isdigit() \
        and 1 <= int(month) <= 12
