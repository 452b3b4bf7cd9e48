"""Webhooks: a batch that ends leaves exactly one signed event for each subscribed endpoint.

Proof from outside: a real receiver on loopback verifies every request with the
`standardwebhooks` package; it answers 500 twice before accepting, and a server restart between
the batch ending and the delivery loses nothing. The outbox is written in the transaction that
ends the batch (store tests on SQLite and PostgreSQL), deliveries are shared by replicas without
duplicates, and non-public destinations are refused before any connection is made.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from service.domain.events import ALL_WEBHOOK_EVENT_TYPES, TERMINAL_WEBHOOK_EVENT_TYPES, thresholds_passed
from service.domain.model import BatchStatus, LineOutcome, ResultStatus, now
from service.engine.webhooks import (
    DestinationPolicy,
    DestinationRefused,
    WebhookConfigError,
    parse_webhooks,
    retry_delay,
)
from service.runtime.client_cli import upload_messages
from service.runtime.server import start
from service.storage.repository import Store
from service.storage.tables import WebhookDeliveryRow, WebhookEventRow
from service.storage.webhooks import EndpointSpec, WebhookStore, event_id_for
from sluice.v1 import batch_pb2, file_pb2_grpc, webhook_pb2, webhook_pb2_grpc
from tests.e2e import start_stack
from tests.harness import (
    KEY_A,
    KEY_B,
    Client,
    ServerProcess,
    chat_line,
    client,
    gateway,
    make_settings,
    md,
    move_expiry,
    until,
)
from tests.test_store import batch_row, requests
from tests.webhook_receiver import WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"sluice-test-secret-0123456789abcd").decode()
FAST = {"first_retry_seconds": 0.05, "max_retry_seconds": 0.2, "poll_seconds": 0.05}
LOOPBACK = ["127.0.0.0/8", "::1/128"]


def write_config(path: Path, endpoints: list[dict[str, Any]], allow: list[str] | None = None,
                 **delivery: float) -> Path:
    path.write_text(yaml.safe_dump({"webhooks": endpoints, "allow_networks": LOOPBACK if allow is None else allow,
                                    "delivery": {**FAST, **delivery}}))
    return path


def endpoint(url: str, endpoint_id: str = "receiver", project: str = "alpha", **extra: Any) -> dict[str, Any]:
    return {"id": endpoint_id, "project": project, "url": url, "secret": SECRET, **extra}


async def deliveries(c: Client, endpoint_id: str, key: str = KEY_A) -> list[webhook_pb2.WebhookDelivery]:
    stub = webhook_pb2_grpc.WebhookServiceStub(c.channel)
    page = await stub.ListWebhookDeliveries(webhook_pb2.ListWebhookDeliveriesRequest(endpoint_id=endpoint_id),
                                            metadata=md(key))
    return list(page.data)


def accepted(rx: WebhookReceiver, count: int = 1) -> Callable[[], Awaitable[bool]]:
    """For `until`: the receiver has accepted at least `count` events."""
    async def check() -> bool:
        return len(rx.accepted()) >= count
    return check


def check_event(rx: WebhookReceiver, batch_id: str, event_type: str) -> Any:
    """Exactly one verified, accepted event for the batch, in OpenAI's shape; every request for
    it (retries included) carried the same webhook-id and the same body."""
    accepted = [d for d in rx.accepted() if d.payload and d.payload["data"]["id"] == batch_id]
    assert len(accepted) == 1, f"{len(accepted)} accepted events for {batch_id}"
    event = accepted[0]
    payload = event.payload
    assert payload is not None
    assert set(payload) == {"id", "object", "type", "created_at", "data"}
    assert payload["object"] == "event" and payload["type"] == event_type
    assert payload["id"] == event.webhook_id and payload["id"].startswith("evt_")
    assert isinstance(payload["created_at"], int) and abs(payload["created_at"] - now()) < 300
    assert payload["data"] == {"id": batch_id}
    attempts = rx.of(event.webhook_id)
    assert all(a.verified and a.body == event.body for a in attempts)
    return event


# --------------------------------------------------------------------------- configuration


def test_config_rejects_what_it_cannot_use() -> None:
    good = {"id": "ops", "url": "https://hooks.example.com/x"}
    config = parse_webhooks({"webhooks": [good]}, {})
    (spec,) = config.endpoints
    assert spec == EndpointSpec("ops", "default", "https://hooks.example.com/x", TERMINAL_WEBHOOK_EVENT_TYPES, None)
    cases: list[tuple[Any, str]] = [
        ({"webhooks": [{**good, "url": "ftp://x"}]}, "url must be an http"),
        ({"webhooks": [{**good, "id": "has space"}]}, "id must be"),
        ({"webhooks": [good, good]}, "used twice"),
        ({"webhooks": [{**good, "events": ["batch.done"]}]}, "events must be"),
        ({"webhooks": [{**good, "secret": "whsec_c2hvcnQ="}]}, "at least 24 bytes"),
        ({"webhooks": [{**good, "secret_env": "NOT_SET_ANYWHERE"}]}, "NOT_SET_ANYWHERE, which is not set"),
        ({"webhooks": [{**good, "colour": "red"}]}, "unknown keys"),
        ({"webhooks": [{**good, "progress_thresholds": [0, 50]}]}, "whole percents from 1 to 99"),
        ({"webhooks": [{**good, "progress_thresholds": [100]}]}, "whole percents from 1 to 99"),
        ({"webhooks": [{**good, "progress_thresholds": [12.5]}]}, "whole percents from 1 to 99"),
        ({"webhooks": [{**good, "progress_thresholds": []}]}, "whole percents from 1 to 99"),
        ({"webhooks": [{**good, "events": ["batch.completed"], "progress_thresholds": [50]}]},
         "does not list batch.progress"),
        ({"webhooks": [good], "allow_networks": ["localhost"]}, "is not a network"),
        ({"webhooks": [good], "delivery": {"poll_seconds": -1}}, "positive number"),
        # Literal non-public addresses are refused at start-up: no attempt could ever succeed.
        ({"webhooks": [{**good, "url": "http://10.1.2.3/hook"}]}, "10.1.2.3 is a private address"),
        ({"webhooks": [{**good, "url": "http://169.254.169.254/latest"}]}, "link-local address"),
        ({"webhooks": [{**good, "url": "http://127.0.0.1:9/x"}]}, "loopback address"),
    ]
    for raw, message in cases:
        with pytest.raises(WebhookConfigError, match=message):
            parse_webhooks(raw, {})
    secret_from_env = parse_webhooks({"webhooks": [{**good, "secret_env": "HOOK_SECRET"}]}, {"HOOK_SECRET": SECRET})
    assert secret_from_env.endpoints[0].secret == SECRET
    allowed = parse_webhooks({"webhooks": [{**good, "url": "http://127.0.0.1:9/x"}], "allow_networks": LOOPBACK}, {})
    assert allowed.endpoints[0].url == "http://127.0.0.1:9/x"


def test_progress_thresholds_in_the_config() -> None:
    good = {"id": "ops", "url": "https://hooks.example.com/x"}
    (spec,) = parse_webhooks({"webhooks": [{**good, "progress_thresholds": [75, 25, 25]}]}, {}).endpoints
    assert spec.event_types == (*TERMINAL_WEBHOOK_EVENT_TYPES, "batch.progress")  # thresholds ask for the event
    assert spec.progress_thresholds == (25, 75)
    (spec,) = parse_webhooks({"webhooks": [{**good, "events": ["batch.progress"]}]}, {}).endpoints
    assert spec.event_types == ("batch.progress",) and spec.progress_thresholds == (25, 50, 75)  # the default
    (spec,) = parse_webhooks({"webhooks": [good]}, {}).endpoints
    assert "batch.progress" not in spec.event_types and spec.progress_thresholds == ()


@given(total=st.integers(1, 500), steps=st.lists(st.integers(0, 60), max_size=40),
       thresholds=st.sets(st.integers(1, 99), min_size=1, max_size=6))
def test_each_threshold_is_passed_exactly_once(total: int, steps: list[int], thresholds: set[int]) -> None:
    """However the ended lines grow (one result at a time, pages, a native batch's counts jumping),
    the thresholds passed on the way are each reported once, in order, and only once reached."""
    ended, seen = 0, []
    for step in steps:
        after = min(total, ended + step)
        seen += thresholds_passed(ended, after, total, thresholds)
        ended = after
    assert seen == sorted(t for t in thresholds if t * total <= ended * 100)
    assert thresholds_passed(ended, ended, total, thresholds) == []


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "127.0.0.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1",
                                     "224.0.0.1"])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert DestinationPolicy().refusal(ipaddress.ip_address(address)) is not None
    wide = DestinationPolicy((ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))
    assert wide.refusal(ipaddress.ip_address(address)) is None  # allow_networks lets them through


@pytest.mark.parametrize("address", ["8.8.8.8", "2001:4860:4860::8888"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert DestinationPolicy().refusal(ipaddress.ip_address(address)) is None


async def test_a_name_that_resolves_to_loopback_is_refused() -> None:
    """The check runs on the resolved addresses, so a friendly name cannot smuggle in a private
    one; the connection then goes to the checked address, with the name as Host."""
    with pytest.raises(DestinationRefused, match=r"localhost resolves to .*a loopback address"):
        await DestinationPolicy().target("http://localhost:8123/hook")
    target = await DestinationPolicy((ipaddress.ip_network("127.0.0.0/8"),)).target("http://127.0.0.1:8123/h?x=1")
    assert str(target.url) == "http://127.0.0.1:8123/h?x=1" and target.headers == {"host": "127.0.0.1:8123"}


def test_retry_delays_grow_with_jitter_and_a_cap() -> None:
    config = parse_webhooks({"webhooks": []}, {}).delivery
    for attempt, base in ((1, 5), (2, 10), (3, 20), (12, 3600), (30, 3600)):
        delays = {retry_delay(attempt, config) for _ in range(50)}
        assert all(base / 2 <= d <= base for d in delays) and len(delays) > 1


# --------------------------------------------------------------------------- the outbox


async def outbox(store: Store, batch_id: str) -> tuple[list[WebhookEventRow], list[WebhookDeliveryRow]]:
    async with store.sessions() as s:
        events = list((await s.scalars(select(WebhookEventRow).where(WebhookEventRow.batch_id == batch_id))).all())
        rows = list((await s.scalars(select(WebhookDeliveryRow).where(
            WebhookDeliveryRow.event_id.in_([e.id for e in events])))).all())
    return events, rows


async def test_the_transaction_that_ends_a_batch_writes_its_event(store: Store) -> None:
    hooks = WebhookStore(store.engine)
    await hooks.sync_endpoints([
        EndpointSpec("all", "alpha", "https://a.example/h", ALL_WEBHOOK_EVENT_TYPES, SECRET),
        EndpointSpec("done-only", "alpha", "https://b.example/h", ("batch.completed",), SECRET),
        EndpointSpec("other-project", "beta", "https://c.example/h", ALL_WEBHOOK_EVENT_TYPES, SECRET),
    ], lambda: SECRET)

    batch = await store.create_batch(batch_row(), requests(2))
    assert await store.transition(batch.id, BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
    assert await store.transition(batch.id, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING)
    assert await outbox(store, batch.id) == ([], [])  # nothing for non-terminal moves
    assert not await store.transition(batch.id, BatchStatus.IN_PROGRESS, BatchStatus.FAILED)  # lost the CAS
    assert await outbox(store, batch.id) == ([], [])
    assert await store.transition(batch.id, BatchStatus.FINALIZING, BatchStatus.COMPLETED)
    (event,), rows = await outbox(store, batch.id)
    assert (event.id, event.type, event.project) == (event_id_for(batch.id), "batch.completed", "alpha")
    assert sorted(r.endpoint_id for r in rows) == ["all", "done-only"]
    assert all(r.status == "pending" and r.attempts == 0 for r in rows)

    cancelled = await store.create_batch(batch_row(), requests(1))
    await store.request_cancel("alpha", cancelled.id)
    assert await store.transition(cancelled.id, BatchStatus.CANCELLING, BatchStatus.CANCELLED)
    (event,), rows = await outbox(store, cancelled.id)
    assert event.type == "batch.cancelled" and [r.endpoint_id for r in rows] == ["all"]

    # A batch that fails its input checks is created `failed`: its event comes with it.
    failed = await store.create_batch(batch_row(status="failed", failed_at=now()), [])
    (event,), _ = await outbox(store, failed.id)
    assert event.type == "batch.failed"


async def test_progress_events_are_written_with_the_counts_that_pass_a_threshold(store: Store) -> None:
    """Executor batches: in the transaction that stores results. Native batches: in the one that
    records the provider's counts, read again or not. Only endpoints that asked get them."""
    hooks = WebhookStore(store.engine)
    await hooks.sync_endpoints([
        EndpointSpec("halves", "alpha", "https://a.example/h", ("batch.progress",), SECRET, (50,)),
        EndpointSpec("quarters", "alpha", "https://b.example/h", ALL_WEBHOOK_EVENT_TYPES, SECRET, (25, 50, 75)),
        EndpointSpec("ends-only", "alpha", "https://c.example/h", TERMINAL_WEBHOOK_EVENT_TYPES, SECRET),
    ], lambda: SECRET)

    def progress(rows: tuple[list[WebhookEventRow], list[WebhookDeliveryRow]]) -> dict[int | None, list[str]]:
        events, deliveries = rows
        by_event = {e.id: e.progress for e in events}
        found: dict[int | None, list[str]] = {}
        for d in deliveries:
            found.setdefault(by_event[d.event_id], []).append(d.endpoint_id)
        return {k: sorted(v) for k, v in found.items()}

    batch = await store.create_batch(batch_row(), requests(4))
    await store.store_results(batch.id, [LineOutcome(0, "r0", ResultStatus.COMPLETED, 200, {})])
    assert progress(await outbox(store, batch.id)) == {25: ["quarters"]}
    await store.store_results(batch.id, [LineOutcome(0, "r0", ResultStatus.COMPLETED, 200, {})])  # stored already
    await store.store_results(batch.id, [LineOutcome(i, f"r{i}", ResultStatus.FAILED, 500, {}) for i in (1, 2)])
    assert progress(await outbox(store, batch.id)) == {25: ["quarters"], 50: ["halves", "quarters"],
                                                       75: ["quarters"]}
    events, _ = await outbox(store, batch.id)
    assert {e.id for e in events} == {f"{event_id_for(batch.id)}_p{t}" for t in (25, 50, 75)}
    assert all(e.type == "batch.progress" for e in events)

    native = await store.create_batch(batch_row(), requests(4))
    await store.record_provider_batch_id(native.id, 0, "pb-1")
    await store.record_provider_status(native.id, 0, "in_progress", 0, 0)
    assert await outbox(store, native.id) == ([], [])
    await store.record_provider_status(native.id, 0, "in_progress", 2, 0)
    await store.record_provider_status(native.id, 0, "in_progress", 2, 0)  # the same counts, polled again
    assert progress(await outbox(store, native.id)) == {25: ["quarters"], 50: ["halves", "quarters"]}
    # Its results, stored when the provider's batch ended: thresholds already sent are not sent again.
    await store.store_results(native.id, [LineOutcome(i, f"r{i}", ResultStatus.COMPLETED, 200, {}) for i in range(4)],
                              part_no=0)
    assert progress(await outbox(store, native.id)) == {25: ["quarters"], 50: ["halves", "quarters"],
                                                        75: ["quarters"]}


async def test_no_event_without_the_status_and_no_status_without_the_event(store: Store) -> None:
    """If the outbox insert fails, the batch does not move: one transaction."""
    batch = await store.create_batch(batch_row(status="in_progress", in_progress_at=now()), requests(1))
    async with store.sessions.begin() as s:  # an event already there makes the insert conflict
        s.add(WebhookEventRow(id=event_id_for(batch.id), project="alpha", type="x", batch_id=batch.id,
                              created_at=now()))
    with pytest.raises(IntegrityError):
        await store.transition(batch.id, BatchStatus.IN_PROGRESS, BatchStatus.EXPIRED)
    assert (await store.engine_batch(batch.id)).status == "in_progress"


# --------------------------------------------------------------------------- end to end


async def upload(c: Client, path: Path, key: str = KEY_A) -> str:
    stub = file_pb2_grpc.FileServiceStub(c.channel)
    uploaded = await stub.UploadFile(upload_messages(path), metadata=md(key))
    return str(uploaded.id)


async def test_each_ending_gives_one_verified_event_after_two_500s(tmp_path: Path, sqlite_url: str) -> None:
    with WebhookReceiver(SECRET, fail_first=2) as rx:
        config = write_config(tmp_path / "webhooks.yaml", [endpoint(rx.url)])
        settings = make_settings(sqlite_url, webhooks_file=config, sim_latency_ms=100, executor_concurrency=1)
        async with gateway(settings) as (app, c):
            done = await c.create([chat_line(f"c{i}") for i in range(2)])

            # Fails at creation: every line targets another endpoint than the batch.
            bad = tmp_path / "bad.jsonl"
            bad.write_text("\n".join(json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                                 "body": {"model": "sim/e", "input": "x"}}) for i in range(2)))
            failed = await c.stub.CreateBatch(batch_pb2.CreateBatchRequest(
                input_file_id=await upload(c, bad), endpoint="/v1/chat/completions"), metadata=md())
            assert failed.status == "failed"

            slow = [chat_line(f"s{i}") for i in range(200)]
            expiring = await c.create(slow)
            cancelling = await c.create(slow)
            for b in (expiring, cancelling):
                await c.wait_until(b.id, lambda b: b.status == "in_progress")
            await move_expiry(app.store, expiring.id, now() - 1)
            await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=cancelling.id), metadata=md())

            ended = {b.id: await c.wait_for(b.id) for b in (done, failed, expiring, cancelling)}
            assert [b.status for b in ended.values()] == ["completed", "failed", "expired", "cancelled"]
            await until("four accepted events", accepted(rx, 4), timeout=60)
            for b in ended.values():
                event = check_event(rx, b.id, f"batch.{b.status}")
                assert [a.answered for a in rx.of(event.webhook_id)] == [500, 500, 200]

            # The attempts and their outcomes, as the API reports them per endpoint (the receiver
            # answers before the sender stores the answer: wait for that).
            async def recorded() -> list[webhook_pb2.WebhookDelivery] | None:
                found = await deliveries(c, "receiver")
                return found if len(found) == 4 and all(d.status == "delivered" for d in found) else None

            listed = {d.batch_id: d for d in await until("four deliveries recorded", recorded)}
            assert set(listed) == set(ended)
            for d in listed.values():
                assert d.status == "delivered" and d.HasField("finished_at") and not d.HasField("next_attempt_at")
                assert [a.status_code for a in d.attempts] == [500, 500, 200]
                assert [a.HasField("error") for a in d.attempts] == [True, True, False]
                assert "HTTP 500" in d.attempts[0].error
        assert len(rx.accepted()) == 4  # nothing more arrived while shutting down


