"""Small, fast checks of the mutation-tested modules' own contracts (docs/mutation.md): API keys,
JSONL streaming, line validation and the output-file format. Each pins what a caller of the
module relies on, and was written against mutants the end-to-end tests let live."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from service.domain.errors import InvalidRequest, NotFound, PayloadTooLarge, Unauthenticated
from service.domain.model import BatchStatus, now
from service.edge import auth as auth_module
from service.edge.auth import Authenticator, hash_key
from service.engine.output_files import OUTPUT_TTL, OutputFiles, _FileWriter, output_line
from service.intake.jsonl import MAX_LINE_BYTES, check_lines, parse_line, split_lines
from service.intake.validation import (
    LineProblem,
    LineValidator,
    check_completion_window,
    check_endpoint,
    check_metadata,
)
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from service.storage.repository import OutputFileIds, Store
from service.storage.tables import FileRow, ResultRow

# --------------------------------------------------------------------------- API keys


def test_hash_key_is_the_hex_sha256_of_the_key() -> None:
    assert hash_key("sk-abc") == hashlib.sha256(b"sk-abc").hexdigest()
    assert hash_key("sk-abc") != hash_key("sk-abd")


@pytest.mark.parametrize(("header", "project"), [
    ("Bearer sk-key-1", "p1"), ("bearer sk-key-1", "p1"), ("BEARER sk-key-2", "p2"), ("Bearer  sk-key-1 ", "p1"),
])
async def test_a_known_key_names_its_project(store: Store, header: str, project: str) -> None:
    auth = Authenticator(store)
    await auth.register({"sk-key-1": "p1", "sk-key-2": "p2"})
    assert await auth.project([("x-other", "1"), ("authorization", header)]) == project
    assert await Authenticator(store).project((("authorization", header),)) == project  # from the database


@pytest.mark.parametrize(("metadata", "code"), [
    (None, "missing_api_key"), ((), "missing_api_key"),
    ((("authorization", "Basic sk-key-1"),), "missing_api_key"),
    ((("authorization", "Bearer "),), "missing_api_key"), ((("authorization", "Bearer    "),), "missing_api_key"),
    ((("authorization", "sk-key-1"),), "missing_api_key"),
    ((("x-authorization", "Bearer sk-key-1"),), "missing_api_key"),
    ((("authorization", "Bearer sk-key-3"),), "invalid_api_key"),
    ((("authorization", "Bearer sk-key"),), "invalid_api_key"),
])
async def test_a_missing_or_unknown_key_is_refused(store: Store, metadata: Any, code: str) -> None:
    auth = Authenticator(store)
    await auth.register({"sk-key-1": "p1"})
    with pytest.raises(Unauthenticated) as info:
        await auth.project(metadata)
    assert info.value.code == code and "sk-key" not in info.value.message
    assert info.value.message == {
        "missing_api_key": "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
        "invalid_api_key": "Incorrect API key provided."}[code]


async def test_a_known_key_is_looked_up_in_the_database_once(store: Store) -> None:
    """Every RPC authenticates: after the first call a key's project comes from memory."""
    lookups: list[str] = []
    original = store.project_for_key_hash

    async def counted(key_hash: str) -> str | None:
        lookups.append(key_hash)
        return await original(key_hash)

    store.project_for_key_hash = counted  # type: ignore[method-assign]
    auth = Authenticator(store)
    await auth.register({"sk-key-1": "p1", "sk-key-2": "p2"})
    for _ in range(3):
        assert await auth.project((("authorization", "Bearer sk-key-1"),)) == "p1"
    assert await auth.project((("authorization", "Bearer sk-key-2"),)) == "p2"
    assert lookups == [hash_key("sk-key-1"), hash_key("sk-key-2")]
    with pytest.raises(Unauthenticated):
        await auth.project((("authorization", "Bearer sk-unknown"),))
    with pytest.raises(Unauthenticated):  # an unknown key is asked again (it may have been added since)
        await auth.project((("authorization", "Bearer sk-unknown"),))
    assert lookups[2:] == [hash_key("sk-unknown")] * 2


async def test_registering_again_moves_a_key_to_its_new_project(store: Store) -> None:
    await Authenticator(store).register({"sk-key-1": "p1"})
    await Authenticator(store).register({"sk-key-1": "p9", "sk-key-2": "p2"})
    assert await store.project_for_key_hash(hash_key("sk-key-1")) == "p9"
    assert await store.project_for_key_hash(hash_key("sk-key-2")) == "p2"
    await Authenticator(store).register({})  # nothing to register is fine


