"""Rows to protobuf messages, and protobuf JSON values back to plain JSON.

`google.protobuf.Struct` holds every number as a double, so `{"max_tokens": 100}` arrives as
100.0; providers with strict schemas reject that. `plain_json` (service/domain/json_values.py)
turns integral doubles back into integers before a body is stored or sent anywhere.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2

from service.domain.codec import loads
from service.domain.json_values import plain_json
from service.domain.model import BatchError, BatchStatus, ResultStatus, Usage, request_counts
from service.storage.tables import BatchRow, PartRow, RequestRow, ResultRow
from sluice.v1 import batch_pb2


def struct_to_dict(message: struct_pb2.Struct) -> dict[str, Any]:
    result: dict[str, Any] = plain_json(json_format.MessageToDict(message))
    return result


def _usage(usage: Usage) -> batch_pb2.BatchUsage:
    msg = batch_pb2.BatchUsage()
    _set_usage(msg, usage)
    return msg


def _set_usage(msg: batch_pb2.BatchUsage, usage: Usage) -> None:
    """Fill a (present) BatchUsage in place, its two details messages present too."""
    msg.SetInParent()
    msg.input_tokens = u32(usage.input_tokens)
    msg.input_tokens_details.SetInParent()
    msg.input_tokens_details.cached_tokens = u32(usage.cached_tokens)
    msg.output_tokens = u32(usage.output_tokens)
    msg.output_tokens_details.SetInParent()
    msg.output_tokens_details.reasoning_tokens = u32(usage.reasoning_tokens)
    msg.total_tokens = u32(usage.total_tokens)
    msg.input_cost, msg.output_cost, msg.total_cost = usage.input_cost, usage.output_cost, usage.total_cost


def u32(value: int | None) -> int:
    """Saturate: a uint32 token count of 4.29 billion is the API's documented ceiling."""
    return min(max(value or 0, 0), 2**32 - 1)


def _request_counts(row: BatchRow) -> batch_pb2.BatchRequestCounts:
    """While native parts run, their results are stored only at the end: each part shows the
    larger of its stored and its provider's live counts, and the batch their sum."""
    live_completed = sum(max(p.completed, p.provider_completed or 0) for p in row.parts)
    live_failed = sum(max(p.failed, p.provider_failed or 0) for p in row.parts)
    completed, failed = request_counts(row.status, row.total, row.completed, row.failed, live_completed,
                                       live_failed)
    return batch_pb2.BatchRequestCounts(total=row.total, completed=completed, failed=failed)


def _part(part: PartRow) -> batch_pb2.BatchPart:
    completed, failed = request_counts(part.status, part.total, part.completed, part.failed,
                                       part.provider_completed, part.provider_failed)
    msg = batch_pb2.BatchPart(part=part.part_no, provider=part.provider, status=part.status,
                              request_counts=batch_pb2.BatchRequestCounts(total=part.total, completed=completed,
                                                                          failed=failed))
    for name, value in (("model", part.provider_model), ("provider_batch_id", part.provider_batch_id),
                        ("provider_status", part.provider_status)):
        if value:
            setattr(msg, name, value)
    if part.errors:
        msg.errors.object = "list"
        msg.errors.data.extend(_batch_error(e) for e in part.errors)
    return msg


def batch_message(row: BatchRow, retries: Sequence[str] = ()) -> batch_pb2.Batch:
    msg = batch_pb2.Batch(
        id=row.id, object="batch", endpoint=row.endpoint, input_file_id=row.input_file_id or "",
        completion_window=row.completion_window, status=row.status, created_at=u32(row.created_at),
        expires_at=u32(row.expires_at), provider=row.provider,
        request_counts=_request_counts(row),
        usage=_usage(row.usage),
    )
    for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                 "cancelling_at", "cancelled_at"):
        value = getattr(row, name)
        if value is not None:
            setattr(msg, name, u32(value))
    for name in ("model", "output_file_id", "error_file_id", "retry_of", "merged_output_file_id",
                 "merged_error_file_id"):
        value = getattr(row, name)
        if value:
            setattr(msg, name, value)
    if len(row.parts) == 1 and row.parts[0].provider_batch_id:
        msg.provider_batch_id = row.parts[0].provider_batch_id
    msg.parts.extend(_part(p) for p in row.parts)
    msg.retries.extend(retries)
    if row.metadata_json:
        msg.metadata.update(json.loads(row.metadata_json))
    if row.errors:
        msg.errors.object = "list"
        msg.errors.data.extend(_batch_error(e) for e in row.errors)
    return msg


def _batch_error(error: BatchError) -> batch_pb2.BatchError:
    msg = batch_pb2.BatchError(code=error.code, message=error.message)
    if error.param is not None:
        msg.param = error.param
    if error.line is not None:
        msg.line = error.line
    return msg


def result_message(batch: BatchRow, req: RequestRow, res: ResultRow | None,
                   attempt: int = 1) -> batch_pb2.BatchResult:
    msg = batch_pb2.BatchResult(custom_id=req.custom_id, index=req.idx, model=req.model,
                                provider=req.provider or batch.provider, url=batch.endpoint, batch_id=batch.id,
                                attempt=attempt)
    if res is None:
        msg.status = (ResultStatus.RUNNING if batch.status is BatchStatus.IN_PROGRESS else ResultStatus.PENDING).value
        return msg
    _fill_result(msg, res, res.usage)
    return msg


