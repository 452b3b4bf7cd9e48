"""The REST edge end to end: a real Envoy (service/runtime/envoy.py) in front of a stub grpc.aio server.

The stub implements BatchService and FileService with canned answers and every error path the
real server uses (an `x-openai-error` envelope in trailing metadata, `x-http-status`, plain
aborts, an uncaught exception, gRPC's own size limit). The official `openai` SDK and httpx then
prove the JSON parses, matches OpenAI's OpenAPI schemas, and that errors map to the SDK's
exception classes with the envelope's `type`, `param` and `code`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import httpx2
import openai
import pytest
from google.api import httpbody_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.edge.multipart import MultipartError, parse_multipart
from service.runtime.envoy import EnvoyProcess, render_config
from sluice.v1 import batch_pb2, batch_pb2_grpc, file_pb2, file_pb2_grpc
from tests.openapi_schemas import validate

CREATED = 1_763_950_000
MiB = 1 << 20
GRPC_ONLY_HEADERS = ("x-openai-error", "x-http-status")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- the stub server


def _reply(service: str, method: str, message: Any) -> Any:
    """`message` as the RPC's declared output: bare, or in its `<Rpc>Response` wrapper."""
    module = batch_pb2 if service == "BatchService" else file_pb2
    out = module.DESCRIPTOR.services_by_name[service].methods_by_name[method].output_type
    if out.full_name == message.DESCRIPTOR.full_name:
        return message
    (wrapped,) = [f for f in out.fields if f.message_type is message.DESCRIPTOR]
    return getattr(module, out.name)(**{wrapped.name: message})


def _batch(batch_id: str, **overrides: Any) -> batch_pb2.Batch:
    batch = batch_pb2.Batch(
        id=batch_id,
        object="batch",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        input_file_id="file-in",
        completion_window="24h",
        status="in_progress",
        created_at=CREATED,
        in_progress_at=CREATED + 5,
        expires_at=CREATED + 86400,
        request_counts=batch_pb2.BatchRequestCounts(total=3, completed=1, failed=0),
        usage=batch_pb2.BatchUsage(
            input_tokens=10,
            input_tokens_details=batch_pb2.InputTokensDetails(cached_tokens=0),
            output_tokens=5,
            output_tokens_details=batch_pb2.OutputTokensDetails(reasoning_tokens=0),
            total_tokens=15,
            input_cost=0.0001,
            output_cost=0.0002,
            total_cost=0.0003,
        ),
        provider="sim",
    )
    batch.metadata.update({"team": "edge"})
    for key, value in overrides.items():
        setattr(batch, key, value)
    return batch


def _file(file_id: str = "file-1", **overrides: Any) -> file_pb2.File:
    f = file_pb2.File(
        id=file_id, object="file", bytes=1234, created_at=CREATED, expires_at=CREATED + 30 * 86400,
        filename="input.jsonl", purpose="batch", status="processed",
    )
    for key, value in overrides.items():
        setattr(f, key, value)
    return f


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    code: grpc.StatusCode,
    message: str,
    error_type: str,
    *,
    param: str | None = None,
    error_code: str | None = None,
    http_status: int | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> None:
    envelope = {"error": {"message": message, "type": error_type, "param": param, "code": error_code}}
    md = [("x-openai-error", json.dumps(envelope, ensure_ascii=True, separators=(",", ":"))), *extra]
    if http_status is not None:
        md.append(("x-http-status", str(http_status)))
    await context.abort(code, message, trailing_metadata=tuple(md))