async def test_progress_thresholds_arrive_once_each_and_signed(tmp_path: Path, sqlite_url: str) -> None:
    with WebhookReceiver(SECRET) as rx:
        config = write_config(tmp_path / "webhooks.yaml", [endpoint(rx.url, progress_thresholds=[25, 50])])
        settings = make_settings(sqlite_url, webhooks_file=config, sim_latency_ms=20, executor_concurrency=1)
        async with gateway(settings) as (_, c):
            batch = await c.wait_for((await c.create([chat_line(f"c{i}") for i in range(8)])).id)
            assert batch.status == "completed"
            await until("three accepted events", accepted(rx, 3), timeout=60)
    events = sorted((d.payload for d in rx.accepted() if d.payload), key=lambda p: p["data"].get("progress", 100))
    assert [(p["type"], p["data"]) for p in events] == [
        ("batch.progress", {"id": batch.id, "progress": 25}), ("batch.progress", {"id": batch.id, "progress": 50}),
        ("batch.completed", {"id": batch.id})]
    assert len({p["id"] for p in events}) == 3
    assert all(a.verified for d in rx.accepted() for a in rx.of(d.webhook_id))


async def test_delivery_survives_a_restart_between_the_end_and_the_delivery(
        tmp_path: Path, sqlite_url: str) -> None:
    """The batch ends while the receiver is down; the server stops; the receiver comes back;
    a new server process delivers the same event (same webhook-id) exactly once."""
    log = tmp_path / "sluice.log"
    with WebhookReceiver(SECRET, always_fail=True) as rx:
        config = write_config(tmp_path / "webhooks.yaml", [endpoint(rx.url)], first_retry_seconds=0.2)
        env = {"SLUICE_DATABASE_URL": sqlite_url, "SLUICE_API_KEYS": f"alpha={KEY_A}", "SLUICE_API_KEY": "",
               "SLUICE_PROVIDERS_FILE": "", "SLUICE_SIM_LATENCY_MS": "0", "SLUICE_WEBHOOKS_FILE": str(config),
               "SLUICE_ENGINE_TICK_SECONDS": "0.05"}
        first = ServerProcess(env, log).start()
        try:
            async with client(first.port) as c:
                batch = await c.wait_for((await c.create([chat_line("only")])).id)
                assert batch.status == "completed"
                await until("a failed attempt", lambda: asyncio.to_thread(lambda: bool(rx.requests)))
        finally:
            assert first.stop(signal.SIGTERM) == 0
        refused = len(rx.requests)
        assert refused >= 1 and not rx.accepted()
        rx.always_fail = False

        second = ServerProcess(env, log).start()
        try:
            async with client(second.port) as c:
                await until("the event to arrive", accepted(rx), timeout=30)
                event = check_event(rx, batch.id, "batch.completed")
                assert [a.answered for a in rx.of(event.webhook_id)] == [500] * refused + [200]

                async def recorded() -> webhook_pb2.WebhookDelivery | None:
                    (d,) = await deliveries(c, "receiver")
                    return d if d.status == "delivered" else None

                d = await until("the delivery to be recorded", recorded)
                assert len(d.attempts) == refused + 1 and d.attempts[-1].status_code == 200
        finally:
            assert second.stop() == 0
    assert "signing secret" not in log.read_text()  # the secret was configured: never shown, never logged