def add_results(page: batch_pb2.ListBatchResultsResponse, batch: BatchRow, rows: Iterable[Any],
                attempts: Mapping[int, int]) -> None:
    """Append a page of stored results (`Store.result_page` rows) to `page.data`: the messages
    `result_message` builds, without ORM instances or a Struct built in Python.

    A repeated field may be written by concatenating its serialized items, and the stored served
    form (`response_pb`) is already the `response` field's bytes: so a successful result's
    BatchResult is written as bytes here, and the page parses them all at once, in C. A result
    without a served form (stored before migration 0011, or a body that is not a JSON object) or
    with an error is built in place as `result_message` builds it, then written the same way."""
    url, batch_id, provider = batch.endpoint, batch.id, batch.provider
    shared = _string_field(0x32, url) + _string_field(0x5A, batch_id)
    items = []
    for row in rows:
        attempt = attempts[row.idx]
        item = None
        if row.response_pb is not None or not row.response_json:
            with contextlib.suppress(ValueError, TypeError, OverflowError, UnicodeError):
                item = _result_bytes(row, row.provider or provider, attempt, shared)
        if item is None:  # built in place, exactly as result_message does (and raising what it raises)
            msg = batch_pb2.BatchResult(custom_id=row.custom_id, index=row.idx, model=row.model,
                                        provider=row.provider or provider, url=url, batch_id=batch_id,
                                        attempt=attempt)
            _fill_result(msg, row, Usage(row.input_tokens, row.cached_tokens, row.output_tokens,
                                         row.reasoning_tokens, row.input_cost, row.output_cost))
            item = msg.SerializeToString()
        items.append(b"\x1a" + _varint(len(item)) + item)  # ListBatchResultsResponse.data = 3
    page.MergeFromString(b"".join(items))


_double = struct.Struct("<d").pack
_BYTES = [bytes((n,)) for n in range(0x80)]


def _varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    if n < 0x80:
        return _BYTES[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _string_field(tag: int, value: str) -> bytes:
    data = value.encode()
    return _BYTES[tag] + _varint(len(data)) + data


def _uint32(value: int) -> bytes:
    if not 0 <= value < 2**32:
        raise ValueError(f"{value} is not a uint32")
    return _varint(value)


def _result_bytes(row: Any, provider: str, attempt: int, shared: bytes) -> bytes | None:
    """A stored result that did not fail, as a serialized BatchResult (field numbers of
    proto/sluice/v1/batch.proto); None when it failed (its error is built in place)."""
    status_code = row.status_code
    if row.error_code or status_code >= 400:
        return None
    served = row.response_pb
    usage = (b"\x08" + _varint(u32(row.input_tokens))
             + b"\x12" + _BYTES[len(cached := _varint(u32(row.cached_tokens))) + 1] + b"\x08" + cached
             + b"\x18" + _varint(u32(row.output_tokens))
             + b"\x22" + _BYTES[len(reasoning := _varint(u32(row.reasoning_tokens))) + 1] + b"\x08" + reasoning
             + b"\x28" + _varint(u32((row.input_tokens or 0) + (row.output_tokens or 0)))
             + b"\x31" + _double(row.input_cost) + b"\x39" + _double(row.output_cost)
             + b"\x41" + _double(row.input_cost + row.output_cost))
    return b"".join((
        _string_field(0x0A, row.custom_id), b"\x10", _uint32(row.idx), _string_field(0x1A, row.model),
        _string_field(0x22, provider), b"\x28", _uint32(status_code), shared,
        b"\x3a" + _varint(len(served)) + served if served is not None else b"",
        _string_field(0x4A, row.status), b"\x52", _varint(len(usage)), usage, b"\x60", _uint32(attempt)))


def response_bytes(body: dict[str, Any]) -> bytes:
    """A result's body as served (`BatchResult.response`), serialized: what the store keeps beside
    the JSON (`Store(encode_response=...)`), so that a page is built by parsing bytes in C
    (`MergeFromString`) instead of building a Struct from a dict in Python at every read."""
    struct = struct_pb2.Struct()
    struct.update(body)
    served: bytes = struct.SerializeToString()
    return served


def _fill_result(msg: batch_pb2.BatchResult, res: Any, usage: Usage) -> None:
    """A stored result's fields (an ORM ResultRow, or a plain row with its columns)."""
    msg.status = res.status
    msg.status_code = res.status_code
    _set_usage(msg.usage, usage)
    failed = bool(res.error_code) or res.status_code >= 400
    served = res.response_pb
    body = loads(res.response_json) if res.response_json and (served is None or failed) else None
    if served is not None:
        msg.response.MergeFromString(served)
    elif isinstance(body, dict):
        msg.response.update(body)
    if failed:
        msg.error.CopyFrom(_result_error(res, body))


def _result_error(res: Any, body: Any) -> batch_pb2.BatchResultError:
    """A failed line's error: Sluice's own (no response: cancelled, expired, lost) or the one the
    provider put in its HTTP error body, whose type and code win over generic ones."""
    provider_error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(provider_error, dict):
        provider_error = {}
    return batch_pb2.BatchResultError(
        message=res.error_message or str(provider_error.get("message") or "")
        or f"The provider answered HTTP {res.status_code}.",
        type=res.error_type or str(provider_error.get("type") or "provider_error"),
        code=res.error_code or str(provider_error.get("code") or res.status_code or ""),
    )