# The canned error paths, chosen by the batch id.
SHAPED_ERRORS: dict[str, tuple[grpc.StatusCode, str, str | None, str | None, int | None]] = {
    # id: (gRPC code, type, param, code, x-http-status)
    "missing": (grpc.StatusCode.NOT_FOUND, "not_found_error", None, "batch_not_found", None),
    "unauth": (grpc.StatusCode.UNAUTHENTICATED, "authentication_error", None, "invalid_api_key", None),
    "unproc": (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error", "metadata", "invalid_metadata", 422),
    "slow": (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_error", None, "rate_limit_exceeded", None),
    "provider": (grpc.StatusCode.UNAVAILABLE, "provider_error", None, "provider_unavailable", 502),
}


@dataclass
class StubState:
    upload_piece_sizes: list[int] = field(default_factory=list)
    upload_content_type: str = ""
    upload_sha256: str = ""
    upload_bytes: int = 0
    metadata_seen: dict[str, str] = field(default_factory=dict)


CONTENT = b"".join(b'{"custom_id":"r%06d","response":{"status_code":200}}\n' % i for i in range(60_000))


class StubBatches(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, state: StubState) -> None:
        self.state = state

    async def GetBatch(self, request: Any, context: Any) -> Any:
        self.state.metadata_seen = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        if request.id in SHAPED_ERRORS:
            code, error_type, param, error_code, http_status = SHAPED_ERRORS[request.id]
            extra = (("retry-after", "7"),) if request.id == "slow" else ()
            await _abort(context, code, f"stub says {request.id}", error_type, param=param,
                         error_code=error_code, http_status=http_status, extra=extra)
        if request.id == "plain-ratelimit":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down")
        if request.id == "plain-badarg":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'café "quoted" 100% \n done')
        if request.id == "plain-unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
        if request.id == "boom":
            raise RuntimeError("unexpected")
        return _reply("BatchService", "GetBatch", _batch(request.id))

    async def ListBatches(self, request: Any, context: Any) -> Any:
        limit = request.limit if request.HasField("limit") else 20
        all_ids = ["batch_3", "batch_2", "batch_1"]
        start = all_ids.index(request.after) + 1 if request.after in all_ids else 0
        page = all_ids[start : start + limit]
        resp = batch_pb2.ListBatchesResponse(
            object="list", data=[_batch(i) for i in page], has_more=start + limit < len(all_ids)
        )
        if page:
            resp.first_id, resp.last_id = page[0], page[-1]
        return resp

    async def CreateBatch(self, request: Any, context: Any) -> Any:
        if not request.input_file_id and not request.requests:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "input_file_id is required",
                         "invalid_request_error", param="input_file_id", error_code="missing_required_parameter")
        batch = _batch("batch_new", status="validating", input_file_id=request.input_file_id,
                       endpoint=request.endpoint)
        batch.request_counts.total = len(request.requests)
        batch.metadata.Clear()
        batch.metadata.update(request.metadata)
        return _reply("BatchService", "CreateBatch", batch)

    async def CancelBatch(self, request: Any, context: Any) -> Any:
        if request.id == "batch_done":
            await _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "batch_done is completed",
                         "invalid_request_error", param=None, error_code="batch_not_cancellable",
                         http_status=409, extra=(("x-should-retry", "false"),))
        batch = _batch(request.id, status="cancelling", cancelling_at=CREATED + 60)
        return _reply("BatchService", "CancelBatch", batch)


class StubFiles(file_pb2_grpc.FileServiceServicer):
    def __init__(self, state: StubState) -> None:
        self.state = state

    async def UploadFile(self, request_iterator: Any, context: Any) -> Any:
        first = await anext(aiter(request_iterator))
        content_type = first.body.content_type
        self.state.upload_content_type = content_type
        self.state.upload_piece_sizes = [len(first.body.data)]

        async def pieces() -> AsyncIterator[bytes]:
            yield first.body.data
            async for message in request_iterator:
                self.state.upload_piece_sizes.append(len(message.body.data))
                yield message.body.data

        purpose, filename, size, digest = first.purpose, None, 0, hashlib.sha256()
        try:
            async for part in parse_multipart(pieces(), content_type):
                if part.name == "purpose":
                    purpose = (await part.read(limit=64)).decode()
                elif part.name == "file":
                    filename = part.filename
                    async for data in part:
                        size += len(data)
                        digest.update(data)
        except MultipartError as exc:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "invalid_request_error",
                         param="file", error_code="invalid_multipart")
        if filename is None:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "a file part is required",
                         "invalid_request_error", param="file", error_code="missing_required_parameter")
        self.state.upload_sha256, self.state.upload_bytes = digest.hexdigest(), size
        return _reply("FileService", "UploadFile",
                      _file("file-up", bytes=size, filename=filename or "", purpose=purpose, status="uploaded"))

    async def ListFiles(self, request: Any, context: Any) -> Any:
        files = [_file("file-2"), _file("file-1")]
        if request.purpose:
            files = [f for f in files if f.purpose == request.purpose]
        return file_pb2.ListFilesResponse(
            object="list", data=files, first_id=files[0].id if files else "",
            last_id=files[-1].id if files else "", has_more=False,
        )

    async def GetFile(self, request: Any, context: Any) -> Any:
        if request.id != "file-1":
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"No such File object: {request.id}",
                         "not_found_error", param="id", error_code=None)
        return _reply("FileService", "GetFile", _file("file-1"))

    async def DeleteFile(self, request: Any, context: Any) -> Any:
        return file_pb2.DeleteFileResponse(id=request.id, object="file", deleted=True)

    async def GetFileContent(self, request: Any, context: Any) -> AsyncIterator[httpbody_pb2.HttpBody]:
        if request.id != "file-big":
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"No such File object: {request.id}",
                         "not_found_error", param="id", error_code=None)
        for i in range(0, len(CONTENT), MiB):
            yield httpbody_pb2.HttpBody(
                content_type="application/jsonl" if i == 0 else "", data=CONTENT[i : i + MiB]
            )


