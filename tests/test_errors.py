"""The error contract (errors.proto): every `SluiceError` maps, in one place, to a gRPC code, a
`google.rpc.ErrorInfo` and the OpenAI envelope; anything else becomes a bare INTERNAL that is
logged with its traceback, from unary and streaming methods alike."""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from service.domain import errors
from service.domain.errors import SluiceError
from service.edge.grpc_errors import ERROR_DOMAIN, status_parts, translate_errors
from sluice.v1 import batch_pb2, errors_pb2, file_pb2, file_pb2_grpc
from tests.harness import chat_line, gateway, make_settings, md
from tests.rpc_errors import ENVELOPE_KEYS, decode, expect_error

SECRET = "postgres://admin:hunter2@db.internal:5432"


def all_subclasses(cls: type) -> set[type]:
    out = {cls}
    sub: type
    for sub in cls.__subclasses__():
        out |= all_subclasses(sub)
    return out


# Every error class and its deliberate mapping: (gRPC code, envelope type, x-http-status).
# A new SluiceError subclass fails `test_every_error_class_has_a_decided_mapping` until it is
# added here, i.e. until someone has decided what the caller sees.
EXPECTED: dict[type[SluiceError], tuple[str, str, int | None]] = {
    errors.SluiceError: ("INTERNAL", "server_error", None),
    errors.Internal: ("INTERNAL", "server_error", None),
    errors.InvalidRequest: ("INVALID_ARGUMENT", "invalid_request_error", None),
    errors.PayloadTooLarge: ("INVALID_ARGUMENT", "invalid_request_error", 413),
    errors.Conflict: ("FAILED_PRECONDITION", "invalid_request_error", 409),
    errors.Unauthenticated: ("UNAUTHENTICATED", "authentication_error", None),
    errors.NotFound: ("NOT_FOUND", "not_found_error", None),
    errors.PermissionDenied: ("PERMISSION_DENIED", "authentication_error", None),
    errors.IdempotencyKeyReused: ("INVALID_ARGUMENT", "invalid_request_error", 422),
    errors.InsufficientQuota: ("RESOURCE_EXHAUSTED", "insufficient_quota", 429),
}

# errors.proto's ErrorType comments: which gRPC codes (and HTTP overrides) each type may use.
CONTRACT: dict[str, set[tuple[str, int | None]]] = {
    "invalid_request_error": {("INVALID_ARGUMENT", None), ("FAILED_PRECONDITION", 409),
                              ("INVALID_ARGUMENT", 413), ("INVALID_ARGUMENT", 422)},
    "authentication_error": {("UNAUTHENTICATED", None), ("PERMISSION_DENIED", None)},
    "not_found_error": {("NOT_FOUND", None)},
    "rate_limit_error": {("RESOURCE_EXHAUSTED", None)},
    "provider_error": {("UNAVAILABLE", 502)},
    "server_error": {("INTERNAL", None)},
    "not_implemented_error": {("UNIMPLEMENTED", None)},
    "insufficient_quota": {("RESOURCE_EXHAUSTED", 429)},
}


def instance(cls: type[SluiceError], message: str = "it went wrong", param: str | None = "requests[3].custom_id",
             code: str | None = "some_code") -> SluiceError:
    accepted = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {k: v for k, v in (("param", param), ("code", code)) if k in accepted}
    err = cls(message, **kwargs)
    return err


CLASSES = sorted(all_subclasses(SluiceError), key=lambda c: c.__name__)


