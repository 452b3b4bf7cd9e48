"""An uploaded file is parsed once: the upload keeps a line index, and a batch created from the file
is checked from it and stores its lines by reference to the file (no body stored twice). These
tests prove it on both databases and with the content in S3 (a real S3-compatible server on
loopback): the engine sends each line's own body; deleting the input file of a running batch and
sweeping it loses no body; a retry after the file is gone runs, or fails with a clear error when
the content was removed behind Sluice's back; and a file is judged (and estimated) the same with or
without its index, which is how files uploaded before the index existed are read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, select

from adapters.base import Capabilities
from adapters.sim import SimProvider
from service.domain.errors import NotFound
from service.domain.model import FileStatus, now
from service.intake.jsonl import numbered_lines, parse_line
from service.intake.line_index import BLOCK_LINES
from service.intake.validation import LineProblem
from service.providers.routing import ProviderEntry, Router
from service.runtime.server import App
from service.storage.repository import NewRequest, Store
from service.storage.tables import BatchRow, FileLineIndexRow, FileRow, RequestRow
from sluice.v1 import batch_pb2, file_pb2
from tests.databases import database_url
from tests.harness import Client, gateway, make_settings, md
from tests.rpc_errors import expect_error
from tests.s3_server import S3Bucket

BOUNDARY = "sluice-test-boundary"
CHAT = "/v1/chat/completions"


@pytest.fixture(params=["sqlite", "postgres", "sqlite+s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, tmp_path, postgres=backend == "postgres")


@pytest.fixture
def blob_url(backend: str, request: pytest.FixtureRequest) -> str:
    if backend.endswith("+s3"):
        bucket: S3Bucket = request.getfixturevalue("s3_env")
        return bucket.url
    return ""


def chat(custom_id: str, text: str, model: str = "sim/small", url: str = CHAT, **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **extra}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    """Lines with the shapes a real file has: CRLF endings, blank lines, escaped and raw non-ASCII."""
    out = b""
    for i, line in enumerate(lines):
        out += json.dumps(line, ensure_ascii=i % 2 == 0).encode() + (b"\r\n" if i % 3 == 0 else b"\n")
        if i % 4 == 1:
            out += b"\n   \n"
    return out


async def upload(c: Client, content: bytes, piece: int = 97) -> file_pb2.File:
    """A multipart upload in odd-sized pieces, so that lines straddle pieces and stored chunks."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{BOUNDARY}--\r\n".encode()

    async def pieces() -> AsyncIterator[file_pb2.UploadFileRequest]:
        for at in range(0, len(body), piece):
            yield file_pb2.UploadFileRequest(body=httpbody_pb2.HttpBody(
                content_type=f"multipart/form-data; boundary={BOUNDARY}" if at == 0 else "",
                data=body[at:at + piece]))

    uploaded: file_pb2.File = await c.files.UploadFile(pieces(), metadata=md())
    return uploaded


async def create(c: Client, file_id: str, endpoint: str = CHAT) -> batch_pb2.Batch:
    batch: batch_pb2.Batch = await c.stub.CreateBatch(batch_pb2.CreateBatchRequest(
        input_file_id=file_id, endpoint=endpoint, completion_window="24h"), metadata=md())
    return batch


async def retry(c: Client, batch_id: str, **fields: Any) -> batch_pb2.Batch:
    batch: batch_pb2.Batch = await c.stub.RetryBatch(batch_pb2.RetryBatchRequest(id=batch_id, **fields),
                                                     metadata=md())
    return batch


async def answers(c: Client, batch_id: str) -> dict[str, str]:
    """custom_id -> what the sim provider answered (it echoes the prompt it was sent)."""
    return {r.custom_id: r.response["choices"][0]["message"]["content"] for r in await c.results(batch_id)}


async def stored_by_reference(app: App, batch_id: str) -> list[bool]:
    async with app.store.sessions() as s:
        rows = (await s.execute(select(RequestRow.body_json, RequestRow.line_offset)
                                .where(RequestRow.batch_id == batch_id).order_by(RequestRow.idx))).all()
    return [body == "" and offset is not None for body, offset in rows]


async def sweep_deleted(app: App) -> list[str]:
    """What the sweeper does once a deleted file's grace period is over."""
    swept = await app.store.sweep_files(stale_upload_before=0, deleted_before=now() + 1)
    return swept.deleted


