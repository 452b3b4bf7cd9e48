"""Fast checks of the engine's output files (`service/engine/output_files.py`) and of what issue 13
changed in the engine, written against the mutants `make mutation` found alive on today's code
(docs/mutation.md): the exact bytes of an output line (stored text copied as it is, or printed
again), the files of a retry chain (merged output and error files), a failed write leaving nothing
visible, the lifetime of output files. A real `Store` on SQLite (and PostgreSQL in `make test`)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.base import LineResult, ProviderState, RequestLine
from service.domain.errors import Internal, NotFound
from service.domain.model import BatchStatus, FileStatus, LineOutcome, ResultError, ResultStatus, now
from service.engine import engine as engine_module
from service.engine import output_files
from service.engine.output_files import OutputFiles, _FileWriter, output_bytes, output_line
from service.storage.repository import NewPart, NewRequest, OutputFileIds, Store, new_id
from service.storage.tables import BatchRow, FileRow, ResultRow
from tests.test_engine_unit import (
    PROVIDER_MODEL,
    FakeExecutor,
    FakeNative,
    add_batch,
    add_parts_batch,
    answer,
    answer_once_collected,
    make_engine,
    result,
    results,
    status,
    statuses,
    step,
)
from tests.test_store import batch_row


def line_id(batch_id: str, idx: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{batch_id}:{idx}".encode()).hexdigest()[:24]


def row(idx: int = 0, *, status_code: int = 200, body: str | None = '{"a":1}', request_id: str | None = "req_1",
        error_code: str | None = None, error_message: str | None = None, custom_id: str = "c0",
        verbatim: bool = False) -> SimpleNamespace:
    """A stored result as `Store.iter_results` yields it (plain columns, `verbatim`: served form kept)."""
    return SimpleNamespace(idx=idx, custom_id=custom_id, status_code=status_code, request_id=request_id,
                           response_json=body, error_code=error_code, error_message=error_message, verbatim=verbatim)


# --------------------------------------------------------------------------- one line's bytes


@pytest.mark.parametrize("stored", [
    row(),
    row(3, body='{"text": "caf\\u00e9 \\"quoted\\"", "n": [1, 2.5, null]}', custom_id='ü "x"\\ \u2028'),
    row(4, request_id=None),
    row(5, request_id=""),
    row(6, body=None),
    row(7, body=""),
    row(8, status_code=0, body=None, request_id=None, error_code="batch_expired", error_message="late \u00e9"),
    row(9, status_code=0, body=None, error_code="missing_result", error_message=None),
    row(10, status_code=400, body='{"error": {"code": "x"}}'),
    row(11, status_code=500, body='{"error":{}}', error_code="boom", error_message="no"),
], ids=["ok", "non-ascii-and-quotes", "no-request-id", "empty-request-id", "no-body", "empty-body", "expired",
        "no-message", "http-error", "http-error-with-error"])
def test_output_bytes_is_the_compact_json_of_output_line(stored: SimpleNamespace) -> None:
    """The fast writer's bytes are exactly `json.dumps(output_line(...), separators=(",", ":"))`
    and a newline: what every reader of an output file parses, escapes included."""
    expected = json.dumps(output_line("batch_q", stored), separators=(",", ":")).encode() + b"\n"
    assert output_bytes("batch_q", stored) == expected


def test_output_bytes_literally() -> None:
    assert output_bytes("batch_q", row(2, body='{"b": [1, 2]}', request_id="r\u00e9")) == (
        b'{"id":"' + line_id("batch_q", 2).encode() + b'","custom_id":"c0","response":{"status_code":200,'
        b'"request_id":"r\\u00e9","body":{"b":[1,2]}},"error":null}\n')
    assert output_bytes("batch_q", row(2, status_code=0, body=None, error_code="batch_cancelled",
                                       error_message="gone")) == (
        b'{"id":"' + line_id("batch_q", 2).encode() + b'","custom_id":"c0","response":null,'
        b'"error":{"code":"batch_cancelled","message":"gone"}}\n')


def test_a_body_stored_with_its_served_form_is_copied_as_it_is() -> None:
    """A result stored with its served form (`response_pb`) has compact JSON already: it is copied
    byte for byte. Older results are parsed and printed compactly (their separators vary)."""
    spaced = '{"a": 1,  "b": "x"}'
    assert b'"body":{"a": 1,  "b": "x"}}' in output_bytes("batch_q", row(body=spaced, verbatim=True))
    assert b'"body":{"a":1,"b":"x"}}' in output_bytes("batch_q", row(body=spaced, verbatim=False))
    # An ORM row (a retry chain's merged files) says it by its `response_pb` column.
    orm = ResultRow(batch_id="batch_q", idx=0, custom_id="c0", status="completed", status_code=200,
                    request_id="r", response_json=spaced, response_pb=b"\x08\x01")
    assert b'"body":{"a": 1,  "b": "x"}}' in output_bytes("batch_q", orm)
    orm.response_pb = None
    assert b'"body":{"a":1,"b":"x"}}' in output_bytes("batch_q", orm)
    assert b'"body":null}' in output_bytes("batch_q", row(body="", verbatim=True))


# --------------------------------------------------------------------------- files


async def stored_file(store: Store, project: str, file_id: str) -> tuple[Any, list[dict[str, Any]]]:
    f = await store.get_file(project, file_id)
    content = b"".join([c async for c in store.blobs.get(file_id)])
    assert len(content) == f.bytes and content.count(b"\n") == f.line_count
    return f, [json.loads(x) for x in content.splitlines()]


async def test_output_files_live_as_long_as_the_batch_asks(store: Store) -> None:
    batch = await store.create_batch(batch_row(project="p", output_expires_after=3600),
                                     [NewRequest(custom_id="c0", model="sim/m", body={"model": "sim/m"})])
    await store.store_results(batch.id, [LineOutcome(0, "c0", ResultStatus.COMPLETED, 200, {"ok": True})])
    fields = await OutputFiles(store)(batch)
    assert fields.error_file_id is None and fields.output_file_id is not None
    f = await store.get_file("p", fields.output_file_id)
    assert f.expires_at == f.created_at + 3600


@pytest.mark.parametrize("fails_at", [0, 1, 3], ids=["before-any-line", "after-an-output-line", "after-both"])
async def test_a_failed_write_leaves_no_file_and_the_next_one_writes_both(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                                         fails_at: int) -> None:
    """A failure while the lines are written (a database error, a cancelled step), whichever files
    were begun: the caller gets that failure, both files stay invisible, their content is dropped,
    no upload is left running, and the next finalization writes them whole."""
    batch = await store.create_batch(batch_row(project="p"), [
        NewRequest(custom_id=f"c{i}", model="sim/m", body={"model": "sim/m"}) for i in range(4)])
    await store.store_results(batch.id, [
        LineOutcome(0, "c0", ResultStatus.COMPLETED, 200, {"n": 0}),
        LineOutcome(1, "c1", ResultStatus.FAILED, 500, error=ResultError("boom", "no")),
        LineOutcome(2, "c2", ResultStatus.COMPLETED, 200, {"n": 2}),
        LineOutcome(3, "c3", ResultStatus.FAILED, 400, {"error": {}})])
    out_id, err_id = f"file-output-{batch.id.removeprefix('batch_')}", f"file-error-{batch.id.removeprefix('batch_')}"
    results = store.iter_results

    async def fails_after_three(batch_id: str, page: int = 1000) -> AsyncIterator[Any]:
        n = 0
        async with contextlib.aclosing(results(batch_id, page)) as rows:
            async for r in rows:
                if n == fails_at:
                    raise RuntimeError("database hiccup")
                n += 1
                yield r

    monkeypatch.setattr(store, "iter_results", fails_after_three)
    with pytest.raises(RuntimeError, match="database hiccup"):
        await OutputFiles(store)(batch)
    lingering = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert lingering == [], "a failed write left an upload running"
    for file_id in (out_id, err_id):
        with pytest.raises(NotFound):
            await store.get_file("p", file_id)
        assert b"".join([c async for c in store.blobs.get(file_id)]) == b""
    monkeypatch.setattr(store, "iter_results", results)
    assert await OutputFiles(store)(batch) == OutputFileIds(out_id, err_id)
    _, ok = await stored_file(store, "p", out_id)
    _, bad = await stored_file(store, "p", err_id)
    assert [x["custom_id"] for x in ok] == ["c0", "c2"] and [x["custom_id"] for x in bad] == ["c1", "c3"]


async def test_the_finalizer_of_an_ended_batch_returns_both_its_files_untouched(store: Store) -> None:
    batch = await store.create_batch(batch_row(project="p", status="completed", output_file_id="file-o",
                                               error_file_id="file-e"), [])
    assert await OutputFiles(store)(batch) == OutputFileIds(output_file_id="file-o", error_file_id="file-e")
    assert (await store.list_files("p", "", 10, "", ascending=True))[0] == []


async def test_a_line_given_as_a_json_value_is_written_compact(store: Store) -> None:
    writer = _FileWriter(store, FileRow(id="file-v", project="p", filename="v.jsonl", purpose="batch_output",
                                        bytes=0, line_count=0, status="uploading", created_at=now()))
    await writer.add({"a": 1, "b": [1, "x"], "c": {"d": None}})
    await writer.add(b'{"as":"given"}\n')
    assert await writer.close() == "file-v"
    assert b"".join([c async for c in store.blobs.get("file-v")]) == (
        b'{"a":1,"b":[1,"x"],"c":{"d":null}}\n{"as":"given"}\n')


async def retry_chain(store: Store) -> tuple[BatchRow, BatchRow]:
    """A first batch of five lines and a retry of three of them, both with results stored:
    c0 ok; c1 failed then ok; c2 expired then failed; c3 ok; c4 failed then not run yet."""
    first = await store.create_batch(batch_row(project="p"), [
        NewRequest(custom_id=f"c{i}", model="sim/m", body={"model": "sim/m"}) for i in range(5)])
    await store.store_results(first.id, [
        LineOutcome(0, "c0", ResultStatus.COMPLETED, 200, {"run": "first-0"}),
        LineOutcome(1, "c1", ResultStatus.FAILED, 500, error=ResultError("boom", "first")),
        LineOutcome(2, "c2", ResultStatus.EXPIRED, 0, None, ResultError("batch_expired", "late")),
        LineOutcome(3, "c3", ResultStatus.COMPLETED, 200, {"run": "first-3"}),
        LineOutcome(4, "c4", ResultStatus.FAILED, 429, {"error": {"code": "slow"}})])
    retry = await store.create_batch(batch_row(project="p", id=new_id("batch_"), retry_of=first.id,
                                               chain_id=first.id, output_expires_after=600), [
        NewRequest(custom_id=f"c{i}", model="sim/m", body={"model": "sim/m"}, origin_idx=i) for i in (1, 2, 4)])
    await store.store_results(retry.id, [
        LineOutcome(0, "c1", ResultStatus.COMPLETED, 200, {"run": "retry-1"}),
        LineOutcome(1, "c2", ResultStatus.FAILED, 400, {"error": {"code": "bad"}})])
    return first, retry


@pytest.mark.parametrize("page", [1, 2, 1000])
async def test_a_retry_writes_its_own_files_and_the_chains_merged_files(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                                      page: int) -> None:
    """A retry's merged files hold every line of the first batch, in its order, from the latest
    batch that ran it (ids derive from that batch and its line); a line without a result in it is
    left out. Read a page of MERGE_PAGE lines at a time (pages of 1 and 2 here: every page edge)."""
    if page != 1000:
        monkeypatch.setattr(output_files, "MERGE_PAGE", page)
    first, retry = await retry_chain(store)
    key = retry.id.removeprefix("batch_")
    fields = await OutputFiles(store)(retry)
    assert fields == OutputFileIds(f"file-output-{key}", f"file-error-{key}",
                                   f"file-merged-output-{key}", f"file-merged-error-{key}")

    _, own_ok = await stored_file(store, "p", f"file-output-{key}")
    _, own_bad = await stored_file(store, "p", f"file-error-{key}")
    assert [(x["id"], x["custom_id"]) for x in own_ok] == [(line_id(retry.id, 0), "c1")]
    assert [(x["id"], x["custom_id"]) for x in own_bad] == [(line_id(retry.id, 1), "c2")]

    merged_ok, ok = await stored_file(store, "p", f"file-merged-output-{key}")
    merged_bad, bad = await stored_file(store, "p", f"file-merged-error-{key}")
    assert [(x["id"], x["custom_id"], x["response"]["body"]) for x in ok] == [
        (line_id(first.id, 0), "c0", {"run": "first-0"}),
        (line_id(retry.id, 0), "c1", {"run": "retry-1"}),
        (line_id(first.id, 3), "c3", {"run": "first-3"})]
    assert [(x["id"], x["custom_id"], x["response"]["status_code"]) for x in bad] == [
        (line_id(retry.id, 1), "c2", 400)]
    for f, kind in ((merged_ok, "merged-output"), (merged_bad, "merged-error")):
        assert (f.filename, f.purpose, f.status) == (f"{retry.id}_{kind}.jsonl", "batch_output", "processed")
        assert f.expires_at == f.created_at + 600


async def test_a_later_retry_still_running_does_not_take_a_line_out_of_a_retrys_merged_files(store: Store) -> None:
    """A second retry of the chain, made before the first retry ends and still running, re-runs c0:
    the first retry's merged output keeps c0 from the first batch (its files are the chain up to
    it). Seen end to end: c0 was missing from the merged output while its second retry ran."""
    first, retry = await retry_chain(store)
    await store.create_batch(batch_row(project="p", id=new_id("batch_"), retry_of=first.id, chain_id=first.id), [
        NewRequest(custom_id="c0", model="sim/m", body={"model": "sim/m"}, origin_idx=0)])
    fields = await OutputFiles(store)(retry)
    assert fields.merged_output_file_id is not None
    _, ok = await stored_file(store, "p", fields.merged_output_file_id)
    assert [(x["id"], x["custom_id"]) for x in ok] == [
        (line_id(first.id, 0), "c0"), (line_id(retry.id, 0), "c1"), (line_id(first.id, 3), "c3")]


async def test_a_merged_error_file_is_only_written_when_a_line_failed(store: Store) -> None:
    first, retry = await retry_chain(store)
    await store.store_results(retry.id, [LineOutcome(2, "c4", ResultStatus.COMPLETED, 200, {"run": "retry-4"})])
    async with store.sessions.begin() as s:  # c2's failure in the retry becomes a success
        stored = await s.get(ResultRow, (retry.id, 1))
        assert stored is not None
        stored.status_code, stored.response_json = 200, '{"run":"retry-2"}'
    fields = await OutputFiles(store)(retry)
    assert fields.merged_error_file_id is None and fields.merged_output_file_id is not None
    _, ok = await stored_file(store, "p", fields.merged_output_file_id)
    assert [x["custom_id"] for x in ok] == ["c0", "c1", "c2", "c3", "c4"]
    assert [x["id"] for x in ok] == [line_id(first.id, 0), line_id(retry.id, 0), line_id(retry.id, 1),
                                     line_id(first.id, 3), line_id(retry.id, 2)]



# --------------------------------------------------------------------------- the engine (issue 13's changes)


async def test_lines_in_flight_get_half_a_second_to_answer_when_a_cancel_stops_the_step(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel noticed while lines run: each line in flight gets IN_FLIGHT_GRACE_SECONDS (0.5 s)
    to answer; one that answers then keeps its result (the provider did the work), one that does
    not is cancelled and closed with the batch. The wait is recorded and cut short, not sat through."""
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)
    fx = FakeExecutor(concurrency=3)
    batch_id = await add_batch(store, "exec", 4)
    grace_started = asyncio.Event()
    c0_and_c1_running = asyncio.Event()
    real_wait = asyncio.wait
    graces: list[float | None] = []

    async def recorded(tasks: Any, *, timeout: float | None = None,
                       return_when: str = asyncio.ALL_COMPLETED) -> Any:
        if return_when == asyncio.ALL_COMPLETED:  # only the grace waits for all of them
            graces.append(timeout)
            grace_started.set()
            timeout = 0.5 if timeout is None else min(timeout, 0.5)
        return await real_wait(tasks, timeout=timeout, return_when=return_when)

    async def answers_in_the_grace(line: RequestLine) -> LineResult:
        await grace_started.wait()
        return answer(line)

    async def never_answers(line: RequestLine) -> LineResult:
        c0_and_c1_running.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def cancels(line: RequestLine) -> LineResult:
        await c0_and_c1_running.wait()
        await store.request_cancel("alpha", batch_id)
        return answer(line)

    fx.script = {"c0": [answers_in_the_grace], "c1": [never_answers], "c2": [cancels]}
    monkeypatch.setattr(asyncio, "wait", recorded)  # the engine's asyncio is this one
    done = await step(make_engine(store, fx), batch_id)
    assert graces == [engine_module.IN_FLIGHT_GRACE_SECONDS] == [0.5]
    assert done.status is BatchStatus.CANCELLED and sorted(fx.executed()) == ["c0", "c1", "c2"]
    found = await results(store, batch_id)
    assert statuses(found) == {"c0": ResultStatus.COMPLETED, "c1": ResultStatus.CANCELLED,
                               "c2": ResultStatus.COMPLETED, "c3": ResultStatus.CANCELLED}
    assert (done.completed, done.failed) == (2, 0)