class StubServer:
    """grpc.aio server on its own event loop in a thread, so tests can use sync clients."""

    def __init__(self) -> None:
        self.state = StubState()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-stub", daemon=True)
        self.port = 0
        self.server: grpc.aio.Server | None = None

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)

    async def _start(self) -> None:
        self.server = grpc.aio.server()  # default 4 MiB receive limit: oversize unary -> RESOURCE_EXHAUSTED
        batch_pb2_grpc.add_BatchServiceServicer_to_server(StubBatches(self.state), self.server)
        file_pb2_grpc.add_FileServiceServicer_to_server(StubFiles(self.state), self.server)
        health_servicer = health.aio.HealthServicer()  # Envoy's active health check asks for ""
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


# --------------------------------------------------------------------------- fixtures


@dataclass
class Edge:
    url: str
    port: int
    envoy: EnvoyProcess


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    server = StubServer()
    server.start()
    yield server
    server.stop()


def _start_edge(out_dir: Path, grpc_port: int, **kwargs: Any) -> Edge:
    http_port, admin_port = _free_port(), _free_port()
    config = render_config("127.0.0.1", http_port, grpc_port, admin_port, out_dir, **kwargs)
    envoy = EnvoyProcess(config, "127.0.0.1", http_port, concurrency=2)
    envoy.start()
    return Edge(f"http://127.0.0.1:{http_port}", http_port, envoy)


@pytest.fixture(scope="module")
def edge(stub: StubServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    e = _start_edge(tmp_path_factory.mktemp("envoy"), stub.port)
    yield e
    e.envoy.stop()


@pytest.fixture(scope="module")
def down_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """A second Envoy, side by side with the first, whose upstream port has no server."""
    e = _start_edge(tmp_path_factory.mktemp("envoy-down"), _free_port())
    yield e
    e.envoy.stop()


def _assert_rest_headers(headers: Any) -> None:
    names = [k.lower() for k in headers.keys()]
    leaked = [n for n in names if n.startswith("grpc-") or n in GRPC_ONLY_HEADERS]
    assert not leaked, f"gRPC-only headers leaked into a REST response: {leaked}"


@pytest.fixture()
def http(edge: Edge) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=edge.url, timeout=30,
        event_hooks={"response": [lambda r: _assert_rest_headers(r.headers)]},
    ) as client:
        yield client


def _sdk(url: str) -> openai.OpenAI:
    http_client = httpx2.Client(
        timeout=60, event_hooks={"response": [lambda r: _assert_rest_headers(r.headers)]}
    )
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, http_client=http_client)


@pytest.fixture()
def client(edge: Edge) -> Iterator[openai.OpenAI]:
    with _sdk(edge.url) as sdk:
        yield sdk