async def test_private_destination_is_refused_without_a_connection(tmp_path: Path, sqlite_url: str) -> None:
    with WebhookReceiver(SECRET) as rx:
        # `localhost` is not an IP literal, so the file loads; the resolved address is refused.
        url = rx.url.replace("127.0.0.1", "localhost")
        config = write_config(tmp_path / "webhooks.yaml", [endpoint(url)], allow=[])
        async with gateway(make_settings(sqlite_url, webhooks_file=config)) as (_, c):
            batch = await c.wait_for((await c.create([chat_line("x")])).id)

            async def given_up() -> webhook_pb2.WebhookDelivery | None:
                found = await deliveries(c, "receiver")
                return found[0] if found and found[0].status == "failed" else None

            d = await until("the delivery to be refused", given_up)
        assert d.batch_id == batch.id and len(d.attempts) == 1  # refused once; no point retrying
        assert not d.attempts[0].HasField("status_code")
        assert "resolves to" in d.attempts[0].error and "loopback address" in d.attempts[0].error
        assert rx.requests == []  # not a single connection reached it

        literal = write_config(tmp_path / "literal.yaml", [endpoint("http://10.20.30.40:8080/hook")], allow=[])
        with pytest.raises(SystemExit, match=r"10\.20\.30\.40 is a private address"):
            await start(make_settings(sqlite_url, webhooks_file=literal))