async def test_a_batch_whose_input_file_content_is_lost_can_still_be_cancelled(store: Store) -> None:
    """Lines stored by reference to an input file whose content is gone (removed behind Sluice's
    back): they cannot run, but closing them needs no body, so a cancel still ends the batch."""
    t = now()
    content = b'{"custom_id":"c0"}\n{"custom_id":"c1"}\n'
    await store.begin_file(FileRow(id="file-in", project="alpha", filename="in.jsonl", purpose="batch",
                                   bytes=len(content), line_count=2, status=FileStatus.PROCESSED, created_at=t))

    async def one_chunk() -> AsyncIterator[bytes]:
        yield content

    await store.blobs.put("file-in", one_chunk())
    row = BatchRow.new(id=new_id("batch_"), project="alpha", endpoint="/v1/chat/completions",
                       completion_window="24h", created_at=t, input_file_id="file-in")
    row.model, row.provider, row.provider_model = "exec/m", "exec", PROVIDER_MODEL
    batch = await store.create_batch(row, [
        NewRequest(f"c{i}", "exec/m", {}, PROVIDER_MODEL, "exec", line_offset=19 * i, line_length=18)
        for i in range(2)], [NewPart(0, "exec", PROVIDER_MODEL, 2)])
    await store.blobs.delete(["file-in"])
    with pytest.raises(Internal, match="no longer available"):  # running them is impossible
        await store.pending_requests(batch.id, 10)
    await store.request_cancel("alpha", batch.id)
    fx = FakeExecutor()
    done = await step(make_engine(store, fx), batch.id)
    assert done.status is BatchStatus.CANCELLED and fx.calls == []
    assert statuses(await results(store, batch.id)) == dict.fromkeys(["c0", "c1"], ResultStatus.CANCELLED)


