"""RetryBatch over gRPC (in-process server, real grpc.aio): only the lines that did not succeed run
again, in a new batch linked both ways; the chain's latest outcome per line reads in one paginated
call and as one merged output file; every attempt of a line stays readable."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf import struct_pb2

from adapters.base import LineResult, RequestLine
from adapters.sim import SimProvider
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from sluice.v1 import batch_pb2, file_pb2, file_pb2_grpc
from tests.harness import Client, chat_line, gateway, make_settings, md
from tests.rpc_errors import expect_error

FLAKY = "FLAKY"


class FailsOnce(SimProvider):
    """The sim, except that a request whose text says FLAKY fails the first time its line runs."""

    def __init__(self, name: str = SIM, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.runs: dict[str, int] = {}

    async def execute(self, line: RequestLine) -> LineResult:
        self.runs[line.custom_id] = self.runs.get(line.custom_id, 0) + 1
        if FLAKY in json.dumps(line.body) and self.runs[line.custom_id] == 1:
            return LineResult(index=line.index, status_code=503, body={"error": {
                "message": "try again", "type": "server_error", "param": None, "code": "overloaded"}})
        return await super().execute(line)


def router(latency_ms: float = 0) -> tuple[Router, FailsOnce]:
    sim = FailsOnce(options={"latency_ms": latency_ms, "concurrency": 4})
    return Router({SIM: ProviderEntry(provider=sim, default_price=DEFAULT_SIM_PRICE)}), sim


async def retry(c: Client, batch_id: str, **fields: Any) -> batch_pb2.Batch:
    batch: batch_pb2.Batch = await c.stub.RetryBatch(batch_pb2.RetryBatchRequest(id=batch_id, **fields),
                                                     metadata=md())
    return batch


async def across(c: Client, batch_id: str, limit: int = 2) -> list[batch_pb2.BatchResult]:
    out: list[batch_pb2.BatchResult] = []
    after = ""
    while True:
        page = await c.stub.ListBatchResults(batch_pb2.ListBatchResultsRequest(
            id=batch_id, limit=limit, after=after, across_retries=True), metadata=md())
        out.extend(page.data)
        if not page.has_more:
            return out
        after = page.next_cursor


async def file_lines(c: Client, file_id: str) -> list[dict[str, Any]]:
    files = file_pb2_grpc.FileServiceStub(c.channel)
    data = b"".join([m.data async for m in files.GetFileContent(file_pb2.GetFileContentRequest(id=file_id),
                                                                metadata=md())])
    return [json.loads(line) for line in data.splitlines()]


async def test_failed_lines_are_retried_into_a_linked_batch_and_merged(db_url: str) -> None:
    r, sim = router()
    ids = ["a", "b-flaky", "c", "d-flaky", "e"]
    async with gateway(make_settings(db_url), r) as (_, c):
        first = await c.wait_for((await c.create(
            [chat_line(cid, f"{FLAKY} {cid}" if "flaky" in cid else f"question {cid}") for cid in ids])).id)
        assert first.status == "completed" and (first.request_counts.completed, first.request_counts.failed) == (3, 2)

        second = await retry(c, first.id)
        assert second.retry_of == first.id and second.request_counts.total == 2 and second.id != first.id
        assert list((await c.get(first.id)).retries) == [second.id]
        second = await c.wait_for(second.id)
        assert second.status == "completed" and second.request_counts.completed == 2
        assert sim.runs == {"a": 1, "b-flaky": 2, "c": 1, "d-flaky": 2, "e": 1}  # only the failed lines ran again

        # The retry's own results: just its lines, as their second attempt.
        own = await c.results(second.id)
        assert [(x.custom_id, x.attempt, x.batch_id) for x in own] == [("b-flaky", 2, second.id),
                                                                      ("d-flaky", 2, second.id)]
        # The whole chain, paged, from either end of it: every line once, its latest attempt.
        for start in (first.id, second.id):
            merged = await across(c, start)
            assert [x.custom_id for x in merged] == ids
            assert {x.status for x in merged} == {"completed"}
            assert [(x.batch_id, x.attempt) for x in merged] == [
                (first.id, 1), (second.id, 2), (first.id, 1), (second.id, 2), (first.id, 1)]
        # The attempt history of a retried line.
        history = await c.stub.ListResultAttempts(batch_pb2.ListResultAttemptsRequest(
            batch_id=second.id, custom_id="b-flaky"), metadata=md())
        assert [(x.batch_id, x.attempt, x.status, x.status_code) for x in history.data] == [
            (first.id, 1, "failed", 503), (second.id, 2, "completed", 200)]
        assert history.data[0].error.code == "overloaded"
        one = await c.stub.GetBatchResult(batch_pb2.GetBatchResultRequest(batch_id=second.id, custom_id="d-flaky"),
                                          metadata=md())
        assert one.attempt == 2 and one.status == "completed"

        # One merged output file of the latest attempts, in the first batch's order; no error file.
        assert second.merged_output_file_id and not second.HasField("merged_error_file_id")
        merged_file = await file_lines(c, second.merged_output_file_id)
        assert [line["custom_id"] for line in merged_file] == ids
        assert all(line["response"]["status_code"] == 200 for line in merged_file)
        assert [line["custom_id"] for line in await file_lines(c, second.output_file_id)] == ["b-flaky", "d-flaky"]
        assert not first.HasField("merged_output_file_id")

        # Nothing left to retry by default; an explicit custom_id runs again whatever its outcome.
        err = await expect_error(retry(c, second.id), grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["code"] == "nothing_to_retry"
        third = await c.wait_for((await retry(c, second.id, custom_ids=["b-flaky"])).id)
        assert third.retry_of == second.id and third.request_counts.total == 1
        history = await c.stub.ListResultAttempts(batch_pb2.ListResultAttemptsRequest(
            batch_id=first.id, custom_id="b-flaky"), metadata=md())
        assert [x.attempt for x in history.data] == [1, 2, 3] and history.data[-1].batch_id == third.id
        # The third batch's own results say the same (they were numbered 2 before a fix).
        assert [(x.custom_id, x.attempt) for x in await c.results(third.id)] == [("b-flaky", 3)]
        one = await c.stub.GetBatchResult(batch_pb2.GetBatchResultRequest(batch_id=third.id, custom_id="b-flaky"),
                                          metadata=md())
        assert one.attempt == 3
        assert [x.batch_id for x in await across(c, first.id, limit=100)][1] == third.id
        assert list((await c.get(second.id)).retries) == [third.id]


async def test_retry_choices_and_refusals(sqlite_url: str) -> None:
    r, _ = router()
    async with gateway(make_settings(sqlite_url), r) as (app, c):
        done = await c.wait_for((await c.create([chat_line("ok"), chat_line("bad", FLAKY)])).id)
        for fields, code, param in (
                ({"outcomes": ["completed"]}, "invalid_outcome", "outcomes[0]"),
                ({"custom_ids": ["ok", "nope"]}, "result_not_found", "custom_ids[1]"),
                ({"custom_ids": ["ok"], "outcomes": ["failed"]}, "conflicting_parameters", "custom_ids"),
                ({"outcomes": ["cancelled"]}, "nothing_to_retry", "outcomes"),
                ({"model": "gpt-4o-mini"}, "model_not_found", "model")):
            if code == "model_not_found":
                app.router.entries["openai"] = ProviderEntry(provider=SimProvider("openai"), models={"other"})
            err = await expect_error(retry(c, done.id, **fields), grpc.StatusCode.INVALID_ARGUMENT)
            assert (err.envelope["code"], err.envelope["param"]) == (code, param), err.envelope
            app.router.entries.pop("openai", None)
        err = await expect_error(retry(c, "batch_nope"), grpc.StatusCode.NOT_FOUND)
        assert err.envelope["code"] == "batch_not_found"
        err = await expect_error(c.stub.RetryBatch(batch_pb2.RetryBatchRequest(id=done.id), metadata=md("sk-x")),
                                 grpc.StatusCode.UNAUTHENTICATED)
        # Another model for the retried lines; metadata carried over unless given.
        meta = struct_pb2.Struct()
        meta.update({"run": "2"})
        again = await c.wait_for((await retry(c, done.id, model="sim/bigger", metadata=meta)).id)
        assert again.model == "sim/bigger" and dict(again.metadata) == {"run": "2"}
        (result,) = await c.results(again.id)
        assert result.model == "sim/bigger" and result.response["model"] == "bigger"

        await app.engine.stop()  # a batch that has not ended cannot be retried
        running = await c.create([chat_line("x")])
        err = await expect_error(retry(c, running.id), grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["code"] == "batch_not_ended"


async def test_cancelled_lines_can_be_retried(sqlite_url: str) -> None:
    r, _ = router(latency_ms=40)
    async with gateway(make_settings(sqlite_url), r) as (_, c):
        created = await c.create([chat_line(f"r{i}") for i in range(300)])  # 3 s of work: cancelled midway
        await c.wait_until(created.id, lambda b: b.request_counts.completed >= 4)
        await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
        cancelled = await c.wait_for(created.id)
        assert cancelled.status == "cancelled"
        left = 300 - cancelled.request_counts.completed
        assert left > 0
        err = await expect_error(retry(c, created.id), grpc.StatusCode.INVALID_ARGUMENT)  # default: failed, expired
        assert err.envelope["code"] == "nothing_to_retry"
        again = await c.wait_for((await retry(c, created.id, outcomes=["cancelled"])).id)
        assert again.status == "completed" and again.request_counts.completed == left
        merged = await across(c, created.id, limit=1000)
        assert len(merged) == 300 and {x.status for x in merged} == {"completed"}
        assert len(await file_lines(c, again.merged_output_file_id)) == 300
