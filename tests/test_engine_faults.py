"""No batch hangs (issue #9): whatever a provider does, every native batch ends with a reason by its
deadline (`expires_at` + `expiry_grace_seconds`), and a batch Sluice gives up on after submitting it
is cancelled at the provider exactly once. Faults are injected in the loopback provider fake; the
passage of time is simulated by moving the batch's `expires_at` (as 24 hours passing would)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import update

from adapters.openai import OpenAIAdapter
from service.domain.model import BatchStatus
from service.storage.db import create_engine
from service.storage.repository import Store
from service.storage.tables import BatchRow
from tests import native_scenarios as sc
from tests.harness import gateway, move_expiry
from tests.native_scenarios import HOLD, Flavor, fake_server  # noqa: F401  (module-scoped fixture)
from tests.provider_fake import ProviderFake

OPENAI = Flavor("openai", OpenAIAdapter, "gpt-4o-mini", detailed_usage=True)
FOREVER = 10**6
GRACE = 1.0
# The watchdog acts at the deadline; ending the batch then takes an engine tick, one cancel call and
# writing the files. Generous for a loaded 2-core machine, and far below the 24 h it would otherwise hang.
SLACK = 15.0


@pytest.fixture
def fake(fake_server: ProviderFake) -> Iterator[ProviderFake]:  # noqa: F811
    yield sc.fresh(fake_server)
    fake_server.clear_faults()


def settings(db: str) -> sc.Settings:
    return dataclasses.replace(sc.settings(db), expiry_grace_seconds=GRACE)


async def end_window_in(db: str, batch_id: str, seconds: float) -> float:
    """Move the batch's `expires_at` to `seconds` from now; returns the watchdog's deadline."""
    store = Store(create_engine(db))
    try:
        expires_at = int(time.time() + seconds)
        await move_expiry(store, batch_id, expires_at)
    finally:
        await store.close()
    return expires_at + GRACE


def cancels(fake: ProviderFake, pid: str) -> int:
    return sum(1 for r in fake.state()["requests"]
               if r["method"] == "POST" and r["path"].endswith(f"/batches/{pid}/cancel") and not r["fault"])


async def test_results_download_failing_forever_ends_the_batch_by_the_deadline(fake: ProviderFake,
                                                                              db_url: str) -> None:
    fake.add_fault(provider="openai", method="GET", path_regex=r"/files/[^/]+/content$", status=500, times=FOREVER)
    async with gateway(settings(db_url), sc.make_router(fake, OPENAI)) as (_, c):
        created = await c.create(sc.lines(OPENAI, {"a": "hello", "b": "world"}))
        await c.wait_for(created.id, {"finalizing"}, timeout=sc.WAIT)  # the provider completed it
        deadline = await end_window_in(db_url, created.id, 2)
        batch = await c.wait_for(created.id, timeout=SLACK + 5)
        results = await sc.results_by_id(c, created.id)
    assert batch.status == "expired" and batch.expired_at <= deadline + SLACK, (batch, deadline)
    assert batch.errors.data[0].code == "batch_expired" and "did not report the end" in batch.errors.data[0].message
    assert {r["status"] for r in results.values()} == {"expired"}
    assert batch.request_counts.completed + batch.request_counts.failed <= batch.request_counts.total


async def test_an_unknown_provider_status_forever_ends_the_batch_and_cancels_it(fake: ProviderFake,
                                                                               db_url: str) -> None:
    fake.configure(polls_per_state=HOLD)
    async with gateway(settings(db_url), sc.make_router(fake, OPENAI)) as (_, c):
        created = await c.create(sc.lines(OPENAI, {"a": "hello"}))
        pid = await sc.provider_id(c, created.id)
        fake.add_fault(provider="openai", method="GET", path_regex=rf"/batches/{pid}$", status=200, times=FOREVER,
                       body={"id": pid, "object": "batch", "endpoint": "/v1/chat/completions",
                             "input_file_id": "file-x", "completion_window": "24h", "status": "reticulating",
                             "created_at": 1, "request_counts": {"total": 1, "completed": 0, "failed": 0}})
        deadline = await end_window_in(db_url, created.id, 2)
        batch = await c.wait_for(created.id, timeout=SLACK + 5)
    assert batch.status == "expired" and batch.expired_at <= deadline + SLACK, (batch, deadline)
    assert "reticulating" in batch.errors.data[0].message
    assert cancels(fake, pid) == 1
    assert sc.fake_state(fake, "openai", pid) in ("cancelling", "cancelled")


async def test_a_batch_failed_after_submit_is_cancelled_once_at_the_provider(fake: ProviderFake,
                                                                            db_url: str) -> None:
    """A non-retryable answer on a poll (the provider lost track of the batch) fails the batch at
    once, with the reason, and one cancel reaches the provider so the job does not keep running."""
    fake.configure(polls_per_state=HOLD)
    async with gateway(settings(db_url), sc.make_router(fake, OPENAI)) as (_, c):
        created = await c.create(sc.lines(OPENAI, {"a": "hello"}))
        pid = await sc.provider_id(c, created.id)
        fake.add_fault(provider="openai", method="GET", path_regex=rf"/batches/{pid}$", status=403, times=FOREVER,
                       body={"error": {"message": "This batch belongs to another project.",
                                       "type": "invalid_request_error", "param": None, "code": None}})
        batch = await c.wait_for(created.id, timeout=sc.WAIT)
    assert batch.status == "failed" and "another project" in batch.errors.data[0].message
    assert cancels(fake, pid) == 1


async def test_a_non_retryable_download_failure_fails_the_batch_with_the_reason(fake: ProviderFake,
                                                                               db_url: str) -> None:
    fake.add_fault(provider="openai", method="GET", path_regex=r"/files/[^/]+/content$", status=404, times=FOREVER,
                   body={"error": {"message": "No such file.", "type": "invalid_request_error", "param": None,
                                   "code": None}})
    started = time.monotonic()
    async with gateway(settings(db_url), sc.make_router(fake, OPENAI)) as (_, c):
        created = await c.create(sc.lines(OPENAI, {"a": "hello"}))
        batch = await c.wait_for(created.id, timeout=sc.WAIT)
    assert batch.status == "failed" and "No such file" in batch.errors.data[0].message
    assert time.monotonic() - started < sc.WAIT
    downloads = [r for r in fake.state()["requests"] if r["path"].endswith("/content")]
    assert len(downloads) == 1  # not retried: retrying cannot fix a 404


async def test_a_batch_left_validating_whose_provider_already_finished_completes(fake: ProviderFake,
                                                                                db_url: str) -> None:
    """A crash between storing the provider's batch id and leaving `validating` (two writes): the
    next process finds the batch ended at the provider. It must pass through `in_progress`
    (validating -> finalizing is no edge of the state machine) and complete, not fail every step
    until the watchdog expires a batch that completed (found by the engine's mutation tests)."""
    fake.configure(polls_per_state=HOLD)
    async with gateway(settings(db_url), sc.make_router(fake, OPENAI)) as (_, c):
        created = await c.create(sc.lines(OPENAI, {"a": "hello", "b": "world"}))
        pid = await sc.provider_id(c, created.id)
    store = Store(create_engine(db_url))
    try:
        async with store.sessions.begin() as s:
            await s.execute(update(BatchRow).where(BatchRow.id == created.id).values(
                status=BatchStatus.VALIDATING, in_progress_at=None))
    finally:
        await store.close()
    fake.complete("openai", pid)
    async with gateway(settings(db_url), sc.make_router(fake, OPENAI)) as (_, c):
        batch = await c.wait_for(created.id, timeout=sc.WAIT)
    assert batch.status == "completed" and batch.request_counts.completed == 2, batch
    assert batch.HasField("in_progress_at") and batch.HasField("finalizing_at")