def _assert_ints(obj: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert type(obj[key]) is int, f"{key}={obj[key]!r} is not a JSON integer"


# --------------------------------------------------------------------------- batches


def test_batches_retrieve_parses_and_matches_schema(client: openai.OpenAI, http: httpx.Client,
                                                    stub: StubServer) -> None:
    batch = client.batches.retrieve("batch_1")
    assert batch.id == "batch_1" and batch.object == "batch" and batch.status == "in_progress"
    assert type(batch.created_at) is int and batch.created_at == CREATED
    assert batch.completed_at is None and batch.expires_at == CREATED + 86400
    assert batch.request_counts is not None and batch.request_counts.total == 3
    assert batch.metadata == {"team": "edge"}
    # The service sees the SDK's headers as metadata.
    assert stub.state.metadata_seen["authorization"] == "Bearer sk-test"

    r = http.get("/v1/batches/batch_1")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    validate("Batch", body)
    _assert_ints(body, "created_at", "in_progress_at", "expires_at")
    _assert_ints(body["request_counts"], "total", "completed", "failed")
    _assert_ints(body["usage"], "input_tokens", "output_tokens", "total_tokens")
    assert body["request_counts"]["failed"] == 0  # zero values are printed
    assert "completed_at" not in body  # unset optional fields are absent (SDK: None)


def test_batches_list_paginates(client: openai.OpenAI, http: httpx.Client) -> None:
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == ["batch_3", "batch_2"] and page.has_more
    assert [b.id for b in page.iter_pages().__next__().data] == ["batch_3", "batch_2"]
    assert [b.id for b in client.batches.list(limit=2)] == ["batch_3", "batch_2", "batch_1"]  # auto-paging
    body = http.get("/v1/batches", params={"limit": 2, "after": "batch_3"}).json()
    validate("ListBatchesResponse", body)
    assert body["has_more"] is False and body["first_id"] == "batch_2" and body["object"] == "list"
    empty = http.get("/v1/batches", params={"after": "batch_1"}).json()
    validate("ListBatchesResponse", empty)
    assert empty["data"] == [] and empty["has_more"] is False


def test_batches_create_and_cancel(client: openai.OpenAI, http: httpx.Client) -> None:
    batch = client.batches.create(input_file_id="file-abc", endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"k": "v"})
    assert batch.status == "validating" and batch.input_file_id == "file-abc" and batch.metadata == {"k": "v"}
    r = http.post("/v1/batches", json={"input_file_id": "file-abc", "endpoint": "/v1/embeddings",
                                       "completion_window": "24h"})
    validate("Batch", r.json())
    cancelled = client.batches.cancel("batch_7")
    assert cancelled.status == "cancelling" and cancelled.cancelling_at == CREATED + 60
    r = http.post("/v1/batches/batch_7/cancel")  # the SDK sends no body; both work
    assert r.status_code == 200
    validate("Batch", r.json())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("batch_id", "exc", "status", "error_type", "param", "code"),
    [
        ("missing", openai.NotFoundError, 404, "not_found_error", None, "batch_not_found"),
        ("unauth", openai.AuthenticationError, 401, "authentication_error", None, "invalid_api_key"),
        ("unproc", openai.UnprocessableEntityError, 422, "invalid_request_error", "metadata", "invalid_metadata"),
        ("slow", openai.RateLimitError, 429, "rate_limit_error", None, "rate_limit_exceeded"),
        ("provider", openai.InternalServerError, 502, "provider_error", None, "provider_unavailable"),
    ],
)
def test_shaped_errors(client: openai.OpenAI, http: httpx.Client, batch_id: str, exc: type[Exception],
                       status: int, error_type: str, param: str | None, code: str | None) -> None:
    with pytest.raises(exc) as info:
        client.batches.retrieve(batch_id)
    err = info.value
    assert isinstance(err, openai.APIStatusError) and err.status_code == status
    assert err.type == error_type and err.param == param and err.code == code
    assert isinstance(err.body, dict) and err.body["message"] == f"stub says {batch_id}"
    r = http.get(f"/v1/batches/{batch_id}")
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    validate("ErrorResponse", r.json())
    assert int(r.headers["content-length"]) == len(r.content)
    if batch_id == "slow":
        assert r.headers["retry-after"] == "7"


def test_create_validation_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.batches.create(input_file_id="", endpoint="/v1/chat/completions", completion_window="24h")
    assert info.value.param == "input_file_id" and info.value.code == "missing_required_parameter"
    assert info.value.type == "invalid_request_error"


def test_conflict_is_not_retried(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.ConflictError) as info:
        client.batches.cancel("batch_done")
    assert info.value.code == "batch_not_cancellable" and info.value.type == "invalid_request_error"
    r = http.post("/v1/batches/batch_done/cancel", json={})
    assert r.status_code == 409 and r.headers["x-should-retry"] == "false"
    validate("ErrorResponse", r.json())


