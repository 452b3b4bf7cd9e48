"""Issue #3, end to end: the official openai SDK, unchanged, against REAL processes.

`sluice run` (grpc.aio server + engine + Envoy's gRPC-JSON transcoder) runs as a child process
on ports chosen at run time (tests/e2e.py). Every JSON body is validated against OpenAI's
OpenAPI schemas with integers required to be JSON integers; every REST response is checked for
leaked gRPC-only headers (the SDK's and httpx's response hooks); leaving a stack sends SIGINT
and asserts both the server and its Envoy are gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import httpx2
import openai
import pytest

from sluice.v1 import batch_pb2, batch_pb2_grpc
from tests.e2e import (
    KEY_A,
    KEY_B,
    KEY_LIST,
    GeneratedFile,
    Stack,
    check,
    free_port,
    raw_json,
    slow_stack_fixture,  # noqa: F401  (the fixture `slow_stack`)
    sqlite_stack_fixture,  # noqa: F401  (the fixture `sqlite_stack`)
    stack_logs_checked,  # noqa: F401  (autouse: the server's log is checked after each test)
    start_stack,
    vm_bytes,
)
from tests.harness import ROOT
from tests.openapi_schemas import validate
from tests.pg_server import PostgresServer
from tests.test_envoy_edge import _start_edge

TERMINAL = {"completed", "failed", "expired", "cancelled"}
CHAT = "/v1/chat/completions"
MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


def request_line(custom_id: str, text: str = "hello there", model: str = "gpt-4o-mini", url: str = CHAT,
                 pad: int = 0) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
    if pad:
        body["metadata"] = {"pad": "x" * pad}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode() + b"\n"


def upload(client: openai.OpenAI, content: bytes, name: str = "input.jsonl") -> tuple[Any, dict[str, Any]]:
    f, body = raw_json(client.files.with_raw_response.create, file=(name, content, "application/jsonl"),
                       purpose="batch", schema="OpenAIFile")
    assert f.id == body["id"] and f.object == "file" and f.purpose == "batch" and f.filename == name
    assert f.bytes == len(content) and f.status == "processed"
    return f, body


def create_batch(client: openai.OpenAI, file_id: str, endpoint: str = CHAT,
                 **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    return raw_json(client.batches.with_raw_response.create, input_file_id=file_id, endpoint=endpoint,
                    completion_window="24h", schema="Batch", **kwargs)


def retrieve(client: openai.OpenAI, batch_id: str) -> tuple[Any, dict[str, Any]]:
    return raw_json(client.batches.with_raw_response.retrieve, batch_id, schema="Batch")


def wait_batch(client: openai.OpenAI, batch_id: str, until: Any = None,
               timeout: float = 60.0) -> tuple[Any, dict[str, Any]]:
    """batches.retrieve until `until(batch)` (default: a terminal status); every body checked."""
    done = until or (lambda b: b.status in TERMINAL)
    deadline = time.monotonic() + timeout
    while True:
        batch, body = retrieve(client, batch_id)
        if done(batch):
            return batch, body
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status} after {timeout}s"
        time.sleep(0.05)


def expect_error(exc: type[openai.APIStatusError], status: int, call: Any, *args: Any, error_type: str,
                 code: str | None, param: str | None = None, **kwargs: Any) -> openai.APIStatusError:
    """The SDK raises exactly `exc` with the envelope's type, param and code; the body is an
    ErrorResponse."""
    with pytest.raises(openai.APIStatusError) as info:
        call(*args, **kwargs)
    err = info.value
    assert type(err) is exc, f"{type(err).__name__} ({err.status_code}): {err.message}"
    assert err.status_code == status
    assert (err.type, err.code, err.param) == (error_type, code, param), err.body
    body = check("ErrorResponse", err.response.json())
    assert body["error"]["message"] == err.body["message"]  # type: ignore[index]
    assert err.response.headers["content-type"] == "application/json"
    return err


def download_lines(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    content = client.files.content(file_id)
    assert content.response.headers["content-type"] == "application/jsonl"
    return [json.loads(line) for line in content.text.splitlines()]


def get_json(client: openai.OpenAI, path: str) -> Any:
    """`client.get(...)` for Sluice's own endpoints, returning the raw JSON."""
    response = client.get(path, cast_to=httpx2.Response)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    return response.json()