async def test_a_line_failing_unexpectedly_in_the_grace_is_left_to_run_again(store: Store,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """In the grace after a cancel, a line whose call ends in an unexpected exception (not a
    provider's answer) is dropped: the step still ends the batch, the answers that arrived in the
    grace are kept, and the failed line is closed with the batch like one that never ran."""
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 0.0)
    fx = FakeExecutor(concurrency=3)
    batch_id = await add_batch(store, "exec", 4)
    grace_started = asyncio.Event()
    c0_and_c1_running = asyncio.Event()
    running: set[str] = set()
    real_wait = asyncio.wait

    async def recorded(tasks: Any, *, timeout: float | None = None,
                       return_when: str = asyncio.ALL_COMPLETED) -> Any:
        if return_when == asyncio.ALL_COMPLETED:
            grace_started.set()
        return await real_wait(tasks, timeout=timeout, return_when=return_when)

    async def in_the_grace(line: RequestLine) -> LineResult:
        running.add(line.custom_id)
        if running >= {"c0", "c1"}:
            c0_and_c1_running.set()
        await grace_started.wait()
        if line.custom_id == "c0":
            raise RuntimeError("an adapter's bug")
        return answer(line)

    async def cancels(line: RequestLine) -> LineResult:
        await c0_and_c1_running.wait()
        await store.request_cancel("alpha", batch_id)
        return answer(line)

    fx.script = {"c0": [in_the_grace], "c1": [in_the_grace], "c2": [cancels]}
    monkeypatch.setattr(asyncio, "wait", recorded)
    done = await step(make_engine(store, fx), batch_id)
    assert done.status is BatchStatus.CANCELLED and done.lease_owner is None
    assert statuses(await results(store, batch_id)) == {"c0": ResultStatus.CANCELLED, "c1": ResultStatus.COMPLETED,
                                                        "c2": ResultStatus.COMPLETED, "c3": ResultStatus.CANCELLED}