async def test_generated_secret_is_shown_once_and_signs(tmp_path: Path, sqlite_url: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "webhooks.yaml"
    with WebhookReceiver(SECRET) as rx:
        spec = endpoint(rx.url)
        del spec["secret"]
        write_config(config, [spec])
        async with gateway(make_settings(sqlite_url, webhooks_file=config)):
            pass
        shown = capsys.readouterr().out
        assert shown.count("signing secret whsec_") == 1
        secret = shown.split("signing secret ")[1].split()[0]
        rx.secret = secret
        async with gateway(make_settings(sqlite_url, webhooks_file=config)) as (_, c):  # a restart
            batch = await c.wait_for((await c.create([chat_line("x")])).id)
            await until("the event", accepted(rx))
            check_event(rx, batch.id, "batch.completed")
        assert "signing secret" not in capsys.readouterr().out


async def test_endpoints_and_deliveries_are_per_project(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path / "webhooks.yaml", [
        endpoint("https://alpha.example/h", "alpha-hook", events=["batch.failed"]),
        endpoint("https://beta.example/h", "beta-hook", project="beta")])
    async with gateway(make_settings(sqlite_url, webhooks_file=config)) as (_, c):
        stub = webhook_pb2_grpc.WebhookServiceStub(c.channel)
        mine = await stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest(), metadata=md(KEY_A))
        assert [(e.id, e.url, list(e.event_types), e.enabled) for e in mine.data] == [
            ("alpha-hook", "https://alpha.example/h", ["batch.failed"], True)]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await deliveries(c, "alpha-hook", key=KEY_B)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert await deliveries(c, "beta-hook", key=KEY_B) == []
    # Removed from the file: disabled, history kept.
    write_config(config, [endpoint("https://alpha.example/h", "alpha-hook")])
    async with gateway(make_settings(sqlite_url, webhooks_file=config)) as (_, c):
        stub = webhook_pb2_grpc.WebhookServiceStub(c.channel)
        theirs = await stub.ListWebhookEndpoints(webhook_pb2.ListWebhookEndpointsRequest(), metadata=md(KEY_B))
        assert [(e.id, e.enabled) for e in theirs.data] == [("beta-hook", False)]


