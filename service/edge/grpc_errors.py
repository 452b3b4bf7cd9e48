"""The one place where errors become gRPC statuses (and, through Envoy, HTTP responses).

`translate_errors` wraps every RPC of a servicer class: a `SluiceError` aborts with its status
code, a `google.rpc.ErrorInfo` detail and the OpenAI envelope in trailing metadata
(`x-openai-error`, plus `x-http-status` where the gRPC code maps to the wrong HTTP status);
anything else is logged with its traceback and becomes a bare INTERNAL error.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from service.domain.errors import Internal, InvalidRequest, SluiceError
from service.domain.model import MAX_JSON_DEPTH

log = logging.getLogger(__name__)

ERROR_DOMAIN = "sluice"


def status_parts(err: SluiceError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The status code, message and trailing metadata that stand for `err` on the wire."""
    code = grpc.StatusCode[err.grpc_code]
    info = error_details_pb2.ErrorInfo(
        reason=err.error_type.upper(),
        domain=ERROR_DOMAIN,
        metadata={k: v for k, v in (("type", err.error_type), ("param", err.param), ("code", err.code)) if v},
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=err.message, details=[detail])
    metadata: list[tuple[str, str | bytes]] = [
        ("x-openai-error", json.dumps(err.envelope(), ensure_ascii=True, separators=(",", ":"))),
        ("grpc-status-details-bin", status.SerializeToString()),
    ]
    if err.http_status is not None:
        metadata.append(("x-http-status", str(err.http_status)))
    if err.http_status == 409 or (err.http_status == 429 and not err.retryable):
        # The SDKs retry 409 and 429 by default; these two are not worth repeating.
        metadata.append(("x-should-retry", "false"))
    return code, err.message, tuple(metadata)


def as_sluice_error(exc: BaseException) -> SluiceError:
    if isinstance(exc, SluiceError):
        return exc
    return Internal("The server had an error while processing your request. Please retry; "
                    "if it keeps failing, report it with the time of the request.")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, rpc: str) -> None:
    if not isinstance(exc, SluiceError):
        log.exception("unexpected error in %s (peer %s)", rpc, _peer(context), exc_info=exc)
    code, message, metadata = status_parts(as_sluice_error(exc))
    await context.abort(code, message, trailing_metadata=metadata)


def _peer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    try:
        return str(context.peer())
    except Exception:  # pragma: no cover - peer is informational only
        return "unknown"


class Undecodable:
    """Stands for a request message that failed to parse (see `safe_handlers`)."""

    def __init__(self, error: DecodeError) -> None:
        reason = str(error)
        if "UTF-8" in reason:
            self.message = "The request holds a string that is not valid UTF-8 text."
        elif "Depth" in reason or "depth" in reason:
            self.message = f"The request nests too deeply (a request line may nest {MAX_JSON_DEPTH} levels)."
        else:
            self.message = "The request is not a valid protobuf message for this method."

    def error(self) -> InvalidRequest:
        return InvalidRequest(self.message, code="invalid_request_encoding")


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    parse = deserializer

    def safe(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return Undecodable(exc)

    return safe


class _Capture:
    """Stands in for a server while a generated `add_*Servicer_to_server` registers its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service, self.handlers = service, handlers


def add_servicer(add: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer` (with the generated `add`) so that a request that fails to parse
    (bad UTF-8 in a string, nesting past protobuf's depth limit, garbage) reaches the servicer as
    `Undecodable` and becomes a clean INVALID_ARGUMENT, instead of grpc's UNKNOWN "Unexpected
    <class 'DecodeError'>: Error parsing message with type 'sluice.v1....'" (a 500 over REST)."""
    capture = _Capture()
    add(servicer, capture)
    handlers = {name: handler._replace(request_deserializer=_safe(handler.request_deserializer))
                for name, handler in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    server.add_registered_method_handlers(capture.service, handlers)


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for message in requests:
        if isinstance(message, Undecodable):
            raise message.error()
        yield message


def _request(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise request.error()
    if hasattr(request, "__aiter__"):  # a client stream
        return _checked(request)
    return request


def _wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in fn(self, _request(request), context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await _abort(context, exc, fn.__qualname__)

        return stream

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await fn(self, _request(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__qualname__)

    return unary


C = TypeVar("C", bound=type)


def translate_errors(cls: C) -> C:
    """Wrap every public RPC method defined on `cls` with the error translation."""
    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            setattr(cls, name, _wrap(fn))
    return cls