def _counting(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key hashes the Authenticator looks up in the database, in order."""
    lookups: list[str] = []
    original = store.project_for_key_hash

    async def counted(key_hash: str) -> str | None:
        lookups.append(key_hash)
        return await original(key_hash)

    monkeypatch.setattr(store, "project_for_key_hash", counted)
    return lookups


async def test_forget_drops_a_key_or_a_projects_keys_from_the_cache_and_nothing_else(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """What was revoked or archived on this replica is asked of the database at once; other keys
    stay cached."""
    lookups = _counting(store, monkeypatch)
    auth = Authenticator(store)
    await auth.register({"sk-key-1": "p1", "sk-key-2": "p1", "sk-key-3": "p3"})
    keys = ("sk-key-1", "sk-key-2", "sk-key-3")
    for key in keys:
        await auth.project((("authorization", f"Bearer {key}"),))
    auth.forget(key_hash=hash_key("sk-key-3"))
    for key in keys:
        await auth.project((("authorization", f"Bearer {key}"),))
    assert lookups[3:] == [hash_key("sk-key-3")]
    auth.forget(project="p1")
    for key in keys:
        await auth.project((("authorization", f"Bearer {key}"),))
    assert lookups[4:] == [hash_key("sk-key-1"), hash_key("sk-key-2")]


async def test_register_empties_the_cache_and_says_what_it_removed(
        store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    lookups = _counting(store, monkeypatch)
    auth = Authenticator(store)
    await auth.register({"sk-key-1": "p1", "sk-key-2": "p2"})
    assert await auth.project((("authorization", "Bearer sk-key-2"),)) == "p2"
    with caplog.at_level(logging.INFO, logger="service.edge.auth"):
        await auth.register({"sk-key-1": "p1"})  # sk-key-2 is no longer configured
    assert [r.getMessage() for r in caplog.records if r.name == "service.edge.auth"] == [
        "removed 1 API key(s) that are no longer configured"]
    with pytest.raises(Unauthenticated):  # refused at once: not served from the cache
        await auth.project((("authorization", "Bearer sk-key-2"),))
    assert lookups == [hash_key("sk-key-2")] * 2


async def test_the_key_cache_lasts_cache_seconds_and_zero_turns_it_off(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = _counting(store, monkeypatch)
    clock = [1000.0]
    monkeypatch.setattr(auth_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # this module's clock only
    header = (("authorization", "Bearer sk-key-1"),)
    auth = Authenticator(store, cache_seconds=5.0)
    await auth.register({"sk-key-1": "p1"})
    await auth.project(header)
    clock[0] += 4.9
    await auth.project(header)
    assert len(lookups) == 1
    clock[0] += 0.1  # the entry expires at exactly first lookup + 5 s
    await auth.project(header)
    assert len(lookups) == 2
    uncached = Authenticator(store, cache_seconds=0.0)
    for _ in range(2):
        assert await uncached.project(header) == "p1"
    assert len(lookups) == 4


# --------------------------------------------------------------------------- JSONL


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def numbered(*parts: bytes) -> list[tuple[int, bytes]]:
    return [item async for item in split_lines(chunks(*parts))]


async def test_split_lines_numbers_lines_across_chunks_and_skips_blank_ones() -> None:
    assert await numbered(b'{"a":1}\n\n  \n{"b"', b':2}\n{"c":3}') == [(1, b'{"a":1}'), (4, b'{"b":2}'),
                                                                      (5, b'{"c":3}')]
    assert await numbered(b"x\n", b"", b"y\n") == [(1, b"x"), (2, b"y")]
    assert await numbered(b"\n\n") == []
    assert await numbered(b"only") == [(1, b"only")]
    assert await numbered(b"a\n   ") == [(1, b"a")]


async def test_a_line_longer_than_the_limit_is_413_naming_it() -> None:
    big = b"x" * (MAX_LINE_BYTES + 1)
    with pytest.raises(PayloadTooLarge) as info:
        await numbered(b"ok\n", big[: MAX_LINE_BYTES // 2], big[MAX_LINE_BYTES // 2:])
    assert (info.value.code, info.value.param) == ("line_too_long", "file")
    assert info.value.message == "Line 2 is longer than 16 MiB."
    # exactly the limit, even while the line is still incomplete
    assert await numbered(b"y" * MAX_LINE_BYTES, b"\n") == [(1, b"y" * MAX_LINE_BYTES)]


def test_parse_line() -> None:
    assert parse_line(b'{"a": [1]}') == {"a": [1]}
    for bad in (b"{nope", b"\xff\xfe", b""):
        with pytest.raises(LineProblem) as info:
            parse_line(bad)
        assert info.value.code == "invalid_json_line" and "not valid JSON" in info.value.message


def line(custom_id: str = "a", **overrides: Any) -> bytes:
    raw = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "m", "messages": []}, **overrides}
    return json.dumps(raw).encode()


async def test_check_lines_counts_and_reports_the_first_20_problems_by_line_number() -> None:
    lines = [(i + 1, line(f"c{i}") if i % 2 else b"{bad") for i in range(50)]

    async def source() -> AsyncIterator[tuple[int, bytes]]:
        for item in lines:
            yield item

    count, problems = await check_lines(source(), LineValidator(endpoint=None))
    assert count == 50 and len(problems) == 20
    assert [p.line for p in problems] == list(range(1, 40, 2))
    assert str(problems[0]).startswith("line 1: is not valid JSON")


async def test_check_lines_stops_past_50000_requests() -> None:
    async def source(n: int) -> AsyncIterator[tuple[int, bytes]]:
        for i in range(n):
            yield i + 1, b"{}"

    count, problems = await check_lines(source(50_000), LineValidator(endpoint=None))
    assert count == 50_000 and len(problems) == 20
    with pytest.raises(PayloadTooLarge) as info:
        await check_lines(source(50_001), LineValidator(endpoint=None))
    assert (info.value.code, info.value.param) == ("too_many_requests", "file")
    assert info.value.message == "The file has more than 50000 requests (line 50001)."


# --------------------------------------------------------------------------- validation


def test_endpoint_window_and_metadata_checks() -> None:
    for endpoint in ("/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses"):
        assert check_endpoint(endpoint) == endpoint
    with pytest.raises(InvalidRequest) as info:
        check_endpoint("/v1/images")
    assert (info.value.param, info.value.code) == ("endpoint", "invalid_endpoint")
    assert info.value.message == ("Unsupported endpoint '/v1/images'; use one of /v1/chat/completions, "
                                  "/v1/embeddings, /v1/completions, /v1/responses.")
    assert check_completion_window("") == "24h" and check_completion_window("24h") == "24h"
    with pytest.raises(InvalidRequest) as info:
        check_completion_window("1h")
    assert (info.value.param, info.value.code) == ("completion_window", "invalid_completion_window")
    assert info.value.message == "Unsupported completion_window '1h'; only '24h' is supported."
    assert check_metadata(None) is None and check_metadata({}) is None
    sixteen = {f"k{i}": "v" for i in range(16)}
    assert check_metadata(sixteen) == sixteen
    assert check_metadata({"k" * 64: "v" * 512}) == {"k" * 64: "v" * 512}
    too_long = "metadata value of 'k' must be a string of at most 512 characters."
    for bad, param, code, message in (
            ({**sixteen, "x": "y"}, "metadata", "too_many_metadata_keys",
             "metadata has 17 keys; at most 16 are allowed."),
            ({"k" * 65: "v"}, "metadata", "invalid_metadata",  # a long key is not echoed in `param`
             f"metadata key '{'k' * 20}…' must be text of at most 64 characters."),
            ({"k": "v" * 513}, "metadata.k", "invalid_metadata", too_long),
            ({"k": 1}, "metadata.k", "invalid_metadata", too_long)):
        with pytest.raises(InvalidRequest) as info:
            check_metadata(bad)
        assert (info.value.param, info.value.code, info.value.message) == (param, code, message)


def two_providers() -> Router:
    from adapters.sim import SimProvider

    return Router({SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
                   "local": ProviderEntry(provider=SimProvider("local"), models={"local-model"})})


CHAT = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}
ENDPOINTS = "/v1/chat/completions, /v1/embeddings, /v1/completions, /v1/responses"
LINE_PROBLEMS: list[tuple[Any, str, str | None, str]] = [
    ([1], "invalid_json_line", None, "must be a JSON object"),
    ({"method": "POST"}, "missing_custom_id", "custom_id", "custom_id is required and must be a non-empty string"),
    ({"custom_id": 5}, "missing_custom_id", "custom_id", "custom_id is required and must be a non-empty string"),
    ({"custom_id": ""}, "missing_custom_id", "custom_id", "custom_id is required and must be a non-empty string"),
    ({"custom_id": "x" * 513}, "invalid_custom_id", "custom_id", "custom_id is longer than 512 characters"),
    ({**CHAT, "custom_id": "dup", "body": {"model": "m"}}, "duplicate_custom_id", "custom_id",
     "custom_id 'dup' is used more than once"),
    ({"custom_id": "a", "method": "GET"}, "invalid_method", "method", "method must be 'POST', got 'GET'"),
    ({**CHAT, "url": "/v1/images"}, "invalid_url", "url",
     f"url '/v1/images' is not a supported endpoint ({ENDPOINTS})"),
    ({**CHAT, "url": "/v1/embeddings"}, "url_mismatch", "url",
     "url '/v1/embeddings' differs from the batch endpoint '/v1/chat/completions'"),
    ({**CHAT, "body": []}, "invalid_body", "body", "body must be a JSON object"),
    ({**CHAT, "body": {}}, "missing_model", "body.model", "body.model is required"),
    ({**CHAT, "body": {"model": 3}}, "missing_model", "body.model", "body.model is required"),
    ({**CHAT, "body": {"model": "nope"}}, "model_not_found", "body.model",
     "model 'nope' is not served by any configured provider"),
]


@pytest.mark.parametrize(("raw", "code", "field", "message"), LINE_PROBLEMS)
def test_each_line_problem_has_its_code_field_and_message(raw: Any, code: str, field: str | None,
                                                          message: str) -> None:
    validator = LineValidator(endpoint="/v1/chat/completions", router=two_providers())
    validator.check({"custom_id": "dup", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "local-model"}})
    with pytest.raises(LineProblem) as info:
        validator.check(raw)
    assert (info.value.code, info.value.field, info.value.message) == (code, field, message)


def test_a_valid_line_and_what_the_validator_remembers() -> None:
    v = LineValidator(endpoint=None)
    req = v.check({"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}})
    assert (req.custom_id, req.model, req.body) == ("a", "m", {"model": "m", "input": "x"})
    assert v.endpoint == "/v1/embeddings"  # the first line sets it
    assert v.model == "m" and v.provider == ""  # no router: nothing routed
    v.check({"custom_id": "b", "method": "POST", "url": "/v1/embeddings", "body": {"model": "n"}})
    assert v.model is None and v.seen == {"a", "b"}
    routed = LineValidator(endpoint="/v1/chat/completions", router=two_providers())
    routed.check({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "local-model"}})
    assert routed.provider == "local" and routed.model == "local-model"
    assert routed.check({"custom_id": "x" * 512, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "local/local-model"}}).custom_id == "x" * 512
    with pytest.raises(LineProblem):  # a refused line is not remembered as seen
        routed.check({"custom_id": "z", "method": "GET"})
    assert "z" not in routed.seen


# --------------------------------------------------------------------------- output files


def result_row(idx: int, status_code: int = 200, error_code: str | None = None, body: Any = None,
               request_id: str | None = "req_1") -> ResultRow:
    return ResultRow(batch_id="batch_x", idx=idx, custom_id=f"c{idx}", status="completed", status_code=status_code,
                     request_id=request_id, response_json=json.dumps(body) if body is not None else None,
                     error_code=error_code, error_message="went wrong" if error_code else None)


def test_output_line_format() -> None:
    ok = output_line("batch_x", result_row(3, body={"object": "chat.completion"}))
    digest = hashlib.sha256(b"batch_x:3").hexdigest()[:24]
    assert ok == {"id": f"batch_req_{digest}", "custom_id": "c3",
                  "response": {"status_code": 200, "request_id": "req_1", "body": {"object": "chat.completion"}},
                  "error": None}
    assert output_line("batch_y", result_row(3))["id"] != ok["id"]
    assert output_line("batch_x", result_row(4, request_id=None))["response"]["request_id"] == ""
    assert output_line("batch_x", result_row(4))["response"]["body"] is None
    lost = output_line("batch_x", result_row(5, status_code=0, error_code="batch_expired"))
    assert lost["response"] is None and lost["error"] == {"code": "batch_expired", "message": "went wrong"}
    bare = result_row(5, status_code=0, error_code="missing_result")
    bare.error_message = None
    assert output_line("batch_x", bare)["error"] == {"code": "missing_result", "message": ""}
    http_error = output_line("batch_x", result_row(6, status_code=400, body={"error": {"code": "x"}}))
    assert http_error["response"]["status_code"] == 400 and http_error["error"] is None


async def test_files_are_written_in_chunks_and_split_by_outcome(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of CHUNK_BYTES (1 MiB; 16 KiB here, to keep the test fast), each line whole."""
    from service.engine import output_files
    from service.storage.repository import new_id
    from tests.test_store import batch_row

    monkeypatch.setattr(output_files, "CHUNK_BYTES", 16 * 1024)
    chunk_bytes = output_files.CHUNK_BYTES
    batch = await store.create_batch(batch_row(project="p"), [])
    big = {"text": "y" * 100}
    rows = [result_row(i, status_code=code, body=big) for i, code in enumerate([200, 299, 199, 300, 404] * 200)]
    async with store.sessions.begin() as s:
        for r in rows:
            r.batch_id, r.created_at = batch.id, now()
            s.add(r)
    original_put = store.blobs.put
    invisible: list[bool] = []

    async def put_while_checking(file_id: str, chunks: AsyncIterable[bytes]) -> int:
        async def checked() -> AsyncIterator[bytes]:
            async for chunk in chunks:
                try:
                    await store.get_file("p", file_id)
                    invisible.append(False)
                except NotFound:
                    invisible.append(True)
                yield chunk
        return await original_put(file_id, checked())

    monkeypatch.setattr(store.blobs, "put", put_while_checking)
    fields = await OutputFiles(store)(batch)
    assert invisible and all(invisible), "a half-written output file was visible"
    out_id, err_id = f"file-output-{batch.id.removeprefix('batch_')}", f"file-error-{batch.id.removeprefix('batch_')}"
    assert fields == OutputFileIds(output_file_id=out_id, error_file_id=err_id)
    for file_id, codes in ((out_id, {200, 299}), (err_id, {199, 300, 404})):
        f = await store.get_file("p", file_id)
        content = b"".join([c async for c in store.blobs.get(file_id)])
        lines = [json.loads(x) for x in content.splitlines()]
        assert content.startswith(b'{"id":"batch_req_') and b'", "' not in content  # compact JSON lines
        for x in lines[:3]:
            idx = int(x["custom_id"][1:])
            assert x["id"] == "batch_req_" + hashlib.sha256(f"{batch.id}:{idx}".encode()).hexdigest()[:24]
        assert {x["response"]["status_code"] for x in lines} == codes and len(lines) == 200 * len(codes)
        assert (f.bytes, f.line_count, f.status, f.purpose) == (len(content), len(lines), "processed", "batch_output")
        assert f.filename == f"{batch.id}_{file_id.split('-')[1]}.jsonl"
        assert f.expires_at == f.created_at + OUTPUT_TTL and f.created_at >= batch.created_at
        sizes = [len(c) async for c in store.blobs.get(file_id)]
        assert all(s >= chunk_bytes for s in sizes[:-1]) and all(s < chunk_bytes + 300 for s in sizes)
        assert all(c.endswith(b"\n") for c in [c async for c in store.blobs.get(file_id)])
        assert len(sizes) >= 2
    # Written again (a crash before the batch was marked ended): the same files, not doubled.
    assert await OutputFiles(store)(batch) == fields
    again = b"".join([c async for c in store.blobs.get(out_id)])
    assert len(again.splitlines()) == 400
    # Nothing to write: no file at all.
    empty = await store.create_batch(batch_row(project="p", id=new_id("batch_")), [])
    assert await OutputFiles(store)(empty) == OutputFileIds()
    writer = _FileWriter(store, FileRow(id="file-none", project="p", filename="n", purpose="batch_output", bytes=0,
                                        line_count=0, status="uploading", created_at=now()))
    assert await writer.close() is None
    assert BatchStatus(batch.status) is BatchStatus.VALIDATING


async def test_file_writer_flushes_exactly_at_the_chunk_size(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import select

    from service.engine import output_files
    from service.storage.tables import FileChunkRow

    line = {"k": "x" * 40}
    size = len(json.dumps(line, separators=(",", ":"))) + 1
    monkeypatch.setattr(output_files, "CHUNK_BYTES", 2 * size)
    writer = _FileWriter(store, FileRow(id="file-w", project="p", filename="w.jsonl", purpose="batch_output", bytes=0,
                                        line_count=0, status="uploading", created_at=now()))
    for _ in range(5):
        await writer.add(line)
    # Half written (two chunks stored): invisible to the API until it is finished.
    with pytest.raises(NotFound):
        await store.get_file("p", "file-w")
    assert (await store.list_files("p", "", 10, "", ascending=True))[0] == []
    assert await writer.close() == "file-w"
    async with store.sessions() as s:
        chunks = (await s.execute(select(FileChunkRow.seq, FileChunkRow.data).where(FileChunkRow.file_id == "file-w")
                                  .order_by(FileChunkRow.seq))).all()
    assert [(seq, len(data)) for seq, data in chunks] == [(0, 2 * size), (1, 2 * size), (2, size)]
    f = await store.get_file("p", "file-w")
    assert (f.bytes, f.line_count, f.status) == (5 * size, 5, "processed")


async def test_the_finalizer_of_an_ended_batch_returns_its_files(store: Store) -> None:
    from tests.test_store import batch_row

    for status in ("completed", "failed", "expired", "cancelled"):
        batch = await store.create_batch(batch_row(project="p", status=status, output_file_id="file-o",
                                                   error_file_id=None), [])
        assert await OutputFiles(store)(batch) == OutputFileIds(output_file_id="file-o", error_file_id=None)
        assert (await store.list_files("p", "", 10, "", ascending=True))[0] == []


# --------------------------------------------------------------------------- the store's reads


async def test_list_batches_newest_first_per_project_with_cursor(store: Store) -> None:
    from tests.test_store import new_batch

    ids = [await new_batch(store, 1, project="p") for _ in range(5)]
    await new_batch(store, 1, project="other")
    rows, more = await store.list_batches("p", 10, "")
    assert [r.id for r in rows] == ids[::-1] and not more
    rows, more = await store.list_batches("p", 2, "")
    assert [r.id for r in rows] == ids[:2:-1] and more
    rows, more = await store.list_batches("p", 2, ids[3])
    assert [r.id for r in rows] == [ids[2], ids[1]] and more
    rows, more = await store.list_batches("p", 2, ids[1])
    assert [r.id for r in rows] == [ids[0]] and not more
    rows, more = await store.list_batches("p", 5, "")
    assert len(rows) == 5 and not more
    for after in ("batch_nope", (await store.list_batches("other", 1, ""))[0][0].id):
        with pytest.raises(NotFound) as info:
            await store.list_batches("p", 2, after)
        assert (info.value.param, info.value.code) == ("after", "cursor_not_found") and after in info.value.message
    assert await store.count_batches("p") == 5 and await store.count_batches("other") == 1
    assert await store.count_batches("nobody") == 0


async def test_results_pages_lookups_and_keys(store: Store) -> None:
    from service.domain.model import LineOutcome, ResultError, ResultStatus, Usage
    from tests.test_store import new_batch

    batch_id = await new_batch(store, 6, project="p")
    usage = Usage(input_tokens=3, cached_tokens=1, output_tokens=4, reasoning_tokens=2, input_cost=0.5,
                  output_cost=0.25)
    await store.store_results(batch_id, [
        LineOutcome(0, "r0", ResultStatus.COMPLETED, 200, {"ok": True}, None, usage, "req-0"),
        LineOutcome(2, "r2", ResultStatus.FAILED, 429, {"error": {}}, ResultError("rate", "slow", "rate_limit_error")),
        LineOutcome(3, "r3", ResultStatus.EXPIRED, 0, None, ResultError("batch_expired", "late", "batch_error")),
        LineOutcome(5, "r5", ResultStatus.COMPLETED, 200, {"ok": 5}),
    ])
    page, more = await store.list_results("p", batch_id, 2, "")
    assert [(req.custom_id, res.idx) for req, res in page] == [("r0", 0), ("r2", 2)] and more
    page, more = await store.list_results("p", batch_id, 2, "r2")
    assert [req.custom_id for req, _ in page] == ["r3", "r5"] and not more
    page, more = await store.list_results("p", batch_id, 4, "")
    assert len(page) == 4 and not more
    with pytest.raises(NotFound) as info:
        await store.list_results("p", batch_id, 2, "r9")
    assert (info.value.param, info.value.code) == ("after", "cursor_not_found")
    with pytest.raises(NotFound):
        await store.list_results("other", batch_id, 2, "")

    batch, req, res = await store.get_result("p", batch_id, "r0")
    assert batch.id == batch_id and req.idx == 0 and res is not None
    assert (res.custom_id, res.status, res.status_code, res.request_id, json.loads(res.response_json or "")) == (
        "r0", "completed", 200, "req-0", {"ok": True})
    assert (res.input_tokens, res.cached_tokens, res.output_tokens, res.reasoning_tokens) == (3, 1, 4, 2)
    assert (res.input_cost, res.output_cost, res.error_code) == (0.5, 0.25, None)
    assert res.created_at >= batch.created_at
    _, _, res = await store.get_result("p", batch_id, "r2")
    assert res is not None and (res.status, res.error_code, res.error_message, res.error_type) == (
        "failed", "rate", "slow", "rate_limit_error")
    _, _, res = await store.get_result("p", batch_id, "r3")
    assert res is not None and res.response_json is None and res.status == "expired"
    _, req, res = await store.get_result("p", batch_id, "r1")
    assert req.custom_id == "r1" and res is None  # pending
    with pytest.raises(NotFound) as info:
        await store.get_result("p", batch_id, "r9")
    assert (info.value.param, info.value.code) == ("custom_id", "result_not_found") and "r9" in info.value.message
    with pytest.raises(NotFound):
        await store.get_result("other", batch_id, "r0")

    keys = await store.request_keys(batch_id, [0, 4, 9])
    assert {i: (r.custom_id, r.model) for i, r in keys.items()} == {0: ("r0", "sim/m"), 4: ("r4", "sim/m")}
    assert [r.idx async for r in store.iter_results(batch_id, page=1)] == [0, 2, 3, 5]
    assert [r.idx async for r in store.iter_requests(batch_id, page=2)] == [0, 1, 2, 3, 4, 5]
    assert [r.idx for r in await store.pending_requests(batch_id, 10, after_idx=1)] == [4]
    batch = await store.get_batch("p", batch_id)
    assert (batch.completed, batch.failed, batch.input_tokens, batch.cached_tokens, batch.output_tokens,
            batch.reasoning_tokens) == (2, 1, 3, 1, 4, 2)
    assert (batch.input_cost, batch.output_cost) == (0.5, 0.25)


async def _pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_files_list_order_purpose_cursor_and_delete(store: Store) -> None:
    async def add(file_id: str, purpose: str = "batch", project: str = "p", status: str = "processed") -> None:
        await store.begin_file(FileRow(id=file_id, project=project, filename=f"{file_id}.jsonl", purpose=purpose,
                                       bytes=0, line_count=0, status="uploading", created_at=now()))
        await store.blobs.put(file_id, _pieces(b"a\n", b"b\n"))
        if status != "uploading":
            done = await store.finish_file(file_id, 4, 2)
            assert (done.bytes, done.line_count, done.status) == (4, 2, status)

    for name in ("f1", "f2", "f3", "f4"):
        await add(name)
    await add("o1", purpose="batch_output")
    await add("x1", project="other")
    await add("u1", status="uploading")
    ids = lambda rows: [r.id for r in rows]  # noqa: E731
    assert ids((await store.list_files("p", "", 10, "", ascending=False))[0]) == ["o1", "f4", "f3", "f2", "f1"]
    assert ids((await store.list_files("p", "batch", 10, "", ascending=True))[0]) == ["f1", "f2", "f3", "f4"]
    assert ids((await store.list_files("p", "batch_output", 10, "", ascending=True))[0]) == ["o1"]
    rows, more = await store.list_files("p", "batch", 2, "f2", ascending=True)
    assert ids(rows) == ["f3", "f4"] and not more
    rows, more = await store.list_files("p", "batch", 1, "f2", ascending=True)
    assert ids(rows) == ["f3"] and more
    rows, more = await store.list_files("p", "batch", 2, "f3", ascending=False)
    assert ids(rows) == ["f2", "f1"] and not more
    with pytest.raises(NotFound):
        await store.list_files("p", "", 2, "x1", ascending=False)
    assert b"".join([c async for c in store.blobs.get("f1")]) == b"a\nb\n"
    with pytest.raises(NotFound) as info:
        await store.get_file("p", "u1")  # still uploading
    assert (info.value.param, info.value.code) == ("id", "file_not_found") and "u1" in info.value.message
    assert (await store.get_file("other", "x1")).project == "other"
    await store.mark_file_deleted("p", "f1")
    with pytest.raises(NotFound):
        await store.get_file("p", "f1")
    assert ids((await store.list_files("p", "batch", 10, "", ascending=True))[0]) == ["f2", "f3", "f4"]
    with pytest.raises(NotFound):
        await store.mark_file_deleted("p", "f1")  # already deleted
    with pytest.raises(NotFound):
        await store.mark_file_deleted("p", "x1")  # another project's
    assert (await store.get_file("other", "x1")).id == "x1"
    assert b"".join([c async for c in store.blobs.get("f1")]) == b"a\nb\n"  # kept for readers in flight
    assert (await store.sweep_files(stale_upload_before=0, deleted_before=now() + 1)).deleted == ["f1"]
    assert [c async for c in store.blobs.get("f1")] == []
    assert (await store.get_file("other", "x1")).id == "x1"
    await store.discard_file("u1")
    assert [c async for c in store.blobs.get("u1")] == []


async def test_named_updates_and_transition_stamps(store: Store) -> None:
    from service.domain.model import BatchError
    from tests.test_store import new_batch

    batch_id = await new_batch(store, 1, project="p")
    await store.record_provider_batch_id(batch_id, 0, "pb-1")
    assert await store.record_poll_failure(batch_id, 0) == 1
    assert await store.record_poll_failure(batch_id, 0) == 2
    (part,) = (await store.get_batch("p", batch_id)).parts
    assert (part.provider_batch_id, part.poll_failures) == ("pb-1", 2)
    why = BatchError(code="provider_error", message="gone")
    assert await store.transition(batch_id, BatchStatus.VALIDATING, BatchStatus.FAILED, errors=[why])
    row = await store.engine_batch(batch_id)
    assert (row.status, row.errors) == (BatchStatus.FAILED, [why]) and row.failed_at is not None
    with pytest.raises(NotFound) as info:
        await store.get_batch("other", batch_id)
    assert (info.value.param, info.value.code) == ("id", "batch_not_found") and batch_id in info.value.message


async def test_every_read_and_write_touches_only_its_own_batch(store: Store) -> None:
    """Two batches with the same custom_ids side by side: no read or write of one sees or
    changes the other."""
    from service.domain.errors import Conflict
    from service.domain.model import LineOutcome, ResultStatus
    from service.storage.repository import NewRequest
    from tests.test_store import batch_row

    def lines(model: str) -> list[NewRequest]:
        return [NewRequest(f"r{i}", model, {"model": model}) for i in range(3)]

    a = (await store.create_batch(batch_row(project="p"), lines("sim/a"))).id
    b = (await store.create_batch(batch_row(project="p"), lines("sim/b"))).id
    await store.store_results(a, [LineOutcome(0, "r0", ResultStatus.COMPLETED, 200, {"a": 0})])
    await store.store_results(b, [LineOutcome(i, f"r{i}", ResultStatus.COMPLETED, 200, {"b": i}) for i in (1, 2)])
    page, _ = await store.list_results("p", a, 10, "")
    assert [(req.batch_id, res.batch_id, req.custom_id) for req, res in page] == [(a, a, "r0")]
    page, _ = await store.list_results("p", b, 10, "r1")
    assert [req.custom_id for req, _ in page] == ["r2"]
    assert [r.idx for r in await store.pending_requests(a, 10)] == [1, 2]
    assert [r.idx for r in await store.pending_requests(b, 10)] == [0]
    assert [(r.batch_id, r.idx) async for r in store.iter_results(a, page=1)] == [(a, 0)]
    assert [(r.batch_id, r.model) async for r in store.iter_requests(a, page=2)] == [(a, "sim/a")] * 3
    assert {i: (r.custom_id, r.model) for i, r in (await store.request_keys(b, [0])).items()} == {0: ("r0", "sim/b")}
    _, req, res = await store.get_result("p", b, "r0")
    assert req.batch_id == b and res is None
    assert (await store.get_batch("p", a)).completed == 1 and (await store.get_batch("p", b)).completed == 2

    assert set(await store.claim("r1", 30, 10)) == {a, b}
    before = (await store.engine_batch(b)).lease_until
    assert await store.renew(a, "r1", 300)
    assert (await store.engine_batch(b)).lease_until == before
    await store.release(a, "r1")
    assert (await store.engine_batch(b)).lease_owner == "r1"

    assert (await store.request_cancel("p", a)).status == "cancelling"
    assert (await store.get_batch("p", b)).status == "validating"
    assert await store.transition(b, BatchStatus.VALIDATING, BatchStatus.FAILED)
    with pytest.raises(Conflict) as info:
        await store.request_cancel("p", b)
    assert (info.value.param, info.value.code) == ("id", "batch_not_cancellable")
    assert info.value.message == "Cannot cancel a batch with status 'failed'."


async def test_list_batches_orders_by_creation_time_before_id(store: Store) -> None:
    """Ids sort in creation order only by construction; the listing itself goes by created_at."""
    from service.storage.repository import new_id
    from tests.test_store import batch_row

    t = now()
    ids = []
    for age in (100, 200, 300):  # each later (larger) id belongs to an OLDER batch
        ids.append((await store.create_batch(batch_row(project="p", created_at=t - age, id=new_id("batch_")), [])).id)
    assert ids == sorted(ids)
    assert [r.id for r in (await store.list_batches("p", 10, ""))[0]] == ids  # newest (by created_at) first
    assert [r.id for r in (await store.list_batches("p", 1, ids[0]))[0]] == [ids[1]]
    assert [r.id for r in (await store.list_batches("p", 5, ids[1]))[0]] == [ids[2]]