def assert_ints(obj: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert type(obj[key]) is int, f"{key}={obj[key]!r} is not a JSON integer"


def grpc_batch(port: int, batch_id: str, key: str = KEY_A) -> batch_pb2.Batch:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = batch_pb2_grpc.BatchServiceStub(channel)
        batch: batch_pb2.Batch = stub.GetBatch(batch_pb2.GetBatchRequest(id=batch_id),
                                               metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        results = stub.ListBatchResults(batch_pb2.ListBatchResultsRequest(id=batch_id, limit=1000),
                                        metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        assert results.batch_id == batch_id and len(results.data) == batch.request_counts.total
        return batch


# --------------------------------------------------------------------------- stacks


@pytest.fixture(scope="module")
def pg_stack(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The real stack on a PostgreSQL database of its own, shared by this module."""
    name = f"e2e_{uuid.uuid4().hex}"
    url = postgres_server.create_database(name)
    try:
        with start_stack(tmp_path_factory.mktemp("pg-stack"), url) as pg:
            yield pg
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """The module's SQLite stack or its PostgreSQL one: the test runs on both."""
    return request.getfixturevalue("sqlite_stack" if request.param == "sqlite" else "pg_stack")


def test_banner_names_rest_url_and_key(sqlite_stack: Stack) -> None:
    assert f"REST, OpenAI-compatible:  {sqlite_stack.base_url}" in sqlite_stack.banner
    assert f"gRPC (sluice.v1):         127.0.0.1:{sqlite_stack.grpc_port}" in sqlite_stack.banner
    assert "API key:" in sqlite_stack.banner
    # Configured keys are secrets: never printed, neither on stdout nor in the log.
    printed = sqlite_stack.banner + (sqlite_stack.work_dir / "sluice.stderr").read_text(errors="replace")
    for key in (KEY_A, KEY_B, KEY_LIST):
        assert key not in printed
    assert "not shown" in sqlite_stack.banner


# --------------------------------------------------------------------------- the happy path


def test_files_batches_outputs_results_and_native_grpc(stack: Stack) -> None:
    client = stack.sdk()
    ids = ["req-1", "req-2", "req-fail-3", "req 4/ü", "req-5", "req-fail-6"]
    content = b"".join(request_line(cid, "SIM_FAIL please" if "fail" in cid else f"question {i}")
                       for i, cid in enumerate(ids))
    f, f_body = upload(client, content)
    assert_ints(f_body, "bytes", "created_at", "expires_at")

    # files.retrieve / files.list see it
    _, got_body = raw_json(client.files.with_raw_response.retrieve, f.id, schema="OpenAIFile")
    assert got_body == f_body
    listed, _ = raw_json(client.files.with_raw_response.list, purpose="batch", schema="ListFilesResponse")
    assert f.id in [x.id for x in listed.data]
    assert download_lines(client, f.id) == [json.loads(line) for line in content.splitlines()]

    batch, body = create_batch(client, f.id, metadata={"team": "e2e"})
    assert batch.input_file_id == f.id and batch.endpoint == CHAT and batch.metadata == {"team": "e2e"}
    assert batch.status in ("validating", "in_progress") and body["object"] == "batch"
    assert_ints(body, "created_at", "expires_at")

    batch, body = wait_batch(client, batch.id)
    assert batch.status == "completed", body
    assert_ints(body, "created_at", "completed_at", "expires_at", "in_progress_at", "finalizing_at")
    assert_ints(body["request_counts"], "total", "completed", "failed")
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (6, 4, 2)
    assert batch.output_file_id and batch.error_file_id

    # The output file: OpenAI's line format, in request order, the successful lines only.
    out_meta, out_body = raw_json(client.files.with_raw_response.retrieve, batch.output_file_id, schema="OpenAIFile")
    assert out_meta.purpose == "batch_output" and out_meta.status == "processed"
    output = download_lines(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == [c for c in ids if "fail" not in c]
    assert out_body["bytes"] == len(client.files.content(batch.output_file_id).content)
    for line in output:
        assert set(line) == {"id", "custom_id", "response", "error"} and line["error"] is None
        assert line["id"].startswith("batch_req_")
        response = line["response"]
        assert set(response) == {"status_code", "request_id", "body"}
        assert response["status_code"] == 200 and response["request_id"]
        assert response["body"]["object"] == "chat.completion"
        assert type(response["body"]["usage"]["prompt_tokens"]) is int
    # The error file: the SIM_FAIL lines, with the provider's answer.
    errors = download_lines(client, batch.error_file_id)
    assert [line["custom_id"] for line in errors] == ["req-fail-3", "req-fail-6"]
    for line in errors:
        assert line["response"]["status_code"] == 500
        assert line["response"]["body"]["error"]["code"] == "sim_failure"

    # Sluice's results endpoints through client.get(...)
    page = get_json(client, f"/batches/{batch.id}/results?limit=4")
    assert page["object"] == "list" and page["batch_id"] == batch.id and page["has_more"] is True
    rest = get_json(client, f"/batches/{batch.id}/results?limit=4&after={quote(page['next_cursor'])}")
    assert rest["has_more"] is False and "next_cursor" not in rest
    results = page["data"] + rest["data"]
    assert [r["custom_id"] for r in results] == ids
    for r in results:
        assert_ints(r, "index", "status_code")
        assert_ints(r["usage"], "input_tokens", "output_tokens", "total_tokens")
        assert r["status"] == ("failed" if "fail" in r["custom_id"] else "completed")
    one = get_json(client, f"/batches/{batch.id}/{quote(ids[3], safe='')}")
    assert one["custom_id"] == ids[3] and one["status"] == "completed" and one["index"] == 3
    assert one["response"]["object"] == "chat.completion"
    failed = get_json(client, f"/batches/{batch.id}/req-fail-3")
    assert failed["status"] == "failed" and failed["status_code"] == 500
    assert failed["error"]["code"] == "sim_failure"
    expect_error(openai.NotFoundError, 404, client.get, f"/batches/{batch.id}/no-such-id", cast_to=object,
                 error_type="not_found_error", code="result_not_found", param="custom_id")

    # A native gRPC client, direct and through Envoy's port, sees the batch made over REST.
    for port in (stack.grpc_port, stack.http_port):
        native = grpc_batch(port, batch.id)
        assert native.status == "completed" and native.output_file_id == batch.output_file_id
        assert native.request_counts.failed == 2


def test_list_auto_paginates_over_pages(sqlite_stack: Stack) -> None:
    client = sqlite_stack.sdk(KEY_LIST)
    f, _ = upload(client, request_line("only"))
    made = [create_batch(client, f.id)[0].id for _ in range(5)]
    pages = []
    page, body = raw_json(client.batches.with_raw_response.list, limit=2, schema="ListBatchesResponse")
    assert body["has_more"] is True and len(body["data"]) == 2
    assert (body["first_id"], body["last_id"]) == (body["data"][0]["id"], body["data"][1]["id"])
    pages.append(page)
    while page.has_next_page():
        page = page.get_next_page()
        pages.append(page)
    assert [len(p.data) for p in pages] == [2, 2, 1] and not pages[-1].has_more
    by_pages = [b.id for p in pages for b in p.data]
    assert by_pages == made[::-1], "newest first, in the order the batches were made"
    seen = [b.id for b in client.batches.list(limit=2)]  # the SDK's auto-pagination
    assert seen == by_pages
    last = check("ListBatchesResponse", sqlite_stack.http(KEY_LIST).get(
        "/v1/batches", params={"limit": 2, "after": by_pages[3]}).json())
    assert [b["id"] for b in last["data"]] == [by_pages[4]] and last["has_more"] is False
    for b in last["data"]:
        assert_ints(b, "created_at", "expires_at")


# --------------------------------------------------------------------------- cancel


def test_cancel_keeps_partial_results(slow_stack: Stack, sqlite_stack: Stack) -> None:
    client = slow_stack.sdk()
    n = 200
    f, _ = upload(client, b"".join(request_line(f"c{i:03d}") for i in range(n)))
    batch, _ = create_batch(client, f.id)
    wait_batch(client, batch.id, lambda b: b.request_counts is not None and b.request_counts.completed >= 4,
               timeout=30)
    cancelled, body = raw_json(client.batches.with_raw_response.cancel, batch.id, schema="Batch")
    assert cancelled.status in ("cancelling", "cancelled"), body
    assert_ints(body, "cancelling_at")
    again, _ = raw_json(client.batches.with_raw_response.cancel, batch.id, schema="Batch")  # not an error
    assert again.status in ("cancelling", "cancelled")
    final, body = wait_batch(client, batch.id, timeout=30)
    assert final.status == "cancelled", body
    assert_ints(body, "cancelled_at", "cancelling_at")
    done = final.request_counts.completed
    assert 4 <= done < n, final.request_counts
    assert raw_json(client.batches.with_raw_response.cancel, batch.id, schema="Batch")[0].status == "cancelled"

    output = download_lines(client, final.output_file_id)
    assert len(output) == done and all(line["response"]["status_code"] == 200 for line in output)
    errors = download_lines(client, final.error_file_id)
    assert len(output) + len(errors) == n
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert all(line["response"] is None for line in errors)
    results = get_json(client, f"/batches/{batch.id}/results?limit=1000")["data"]
    assert sum(r["status"] == "completed" for r in results) == done
    assert sum(r["status"] == "cancelled" for r in results) == n - done

    # Cancelling a completed batch is a conflict the SDK does not retry.
    fast = sqlite_stack.sdk()
    f2, _ = upload(fast, request_line("x"))
    finished, _ = wait_batch(fast, create_batch(fast, f2.id)[0].id)
    assert finished.status == "completed"
    err = expect_error(openai.ConflictError, 409, fast.batches.cancel, finished.id,
                       error_type="invalid_request_error", code="batch_not_cancellable", param="id")
    assert err.response.headers["x-should-retry"] == "false"


# --------------------------------------------------------------------------- invalid input


def test_file_not_matching_the_endpoint_fails_the_batch_with_line_errors(stack: Stack) -> None:
    client = stack.sdk()
    f, _ = upload(client, request_line("a") + request_line("b"))
    batch, body = create_batch(client, f.id, endpoint="/v1/embeddings")
    if batch.status != "failed":
        batch, body = wait_batch(client, batch.id)
    assert batch.status == "failed" and body["errors"]["object"] == "list"
    assert_ints(body, "failed_at")
    data = body["errors"]["data"]
    assert [e["line"] for e in data] == [1, 2]
    for e in data:
        assert set(e) == {"code", "message", "param", "line"}
        assert e["code"] == "url_mismatch" and e["param"] == "url" and "/v1/embeddings" in e["message"]
        assert type(e["line"]) is int
    assert batch.errors is not None and batch.errors.data[0].line == 1  # the SDK parses it too
    assert batch.output_file_id is None


def test_bad_requests(stack: Stack) -> None:
    client = stack.sdk()
    f, _ = upload(client, request_line("a"))
    expect_error(openai.BadRequestError, 400, client.batches.create, input_file_id=f.id, endpoint="/v1/images",
                 completion_window="24h", error_type="invalid_request_error", code="invalid_endpoint",
                 param="endpoint")
    bad = request_line("ok-1") + b"{not json\n" + request_line("ok-3") + b'{"method": "POST"}\n'
    err = expect_error(openai.BadRequestError, 400, client.files.create, file=("bad.jsonl", bad), purpose="batch",
                       error_type="invalid_request_error", code="invalid_json_line", param="file")
    assert "line 2:" in err.message and "line 4:" in err.message and "line 1:" not in err.message
    expect_error(openai.BadRequestError, 400, client.files.create, file=("a.jsonl", request_line("a")),
                 purpose="fine-tune", error_type="invalid_request_error", code="invalid_purpose", param="purpose")
    expect_error(openai.BadRequestError, 400, client.files.create, file=("e.jsonl", b"\n\n"), purpose="batch",
                 error_type="invalid_request_error", code="empty_file", param="file")
    # Nothing of the rejected uploads stays visible.
    assert all(x.filename not in ("bad.jsonl", "e.jsonl") for x in client.files.list())


def test_more_than_50000_lines_is_413(sqlite_stack: Stack) -> None:
    client = sqlite_stack.sdk()
    lines = b"".join(request_line(f"r{i}") for i in range(50_001))
    err = expect_error(openai.APIStatusError, 413, client.files.create, file=("many.jsonl", lines), purpose="batch",
                       error_type="invalid_request_error", code="too_many_requests", param="file")
    assert "50000" in err.message


def reset_peak_memory(pid: int) -> None:
    """Start VmHWM afresh (Linux: writing 5 to clear_refs resets the peak RSS), so a process's
    peak is measured for what follows, not for whatever a shared process did before."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def exact_upload(total: int, line_bytes: int = 8192) -> GeneratedFile:
    """A valid JSONL upload of exactly `total` bytes, generated as it is sent: lines of
    `line_bytes` (the last one takes the remainder)."""
    assert total % line_bytes < line_bytes and total // line_bytes <= 50_000

    def line(i: int, size: int) -> bytes:
        head = request_line(f"b{i:07d}", pad=1)
        return request_line(f"b{i:07d}", pad=1 + size - len(head))

    def chunks() -> Iterator[bytes]:
        full, rest = divmod(total, line_bytes)
        block: list[bytes] = []
        for i in range(full - 1):
            block.append(line(i, line_bytes))
            if len(block) == 64:
                yield b"".join(block)
                block = []
        block.append(line(full - 1, line_bytes + rest))
        yield b"".join(block)

    return GeneratedFile("exact.jsonl", chunks())


@pytest.mark.timeout(600)
def test_exactly_200_mb_is_accepted_one_byte_more_is_413_and_neither_is_held_in_memory(sqlite_stack: Stack) -> None:
    client = sqlite_stack.sdk()
    pids = (("server", sqlite_stack.proc.pid), ("envoy", sqlite_stack.envoy_pid))

    baseline: dict[str, int] = {}

    def reset() -> None:
        """Peak := now, for both processes. The stack is shared by the session, so what they hold
        already depends on the tests that ran before: the promise is about growth from here."""
        for name, pid in pids:
            reset_peak_memory(pid)
            baseline[name] = vm_bytes(pid, "VmHWM")

    def assert_streamed() -> None:
        # Neither process ever held the upload whole: each one's peak grows by less than a third of it
        # (measured: server +34 MiB, Envoy +24 MiB).
        for name, pid in pids:
            grown = vm_bytes(pid, "VmHWM") - baseline[name]
            assert grown < 64 * MiB, f"{name}'s peak grew by {grown / MiB:.0f} MiB"

    reset()
    source = exact_upload(200 * MiB)
    f = client.files.create(file=source, purpose="batch")
    assert source.sent == 200 * MiB and (f.bytes, f.status) == (200 * MiB, "processed")
    assert_streamed()
    client.files.delete(f.id)

    reset()
    source = exact_upload(200 * MiB + 1)
    err = expect_error(openai.APIStatusError, 413, client.files.create, file=source, purpose="batch",
                       error_type="invalid_request_error", code="file_too_large", param="file")
    assert "200 MB" in err.message
    assert source.sent > 200 * MiB  # the server judged the bytes, not a declared length
    assert_streamed()
    assert f.id not in [x.id for x in client.files.list()]


# --------------------------------------------------------------------------- auth and tenants


def test_authentication_errors(stack: Stack) -> None:
    bad = stack.sdk("sk-wrong")
    expect_error(openai.AuthenticationError, 401, bad.batches.list, error_type="authentication_error",
                 code="invalid_api_key")
    expect_error(openai.AuthenticationError, 401, bad.files.create, file=("a.jsonl", request_line("a")),
                 purpose="batch", error_type="authentication_error", code="invalid_api_key")
    r = stack.http(key=None).get("/v1/batches")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    check("ErrorResponse", r.json())

    # The file routes too, with a wrong key (SDK) and with none (plain HTTP).
    good = stack.sdk()
    f, _ = upload(good, request_line("a"))
    file_calls: list[Any] = [bad.files.list, lambda: bad.files.retrieve(f.id), lambda: bad.files.content(f.id),
                             lambda: bad.files.delete(f.id)]
    for call in file_calls:
        expect_error(openai.AuthenticationError, 401, call, error_type="authentication_error", code="invalid_api_key")
    anonymous = stack.http(key=None)
    for method, path in (("GET", "/v1/files"), ("GET", f"/v1/files/{f.id}"), ("GET", f"/v1/files/{f.id}/content"),
                         ("DELETE", f"/v1/files/{f.id}"), ("POST", "/v1/files")):
        r = anonymous.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "missing_api_key" and r.headers["content-type"] == "application/json"
        check("ErrorResponse", r.json())
    assert good.files.retrieve(f.id).id == f.id  # nothing was deleted
    assert download_lines(good, f.id) == [json.loads(request_line("a"))]


def test_tenants_are_isolated(stack: Stack) -> None:
    a, b = stack.sdk(KEY_A), stack.sdk(KEY_B)
    f, _ = upload(a, request_line("mine"))
    batch, _ = wait_batch(a, create_batch(a, f.id)[0].id)
    nf = {"error_type": "not_found_error"}
    file_calls: list[Any] = [b.files.retrieve, b.files.content, b.files.delete]
    for call, file_id in [(c, x) for c in file_calls for x in (f.id, batch.output_file_id)]:
        err = expect_error(openai.NotFoundError, 404, call, file_id, code="file_not_found", param="id", **nf)
        assert "No such File object" in err.message
    batch_calls: list[Any] = [b.batches.retrieve, b.batches.cancel]
    for call in batch_calls:
        expect_error(openai.NotFoundError, 404, call, batch.id, code="batch_not_found", param="id", **nf)
    expect_error(openai.NotFoundError, 404, b.get, f"/batches/{batch.id}/results", cast_to=object,
                 code="batch_not_found", param="id", **nf)
    expect_error(openai.NotFoundError, 404, b.get, f"/batches/{batch.id}/mine", cast_to=object,
                 code="batch_not_found", param="id", **nf)
    expect_error(openai.NotFoundError, 404, b.batches.create, input_file_id=f.id, endpoint=CHAT,
                 completion_window="24h", code="file_not_found", param="input_file_id", **nf)
    assert batch.id not in [x.id for x in b.batches.list()]
    assert f.id not in [x.id for x in b.files.list()]
    with pytest.raises(grpc.RpcError) as info:
        grpc_batch(stack.grpc_port, batch.id, key=KEY_B)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # and A still has everything
    assert a.files.retrieve(f.id).id == f.id and a.batches.retrieve(batch.id).status == "completed"


def test_unknown_ids_are_404(stack: Stack) -> None:
    client = stack.sdk()
    nf = {"error_type": "not_found_error"}
    expect_error(openai.NotFoundError, 404, client.batches.retrieve, "batch_nope", code="batch_not_found",
                 param="id", **nf)
    expect_error(openai.NotFoundError, 404, client.files.retrieve, "file-nope", code="file_not_found", param="id", **nf)
    expect_error(openai.NotFoundError, 404, client.files.content, "file-nope", code="file_not_found", param="id", **nf)
    expect_error(openai.NotFoundError, 404, client.batches.create, input_file_id="file-nope", endpoint=CHAT,
                 completion_window="24h", code="file_not_found", param="input_file_id", **nf)


# --------------------------------------------------------------------------- Envoy's own errors


def test_envoy_made_errors_on_the_real_stack(sqlite_stack: Stack) -> None:
    client, http = sqlite_stack.sdk(), sqlite_stack.http()
    err = expect_error(openai.NotFoundError, 404, client.get, "/nope", cast_to=object,
                       error_type="invalid_request_error", code="unknown_url")
    assert "Invalid URL (GET /v1/nope)" in err.message
    err = expect_error(openai.BadRequestError, 400, client.batches.list, extra_query={"foo": "1"},
                       error_type="invalid_request_error", code="unknown_parameter", param="foo")
    assert "Unknown parameter: 'foo'" in err.message and "sluice.v1" not in err.message
    r = http.post("/v1/batches", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    check("ErrorResponse", r.json())


@pytest.mark.logs_errors(r"Traceback", r"ERROR service\.edge\.grpc_errors: unexpected error in FileServicer")
def test_an_internal_failure_is_a_500_envelope_that_leaks_nothing(sqlite_stack: Stack) -> None:
    """The database under the real server breaks (a table it reads is gone): REST answers 500
    with OpenAI's `server_error` envelope, no internals in it; the operator's log has the
    traceback; the server keeps serving once the table is back."""
    client = sqlite_stack.sdk()
    f, _ = upload(client, request_line("a"))
    db = sqlite3.connect(sqlite_stack.database_url.removeprefix("sqlite+aiosqlite:///"), timeout=30)
    try:
        db.execute("ALTER TABLE file_chunks RENAME TO file_chunks_moved_away")
        db.commit()
        err = expect_error(openai.InternalServerError, 500, client.files.content, f.id, error_type="server_error",
                           code=None)
        assert "file_chunks" not in err.message and "sqlite" not in err.message.lower()
        assert "Traceback" not in err.response.text and "SELECT" not in err.response.text
    finally:
        db.execute("ALTER TABLE file_chunks_moved_away RENAME TO file_chunks")
        db.commit()
        db.close()
    assert download_lines(client, f.id) == [json.loads(request_line("a"))]
    assert "Traceback" in sqlite_stack.server_log.read_text()


def test_inline_body_over_the_limit_is_413(sqlite_stack: Stack) -> None:
    """A JSON body over 16 MiB: refused by the edge before it is read (and by gRPC's receive
    limit for native clients), never a 429 that SDKs would retry."""
    requests = [{"custom_id": f"r{i}", "method": "POST", "url": CHAT,
                 "body": {"model": "m", "messages": [{"role": "user", "content": "y" * 70_000}]}}
                for i in range(300)]
    err = expect_error(openai.APIStatusError, 413, sqlite_stack.sdk().batches.create, input_file_id="",
                       endpoint=CHAT, completion_window="24h", extra_body={"requests": requests},
                       error_type="invalid_request_error", code="request_too_large", param="requests")
    assert "16 MiB" in err.message


def test_upstream_down_is_503(tmp_path: Path) -> None:
    """Envoy rendered by service/runtime/envoy.py (as `sluice run` does) with nothing on its upstream port."""
    edge = _start_edge(tmp_path, free_port())
    try:
        client = openai.OpenAI(base_url=f"{edge.url}/v1", api_key=KEY_A, max_retries=0)
        expect_error(openai.InternalServerError, 503, client.batches.list, error_type="server_error",
                     code="upstream_unavailable")
        r = httpx.get(f"{edge.url}/v1/files", headers={"authorization": f"Bearer {KEY_A}"})
        assert r.status_code == 503
        validate("ErrorResponse", r.json())
        assert not [k for k in r.headers if k.lower().startswith("grpc-")]
    finally:
        edge.envoy.stop()


# --------------------------------------------------------------------------- `sluice run` itself


def test_sluice_run_stops_when_envoy_dies(tmp_path: Path) -> None:
    with start_stack(tmp_path / "stack", f"sqlite+aiosqlite:///{tmp_path}/db.sqlite") as stack:
        os.kill(stack.envoy_pid, signal.SIGKILL)
        code = stack.proc.wait(30)  # bounded: it notices within a second
        assert code == 1, stack.log_tail()
        assert "envoy (the REST edge) exited on its own" in (stack.work_dir / "sluice.stderr").read_text()


def test_sluice_run_refuses_a_taken_http_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "SLUICE_HTTP_PORT": str(port), "SLUICE_GRPC_PORT": str(free_port()),
               "SLUICE_API_KEY": KEY_A, "SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/db.sqlite"}
        run = subprocess.run([sys.executable, "-m", "service.runtime.cli", "run", "--work-dir", str(tmp_path)], env=env,
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode != 0 and "Sluice is running" not in run.stdout
    assert f"cannot serve REST on 127.0.0.1:{port}" in run.stderr, run.stderr[-2000:]
