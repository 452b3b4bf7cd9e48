"""Sluice's one exception tree.

Everything that can go wrong for a caller is a `SluiceError` subclass. The gRPC boundary
(`service/edge/grpc_errors.py`) is the only place that turns them into a status code, a
`google.rpc.ErrorInfo` detail and OpenAI's `{"error": {...}}` envelope; nothing else knows
about gRPC or HTTP. Each class fixes its envelope `type`, its gRPC code name, and, where the
gRPC code maps to the wrong HTTP status through Envoy, the HTTP status to use instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

# An error travels three times in gRPC trailers (grpc-message, grpc-status-details-bin and
# x-openai-error), and clients refuse trailers over 8 KiB: messages and params are capped.
MAX_MESSAGE_CHARS = 1000
MAX_PARAM_CHARS = 200


def clip(value: object, limit: int = 64) -> str:
    """`value` quoted for an error message, cut at `limit` characters and with control characters
    escaped: a message never echoes unbounded or unprintable input."""
    text = value if isinstance(value, str) else repr(value)
    return repr(text[:limit] + "…" if len(text) > limit else text)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SluiceError(Exception):
    """Base of every error a caller may see. `message` is safe to show to the caller."""

    error_type: ClassVar[str] = "server_error"
    grpc_code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int | None] = None  # None: what Envoy maps the gRPC code to
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        message = _cap(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.param = _cap(param, MAX_PARAM_CHARS) if param is not None else None
        self.code = code

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


class InvalidRequest(SluiceError):
    """The request is malformed or breaks a documented limit: HTTP 400."""

    error_type = "invalid_request_error"
    grpc_code = "INVALID_ARGUMENT"


class PayloadTooLarge(InvalidRequest):
    """An upload or batch over the size or line limit: HTTP 413."""

    grpc_code = "INVALID_ARGUMENT"
    http_status = 413


class Conflict(InvalidRequest):
    """The request is valid but the resource's state forbids it (e.g. cancel a completed batch).

    409 makes SDKs retry by default, so the boundary also sends `x-should-retry: false`.
    """

    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


class IdempotencyKeyReused(InvalidRequest):
    """An `Idempotency-Key` already used, within 24 hours, for a request with a different body: HTTP 422
    (the IETF Idempotency-Key draft's status for a reused key), never retried by the SDKs."""

    http_status = 422


class InsufficientQuota(SluiceError):
    """The project's spend limit for the month would be passed: HTTP 429 with OpenAI's
    `insufficient_quota` type. Unlike a rate limit, waiting a few seconds does not help, so the
    boundary also sends `x-should-retry: false`."""

    error_type = "insufficient_quota"
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 429


class Unauthenticated(SluiceError):
    error_type = "authentication_error"
    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(SluiceError):
    """A valid key that may not make this call (a project key on the admin API): HTTP 403."""

    error_type = "authentication_error"
    grpc_code = "PERMISSION_DENIED"


class NotFound(SluiceError):
    """No such object in the caller's project (another project's objects are not found too)."""

    error_type = "not_found_error"
    grpc_code = "NOT_FOUND"


class Internal(SluiceError):
    """A bug or outage inside Sluice. The message never carries internals."""

    error_type = "server_error"
    grpc_code = "INTERNAL"
