"""FileService over real gRPC on both databases, and with file content in S3 (a real
S3-compatible server on loopback): listing order and cursors, authentication, tenants, upload
errors that leave nothing behind, the line limit, and the output and error files of batches that
completed, were cancelled or expired."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select, update

from service.domain.model import now
from service.runtime.server import App
from service.storage.tables import BatchRow, FileChunkRow, FileRow
from sluice.v1 import batch_pb2, file_pb2
from tests.databases import database_url
from tests.harness import (
    KEY_A,
    KEY_B,
    Client,
    chat_line,
    gateway,
    jsonl,
    make_settings,
    md,
    multipart_upload,
    request_dict,
)
from tests.rpc_errors import expect_error
from tests.s3_server import S3Bucket

CHAT = "/v1/chat/completions"


@pytest.fixture(params=["sqlite", "postgres", "sqlite+s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """This module's tests run on both databases with the content in the database, and once more
    with the content in S3 (the blob store is independent of the database)."""
    return database_url(request, tmp_path, postgres=backend == "postgres")


@pytest.fixture
def bucket(backend: str, request: pytest.FixtureRequest) -> S3Bucket | None:
    return request.getfixturevalue("s3_env") if backend.endswith("+s3") else None


@pytest.fixture
async def gw(db_url: str, bucket: S3Bucket | None) -> AsyncIterator[tuple[App, Client]]:
    async with gateway(make_settings(db_url, blob_url=bucket.url if bucket else "")) as pair:
        yield pair


@pytest.fixture
async def slow(db_url: str, bucket: S3Bucket | None) -> AsyncIterator[tuple[App, Client]]:
    """One line at a time, 100 ms each: work is reliably in flight."""
    async with gateway(make_settings(db_url, sim_latency_ms=100, executor_concurrency=1,
                                     blob_url=bucket.url if bucket else "")) as pair:
        yield pair


@pytest.fixture
def file_counts(bucket: S3Bucket | None) -> Callable[[App], Awaitable[tuple[int, int]]]:
    """(file rows, pieces of stored content): chunk rows in the database, or objects in the bucket."""
    async def counts(app: App) -> tuple[int, int]:
        async with app.store.sessions() as s:
            files = int(await s.scalar(select(func.count()).select_from(FileRow)) or 0)
            chunks = int(await s.scalar(select(func.count()).select_from(FileChunkRow)) or 0)
        return files, (len(bucket.objects()) if bucket else chunks)
    return counts


async def set_batch(app: App, batch_id: str, **values: Any) -> None:
    """Change a batch row directly (what a clock or another replica would have done)."""
    async with app.store.sessions.begin() as s:
        await s.execute(update(BatchRow).where(BatchRow.id == batch_id).values(**values))


async def list_ids(c: Client, key: str = KEY_A, **request: Any) -> tuple[list[str], file_pb2.ListFilesResponse]:
    page = await c.files.ListFiles(file_pb2.ListFilesRequest(**request), metadata=md(key))
    return [f.id for f in page.data], page


# --------------------------------------------------------------------------- listing


async def test_list_files_newest_first_with_cursor_and_order(gw: tuple[App, Client]) -> None:
    _, c = gw
    made = [(await c.upload(jsonl([request_dict("a")]), filename=f"f{i}.jsonl")).id for i in range(5)]
    await c.upload(jsonl([request_dict("a")]), key=KEY_B)  # another project's file never shows up

    newest_first, page = await list_ids(c)
    assert newest_first == made[::-1], "newest first, in the order the files were made"
    assert page.object == "list" and not page.has_more
    assert (page.first_id, page.last_id) == (made[-1], made[0])
    assert (await list_ids(c, order="desc"))[0] == made[::-1]
    assert (await list_ids(c, order="asc"))[0] == made

    for order, expected in (("desc", made[::-1]), ("asc", made)):
        seen: list[str] = []
        pages = []
        after = ""
        for _ in range(10):  # bounded: a cursor that does not move must fail, not hang
            ids, page = await list_ids(c, limit=2, after=after, order=order)
            pages.append((len(ids), page.has_more))
            assert (page.first_id, page.last_id) == (ids[0], ids[-1])
            seen += ids
            if not page.has_more:
                break
            after = page.last_id
        assert seen == expected, order
        assert pages == [(2, True), (2, True), (1, False)], order
    ids, page = await list_ids(c, limit=5)
    assert ids == made[::-1] and not page.has_more  # exactly one page's worth
    ids, page = await list_ids(c, limit=2, after=made[0])
    assert ids == [] and not page.has_more


async def test_list_files_purpose_filter_and_bad_arguments(gw: tuple[App, Client]) -> None:
    _, c = gw
    upload = await c.upload(jsonl([request_dict("a"), request_dict("b", "SIM_FAIL")]))
    batch = await c.wait_for((await c.create([], input_file_id=upload.id)).id)
    assert batch.status == "completed" and batch.output_file_id and batch.error_file_id

    everything, _ = await list_ids(c)
    assert set(everything) == {upload.id, batch.output_file_id, batch.error_file_id}
    assert (await list_ids(c, purpose="batch"))[0] == [upload.id]
    assert set((await list_ids(c, purpose="batch_output"))[0]) == {batch.output_file_id, batch.error_file_id}
    assert (await list_ids(c, key=KEY_B))[0] == []

    theirs = await c.upload(jsonl([request_dict("a")]), key=KEY_B)
    for after in ("file-doesnotexist", theirs.id):  # unknown, or another project's: the same answer
        err = await expect_error(c.files.ListFiles(file_pb2.ListFilesRequest(after=after), metadata=md()),
                                 grpc.StatusCode.NOT_FOUND)
        assert err.envelope["param"] == "id" or err.envelope["param"] == "after", err.envelope
    for limit in (0, 10_001):
        err = await expect_error(c.files.ListFiles(file_pb2.ListFilesRequest(limit=limit), metadata=md()),
                                 grpc.StatusCode.INVALID_ARGUMENT)
        assert (err.envelope["param"], err.envelope["code"]) == ("limit", "invalid_limit")
    err = await expect_error(c.files.ListFiles(file_pb2.ListFilesRequest(order="sideways"), metadata=md()),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert (err.envelope["param"], err.envelope["code"]) == ("order", "invalid_order")


# --------------------------------------------------------------------------- auth and tenants


BAD_CREDENTIALS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "missing": ((), "missing_api_key"),
    "not bearer": ((("authorization", f"Basic {KEY_A}"),), "missing_api_key"),
    "unknown key": ((("authorization", "Bearer sk-not-a-real-key"),), "invalid_api_key"),
}


async def test_every_file_rpc_needs_a_known_key(gw: tuple[App, Client],
        file_counts: Callable[[App], Awaitable[tuple[int, int]]]) -> None:
    app, c = gw
    mine = await c.upload(jsonl([request_dict("a")]))
    before = await file_counts(app)
    calls = {
        "UploadFile": lambda m: c.files.UploadFile(iter(multipart_upload(jsonl([request_dict("x")]))), metadata=m),
        "ListFiles": lambda m: c.files.ListFiles(file_pb2.ListFilesRequest(), metadata=m),
        "GetFile": lambda m: c.files.GetFile(file_pb2.GetFileRequest(id=mine.id), metadata=m),
        "DeleteFile": lambda m: c.files.DeleteFile(file_pb2.DeleteFileRequest(id=mine.id), metadata=m),
        "GetFileContent": lambda m: _read(c.files.GetFileContent(file_pb2.GetFileContentRequest(id=mine.id),
                                                                 metadata=m)),
    }
    for rpc, call in calls.items():
        for what, (metadata, code) in BAD_CREDENTIALS.items():
            err = await expect_error(call(metadata), grpc.StatusCode.UNAUTHENTICATED)
            assert (err.envelope["type"], err.envelope["code"]) == ("authentication_error", code), (rpc, what)
            assert KEY_A not in err.message
    assert await file_counts(app) == before, "an unauthenticated call changed the stored files"
    assert (await c.files.GetFile(file_pb2.GetFileRequest(id=mine.id), metadata=md())).id == mine.id


async def _read(call: Any) -> bytes:
    return b"".join([piece.data async for piece in call])


async def test_another_projects_files_are_not_found(gw: tuple[App, Client]) -> None:
    _, c = gw
    mine = await c.upload(jsonl([request_dict("a")]))
    for call in (c.files.GetFile(file_pb2.GetFileRequest(id=mine.id), metadata=md(KEY_B)),
                 c.files.DeleteFile(file_pb2.DeleteFileRequest(id=mine.id), metadata=md(KEY_B)),
                 _read(c.files.GetFileContent(file_pb2.GetFileContentRequest(id=mine.id), metadata=md(KEY_B)))):
        err = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert (err.envelope["type"], err.envelope["code"]) == ("not_found_error", "file_not_found")
        assert err.message == f"No such File object: {mine.id}"  # the same as for a file that does not exist
    err = await expect_error(c.stub.CreateBatch(batch_pb2.CreateBatchRequest(endpoint=CHAT, input_file_id=mine.id),
                                                metadata=md(KEY_B)), grpc.StatusCode.NOT_FOUND)
    assert (err.envelope["param"], err.envelope["code"]) == ("input_file_id", "file_not_found")
    assert (await c.files.GetFile(file_pb2.GetFileRequest(id=mine.id), metadata=md())).id == mine.id
    assert await c.content(mine.id) == jsonl([request_dict("a")])


async def test_delete_file_removes_it_and_its_content(gw: tuple[App, Client],
        file_counts: Callable[[App], Awaitable[tuple[int, int]]]) -> None:
    app, c = gw
    f = await c.upload(jsonl([request_dict(f"r{i}") for i in range(3)]))
    deleted = await c.files.DeleteFile(file_pb2.DeleteFileRequest(id=f.id), metadata=md())
    assert (deleted.id, deleted.object, deleted.deleted) == (f.id, "file", True)
    await expect_error(c.files.GetFile(file_pb2.GetFileRequest(id=f.id), metadata=md()), grpc.StatusCode.NOT_FOUND)
    await expect_error(c.files.DeleteFile(file_pb2.DeleteFileRequest(id=f.id), metadata=md()),
                       grpc.StatusCode.NOT_FOUND)
    listed = await c.files.ListFiles(file_pb2.ListFilesRequest(), metadata=md())
    assert f.id not in [x.id for x in listed.data]
    # Hidden at once; the content is kept for downloads in flight until the sweep after the grace period.
    assert (await app.store.sweep_files(stale_upload_before=0, deleted_before=0)).total == 0
    assert await file_counts(app) == (1, 1)
    assert (await app.store.sweep_files(stale_upload_before=0, deleted_before=now() + 1)).deleted == [f.id]
    assert await file_counts(app) == (0, 0)


# --------------------------------------------------------------------------- uploads


UPLOAD_ERRORS: dict[str, tuple[bytes, str, str, str, list[str]]] = {
    # name: (content, purpose, code, param, what the message names)
    "empty": (b"\n\n", "batch", "empty_file", "file", []),
    "bad lines": (jsonl([request_dict("a")]) + b"{not json\n" + jsonl([request_dict("c")]) + b'{"method": "POST"}\n'
                  + jsonl([request_dict("a")]),
                  "batch", "invalid_json_line", "file", ["line 2:", "line 4:", "line 5:"]),
    "long custom_id": (jsonl([request_dict("x" * 513)]), "batch", "invalid_custom_id", "file", ["line 1:"]),
    "mixed urls": (jsonl([request_dict("a"), request_dict("b", url="/v1/embeddings")]), "batch", "url_mismatch",
                   "file", ["line 2:"]),
    "purpose": (jsonl([request_dict("a")]), "fine-tune", "invalid_purpose", "purpose", []),
}


@pytest.mark.parametrize("case", list(UPLOAD_ERRORS))
async def test_rejected_uploads_leave_nothing_behind(gw: tuple[App, Client], case: str,
        file_counts: Callable[[App], Awaitable[tuple[int, int]]]) -> None:
    app, c = gw
    content, purpose, code, param, named = UPLOAD_ERRORS[case]
    err = await expect_error(c.upload(content, purpose=purpose), grpc.StatusCode.INVALID_ARGUMENT)
    assert (err.envelope["type"], err.envelope["code"], err.envelope["param"]) == (
        "invalid_request_error", code, param)
    for text in named:
        assert text in err.message, err.message
    if case == "bad lines":
        assert "line 1:" not in err.message and "line 3:" not in err.message
    assert await file_counts(app) == (0, 0)
    assert (await list_ids(c))[0] == []


async def test_exactly_50000_lines_are_accepted_and_one_more_is_413(gw: tuple[App, Client]) -> None:
    app, c = gw
    line = b'{"custom_id":"r%05d","method":"POST","url":"/v1/chat/completions","body":{"model":"sim/m"}}\n'
    content = b"".join(line % i for i in range(50_000))
    f = await c.upload(content)
    assert (f.bytes, f.status) == (len(content), "processed")
    err = await expect_error(c.upload(content + line % 50_000), grpc.StatusCode.INVALID_ARGUMENT)
    assert err.trailers.get("x-http-status") == "413"
    assert (err.envelope["code"], err.envelope["param"]) == ("too_many_requests", "file")
    assert "50000" in err.message
    listed, _ = await list_ids(c)
    assert listed == [f.id]
    async with app.store.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(FileRow)) == 1


# --------------------------------------------------------------------------- output and error files


def assert_output_line(line: dict[str, Any], custom_id: str) -> None:
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["custom_id"] == custom_id and line["id"].startswith("batch_req_")


async def test_output_and_error_files_of_a_completed_batch(gw: tuple[App, Client]) -> None:
    _, c = gw
    cids = ["ok-1", "bad-2", "ok-3", "bad-4", "ok-5"]
    batch = await c.wait_for((await c.create(
        [chat_line(cid, "SIM_FAIL now" if "bad" in cid else f"text {cid}") for cid in cids])).id)
    assert batch.status == "completed"
    out = await c.file_lines(batch.output_file_id)
    errs = await c.file_lines(batch.error_file_id)
    assert [x["custom_id"] for x in out] == ["ok-1", "ok-3", "ok-5"]  # request order
    assert [x["custom_id"] for x in errs] == ["bad-2", "bad-4"]
    results = {r.custom_id: r for r in await c.results(batch.id)}
    for x in out:
        assert_output_line(x, x["custom_id"])
        assert x["error"] is None and x["response"]["status_code"] == 200
        assert x["response"]["request_id"].startswith("req_sim_")
        assert x["response"]["body"]["choices"][0]["message"]["content"] == \
            results[x["custom_id"]].response["choices"][0]["message"]["content"]
    for x in errs:
        assert_output_line(x, x["custom_id"])
        assert x["response"]["status_code"] == 500 and x["response"]["body"]["error"]["code"] == "sim_failure"
    assert len({x["id"] for x in out + errs}) == 5
    for file_id, n in ((batch.output_file_id, 3), (batch.error_file_id, 2)):
        meta = await c.files.GetFile(file_pb2.GetFileRequest(id=file_id), metadata=md())
        assert (meta.purpose, meta.status) == ("batch_output", "processed")
        assert meta.bytes == len(await c.content(file_id)) and meta.bytes > 0
        assert len(await c.file_lines(file_id)) == n


async def test_a_batch_with_no_failures_has_no_error_file(gw: tuple[App, Client]) -> None:
    _, c = gw
    batch = await c.wait_for((await c.create([chat_line("a"), chat_line("b")])).id)
    assert batch.status == "completed" and batch.output_file_id
    assert not batch.HasField("error_file_id")
    assert [x["custom_id"] for x in await c.file_lines(batch.output_file_id)] == ["a", "b"]


async def test_executor_batch_expires_keeping_finished_work(slow: tuple[App, Client]) -> None:
    """A sim batch whose 24 h window runs out while it runs ends `expired`: finished lines keep
    their results (and are billed), the rest are expired, and both files say so."""
    app, c = slow
    cids = [f"line-{i:02d}" for i in range(30)]
    created = await c.create([chat_line(cid) for cid in cids])
    await c.wait_until(created.id, lambda b: b.request_counts.completed >= 2, timeout=30)
    await set_batch(app, created.id, expires_at=1)  # the window is over
    batch = await c.wait_for(created.id, timeout=30)
    assert batch.status == "expired" and batch.HasField("expired_at"), batch
    for name in ("completed_at", "cancelled_at", "failed_at"):
        assert not batch.HasField(name)
    results = await c.results(created.id)
    assert [r.custom_id for r in results] == cids
    done = [r for r in results if r.status == "completed"]
    expired = [r for r in results if r.status == "expired"]
    assert len(done) >= 2 and expired and len(done) + len(expired) == 30
    assert batch.request_counts.completed == len(done) and batch.request_counts.failed == 0
    assert batch.usage.input_tokens == sum(r.usage.input_tokens for r in done) > 0
    for r in expired:
        assert r.error.code == "batch_expired" and r.status_code == 0 and not r.HasField("response")
    out = await c.file_lines(batch.output_file_id)
    errs = await c.file_lines(batch.error_file_id)
    assert [x["custom_id"] for x in out] == [r.custom_id for r in done]
    assert [x["custom_id"] for x in errs] == [r.custom_id for r in expired]
    for x in errs:
        assert x["response"] is None and x["error"]["code"] == "batch_expired" and x["error"]["message"]


async def test_executor_batch_expired_before_it_started(db_url: str) -> None:
    async with gateway(make_settings(db_url)) as (app, c):
        await app.engine.stop()  # accept the batch, run nothing
        created = await c.create([chat_line("a"), chat_line("b")])
        await set_batch(app, created.id, expires_at=1)
    async with gateway(make_settings(db_url)) as (app, c):
        batch = await c.wait_for(created.id, timeout=30)
        assert batch.status == "expired" and batch.HasField("expired_at")
        assert batch.request_counts == batch_pb2.BatchRequestCounts(total=2, completed=0, failed=0)
        assert {r.status for r in await c.results(created.id)} == {"expired"}
        assert not batch.HasField("output_file_id")
        assert [x["error"]["code"] for x in await c.file_lines(batch.error_file_id)] == ["batch_expired"] * 2


async def test_cancel_while_validating(db_url: str) -> None:
    """A batch no engine has touched yet is cancellable, and ends with every line cancelled."""
    async with gateway(make_settings(db_url)) as (app, c):
        await app.engine.stop()
        created = await c.create([chat_line("a"), chat_line("b"), chat_line("c")])
        assert (await c.get(created.id)).status == "validating"
        cancelling = await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
        assert cancelling.status == "cancelling" and cancelling.HasField("cancelling_at")
        assert not cancelling.HasField("in_progress_at")
    async with gateway(make_settings(db_url)) as (app, c):
        batch = await c.wait_for(created.id, timeout=30)
        assert batch.status == "cancelled" and batch.HasField("cancelled_at")
        assert not batch.HasField("in_progress_at") and not batch.HasField("completed_at")
        assert batch.request_counts == batch_pb2.BatchRequestCounts(total=3, completed=0, failed=0)
        assert {r.status for r in await c.results(created.id)} == {"cancelled"}
        assert not batch.HasField("output_file_id")
        errs = await c.file_lines(batch.error_file_id)
    assert [x["custom_id"] for x in errs] == ["a", "b", "c"]
    assert {x["error"]["code"] for x in errs} == {"batch_cancelled"}
