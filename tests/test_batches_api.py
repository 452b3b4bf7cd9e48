"""BatchService end to end: a real gateway (grpc.aio on a port picked at run time, SQLite, the
sim provider) driven by a real gRPC client, for every RPC and every documented error."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy import func, select

from service.providers.routing import DEFAULT_SIM_PRICE
from service.runtime.server import App
from service.storage.tables import BatchRow, RequestRow, ResultRow
from sluice.v1 import batch_pb2
from tests.harness import KEY_A, KEY_B, Client, chat_line, gateway, make_settings, md, request_dict
from tests.rpc_errors import WireError, expect_error

CHAT = "/v1/chat/completions"
SIM_OUTPUT_TOKENS = 8
OPTIONAL_TIMES = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                  "cancelling_at", "cancelled_at")


@pytest.fixture
async def slow(db_url: str) -> AsyncIterator[tuple[App, Client]]:
    """One line at a time, 250 ms each: work is reliably in flight."""
    async with gateway(make_settings(db_url, sim_latency_ms=250, executor_concurrency=1)) as pair:
        yield pair


def cost(tokens: int, per_mtok: float) -> float:
    return tokens * per_mtok * (1 - DEFAULT_SIM_PRICE.batch_discount) / 1_000_000


def assert_usage(usage: batch_pb2.BatchUsage, input_tokens: int, output_tokens: int) -> None:
    assert usage.input_tokens == input_tokens
    assert usage.output_tokens == output_tokens
    assert usage.total_tokens == input_tokens + output_tokens
    assert usage.input_cost == pytest.approx(cost(input_tokens, DEFAULT_SIM_PRICE.input_per_mtok))
    assert usage.output_cost == pytest.approx(cost(output_tokens, DEFAULT_SIM_PRICE.output_per_mtok))
    assert usage.total_cost == pytest.approx(usage.input_cost + usage.output_cost)


async def row_counts(app: App) -> tuple[int, int, int]:
    async with app.store.sessions() as s:
        return tuple([int(await s.scalar(select(func.count()).select_from(t)) or 0)  # type: ignore[return-value]
                      for t in (BatchRow, RequestRow, ResultRow)])


# --------------------------------------------------------------------------- lifecycle


async def test_full_lifecycle_with_the_sim_provider(gw: tuple[App, Client]) -> None:
    _, c = gw
    texts = {"a": "hello there", "b": "one two three four five", "c": "x"}
    meta = struct_pb2.Struct()
    meta.update({"team": "search", "run": "7"})
    before = int(time.time())
    created = await c.create([chat_line(cid, text) for cid, text in texts.items()], metadata=meta)

    assert created.id.startswith("batch_") and created.object == "batch"
    assert created.status == "validating"
    assert created.endpoint == CHAT and created.completion_window == "24h" and created.input_file_id == ""
    assert created.provider == "sim" and created.model == "sim/small"
    assert before <= created.created_at <= int(time.time())
    assert created.HasField("expires_at") and created.expires_at == created.created_at + 24 * 3600
    for name in OPTIONAL_TIMES:
        assert not created.HasField(name), name
    assert not created.HasField("errors") and not created.HasField("provider_batch_id")
    assert created.request_counts == batch_pb2.BatchRequestCounts(total=3, completed=0, failed=0)
    assert dict(created.metadata) == {"team": "search", "run": "7"}

    done = await c.wait_for(created.id)
    assert done.status == "completed"
    # validating -> in_progress -> finalizing -> completed, each stamped once, in order.
    assert created.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    for name in ("failed_at", "expired_at", "cancelling_at", "cancelled_at"):
        assert not done.HasField(name), name
    assert not done.HasField("errors")
    assert done.request_counts == batch_pb2.BatchRequestCounts(total=3, completed=3, failed=0)
    words = {cid: len(text.split()) for cid, text in texts.items()}
    assert_usage(done.usage, sum(words.values()), SIM_OUTPUT_TOKENS * 3)
    assert dict(done.metadata) == {"team": "search", "run": "7"}

    results = await c.results(created.id)
    assert [r.custom_id for r in results] == ["a", "b", "c"]
    assert [r.index for r in results] == [0, 1, 2]
    for r in results:
        assert r.status == "completed" and r.status_code == 200 and not r.HasField("error")
        assert r.provider == "sim" and r.model == "sim/small" and r.url == CHAT
        body = dict(r.response)
        assert body["object"] == "chat.completion"
        assert_usage(r.usage, words[r.custom_id], SIM_OUTPUT_TOKENS)
        assert body["usage"]["prompt_tokens"] == words[r.custom_id]
        one = await c.stub.GetBatchResult(batch_pb2.GetBatchResultRequest(batch_id=created.id, custom_id=r.custom_id),
                                          metadata=md())
        assert one == r

    # GetBatch and ListBatches agree with the final state.
    listed = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md())
    assert [b.id for b in listed.data] == [created.id] and listed.data[0] == await c.get(created.id)


@pytest.mark.parametrize(("endpoint", "body", "obj", "out_tokens"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c"}]}, "chat.completion", 8),
    ("/v1/completions", {"prompt": "a b c"}, "text_completion", 8),
    ("/v1/embeddings", {"input": "a b c"}, "list", 0),
    ("/v1/responses", {"input": "a b c"}, "response", 8),
])
async def test_every_supported_endpoint_completes(gw: tuple[App, Client], endpoint: str, body: dict[str, Any],
                                                  obj: str, out_tokens: int) -> None:
    _, c = gw
    s = struct_pb2.Struct()
    s.update({"model": "sim/m", **body})
    line = batch_pb2.BatchRequestLine(custom_id="only", method="POST", url=endpoint, body=s)
    batch = await c.wait_for((await c.create([line], endpoint=endpoint)).id)
    assert batch.status == "completed" and batch.endpoint == endpoint
    (result,) = await c.results(batch.id)
    assert result.response["object"] == obj
    assert_usage(result.usage, 3, out_tokens)


async def test_partial_failure_keeps_the_batch_completed(gw: tuple[App, Client]) -> None:
    _, c = gw
    lines = [chat_line("ok-1", "fine one"), chat_line("bad-1", "please SIM_FAIL here"),
             chat_line("ok-2", "fine two words"), chat_line("bad-2", "SIM_FAIL")]
    batch = await c.wait_for((await c.create(lines)).id)
    assert batch.status == "completed"
    assert batch.request_counts == batch_pb2.BatchRequestCounts(total=4, completed=2, failed=2)
    assert_usage(batch.usage, 2 + 3, 2 * SIM_OUTPUT_TOKENS)  # only successful lines cost anything

    by_id = {r.custom_id: r for r in await c.results(batch.id)}
    assert set(by_id) == {"ok-1", "bad-1", "ok-2", "bad-2"}
    for cid in ("bad-1", "bad-2"):
        r = by_id[cid]
        assert r.status == "failed" and r.status_code == 500
        assert r.HasField("error")
        assert r.error.code == "sim_failure" and r.error.type == "provider_error" and r.error.message
        assert r.response["error"]["code"] == "sim_failure"
        assert_usage(r.usage, 0, 0)
    for cid in ("ok-1", "ok-2"):
        assert by_id[cid].status == "completed" and not by_id[cid].HasField("error")


async def test_get_batch_result_unknown_custom_id_and_unknown_batch(gw: tuple[App, Client]) -> None:
    _, c = gw
    batch = await c.wait_for((await c.create([chat_line("a")])).id)
    err = await expect_error(c.stub.GetBatchResult(
        batch_pb2.GetBatchResultRequest(batch_id=batch.id, custom_id="nope"), metadata=md()), grpc.StatusCode.NOT_FOUND)
    assert err.envelope["type"] == "not_found_error" and err.envelope["param"] == "custom_id"
    assert err.envelope["code"] == "result_not_found" and "nope" in err.message
    err = await expect_error(c.stub.GetBatchResult(
        batch_pb2.GetBatchResultRequest(batch_id="batch_nope", custom_id="a"), metadata=md()),
        grpc.StatusCode.NOT_FOUND)
    assert err.envelope["code"] == "batch_not_found"
    for call in (c.stub.GetBatch(batch_pb2.GetBatchRequest(id="batch_nope"), metadata=md()),
                 c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id="batch_nope"), metadata=md()),
                 c.stub.ListBatchResults(batch_pb2.ListBatchResultsRequest(id="batch_nope"), metadata=md())):
        err = await expect_error(call, grpc.StatusCode.NOT_FOUND)
        assert err.envelope["code"] == "batch_not_found" and err.envelope["type"] == "not_found_error"


# --------------------------------------------------------------------------- pagination


async def test_list_batches_pages_newest_first(gw: tuple[App, Client]) -> None:
    _, c = gw
    ids = [(await c.create([chat_line("a")])).id for _ in range(7)]
    await c.create([chat_line("a")], key=KEY_B)  # another project's batch never shows up

    everything = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md())
    assert len(everything.data) == 7 and not everything.has_more and everything.object == "list"
    assert [b.id for b in everything.data] == ids[::-1], "newest first, in the order the batches were made"

    pages: list[batch_pb2.ListBatchesResponse] = []
    after = ""
    while True:
        page = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(limit=3, after=after), metadata=md())
        pages.append(page)
        assert page.first_id == page.data[0].id and page.last_id == page.data[-1].id
        if not page.has_more:
            break
        after = page.last_id
    assert [len(p.data) for p in pages] == [3, 3, 1]
    assert [p.has_more for p in pages] == [True, True, False]
    seen = [b.id for p in pages for b in p.data]
    assert seen == [b.id for b in everything.data]  # same order, no duplicates, none missing

    # Exactly one page's worth: no empty trailing page is promised.
    exact = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(limit=7), metadata=md())
    assert len(exact.data) == 7 and not exact.has_more
    last = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(limit=3, after=seen[-1]), metadata=md())
    assert not last.data and not last.has_more and not last.HasField("first_id") and not last.HasField("last_id")


@pytest.mark.parametrize("limit", [0, -1, 101])
async def test_list_batches_limit_out_of_range(gw: tuple[App, Client], limit: int) -> None:
    _, c = gw
    err = await expect_error(c.stub.ListBatches(batch_pb2.ListBatchesRequest(limit=limit), metadata=md()),
                             grpc.StatusCode.INVALID_ARGUMENT)
    assert err.envelope["param"] == "limit" and err.envelope["code"] == "invalid_limit"


async def test_list_batches_bad_cursor(gw: tuple[App, Client]) -> None:
    _, c = gw
    other = await c.create([chat_line("a")], key=KEY_B)
    for after in ("batch_doesnotexist", other.id):  # unknown, or another project's: the same answer
        err = await expect_error(c.stub.ListBatches(batch_pb2.ListBatchesRequest(after=after), metadata=md()),
                                 grpc.StatusCode.NOT_FOUND)
        assert err.envelope["param"] == "after", err.envelope
        assert after in err.message


@pytest.mark.parametrize(("total", "limit"), [(13, 1), (13, 4), (12, 4), (13, 13), (13, 100)])
async def test_list_batch_results_pages(gw: tuple[App, Client], total: int, limit: int) -> None:
    _, c = gw
    cids = [f"req-{i:02d}" for i in range(total)]
    batch = await c.wait_for((await c.create([chat_line(cid) for cid in cids])).id)
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        page = await c.stub.ListBatchResults(
            batch_pb2.ListBatchResultsRequest(id=batch.id, limit=limit, after=after), metadata=md())
        pages += 1
        assert page.object == "list" and page.batch_id == batch.id
        assert 0 < len(page.data) <= limit
        assert page.first_id == page.data[0].custom_id and page.last_id == page.data[-1].custom_id
        seen.extend(r.custom_id for r in page.data)
        if not page.has_more:
            assert not page.HasField("next_cursor")
            break
        assert page.next_cursor == page.last_id
        after = page.next_cursor
    assert seen == cids  # request order, no duplicates, none missing
    assert pages == -(-total // limit)


async def test_list_batch_results_bad_cursor_and_limits(gw: tuple[App, Client]) -> None:
    _, c = gw
    batch = await c.wait_for((await c.create([chat_line("a"), chat_line("b")])).id)
    err = await expect_error(c.stub.ListBatchResults(
        batch_pb2.ListBatchResultsRequest(id=batch.id, after="zzz"), metadata=md()), grpc.StatusCode.NOT_FOUND)
    assert err.envelope["param"] == "after" and err.envelope["code"] == "cursor_not_found"
    for limit in (0, 1001):
        err = await expect_error(c.stub.ListBatchResults(
            batch_pb2.ListBatchResultsRequest(id=batch.id, limit=limit), metadata=md()),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["param"] == "limit"


# --------------------------------------------------------------------------- cancel


async def test_cancel_keeps_finished_results_and_cancels_the_rest(slow: tuple[App, Client]) -> None:
    _, c = slow
    cids = [f"line-{i:02d}" for i in range(20)]
    created = await c.create([chat_line(cid) for cid in cids])
    running = await c.wait_until(created.id, lambda b: b.request_counts.completed >= 2)
    assert running.status == "in_progress" and running.HasField("in_progress_at")

    # A line not run yet: known, unfinished, no error and no response.
    pending = await c.stub.GetBatchResult(
        batch_pb2.GetBatchResultRequest(batch_id=created.id, custom_id=cids[-1]), metadata=md())
    assert pending.status in {"pending", "running"} and pending.status_code == 0 and pending.index == 19
    assert not pending.HasField("error") and not pending.HasField("response")

    before = {r.custom_id: r for r in await c.results(created.id)}
    assert 2 <= len(before) < 20

    cancelled = await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
    assert cancelled.status in {"cancelling", "cancelled"} and cancelled.HasField("cancelling_at")
    again = await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
    assert again.status in {"cancelling", "cancelled"}  # a repeated cancel is not an error

    final = await c.wait_for(created.id, timeout=15)
    assert final.status == "cancelled"
    assert final.HasField("cancelling_at") and final.HasField("cancelled_at")
    assert final.cancelling_at <= final.cancelled_at
    for name in ("completed_at", "failed_at", "expired_at"):
        assert not final.HasField(name)

    after = await c.results(created.id)
    assert [r.custom_id for r in after] == cids  # every line accounted for, once
    by_id = {r.custom_id: r for r in after}
    for cid, r in before.items():
        assert by_id[cid] == r, f"{cid} changed after the cancel"
    done = [r for r in after if r.status == "completed"]
    dropped = [r for r in after if r.status == "cancelled"]
    assert len(done) + len(dropped) == 20 and dropped, "some lines must have been cancelled"
    for r in dropped:
        assert r.error.code == "batch_cancelled" and r.status_code == 0 and r.error.message
    assert final.request_counts.total == 20
    assert final.request_counts.completed == len(done) and final.request_counts.failed == 0
    assert_usage(final.usage, sum(r.usage.input_tokens for r in done), SIM_OUTPUT_TOKENS * len(done))

    # Cancelling a cancelled batch stays OK.
    assert (await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())).status == "cancelled"


async def test_cancel_of_a_completed_batch_is_a_conflict(gw: tuple[App, Client]) -> None:
    _, c = gw
    batch = await c.wait_for((await c.create([chat_line("a")])).id)
    assert batch.status == "completed"
    err = await expect_error(c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=batch.id), metadata=md()),
                             grpc.StatusCode.FAILED_PRECONDITION)
    assert err.trailers.get("x-http-status") == "409"
    assert err.trailers.get("x-should-retry") == "false"
    assert err.envelope["type"] == "invalid_request_error" and err.envelope["code"] == "batch_not_cancellable"
    assert "completed" in err.message
    assert (await c.get(batch.id)).status == "completed"


# --------------------------------------------------------------------------- validation


def _line(cid: str = "a", method: str = "POST", url: str = CHAT, body: dict[str, Any] | None = None,
          no_body: bool = False) -> batch_pb2.BatchRequestLine:
    line = batch_pb2.BatchRequestLine(custom_id=cid, method=method, url=url)
    if not no_body:
        line.body.update(body if body is not None else {"model": "sim/small", "messages": []})
    return line


def _meta(n: int, value: Any = "v") -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({f"k{i}": value for i in range(n)})
    return s


VALIDATION_CASES: dict[str, tuple[Callable[[], batch_pb2.CreateBatchRequest], str, str, str | None]] = {
    # name: (request, param, code, x-http-status)
    "no requests": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT),
                    "input_file_id", "missing_required_parameter", None),
    "too many requests": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, requests=[batch_pb2.BatchRequestLine(custom_id=str(i)) for i in range(50_001)]),
        "requests", "too_many_requests", "413"),
    "file and requests": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT, input_file_id="file-1",
                                                               requests=[_line()]),
                          "input_file_id", "conflicting_parameters", None),
    "missing custom_id": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT, requests=[_line("a"), _line("")]),
                          "requests[1].custom_id", "missing_custom_id", None),
    "duplicate custom_id": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, requests=[_line("a"), _line("b"), _line("a")]),
        "requests[2].custom_id", "duplicate_custom_id", None),
    "method GET": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT, requests=[_line(method="GET")]),
                   "requests[0].method", "invalid_method", None),
    "unsupported url": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT, requests=[
        _line("a"), _line("b", url="/v1/images/generations")]), "requests[1].url", "invalid_url", None),
    "url differs from endpoint": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, requests=[_line(url="/v1/embeddings", body={"model": "m", "input": "x"})]),
        "requests[0].url", "url_mismatch", None),
    "no body": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT, requests=[_line(no_body=True)]),
                "requests[0].body", "invalid_body", None),
    "body without model": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, requests=[_line(body={"messages": []})]), "requests[0].body.model", "missing_model", None),
    "empty model": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, requests=[_line(body={"model": ""})]), "requests[0].body.model", "missing_model", None),
    "unsupported endpoint": (lambda: batch_pb2.CreateBatchRequest(endpoint="/v1/images", requests=[_line()]),
                             "endpoint", "invalid_endpoint", None),
    "missing endpoint": (lambda: batch_pb2.CreateBatchRequest(requests=[_line()]),
                         "endpoint", "invalid_endpoint", None),
    "completion_window 48h": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT, completion_window="48h",
                                                                   requests=[_line()]),
                              "completion_window", "invalid_completion_window", None),
    "17 metadata keys": (lambda: batch_pb2.CreateBatchRequest(endpoint=CHAT, metadata=_meta(17), requests=[_line()]),
                         "metadata", "too_many_metadata_keys", None),
    "metadata value not a string": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, metadata=_meta(1, 5), requests=[_line()]), "metadata.k0", "invalid_metadata", None),
    "custom_id of 513 characters": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, requests=[_line("a"), _line("x" * 513)]), "requests[1].custom_id", "invalid_custom_id", None),
    "metadata key of 65 characters": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, metadata=_struct({"k" * 65: "v"}), requests=[_line()]),
        "metadata", "invalid_metadata", None),
    "metadata value of 513 characters": (lambda: batch_pb2.CreateBatchRequest(
        endpoint=CHAT, metadata=_struct({"k": "v" * 513}), requests=[_line()]), "metadata.k", "invalid_metadata", None),
}


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
async def test_validation_errors(gw: tuple[App, Client], case: str) -> None:
    app, c = gw
    build, param, code, http_status = VALIDATION_CASES[case]
    err = await expect_error(c.stub.CreateBatch(build(), metadata=md()), grpc.StatusCode.INVALID_ARGUMENT)
    assert err.envelope["type"] == "invalid_request_error"
    assert err.envelope["param"] == param
    assert err.envelope["code"] == code
    assert err.info.reason == "INVALID_REQUEST_ERROR"
    assert err.trailers.get("x-http-status") == http_status
    if param.startswith("requests["):
        assert param.split(".")[0] in err.message  # the message names the line
    # A rejected batch leaves nothing behind.
    listed = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md())
    assert not listed.data
    assert await row_counts(app) == (0, 0, 0)


async def test_exactly_the_limits_are_accepted(gw: tuple[App, Client]) -> None:
    """Each documented limit, exactly: 16 metadata keys, a 64-character key, a 512-character
    value, a 512-character custom_id (the ones just over are in VALIDATION_CASES)."""
    _, c = gw
    batch = await c.create([chat_line("a")], metadata=_meta(16), completion_window="24h")
    assert len(batch.metadata) == 16
    long_id = "i" * 512
    meta = {"k" * 64: "v" * 512}
    batch = await c.create([chat_line(long_id)], metadata=_struct(meta))
    assert dict(batch.metadata) == meta
    done = await c.wait_for(batch.id)
    assert done.status == "completed"
    (result,) = await c.results(batch.id)
    assert result.custom_id == long_id and result.status == "completed"
    one = await c.stub.GetBatchResult(batch_pb2.GetBatchResultRequest(batch_id=batch.id, custom_id=long_id),
                                      metadata=md())
    assert one.custom_id == long_id


async def test_exactly_50000_inline_requests_are_accepted(gw: tuple[App, Client]) -> None:
    """The 50,000-request limit, exactly (50,001 is in VALIDATION_CASES). The engine is stopped:
    this is about acceptance, not about running them."""
    app, c = gw
    await app.engine.stop()
    line = _line("x")
    lines = []
    for i in range(50_000):
        copy = batch_pb2.BatchRequestLine()
        copy.CopyFrom(line)
        copy.custom_id = f"r{i}"
        lines.append(copy)
    batch = await c.create(lines)
    assert batch.status == "validating" and batch.request_counts.total == 50_000
    assert await row_counts(app) == (1, 50_000, 0)


def _router_with_a_real_provider() -> Any:
    """sim plus one more provider (another sim under the name `local`, serving `local-model`):
    with a real provider configured, models no longer all fall back to sim."""
    from adapters.sim import SimProvider
    from service.providers.routing import SIM, ProviderEntry, Router

    return Router({SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
                   "local": ProviderEntry(provider=SimProvider("local"), models={"local-model"},
                                          default_price=DEFAULT_SIM_PRICE)})


async def test_an_unknown_model_is_rejected_and_mixed_providers_are_split_at_create(db_url: str) -> None:
    async with gateway(make_settings(db_url), _router_with_a_real_provider()) as (app, c):
        err = await expect_error(c.stub.CreateBatch(batch_pb2.CreateBatchRequest(endpoint=CHAT, requests=[
            chat_line("a", model="local-model"), chat_line("b", model="gpt-nope")]), metadata=md()),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert (err.envelope["param"], err.envelope["code"]) == ("requests[1].body.model", "model_not_found")
        assert "gpt-nope" in err.message
        assert await row_counts(app) == (0, 0, 0)

        # The same from a file: the batch is created `failed`, with the file's line number.
        bad = await c.upload(b"".join(json.dumps(line).encode() + b"\n" for line in (
            request_dict("a", model="local-model"), request_dict("b", model="gpt-nope"),
            request_dict("c", model="sim/x"))))
        failed = await c.create([], input_file_id=bad.id)
        assert failed.status == "failed" and failed.request_counts.total == 0
        assert [(e.code, e.line) for e in failed.errors.data] == [("model_not_found", 2)]

        # Lines for two providers: one batch, one part per provider, every line run where it routes.
        mixed = await c.wait_for((await c.create([chat_line("a", model="sim/small"), chat_line("b", model="sim/other"),
                                                  chat_line("c", model="local/local-model")])).id)
        assert mixed.status == "completed" and mixed.provider == "mixed"
        assert [(p.provider, p.request_counts.total, p.status) for p in mixed.parts] == [
            ("sim", 2, "completed"), ("local", 1, "completed")]
        assert (mixed.request_counts.total, mixed.request_counts.completed) == (3, 3)
        # and a batch for one provider is one part
        ok = await c.wait_for((await c.create([chat_line("a", model="local-model")])).id)
        assert ok.status == "completed" and ok.provider == "local" and len(ok.parts) == 1


async def test_input_file_id_of_an_unknown_file_is_not_found(gw: tuple[App, Client]) -> None:
    """A clear NOT_FOUND naming the file parameter, and nothing stored."""
    app, c = gw
    err = await expect_error(c.stub.CreateBatch(
        batch_pb2.CreateBatchRequest(endpoint=CHAT, input_file_id="file-doesnotexist"), metadata=md()),
        grpc.StatusCode.NOT_FOUND)
    assert (err.envelope["type"], err.envelope["param"], err.envelope["code"]) == (
        "not_found_error", "input_file_id", "file_not_found")
    assert "file-doesnotexist" in err.message
    assert await row_counts(app) == (0, 0, 0)


# --------------------------------------------------------------------------- auth and isolation


def _every_rpc(c: Client, batch_id: str) -> dict[str, Callable[[Any], Any]]:
    s = c.stub
    return {
        "CreateBatch": lambda m: s.CreateBatch(batch_pb2.CreateBatchRequest(endpoint=CHAT, requests=[_line()]),
                                               metadata=m),
        "GetBatch": lambda m: s.GetBatch(batch_pb2.GetBatchRequest(id=batch_id), metadata=m),
        "ListBatches": lambda m: s.ListBatches(batch_pb2.ListBatchesRequest(), metadata=m),
        "CancelBatch": lambda m: s.CancelBatch(batch_pb2.CancelBatchRequest(id=batch_id), metadata=m),
        "ListBatchResults": lambda m: s.ListBatchResults(batch_pb2.ListBatchResultsRequest(id=batch_id), metadata=m),
        "GetBatchResult": lambda m: s.GetBatchResult(
            batch_pb2.GetBatchResultRequest(batch_id=batch_id, custom_id="a"), metadata=m),
    }


BAD_CREDENTIALS: dict[str, tuple[tuple[tuple[str, str], ...], str]] = {
    "missing": ((), "missing_api_key"),
    "not bearer": ((("authorization", f"Basic {KEY_A}"),), "missing_api_key"),
    "empty bearer": ((("authorization", "Bearer "),), "missing_api_key"),
    "bare key": ((("authorization", KEY_A),), "missing_api_key"),
    "unknown key": ((("authorization", "Bearer sk-not-a-real-key"),), "invalid_api_key"),
}


async def test_every_rpc_needs_a_known_key(gw: tuple[App, Client]) -> None:
    app, c = gw
    batch = await c.wait_for((await c.create([chat_line("a")])).id)
    for rpc, call in _every_rpc(c, batch.id).items():
        for what, (metadata, code) in BAD_CREDENTIALS.items():
            err = await expect_error(call(metadata), grpc.StatusCode.UNAUTHENTICATED)
            assert err.envelope["type"] == "authentication_error", (rpc, what)
            assert err.envelope["code"] == code, (rpc, what)
            assert KEY_A not in err.message
        # and the good key works (CancelBatch of a completed batch is a conflict, not an auth error)
        if rpc == "CancelBatch":
            await expect_error(call(md(KEY_A)), grpc.StatusCode.FAILED_PRECONDITION)
        else:
            await call(md(KEY_A))
    assert (await row_counts(app))[0] == 2  # only the two authenticated creates stored anything


async def test_another_projects_batch_is_not_found(gw: tuple[App, Client]) -> None:
    _, c = gw
    mine = await c.wait_for((await c.create([chat_line("a")], key=KEY_A)).id)
    for rpc, call in _every_rpc(c, mine.id).items():
        if rpc in ("CreateBatch", "ListBatches"):
            continue
        theirs: WireError = await expect_error(call(md(KEY_B)), grpc.StatusCode.NOT_FOUND)
        unknown = await expect_error(_every_rpc(c, "batch_0000")[rpc](md(KEY_B)), grpc.StatusCode.NOT_FOUND)
        # indistinguishable from a batch that does not exist
        assert theirs.envelope == {**unknown.envelope, "message": theirs.envelope["message"]}, rpc
        assert theirs.envelope["code"] == "batch_not_found"
    listed = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md(KEY_B))
    assert not listed.data
    await expect_error(c.stub.ListBatches(batch_pb2.ListBatchesRequest(after=mine.id), metadata=md(KEY_B)),
                       grpc.StatusCode.NOT_FOUND)
    # B's failed cancel changed nothing for A.
    still = await c.get(mine.id)
    assert still.status == "completed" and not still.HasField("cancelling_at")
    assert [b.id for b in (await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md())).data] == [mine.id]


async def test_cancel_in_flight_batch_of_another_project_is_not_found(slow: tuple[App, Client]) -> None:
    _, c = slow
    mine = await c.create([chat_line(f"l{i}") for i in range(10)])
    await expect_error(c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=mine.id), metadata=md(KEY_B)),
                       grpc.StatusCode.NOT_FOUND)
    assert (await c.get(mine.id)).status in {"validating", "in_progress"}
    await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=mine.id), metadata=md())  # let it end quickly
    assert (await c.wait_for(mine.id, timeout=15)).status == "cancelled"


# --------------------------------------------------------------------------- health, reflection


async def test_health_and_reflection(gw: tuple[App, Client]) -> None:
    _, c = gw
    health = health_pb2_grpc.HealthStub(c.channel)
    for service in ("", "sluice.v1.BatchService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    reflection = reflection_pb2_grpc.ServerReflectionStub(c.channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = await call.read()
    names = {s.name for s in listed.list_services_response.service}
    assert {"sluice.v1.BatchService", "grpc.health.v1.Health"} <= names
    await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="sluice.v1.BatchService"))
    found = await call.read()
    assert found.file_descriptor_response.file_descriptor_proto
    await call.done_writing()

