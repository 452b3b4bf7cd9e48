"""WatchBatch: the batch at once, then every status change and its progress, until it ends.

Over gRPC, and as Server-Sent Events through a real Envoy (`GET /v1/batches/{id}/events`), both
reading the same batch; on two replicas sharing PostgreSQL, a stream served by one replica
follows a batch the other one drives.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format

from service.domain.events import statuses_between
from service.domain.model import TRANSITIONS, BatchStatus, can_transition
from service.edge.watch import as_of
from service.runtime.server import start
from sluice.v1 import batch_pb2, batch_pb2_grpc
from tests.e2e import KEY_A, Stack, start_stack
from tests.harness import KEY_B, Client, chat_line, client, gateway, make_settings, md

S = BatchStatus


# --------------------------------------------------------------------------- the status path


def test_statuses_between_rebuilds_what_a_poll_missed() -> None:
    assert statuses_between(S.IN_PROGRESS, S.COMPLETED, {S.VALIDATING, S.IN_PROGRESS, S.FINALIZING}) == [
        S.FINALIZING, S.COMPLETED]
    assert statuses_between(S.VALIDATING, S.COMPLETED, {S.VALIDATING, S.IN_PROGRESS, S.FINALIZING}) == [
        S.IN_PROGRESS, S.FINALIZING, S.COMPLETED]
    assert statuses_between(S.IN_PROGRESS, S.CANCELLED, {S.VALIDATING, S.IN_PROGRESS, S.CANCELLING}) == [
        S.CANCELLING, S.CANCELLED]
    assert statuses_between(S.VALIDATING, S.FAILED, {S.VALIDATING}) == [S.FAILED]
    assert statuses_between(S.IN_PROGRESS, S.EXPIRED, {S.VALIDATING, S.IN_PROGRESS}) == [S.EXPIRED]
    assert statuses_between(S.COMPLETED, S.COMPLETED, set(S)) == []


def test_every_rebuilt_path_is_legal() -> None:
    """For any two statuses and any set of stamps, the path is a chain of legal transitions
    ending at the current status."""
    for previous in S:
        for current in S:
            if previous == current or previous.terminal:
                continue
            for mask in range(16):
                visited = {s for i, s in enumerate((S.IN_PROGRESS, S.FINALIZING, S.CANCELLING, S.VALIDATING))
                           if mask >> i & 1}
                path = statuses_between(previous, current, visited)
                assert path[-1] == current
                if can_transition(previous, path[0]):
                    assert all(can_transition(a, b) for a, b in itertools.pairwise(path))
                else:
                    assert path == [current]  # the stamps did not describe a path: no invention
    assert set(TRANSITIONS) == set(S)


def test_as_of_hides_what_came_later() -> None:
    done = batch_pb2.Batch(id="b", status="completed", in_progress_at=10, finalizing_at=20, completed_at=21,
                           output_file_id="file-output-b", merged_output_file_id="file-merged-b",
                           request_counts=batch_pb2.BatchRequestCounts(total=2))
    finalizing = as_of(done, S.FINALIZING)
    assert finalizing.status == "finalizing"
    assert finalizing.in_progress_at == 10 and finalizing.finalizing_at == 20
    assert not finalizing.HasField("completed_at") and not finalizing.HasField("output_file_id")
    assert not finalizing.HasField("merged_output_file_id")  # a retry's merged file is written as it ends
    assert finalizing.request_counts.total == 2 and done.status == "completed"  # a copy


# --------------------------------------------------------------------------- over gRPC


async def collect(stub: batch_pb2_grpc.BatchServiceStub, batch_id: str,
                  key: str = KEY_A) -> list[batch_pb2.WatchBatchResponse]:
    events = []
    async for event in stub.WatchBatch(batch_pb2.WatchBatchRequest(id=batch_id), metadata=md(key)):
        events.append(event)
    return events


def statuses(events: list[Any]) -> list[str]:
    """The status of each event, consecutive repeats collapsed."""
    out: list[str] = []
    for status in (e.batch.status if hasattr(e, "batch") else e["batch"]["status"] for e in events):
        if not out or out[-1] != status:
            out.append(status)
    return out


def check_life(events: list[batch_pb2.WatchBatchResponse], final: str = "completed") -> None:
    """A snapshot, then status/progress events along legal transitions, ending at `final`."""
    assert events[0].type == "snapshot" and all(e.type in ("status", "progress") for e in events[1:])
    seen = statuses(events)
    assert all(can_transition(S(a), S(b)) for a, b in itertools.pairwise(seen)), seen
    assert seen[-1] == final and events[-1].type == "status"
    for before, after in itertools.pairwise(events):
        assert (after.type == "status") == (after.batch.status != before.batch.status)
        done = [e.batch.request_counts.completed + e.batch.request_counts.failed for e in (before, after)]
        assert done[1] >= done[0]
        assert after.batch != before.batch  # nothing is sent twice


async def test_a_stream_follows_a_batch_to_its_end(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, sim_latency_ms=40, executor_concurrency=2)
    async with gateway(settings) as (_, c):
        batch = await c.create([chat_line(f"r{i}") for i in range(60)])
        started = time.monotonic()
        events = await collect(c.stub, batch.id)
        took = time.monotonic() - started
        check_life(events)
        assert "finalizing" in statuses(events)  # however short, a status is never skipped
        assert statuses(events)[-3:] == ["in_progress", "finalizing", "completed"]
        progress = [e for e in events if e.type == "progress"]
        assert progress, "no progress events for a batch that ran over a second"
        assert len(progress) <= took / settings.watch_poll_seconds + 1  # throttled by the poll
        last = events[-1].batch
        assert last.request_counts.completed == 60 and last.usage.total_tokens > 0 and last.usage.total_cost >= 0
        assert last.output_file_id and last.completed_at
        assert last == await c.get(batch.id)

        # Reconnecting after the end: the current state first (and only).
        again = await collect(c.stub, batch.id)
        assert [(e.type, e.batch.status) for e in again] == [("snapshot", "completed")]


async def test_a_cancelled_batch_ends_its_stream(sqlite_url: str) -> None:
    async with gateway(make_settings(sqlite_url, sim_latency_ms=100, executor_concurrency=1)) as (_, c):
        batch = await c.create([chat_line(f"r{i}") for i in range(100)])
        watching = asyncio.create_task(collect(c.stub, batch.id))
        await c.wait_until(batch.id, lambda b: b.request_counts.completed >= 2)
        await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=batch.id), metadata=md())
        events = await asyncio.wait_for(watching, 30)
    check_life(events, "cancelled")
    assert statuses(events)[-2:] == ["cancelling", "cancelled"]


async def test_another_projects_batch_is_not_found_before_any_event(sluice: Client) -> None:
    batch = await sluice.create([chat_line("x")])
    for key, batch_id in ((KEY_B, batch.id), (KEY_A, "batch_missing")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(sluice.stub, batch_id, key)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_open_streams_do_not_hold_up_a_shutdown(sqlite_url: str) -> None:
    app = await start(make_settings(sqlite_url, sim_latency_ms=200, executor_concurrency=1))
    try:
        async with client(app.port) as c:
            batch = await c.create([chat_line(f"r{i}") for i in range(100)])
            stream = c.stub.WatchBatch(batch_pb2.WatchBatchRequest(id=batch.id), metadata=md())
            assert (await stream.read()).type == "snapshot"
            started = time.monotonic()
            await app.stop(grace=10)
            assert time.monotonic() - started < 5, "an open watch stream held the shutdown for its grace period"
            rest = []
            with contextlib.suppress(grpc.aio.AioRpcError):
                while (event := await stream.read()) is not grpc.aio.EOF:
                    rest.append(event)
            assert all(not S(e.batch.status).terminal for e in rest)  # ended early: the client reconnects
    finally:
        await app.stop(grace=0)


async def test_two_replicas_stream_batches_the_other_one_drives(postgres_url: str) -> None:
    """Replica A serves the API only (SLUICE_RUN_ENGINE=false); replica B drives every batch.
    Streams on A follow B's work through the database, and say the same as streams on B."""
    api_only = make_settings(postgres_url, run_engine=False, replica_id="api-only")
    worker = make_settings(postgres_url, sim_latency_ms=30, executor_concurrency=2, replica_id="worker")
    async with gateway(api_only) as (_, a), gateway(worker) as (_, b):
        created = [await a.create([chat_line(f"a{i}") for i in range(40)]),
                   await b.create([chat_line(f"b{i}") for i in range(40)])]
        results = await asyncio.gather(*(collect(c.stub, batch.id) for batch in created for c in (a, b)))
        for events in results:
            check_life(events)
        for on_a, on_b in (results[0:2], results[2:4]):
            assert statuses(on_a)[-3:] == statuses(on_b)[-3:] == ["in_progress", "finalizing", "completed"]
            assert on_a[-1].batch == on_b[-1].batch