@pytest.mark.parametrize(
    ("batch_id", "exc", "status", "error_type", "message"),
    [
        # Sluice never rate-limits: gRPC's own RESOURCE_EXHAUSTED is an overload, not a 429.
        ("plain-ratelimit", openai.InternalServerError, 503, "server_error",
         "The server is overloaded; retry shortly."),
        ("plain-badarg", openai.BadRequestError, 400, "invalid_request_error", "The request is not valid."),
        ("plain-unavailable", openai.InternalServerError, 503, "server_error",
         "The server is unavailable; retry shortly."),
        ("boom", openai.InternalServerError, 500, "server_error",
         "The server had an error while processing your request."),
    ],
)
def test_unshaped_errors_get_a_fixed_envelope(client: openai.OpenAI, http: httpx.Client, batch_id: str,
                                              exc: type[Exception], status: int, error_type: str,
                                              message: str) -> None:
    """gRPC's own text never reaches a REST client: it can name Python or protobuf classes
    ("Unexpected <class 'RuntimeError'>") or list the request's headers."""
    with pytest.raises(exc) as info:
        client.batches.retrieve(batch_id)
    err = info.value
    assert isinstance(err, openai.APIStatusError) and err.status_code == status
    assert err.type == error_type and err.param is None and err.code is None
    assert isinstance(err.body, dict) and err.body["message"] == message
    body = http.get(f"/v1/batches/{batch_id}").json()
    validate("ErrorResponse", body)
    assert body["error"]["message"] == message
    assert "class" not in body["error"]["message"] and "quoted" not in body["error"]["message"]


def test_oversize_unary_message_is_413_not_429(client: openai.OpenAI, http: httpx.Client) -> None:
    # ~5 MB of inline requests: under Envoy's 64 MiB body limit, over grpc's 4 MiB receive limit.
    line = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "y" * 5000}]}}
    requests = [dict(line, custom_id=f"r{i}") for i in range(1000)]
    with pytest.raises(openai.APIStatusError) as info:
        client.batches.create(input_file_id="", endpoint="/v1/chat/completions", completion_window="24h",
                              extra_body={"requests": requests})
    assert info.value.status_code == 413 and info.value.type == "invalid_request_error"
    assert "too large" in str(info.value.message) and info.value.code == "request_too_large"
    r = http.post("/v1/batches", json={"endpoint": "/v1/chat/completions", "requests": requests})
    assert r.status_code == 413
    validate("ErrorResponse", r.json())


# --------------------------------------------------------------------------- Envoy's own replies