LINES = [chat(f"q{i}", f"Question {i} - ünïcødé \u2028 {'x' * (i * 37 % 300)}", max_tokens=7) for i in range(40)]


async def expected(c: Client, lines: list[dict[str, Any]]) -> dict[str, str]:
    """What the sim answers to these lines when their bodies are sent inline (the reference)."""
    batch = await c.create([batch_pb2.BatchRequestLine(custom_id=line["custom_id"], method="POST", url=line["url"],
                                                       body=_struct(line["body"])) for line in lines])
    done = await c.wait_for(batch.id)
    assert done.status == "completed", done
    return await answers(c, batch.id)


def _struct(value: dict[str, Any]) -> Any:
    from google.protobuf import struct_pb2
    out = struct_pb2.Struct()
    out.update(value)
    return out


async def test_lines_are_stored_by_reference_and_sent_with_their_own_bodies(db_url: str, blob_url: str) -> None:
    async with gateway(make_settings(db_url, blob_url=blob_url)) as (app, c):
        file = await upload(c, jsonl(LINES))
        batch = await create(c, file.id)
        assert batch.status != "failed" and batch.request_counts.total == len(LINES)
        assert all(await stored_by_reference(app, batch.id)), "bodies were copied at create"
        bodies = [(r.custom_id, json.loads(r.body_json)) async for r in app.store.iter_requests(batch.id, page=7)]
        assert bodies == [(line["custom_id"], line["body"]) for line in LINES]

        done = await c.wait_for(batch.id)
        assert done.status == "completed" and done.request_counts.completed == len(LINES)
        assert await answers(c, batch.id) == await expected(c, LINES)


async def test_sweeping_the_deleted_input_file_of_an_unfinished_batch_loses_no_body(db_url: str,
                                                                                  blob_url: str) -> None:
    lines = LINES[:12]
    async with gateway(make_settings(db_url, blob_url=blob_url, run_engine=False)) as (app, c):
        file = await upload(c, jsonl(lines))
        batch = await create(c, file.id)
        await c.files.DeleteFile(file_pb2.DeleteFileRequest(id=file.id), metadata=md())
        assert await sweep_deleted(app) == [file.id]
        assert not await app.store.blobs.exists(file.id), "the content was not removed"
        assert not any(await stored_by_reference(app, batch.id)), "lines still point into a purged file"
    async with gateway(make_settings(db_url, blob_url=blob_url)) as (app, c):  # now the engine runs it
        done = await c.wait_for(batch.id)
        assert done.status == "completed" and done.request_counts.completed == len(lines), done
        assert await answers(c, batch.id) == await expected(c, lines)


async def test_the_input_file_swept_while_the_engine_runs_its_lines(db_url: str, blob_url: str) -> None:
    """More lines than the engine reads at once: pages read before the sweep come from the file,
    pages after it from the bodies the sweep copied in (whichever way the timing falls)."""
    lines = [chat(f"r{i}", f"line {i}") for i in range(1100)]
    async with gateway(make_settings(db_url, blob_url=blob_url, sim_latency_ms=1, executor_concurrency=2)) as (app, c):
        file = await upload(c, jsonl(lines), piece=64 * 1024)
        batch = await create(c, file.id)
        await c.wait_until(batch.id, lambda b: b.request_counts.completed >= 1)
        await c.files.DeleteFile(file_pb2.DeleteFileRequest(id=file.id), metadata=md())
        assert await sweep_deleted(app) == [file.id]
        done = await c.wait_for(batch.id)
        assert done.status == "completed" and done.request_counts.completed == len(lines), done
        assert await answers(c, batch.id) == await expected(c, lines)


async def test_a_retry_after_the_input_file_is_gone_runs_the_lines_own_bodies(db_url: str, blob_url: str) -> None:
    async with gateway(make_settings(db_url, blob_url=blob_url)) as (app, c):
        lines = LINES[:6]
        file = await upload(c, jsonl(lines))
        first = await c.wait_for((await create(c, file.id)).id)
        assert first.status == "completed"
        await c.files.DeleteFile(file_pb2.DeleteFileRequest(id=file.id), metadata=md())
        assert await sweep_deleted(app) == [file.id]

        again = await c.wait_for((await retry(c, first.id, custom_ids=["q1", "q4"])).id)
        assert again.status == "completed" and again.request_counts.completed == 2
        reference = await expected(c, lines)
        assert await answers(c, again.id) == {k: reference[k] for k in ("q1", "q4")}