# --------------------------------------------------------------------------- SSE through Envoy


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse `data:` frames (blank-line separated) as they arrive."""
    data: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


@pytest.fixture(scope="module")
def slow_sim_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("watch-stack")
    with start_stack(work, f"sqlite+aiosqlite:///{work}/sluice.db", SLUICE_SIM_LATENCY_MS="40",
                     SLUICE_EXECUTOR_CONCURRENCY="2") as stack:
        yield stack


async def test_sse_through_envoy_and_grpc_see_the_same_batch(slow_sim_stack: Stack) -> None:
    stack = slow_sim_stack
    async with client(stack.grpc_port) as c:
        batch = await c.create([chat_line(f"q{i}") for i in range(60)])
        await c.wait_until(batch.id, lambda b: b.status == "in_progress")
        via_grpc = asyncio.create_task(collect(c.stub, batch.id))

        def read_sse() -> tuple[httpx.Response, list[dict[str, Any]]]:
            with stack.http().stream("GET", f"/v1/batches/{batch.id}/events") as response:
                return response, list(sse_events(response))

        response, via_sse = await asyncio.to_thread(read_sse)
        from_grpc = await via_grpc
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert not any(h.startswith("grpc-") for h in response.headers)
    # From in_progress to completed, with progress between, as over gRPC.
    assert via_sse[0]["type"] == "snapshot" and via_sse[0]["batch"]["status"] == "in_progress"
    assert statuses(via_sse) == statuses(from_grpc) == ["in_progress", "finalizing", "completed"]
    assert any(e["type"] == "progress" for e in via_sse)
    # The JSON is the REST Batch (OpenAI's field names, integer times and counts) ...
    last = via_sse[-1]["batch"]
    assert last["object"] == "batch" and last["request_counts"] == {"total": 60, "completed": 60, "failed": 0}
    assert isinstance(last["completed_at"], int) and isinstance(last["usage"]["total_tokens"], int)
    # ... and says what the gRPC stream's last message says.
    expected = json_format.MessageToDict(from_grpc[-1].batch, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    assert last == expected


def test_sse_errors_before_the_stream_are_openai_envelopes(slow_sim_stack: Stack) -> None:
    http = slow_sim_stack.http(KEY_B)
    response = http.get("/v1/batches/batch_missing/events")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["type"] == "not_found_error"
    assert slow_sim_stack.http(None).get("/v1/batches/batch_missing/events").status_code == 401