def test_every_error_class_has_a_decided_mapping() -> None:
    found = set(CLASSES)
    assert len(found) >= len(EXPECTED)
    missing = found - set(EXPECTED)
    assert not missing, f"add {sorted(c.__name__ for c in missing)} to EXPECTED once its mapping is decided"
    assert set(CONTRACT) == {
        name.removeprefix("ERROR_TYPE_").lower()
        for name in errors_pb2.ErrorType.keys() if name != "ERROR_TYPE_UNSPECIFIED"
    }


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_error_class_maps_to_code_envelope_and_error_info(cls: type[SluiceError]) -> None:
    err = instance(cls)
    code, message, trailers = status_parts(err)

    assert isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK
    assert message == "it went wrong"
    want_code, want_type, want_http = EXPECTED[cls]
    assert (code.name, err.error_type, err.http_status) == (want_code, want_type, want_http)
    assert (code.name, err.http_status) in CONTRACT[err.error_type], "errors.proto does not allow this pairing"

    meta: dict[str, Any] = {}
    for key, value in trailers:
        assert key == key.lower() and (key.endswith("-bin") == isinstance(value, bytes)), key
        meta[key] = value
    envelope = json.loads(meta["x-openai-error"])
    assert set(envelope) == {"error"} and set(envelope["error"]) == ENVELOPE_KEYS
    assert envelope["error"]["message"] == message and envelope["error"]["type"] == err.error_type
    assert envelope["error"]["param"] == err.param and envelope["error"]["code"] == err.code
    meta["x-openai-error"].encode("ascii")  # metadata values must be ASCII

    status = status_pb2.Status.FromString(meta["grpc-status-details-bin"])
    assert status.code == code.value[0] and status.message == message
    (detail,) = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert info.domain == ERROR_DOMAIN == "sluice"
    assert info.reason == err.error_type.upper()
    assert "ERROR_TYPE_" + info.reason in errors_pb2.ErrorType.keys()
    assert info.metadata["type"] == err.error_type
    assert dict(info.metadata) == {k: v for k, v in envelope["error"].items() if k != "message" and v}

    assert meta.get("x-http-status") == (str(err.http_status) if err.http_status else None)
    assert meta.get("x-should-retry") == ("false" if err.http_status in (409, 429) else None)