async def test_content_removed_behind_sluices_back_fails_a_retry_with_a_clear_error(db_url: str,
                                                                                   blob_url: str) -> None:
    async with gateway(make_settings(db_url, blob_url=blob_url)) as (app, c):
        file = await upload(c, jsonl(LINES[:3]))
        first = await c.wait_for((await create(c, file.id)).id)
        await app.store.blobs.delete([file.id])  # not through Sluice: nothing copied the bodies out
        err = await expect_error(retry(c, first.id, custom_ids=["q1"]), grpc.StatusCode.INTERNAL)
        assert err.envelope["code"] == "file_content_lost"
        assert f"input file {file.id} is gone" in err.envelope["message"]


class LimitedSim(SimProvider):
    capabilities = Capabilities(endpoints=frozenset({CHAT}), one_model_per_job=True, max_lines=4,
                                max_bytes=100_000)


def limited_router() -> Router:
    return Router({"sim": ProviderEntry(provider=SimProvider("sim"), models={"small"}),
                   "limited": ProviderEntry(provider=LimitedSim("limited", options={"default_max_tokens": 77}),
                                            models={"m1", "m2"})})


async def drop_index(app: App, file_id: str) -> None:
    """What a file uploaded before the index existed looks like."""
    async with app.store.sessions.begin() as s:
        await s.execute(delete(FileLineIndexRow).where(FileLineIndexRow.file_id == file_id))


@pytest.mark.parametrize("endpoint", [CHAT, "/v1/embeddings"])
async def test_a_file_is_judged_the_same_with_or_without_its_index(db_url: str, endpoint: str) -> None:
    """Routing, the provider's capabilities and limits, the batch's endpoint, line numbers."""
    lines = [chat("a", "hi", "limited/m1"), chat("b", "hi", model="no-such-model"), chat("c", "hi", "limited/m2"),
             *(chat(f"d{i}", "hi", "limited/m1") for i in range(4))]
    async with gateway(make_settings(db_url), limited_router()) as (app, c):
        indexed, plain = await upload(c, jsonl(lines)), await upload(c, jsonl(lines))
        await drop_index(app, plain.id)
        verdicts = []
        for file in (indexed, plain):
            batch = await create(c, file.id, endpoint)
            verdicts.append((batch.status, batch.request_counts.total,
                             [(e.code, e.message, e.param, e.line) for e in batch.errors.data]))
        assert verdicts[0] == verdicts[1]
        assert verdicts[0][0] == "failed" and verdicts[0][2], verdicts[0]


async def test_a_file_without_its_index_is_split_estimated_and_run_the_same(db_url: str) -> None:
    """A good file: the same parts and estimate from the index as from parsing every line (the
    fallback, for files uploaded before the index existed, which stores the bodies)."""
    lines = [chat(f"a{i}", "words " * i, "limited/m1", **({"max_tokens": 5 * i, "n": 2} if i % 2 else {}))
             for i in range(9)] + [chat(f"s{i}", "small talk " * i, max_completion_tokens=3) for i in range(3)]
    async with gateway(make_settings(db_url), limited_router()) as (app, c):
        indexed, plain = await upload(c, jsonl(lines)), await upload(c, jsonl(lines))
        await drop_index(app, plain.id)
        estimates = [await c.stub.EstimateBatch(batch_pb2.EstimateBatchRequest(
            input_file_id=f.id, endpoint=CHAT, completion_window="24h"), metadata=md()) for f in (indexed, plain)]
        assert estimates[0] == estimates[1] and len(estimates[0].parts) == 4, estimates[0]
        batches = [await create(c, f.id) for f in (indexed, plain)]
        assert all(await stored_by_reference(app, batches[0].id))
        assert not any(await stored_by_reference(app, batches[1].id))
        done = [await c.wait_for(b.id) for b in batches]
        assert [d.status for d in done] == ["completed", "completed"]
        assert [len(d.parts) for d in done] == [4, 4]
        assert await answers(c, batches[0].id) == await answers(c, batches[1].id)