async def test_while_an_executor_part_runs_the_loop_waits_no_longer_than_until_a_native_part_is_due(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop that steps native parts while an executor part runs sleeps until the next part is
    due, never longer (here a part is due every 0.2 s; the periodic look is an hour away): every
    wait it chooses is recorded, and none is longer than the time to the next due part."""
    monkeypatch.setattr(engine_module, "CHECK_SECONDS", 3600.0)
    fx, fake = FakeExecutor(), FakeNative()
    fake.polls = [status(ProviderState.IN_PROGRESS), status(ProviderState.IN_PROGRESS),
                  status(ProviderState.COMPLETED)]
    fake.outputs = [result(1)]
    batch_id = await add_parts_batch(store, [("exec", 1), ("native", 1)])
    real_wait = asyncio.wait
    waits: list[float] = []

    async def recorded(tasks: Any, *, timeout: float | None = None,
                       return_when: str = asyncio.ALL_COMPLETED) -> Any:
        parts = all("_run_executor_part" in t.get_coro().__qualname__ for t in tasks)  # not the lines' wait
        if parts and fake.called("results") == 0 and (timeout or 0) > 0.5:
            waits.append(timeout or 0)  # while the native part runs: longer than its next look (0.2 s)
        return await real_wait(tasks, timeout=timeout, return_when=return_when)

    fx.script = {"c0": [answer_once_collected(fake, 30)]}
    monkeypatch.setattr(asyncio, "wait", recorded)
    row = await step(make_engine(store, fx, fake, poll_seconds=0.2), batch_id)
    assert waits == []
    assert row.status is BatchStatus.COMPLETED and fake.called("poll") == 3