def test_optional_param_and_code_are_null_in_the_envelope() -> None:
    _, _, trailers = status_parts(errors.NotFound("gone"))
    meta = dict(trailers)
    assert json.loads(meta["x-openai-error"]) == {
        "error": {"message": "gone", "type": "not_found_error", "param": None, "code": None}}
    status = status_pb2.Status.FromString(meta["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert dict(info.metadata) == {"type": "not_found_error"}


def test_non_ascii_message_survives_as_ascii_json() -> None:
    _, _, trailers = status_parts(errors.InvalidRequest('café "quoted" \n done', param="x"))
    raw = dict(trailers)["x-openai-error"]
    assert isinstance(raw, str)
    raw.encode("ascii")
    assert json.loads(raw)["error"]["message"] == 'café "quoted" \n done'


# --------------------------------------------------------------------------- over the wire


def _assert_generic_internal(err: Any) -> None:
    assert err.envelope["type"] == "server_error" and err.info.reason == "SERVER_ERROR"
    assert err.envelope["param"] is None and err.envelope["code"] is None
    assert "hunter2" not in err.message and "RuntimeError" not in err.message and "Traceback" not in err.message
    assert all("hunter2" not in v for v in err.trailers.values())


def _logged_traceback(caplog: pytest.LogCaptureFixture, rpc: str) -> logging.LogRecord:
    records = [r for r in caplog.records if r.name == "service.edge.grpc_errors" and r.levelno >= logging.ERROR]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]
    record = records[0]
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert SECRET in caplog.text and "Traceback" in caplog.text  # the operator does see it
    assert rpc in record.getMessage(), record.getMessage()
    return record


@pytest.mark.logs_errors(r"unexpected error in BatchServicer\.GetBatch .*RuntimeError: connection to")
async def test_unexpected_exception_in_a_servicer_is_internal_and_logged(
        db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.edge.grpc_errors")
    async with gateway(make_settings(db_url)) as (app, c):
        batch = await c.create([chat_line("a")])

        async def broken(*_: Any, **__: Any) -> Any:
            raise RuntimeError(f"connection to {SECRET} reset")

        for read in ("get_batch", "get_batch_with_retries"):  # every way GetBatch may read the batch
            monkeypatch.setattr(app.store, read, broken)
        err = await expect_error(c.stub.GetBatch(batch_pb2.GetBatchRequest(id=batch.id), metadata=md()),
                                 grpc.StatusCode.INTERNAL)
        _assert_generic_internal(err)
        _logged_traceback(caplog, "GetBatch")

        # The server keeps serving after it.
        monkeypatch.undo()
        assert (await c.get(batch.id)).id == batch.id


class _FlakyFiles(file_pb2_grpc.FileServiceServicer):
    """Streaming methods that fail in every way a real one might."""

    async def GetFileContent(self, request: file_pb2.GetFileContentRequest,
                             context: Any) -> AsyncIterator[httpbody_pb2.HttpBody]:
        if request.id == "missing":
            raise errors.NotFound("No such File object: missing", param="id", code="file_not_found")
        yield httpbody_pb2.HttpBody(content_type="application/jsonl", data=b"{}\n")
        if request.id == "crash":
            raise RuntimeError(f"chunk read failed on {SECRET}")
        yield httpbody_pb2.HttpBody(data=b"{}\n")

    async def UploadFile(self, request_iterator: AsyncIterator[file_pb2.UploadFileRequest], context: Any) -> Any:
        async for piece in request_iterator:
            if piece.purpose == "crash":
                raise RuntimeError(f"disk full at {SECRET}")
            raise errors.PayloadTooLarge("File too large.", param="file", code="file_too_large")
        return file_pb2.File()


@pytest.fixture
async def flaky_files() -> AsyncIterator[file_pb2_grpc.FileServiceStub]:
    server = grpc.aio.server()
    file_pb2_grpc.add_FileServiceServicer_to_server(translate_errors(_FlakyFiles)(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield file_pb2_grpc.FileServiceStub(channel)
    finally:
        await server.stop(None)


async def _read_all(call: Any) -> list[Any]:
    return [item async for item in call]


@pytest.mark.logs_errors(r"unexpected error in _FlakyFiles\.GetFileContent .*RuntimeError: chunk read failed",
                         r"unexpected error in _FlakyFiles\.UploadFile .*RuntimeError: disk full")
async def test_streaming_errors_are_mapped_too(flaky_files: file_pb2_grpc.FileServiceStub,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.edge.grpc_errors")
    ok = await _read_all(flaky_files.GetFileContent(file_pb2.GetFileContentRequest(id="fine")))
    assert len(ok) == 2

    # A SluiceError before the first message.
    err = await expect_error(_read_all(flaky_files.GetFileContent(file_pb2.GetFileContentRequest(id="missing"))),
                             grpc.StatusCode.NOT_FOUND)
    assert err.envelope["code"] == "file_not_found" and err.envelope["param"] == "id"

    # An unexpected exception after the first message: the stream still ends with the contract.
    call = flaky_files.GetFileContent(file_pb2.GetFileContentRequest(id="crash"))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in call:
            got.append(item)
    assert len(got) == 1 and info.value.code() == grpc.StatusCode.INTERNAL
    _assert_generic_internal(decode(info.value))
    _logged_traceback(caplog, "GetFileContent")
    caplog.clear()

    # Client streaming: a SluiceError and an unexpected one.
    async def pieces(purpose: str) -> AsyncIterator[file_pb2.UploadFileRequest]:
        yield file_pb2.UploadFileRequest(purpose=purpose)

    err = await expect_error(flaky_files.UploadFile(pieces("batch")), grpc.StatusCode.INVALID_ARGUMENT)
    assert err.trailers["x-http-status"] == "413" and err.envelope["code"] == "file_too_large"
    err = await expect_error(flaky_files.UploadFile(pieces("crash")), grpc.StatusCode.INTERNAL)
    _assert_generic_internal(err)
    _logged_traceback(caplog, "UploadFile")


def test_translate_errors_wraps_every_public_rpc() -> None:
    from service.edge.batch_service import BatchServicer

    for name in batch_pb2.DESCRIPTOR.services_by_name["BatchService"].methods_by_name:
        method = getattr(BatchServicer, name)
        assert method.__qualname__ == f"BatchServicer.{name}"  # functools.wraps kept the name
        assert method.__wrapped__ is not None, f"{name} is not wrapped by translate_errors"


def test_detail_is_a_packed_any() -> None:
    _, _, trailers = status_parts(errors.Conflict("no", param="id", code="batch_not_cancellable"))
    status = status_pb2.Status.FromString(dict(trailers)["grpc-status-details-bin"])
    assert isinstance(status.details[0], any_pb2.Any)
    assert status.details[0].type_url == "type.googleapis.com/google.rpc.ErrorInfo"
