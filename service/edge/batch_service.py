"""BatchService: the RPCs, in terms of the store, the validator and the engine.

Only this module and service/edge/grpc_errors.py know the servicer side of gRPC; errors raised here
are `SluiceError`s and are turned into statuses by `translate_errors`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, TypeAlias

from service.domain.errors import InvalidRequest, PayloadTooLarge
from service.domain.model import MAX_REQUESTS, now
from service.edge import convert, lookups
from service.edge.auth import Authenticator
from service.edge.grpc_errors import translate_errors
from service.edge.watch import watch_batch
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
from service.storage.repository import NewRequest, Store, new_id
from service.storage.tables import BatchRow
from sluice.v1 import batch_pb2, batch_pb2_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpcio ships no type stubs

DEFAULT_LIMIT, MAX_LIMIT = 20, 100
DEFAULT_RESULTS_LIMIT, MAX_RESULTS_LIMIT = 100, 1000


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


def inline_requests(lines: Any, validator: LineValidator) -> AsyncIterator[NewRequest]:
    """Check every inline line, then hand them to the store one at a time.

    Two passes over the protobuf message, converting one line to JSON at a time in each, so a
    16 MiB request never becomes a list of 50,000 dicts (several times its size) in memory."""
    if len(lines) > MAX_REQUESTS:
        raise PayloadTooLarge(f"A batch holds at most {MAX_REQUESTS} requests; got {len(lines)}.",
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
    for line in lines:
        raw = _inline_line(line)
        model = raw["body"]["model"]
        yield NewRequest(custom_id=raw["custom_id"], model=model, body=raw["body"],
                         provider_model=validator.route_of(model).model)


@translate_errors
class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, store: Store, auth: Authenticator, router: Router, on_change: Callable[[], None],
                 inputs: BatchInputs, *, watch_poll_seconds: float = 0.25,
                 closing: asyncio.Event | None = None) -> None:
        self.store = store
        self.auth = auth
        self.router = router
        self.on_change = on_change
        self.inputs = inputs
        self.watch_poll_seconds = watch_poll_seconds
        # Set when the server shuts down: watch streams end at once instead of holding it up.
        self.closing = closing or asyncio.Event()

    async def _project(self, context: Context) -> str:
        return await self.auth.project(context.invocation_metadata())

    async def CreateBatch(self, request: batch_pb2.CreateBatchRequest,
                          context: Context) -> batch_pb2.Batch:
        project = await self._project(context)
        if request.input_file_id and request.requests:
            raise InvalidRequest("Give either input_file_id or requests, not both.", param="input_file_id",
                                 code="conflicting_parameters")
        if not request.input_file_id and not request.requests:
            raise InvalidRequest("Missing required parameter: 'input_file_id' (or inline 'requests').",
                                 param="input_file_id", code="missing_required_parameter")
        endpoint = check_endpoint(request.endpoint)
        window = check_completion_window(request.completion_window)
        metadata = check_metadata(convert.struct_to_dict(request.metadata) if request.HasField("metadata") else None)
        output_ttl = check_expires_after(request.output_expires_after.anchor, request.output_expires_after.seconds,
                                         "output_expires_after") if request.HasField("output_expires_after") else None
        validator = LineValidator(endpoint=endpoint, router=self.router)
        row = BatchRow.new(id=new_id("batch_"), project=project, endpoint=endpoint, completion_window=window,
                           created_at=now(), input_file_id=request.input_file_id, metadata=metadata)
        row.output_expires_after = output_ttl
        requests: Iterable[NewRequest] | AsyncIterable[NewRequest]
        if request.input_file_id:
            lookups.file_id(request.input_file_id, param="input_file_id")
            requests = await self.inputs.prepare(project, request.input_file_id, validator, row) or ()
        else:
            requests = inline_requests(request.requests, validator)
        row.model, row.provider, row.provider_model = validator.model, validator.provider, validator.provider_model
        batch = await self.store.create_batch(row, requests)
        self.on_change()
        return convert.batch_message(batch)

    async def GetBatch(self, request: batch_pb2.GetBatchRequest, context: Context) -> batch_pb2.Batch:
        project = await self._project(context)
        batch = await self.store.get_batch(project, lookups.batch_id(request.id))
        return convert.batch_message(batch)

    async def ListBatches(self, request: batch_pb2.ListBatchesRequest,
                          context: Context) -> batch_pb2.ListBatchesResponse:
        project = await self._project(context)
        limit = page_size(request.limit if request.HasField("limit") else None, DEFAULT_LIMIT, MAX_LIMIT)
        rows, has_more = await self.store.list_batches(project, limit, lookups.cursor(request.after, "batch"))
        out = batch_pb2.ListBatchesResponse(object="list", has_more=has_more,
                                            data=[convert.batch_message(r) for r in rows])
        if rows:
            out.first_id, out.last_id = rows[0].id, rows[-1].id
        return out

    async def CancelBatch(self, request: batch_pb2.CancelBatchRequest,
                          context: Context) -> batch_pb2.Batch:
        project = await self._project(context)
        batch = await self.store.request_cancel(project, lookups.batch_id(request.id))
        self.on_change()
        return convert.batch_message(batch)

    async def ListBatchResults(self, request: batch_pb2.ListBatchResultsRequest,
                               context: Context) -> batch_pb2.ListBatchResultsResponse:
        project = await self._project(context)
        limit = page_size(request.limit if request.HasField("limit") else None, DEFAULT_RESULTS_LIMIT,
                          MAX_RESULTS_LIMIT)
        batch = await self.store.get_batch(project, lookups.batch_id(request.id))
        after = lookups.custom_id(request.after, batch.id, param="after", code="cursor_not_found") \
            if request.after else ""
        rows, has_more = await self.store.list_results(project, request.id, limit, after)
        out = batch_pb2.ListBatchResultsResponse(
            object="list", batch_id=batch.id, has_more=has_more,
            data=[convert.result_message(batch, req, res) for req, res in rows])
        if rows:
            out.first_id, out.last_id = rows[0][0].custom_id, rows[-1][0].custom_id
            if has_more:
                out.next_cursor = out.last_id
        return out

    async def GetBatchResult(self, request: batch_pb2.GetBatchResultRequest,
                             context: Context) -> batch_pb2.BatchResult:
        project = await self._project(context)
        batch_id = lookups.batch_id(request.batch_id)
        await self.store.get_batch(project, batch_id)  # an unknown batch is a 404 on the batch, first
        batch, req, res = await self.store.get_result(project, batch_id, lookups.custom_id(request.custom_id, batch_id))
        return convert.result_message(batch, req, res)

    async def WatchBatch(self, request: batch_pb2.WatchBatchRequest,
                         context: Context) -> AsyncIterator[batch_pb2.WatchBatchResponse]:
        project = await self._project(context)
        async for kind, batch in watch_batch(self.store, project, request.id, self.watch_poll_seconds, self.closing):
            yield batch_pb2.WatchBatchResponse(type=kind.value, batch=batch)