def test_envoy_local_replies_are_openai_envelopes(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.get("/nope", cast_to=object)
    assert nf.value.type == "invalid_request_error"
    assert nf.value.body["message"] == "Invalid URL (GET /v1/nope): no such route."  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.delete("/batches/batch_1", cast_to=object)  # wrong method: 404, never 405 or 503
    with pytest.raises(openai.BadRequestError) as bad:
        client.batches.list(extra_query={"foo": "1"})
    assert bad.value.body["message"] == "Unknown parameter: 'foo'." and bad.value.param == "foo"  # type: ignore[index]
    assert bad.value.code == "unknown_parameter"

    cases = [
        http.get("/v1/nope"),
        http.get("/"),
        http.get("/v1/batches", params={"foo": "1"}),
        http.get("/v1/batches", params={"limit": "abc"}),
        http.post("/v1/batches", content=b"{not json", headers={"content-type": "application/json"}),
        http.post("/sluice.v1.BatchService/GetBatch", content=b"{}"),  # not gRPC: never reaches upstream
    ]
    assert [r.status_code for r in cases] == [404, 404, 400, 400, 400, 404]
    for r in cases:
        assert r.headers["content-type"] == "application/json"
        validate("ErrorResponse", r.json())
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_upstream_down_is_a_503_envelope(down_edge: Edge, edge: Edge) -> None:
    assert edge.envoy.running and down_edge.envoy.running  # two Envoys side by side
    with _sdk(down_edge.url) as sdk, pytest.raises(openai.InternalServerError) as info:
        sdk.batches.retrieve("batch_1")
    assert info.value.status_code == 503 and info.value.type == "server_error"
    r = httpx.get(f"{down_edge.url}/v1/batches/batch_1")
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    validate("ErrorResponse", r.json())
    _assert_rest_headers(r.headers)


# --------------------------------------------------------------------------- native gRPC


@pytest.mark.parametrize("via", ["envoy", "direct"])
def test_native_grpc_still_works(edge: Edge, stub: StubServer, via: str) -> None:
    port = edge.port if via == "envoy" else stub.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        batches = batch_pb2_grpc.BatchServiceStub(channel)
        got = batches.GetBatch(batch_pb2.GetBatchRequest(id="batch_1"), timeout=10)
        batch = got if isinstance(got, batch_pb2.Batch) else got.batch
        assert batch.id == "batch_1" and batch.created_at == CREATED
        with pytest.raises(grpc.RpcError) as info:
            batches.GetBatch(batch_pb2.GetBatchRequest(id="missing"), timeout=10)
        err: Any = info.value
        assert err.code() == grpc.StatusCode.NOT_FOUND and err.details() == "stub says missing"
        envelope = dict(err.trailing_metadata())["x-openai-error"]
        assert json.loads(envelope)["error"]["code"] == "batch_not_found"

        files = file_pb2_grpc.FileServiceStub(channel)
        body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"g.jsonl\"\r\n\r\n" \
               b"{}\n\r\n--XyZ--\r\n"
        uploaded = files.UploadFile(iter([
            file_pb2.UploadFileRequest(purpose="batch", body=httpbody_pb2.HttpBody(
                content_type="multipart/form-data; boundary=XyZ", data=body[:30])),
            file_pb2.UploadFileRequest(body=httpbody_pb2.HttpBody(data=body[30:])),
        ]), timeout=10)
        f = uploaded if isinstance(uploaded, file_pb2.File) else uploaded.file
        assert (f.filename, f.bytes, f.purpose) == ("g.jsonl", 3, "batch")


# --------------------------------------------------------------------------- files


def test_upload_streams_in_small_pieces(client: openai.OpenAI, stub: StubServer, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    line = b'{"custom_id":"c","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}\n'
    with open(path, "wb") as out:
        for _ in range(20 * MiB // len(line) + 1):
            out.write(line)
    data = path.read_bytes()
    with open(path, "rb") as fh:
        f = client.files.create(file=fh, purpose="batch")
    assert f.object == "file" and f.filename == "big.jsonl" and f.purpose == "batch"
    assert type(f.bytes) is int and f.bytes == len(data) and type(f.created_at) is int
    assert stub.state.upload_sha256 == hashlib.sha256(data).hexdigest()
    assert stub.state.upload_content_type.startswith("multipart/form-data; boundary=")
    sizes = stub.state.upload_piece_sizes
    assert len(sizes) >= 20 and max(sizes) <= MiB, (len(sizes), max(sizes))


def test_upload_errors(client: openai.OpenAI, http: httpx.Client) -> None:
    with pytest.raises(openai.BadRequestError) as info:  # a form without a `file` part
        client.post("/files", cast_to=object, body={"purpose": "batch"}, files=[("other", ("x.jsonl", b"{}"))],
                    options={"headers": {"Content-Type": "multipart/form-data"}})
    assert info.value.param == "file" and info.value.code == "missing_required_parameter"
    r = http.post("/v1/files", content=b"--b\r\nbroken", headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert "truncated" in r.json()["error"]["message"]
    validate("ErrorResponse", r.json())


def test_files_metadata_endpoints(client: openai.OpenAI, http: httpx.Client) -> None:
    f = client.files.retrieve("file-1")
    assert f.id == "file-1" and f.bytes == 1234 and f.expires_at == CREATED + 30 * 86400
    body = http.get("/v1/files/file-1").json()
    validate("OpenAIFile", body)
    _assert_ints(body, "bytes", "created_at", "expires_at")
    assert "status_details" not in body

    page = client.files.list(purpose="batch", limit=10, order="desc")
    assert [x.id for x in page.data] == ["file-2", "file-1"]
    listed = http.get("/v1/files", params={"purpose": "batch", "after": "file-3", "order": "asc"}).json()
    validate("ListFilesResponse", listed)
    empty = http.get("/v1/files", params={"purpose": "vision"}).json()
    validate("ListFilesResponse", empty)
    assert empty["data"] == [] and empty["has_more"] is False

    deleted = client.files.delete("file-1")
    assert deleted.id == "file-1" and deleted.deleted is True and deleted.object == "file"
    validate("DeleteFileResponse", http.delete("/v1/files/file-1").json())

    with pytest.raises(openai.NotFoundError) as info:
        client.files.retrieve("file-nope")
    assert info.value.type == "not_found_error" and info.value.param == "id"


def test_file_content_streams_byte_exact(client: openai.OpenAI, http: httpx.Client) -> None:
    content = client.files.content("file-big")
    assert content.response.headers["content-type"] == "application/jsonl"
    assert content.content == CONTENT
    with http.stream("GET", "/v1/files/file-big/content") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/jsonl"
        got = b"".join(r.iter_raw())
    assert got == CONTENT and len(CONTENT) > 3 * MiB
    with pytest.raises(openai.NotFoundError) as info:
        client.files.content("file-nope")
    assert info.value.type == "not_found_error"