async def test_two_replicas_deliver_each_event_once(tmp_path: Path, postgres_url: str) -> None:
    with WebhookReceiver(SECRET) as rx:
        config = write_config(tmp_path / "webhooks.yaml", [endpoint(rx.url)], poll_seconds=0.02)
        async with gateway(make_settings(postgres_url, webhooks_file=config)) as (app, a), \
                gateway(make_settings(postgres_url, webhooks_file=config, replica_id="replica-b")) as (_, b):
            created = [await (a if n % 2 else b).create([chat_line(f"r{n}")]) for n in range(8)]
            for batch in created:
                await a.wait_for(batch.id)
            await until("eight events", accepted(rx, 8))
            for batch in created:
                event = check_event(rx, batch.id, "batch.completed")
                assert len(rx.of(event.webhook_id)) == 1  # never sent twice

            async def all_recorded() -> bool:  # the receiver answers before the sender stores it
                async with app.store.sessions() as s:
                    return await s.scalar(select(func.count()).select_from(WebhookDeliveryRow)
                                          .where(WebhookDeliveryRow.status == "delivered")) == 8
            await until("eight deliveries recorded", all_recorded)
        assert len(rx.requests) == 8


def test_deliveries_over_rest_through_envoy(tmp_path: Path) -> None:
    """The read side through the real REST edge: GET /v1/webhook_endpoints[/{id}/deliveries]."""
    with WebhookReceiver(SECRET, fail_first=1) as rx:
        config = write_config(tmp_path / "webhooks.yaml", [endpoint(rx.url)])
        with start_stack(tmp_path / "stack", f"sqlite+aiosqlite:///{tmp_path}/sluice.db",
                         SLUICE_WEBHOOKS_FILE=str(config)) as stack:
            http = stack.http()
            line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "sim/x", "messages": [{"role": "user", "content": "hi"}]}}
            batch = http.post("/v1/batches", json={"endpoint": "/v1/chat/completions", "requests": [line]}).json()

            def delivered() -> list[dict[str, Any]] | None:
                page = http.get("/v1/webhook_endpoints/receiver/deliveries").json()
                return page["data"] if page["data"] and page["data"][0]["status"] == "delivered" else None

            data = asyncio.run(until("the delivery", lambda: asyncio.to_thread(delivered)))
            endpoints = http.get("/v1/webhook_endpoints").json()
            other = stack.http(KEY_B).get("/v1/webhook_endpoints/receiver/deliveries")
    assert endpoints == {"object": "list", "data": [{
        "id": "receiver", "object": "webhook_endpoint", "url": rx.url,
        "event_types": list(TERMINAL_WEBHOOK_EVENT_TYPES), "enabled": True,
        "created_at": endpoints["data"][0]["created_at"], "progress_thresholds": []}]}
    (d,) = data
    assert d["batch_id"] == batch["id"] and d["event_type"] == "batch.completed" and d["id"].startswith("evt_")
    assert [(a["attempt"], a.get("status_code")) for a in d["attempts"]] == [(1, 500), (2, 200)]
    assert isinstance(d["created_at"], int) and "next_attempt_at" not in d
    assert other.status_code == 404 and other.json()["error"]["code"] == "webhook_endpoint_not_found"
    check_event(rx, batch["id"], "batch.completed")
