"""Reading Sluice's error contract back off the wire (errors.proto): the status code, the
`google.rpc.ErrorInfo` detail in `grpc-status-details-bin`, and the OpenAI envelope in the
`x-openai-error` trailer."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ENVELOPE_KEYS = {"message", "type", "param", "code"}


@dataclass
class WireError:
    code: grpc.StatusCode
    message: str
    trailers: dict[str, str]
    envelope: dict[str, Any]  # the inner {"message", "type", "param", "code"}
    info: error_details_pb2.ErrorInfo


def decode(err: grpc.aio.AioRpcError) -> WireError:
    """Check the error's three views agree and return them."""
    trailers = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    assert "x-openai-error" in trailers, f"no x-openai-error trailer on {err.code()}: {err.details()}"
    raw = json.loads(trailers["x-openai-error"])
    assert set(raw) == {"error"}, raw
    envelope = raw["error"]
    assert set(envelope) == ENVELOPE_KEYS, envelope
    assert envelope["message"] == err.details()
    # grpcio-status checks the Status proto's code and message against the call's own.
    status = rpc_status.from_call(err)
    assert status is not None, "no grpc-status-details-bin"
    infos = []
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert len(infos) == 1, status.details
    info = infos[0]
    assert info.domain == "sluice"
    assert info.reason == envelope["type"].upper()
    expected_md = {k: envelope[k] for k in ("type", "param", "code") if envelope[k]}
    assert dict(info.metadata) == expected_md
    return WireError(err.code(), err.details() or "", trailers, envelope, info)


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> WireError:
    """Await a unary call that must fail with `code`; return its decoded error."""
    try:
        result = await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == code, f"wanted {code}, got {err.code()}: {err.details()}"
        return decode(err)
    raise AssertionError(f"wanted {code}, the call succeeded: {result}")