async def test_a_file_purged_before_the_create_commits_fails_it_leaving_nothing(store: Store) -> None:
    """The create holds its input file: once a sweep claimed it, lines by reference are refused."""
    t = now()
    await store.begin_file(FileRow(id="file-x", project="p", filename="f", purpose="batch", bytes=10, line_count=1,
                                   status=FileStatus.PURGING, created_at=t))
    row = BatchRow.new(id="batch_x", project="p", endpoint=CHAT, completion_window="24h", created_at=t,
                       input_file_id="file-x")
    line = NewRequest("a", "sim/m", {}, "m", "sim", line_offset=0, line_length=10)
    with pytest.raises(NotFound, match="deleted while the batch was being created"):
        await store.create_batch(row, [line])
    async with store.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(BatchRow)) == 0


async def _numbered(data: bytes, cuts: list[int]) -> list[tuple[int, int, bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        last = 0
        for cut in sorted({c % (len(data) + 1) for c in cuts}):
            yield data[last:cut]
            last = cut
        yield data[last:]
    return [line async for lines in numbered_lines(chunks()) for line in lines]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(0, 10_000), max_size=10), st.booleans())
def test_each_line_is_found_at_its_offset_however_the_chunks_cut(lines: list[bytes], cuts: list[int],
                                                                 trailing: bool) -> None:
    """The offsets the index keeps point at exactly the line's bytes in the stored file."""
    data = b"\n".join(lines) + (b"\n" if trailing else b"")
    found = asyncio.run(_numbered(data, cuts))
    assert [(n, line) for n, _, line in found] == [(i + 1, ln) for i, ln in enumerate(data.split(b"\n"))
                                                   if ln.strip()]
    assert all(data[offset:offset + len(line)] == line for _, offset, line in found)


@pytest.mark.parametrize("raw", [b'{"a": 123456789012345678901234567890}', b'{"a": -18446744073709551616}',
                                 b'{"a": 18446744073709551615, "b": 1.5e308}', b'"\\ud800"', b"\xef\xbb\xbf{}",
                                 b'{"a": NaN}', b'{"a": 1e400}', b'[1,]', b"{\"a\": \"\xed\xa0\x80\"}",
                                 "{}".encode("utf-16"), b'{"a": 1, "a": 2}', b'{"x": "\\u00e9\xc3\xa9"}'])
def test_lines_parse_to_what_json_makes_of_them_or_fail_with_its_message(raw: bytes) -> None:
    """orjson parses where it agrees with `json`; elsewhere `json` decides (values and messages)."""
    try:
        reference: Any = json.loads(raw, parse_constant=_refuse, parse_float=_finite)
    except (ValueError, UnicodeDecodeError) as exc:
        with pytest.raises(LineProblem) as info:
            parse_line(raw)
        assert info.value.message == f"is not valid JSON ({str(exc)[:200]})"
        return
    parsed = parse_line(raw)
    assert parsed == reference and json.dumps(parsed) == json.dumps(reference)


def _refuse(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:20]} is too large for JSON")
    return value


async def test_a_rejected_upload_leaves_no_index_behind(db_url: str, blob_url: str) -> None:
    """A bad line after a whole block of good ones: the upload is refused and its index goes with it."""
    lines = [chat(f"g{i}", "ok") for i in range(BLOCK_LINES + 10)]
    content = jsonl(lines) + b'{"custom_id": "bad"}\n'
    async with gateway(make_settings(db_url, blob_url=blob_url)) as (app, c):
        err = await expect_error(upload(c, content, piece=256 * 1024), grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["code"] == "invalid_method", err.envelope
        async with app.store.sessions() as s:
            assert await s.scalar(select(func.count()).select_from(FileLineIndexRow)) == 0
            assert await s.scalar(select(func.count()).select_from(FileRow)) == 0


async def test_cancelling_a_batch_whose_input_content_is_gone_still_ends_it(db_url: str, blob_url: str) -> None:
    """Closing lines that will not run reads no body: a batch cancelled after its input file's
    content went missing behind Sluice's back still ends, its lines cancelled."""
    async with gateway(make_settings(db_url, blob_url=blob_url, run_engine=False)) as (app, c):
        file = await upload(c, jsonl(LINES[:5]))
        batch = await create(c, file.id)
        await app.store.blobs.delete([file.id])
        await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=batch.id), metadata=md())
    async with gateway(make_settings(db_url, blob_url=blob_url)) as (app, c):
        done = await c.wait_for(batch.id)
        assert done.status == "cancelled" and [r.status for r in await c.results(batch.id)] == ["cancelled"] * 5
