"""The admin API over gRPC (in-process servers, both databases): only the admin key may call it;
projects, keys, budgets and webhook endpoints behave as documented; a revoked key and the keys of
an archived project are refused, on the replica that did it at once and on another replica within
the auth cache's lifetime."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import update

from service.domain.events import TERMINAL_WEBHOOK_EVENT_TYPES
from service.edge.auth import hash_key
from service.providers.registry import ConfigError
from service.runtime.config import Settings, admin_key_digest
from service.runtime.server import App
from service.storage.admin import AdminStore
from service.storage.repository import KEY_USE_EVERY
from service.storage.tables import ApiKeyRow
from sluice.v1 import admin_pb2, admin_pb2_grpc, batch_pb2, webhook_pb2, webhook_pb2_grpc
from tests.harness import KEY_A, KEY_B, Client, chat_line, gateway, make_settings, md, until
from tests.rpc_errors import expect_error
from tests.test_webhooks import SECRET, write_config
from tests.webhook_receiver import WebhookReceiver

ADMIN_KEY = "sk-admin-test-0123456789abcdef"


def admin_settings(db_url: str, **overrides: Any) -> Settings:
    return replace(make_settings(db_url, admin_key_sha256=admin_key_digest(ADMIN_KEY)), **overrides)


@asynccontextmanager
async def admin_gateway(settings: Settings) -> AsyncIterator[tuple[App, Client, admin_pb2_grpc.AdminServiceStub]]:
    async with gateway(settings) as (app, c):
        yield app, c, admin_pb2_grpc.AdminServiceStub(c.channel)


async def works(c: Client, key: str) -> bool:
    try:
        await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md(key))
        return True
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        return False


ADMIN = md(ADMIN_KEY)


async def test_only_the_admin_key_may_call_the_admin_api(sqlite_url: str) -> None:
    async with admin_gateway(admin_settings(sqlite_url)) as (_, _c, admin):
        listing = admin.ListProjects(admin_pb2.ListProjectsRequest())
        err = await expect_error(listing, grpc.StatusCode.UNAUTHENTICATED)
        assert err.envelope["code"] == "missing_api_key"
        err = await expect_error(admin.ListProjects(admin_pb2.ListProjectsRequest(), metadata=md(KEY_A)),
                                 grpc.StatusCode.PERMISSION_DENIED)
        assert err.envelope["type"] == "authentication_error" and err.envelope["code"] == "insufficient_permissions"
        err = await expect_error(admin.CreateProject(admin_pb2.CreateProjectRequest(name="x"),
                                                     metadata=md("sk-not-a-key-at-all-000")),
                                 grpc.StatusCode.UNAUTHENTICATED)
        assert err.envelope["code"] == "invalid_api_key"
        page = await admin.ListProjects(admin_pb2.ListProjectsRequest(), metadata=ADMIN)
        assert {p.id for p in page.data} == {"alpha", "beta"}, "configured projects are listed"
        assert all(p.source == "config" and p.object == "organization.project" for p in page.data)
    async with admin_gateway(make_settings(sqlite_url)) as (_, _c, admin):  # no SLUICE_ADMIN_KEY
        err = await expect_error(admin.ListProjects(admin_pb2.ListProjectsRequest(), metadata=ADMIN),
                                 grpc.StatusCode.PERMISSION_DENIED)
        assert err.envelope["code"] == "admin_api_disabled"


async def test_project_and_key_lifecycle(db_url: str) -> None:
    async with admin_gateway(admin_settings(db_url)) as (_, c, admin):
        project = await admin.CreateProject(admin_pb2.CreateProjectRequest(name="Team Gamma"), metadata=ADMIN)
        assert project.id.startswith("proj_") and project.status == "active" and not project.HasField("archived_at")
        assert await admin.GetProject(admin_pb2.GetProjectRequest(project_id=project.id), metadata=ADMIN) == project

        created = await admin.CreateProjectApiKey(
            admin_pb2.CreateProjectApiKeyRequest(project_id=project.id, name="ci"), metadata=ADMIN)
        assert created.HasField("value") and created.value.startswith("sk-proj-")
        assert created.value not in created.redacted_value and "..." in created.redacted_value
        assert created.source == "admin" and created.owner.type == "service_account"
        assert not created.HasField("last_used_at")
        assert await works(c, created.value)
        other = await c.stub.ListBatches(batch_pb2.ListBatchesRequest(), metadata=md(created.value))
        assert list(other.data) == [], "a new project sees none of another project's batches"

        keys = await admin.ListProjectApiKeys(admin_pb2.ListProjectApiKeysRequest(project_id=project.id),
                                              metadata=ADMIN)
        assert [k.id for k in keys.data] == [created.id]
        listed = keys.data[0]
        assert not listed.HasField("value"), "a key's value is shown once, at creation"
        assert listed.HasField("last_used_at") and listed.last_used_at >= created.created_at
        assert listed.redacted_value == created.redacted_value and listed.name == "ci"

        configured = await admin.ListProjectApiKeys(admin_pb2.ListProjectApiKeysRequest(project_id="alpha"),
                                                    metadata=ADMIN)
        assert [(k.source, k.name, k.redacted_value[:4]) for k in configured.data] == [
            ("config", "configured", KEY_A[:4])]
        assert KEY_A not in str(configured)
        err = await expect_error(admin.DeleteProjectApiKey(admin_pb2.DeleteProjectApiKeyRequest(
            project_id="alpha", key_id=configured.data[0].id), metadata=ADMIN), grpc.StatusCode.FAILED_PRECONDITION)
        assert err.envelope["code"] == "api_key_from_configuration"
        assert await works(c, KEY_A)

        deleted = await admin.DeleteProjectApiKey(admin_pb2.DeleteProjectApiKeyRequest(
            project_id=project.id, key_id=created.id), metadata=ADMIN)
        assert (deleted.object, deleted.id, deleted.deleted) == ("organization.project.api_key.deleted",
                                                                 created.id, True)
        assert not await works(c, created.value), "refused at once on the replica that revoked it"
        for call in (admin.DeleteProjectApiKey(admin_pb2.DeleteProjectApiKeyRequest(
                project_id=project.id, key_id=created.id), metadata=ADMIN),
                admin.GetProjectApiKey(admin_pb2.GetProjectApiKeyRequest(project_id=project.id, key_id=created.id),
                                       metadata=ADMIN)):
            await expect_error(call, grpc.StatusCode.NOT_FOUND)
        # Another project's key id is not found through this project.
        await expect_error(admin.GetProjectApiKey(admin_pb2.GetProjectApiKeyRequest(
            project_id=project.id, key_id=configured.data[0].id), metadata=ADMIN), grpc.StatusCode.NOT_FOUND)


async def test_archiving_a_project_refuses_its_keys_and_takes_no_new_ones(db_url: str) -> None:
    async with admin_gateway(admin_settings(db_url)) as (_, c, admin):
        project = await admin.CreateProject(admin_pb2.CreateProjectRequest(name="short-lived"), metadata=ADMIN)
        key = await admin.CreateProjectApiKey(admin_pb2.CreateProjectApiKeyRequest(project_id=project.id, name="k"),
                                              metadata=ADMIN)
        assert await works(c, key.value) and await works(c, KEY_B)
        archived = await admin.ArchiveProject(admin_pb2.ArchiveProjectRequest(project_id=project.id), metadata=ADMIN)
        assert archived.status == "archived" and archived.HasField("archived_at")
        again = await admin.ArchiveProject(admin_pb2.ArchiveProjectRequest(project_id=project.id), metadata=ADMIN)
        assert again.archived_at == archived.archived_at
        assert not await works(c, key.value)
        await admin.ArchiveProject(admin_pb2.ArchiveProjectRequest(project_id="beta"), metadata=ADMIN)
        assert not await works(c, KEY_B), "a configured project's keys stop too"
        assert await works(c, KEY_A)
        err = await expect_error(admin.CreateProjectApiKey(admin_pb2.CreateProjectApiKeyRequest(
            project_id=project.id, name="late"), metadata=ADMIN), grpc.StatusCode.FAILED_PRECONDITION)
        assert err.envelope["code"] == "project_archived"
        keys = await admin.ListProjectApiKeys(admin_pb2.ListProjectApiKeysRequest(project_id=project.id),
                                              metadata=ADMIN)
        assert [k.owner_project_access for k in keys.data] == ["inactive"]

        active = await admin.ListProjects(admin_pb2.ListProjectsRequest(), metadata=ADMIN)
        assert [p.id for p in active.data] == ["alpha"]
        everything = await admin.ListProjects(admin_pb2.ListProjectsRequest(include_archived=True), metadata=ADMIN)
        assert {p.id for p in everything.data} == {"alpha", "beta", project.id}
        first = await admin.ListProjects(admin_pb2.ListProjectsRequest(include_archived=True, limit=2),
                                         metadata=ADMIN)
        rest = await admin.ListProjects(admin_pb2.ListProjectsRequest(include_archived=True, after=first.last_id),
                                        metadata=ADMIN)
        assert first.has_more and not rest.has_more
        assert [p.id for p in (*first.data, *rest.data)] == [p.id for p in everything.data]
    async with admin_gateway(admin_settings(db_url)) as (_, c, _admin):
        assert not await works(c, KEY_B), "archival outlives a restart (the start-up sync keeps it)"


async def test_budget_is_stored_on_the_project(db_url: str) -> None:
    async with admin_gateway(admin_settings(db_url)) as (app, _c, admin):
        store = AdminStore(app.store)
        assert await store.project_budget("alpha") is None
        set_ = await admin.SetProjectBudget(admin_pb2.SetProjectBudgetRequest(project_id="alpha",
                                                                              monthly_budget_usd=12.5), metadata=ADMIN)
        assert set_.monthly_budget_usd == 12.5
        assert await store.project_budget("alpha") == 12.5
        assert await store.project_budget("no-such-project") is None
        for bad in (-1.0, float("inf"), float("nan")):
            err = await expect_error(admin.SetProjectBudget(admin_pb2.SetProjectBudgetRequest(
                project_id="alpha", monthly_budget_usd=bad), metadata=ADMIN), grpc.StatusCode.INVALID_ARGUMENT)
            assert err.envelope["param"] == "monthly_budget_usd"
        await expect_error(admin.SetProjectBudget(admin_pb2.SetProjectBudgetRequest(
            project_id="nope", monthly_budget_usd=1), metadata=ADMIN), grpc.StatusCode.NOT_FOUND)
        cleared = await admin.SetProjectBudget(admin_pb2.SetProjectBudgetRequest(project_id="alpha"), metadata=ADMIN)
        assert not cleared.HasField("monthly_budget_usd") and await store.project_budget("alpha") is None


async def test_last_use_is_written_at_most_once_a_minute(db_url: str) -> None:
    async with admin_gateway(admin_settings(db_url, auth_cache_seconds=0)) as (app, c, _admin):
        async def last_used() -> int | None:
            async with app.store.sessions() as s:
                return await s.scalar(ApiKeyRow.__table__.select().with_only_columns(ApiKeyRow.last_used_at)
                                      .where(ApiKeyRow.key_hash == hash_key(KEY_A)))

        async def set_last_used(value: int) -> None:
            async with app.store.sessions.begin() as s:
                await s.execute(update(ApiKeyRow).where(ApiKeyRow.key_hash == hash_key(KEY_A))
                                .values(last_used_at=value))

        assert await last_used() is None
        assert await works(c, KEY_A)
        first = await last_used()
        assert first is not None and abs(first - time.time()) < 60
        recent = int(time.time()) - KEY_USE_EVERY // 2
        await set_last_used(recent)
        assert await works(c, KEY_A) and await works(c, KEY_A)
        assert await last_used() == recent, "used again within the minute: not rewritten"
        await set_last_used(recent - KEY_USE_EVERY)
        assert await works(c, KEY_A)
        assert (await last_used() or 0) > recent


async def test_webhook_endpoints_through_the_admin_api(db_url: str) -> None:
    async with admin_gateway(admin_settings(db_url)) as (_, c, admin):
        created = await admin.CreateProjectWebhookEndpoint(admin_pb2.CreateProjectWebhookEndpointRequest(
            project_id="alpha", url="https://hooks.example.com/sluice", event_types=["batch.completed"]),
            metadata=ADMIN)
        assert created.secret.startswith("whsec_") and created.source == "admin" and created.enabled
        assert list(created.event_types) == ["batch.completed"]
        listed = await admin.ListProjectWebhookEndpoints(
            admin_pb2.ListProjectWebhookEndpointsRequest(project_id="alpha"), metadata=ADMIN)
        assert [(e.id, e.HasField("secret")) for e in listed.data] == [(created.id, False)]
        tenant = await webhook_pb2_grpc.WebhookServiceStub(c.channel).ListWebhookEndpoints(
            webhook_pb2.ListWebhookEndpointsRequest(), metadata=md(KEY_A))
        assert [e.id for e in tenant.data] == [created.id], "the project sees its new endpoint"

        for url, code in (("ftp://hooks.example.com/x", "invalid_url"),
                          ("http://127.0.0.1:9/hook", "webhook_destination_refused")):
            err = await expect_error(admin.CreateProjectWebhookEndpoint(admin_pb2.CreateProjectWebhookEndpointRequest(
                project_id="alpha", url=url), metadata=ADMIN), grpc.StatusCode.INVALID_ARGUMENT)
            assert err.envelope["code"] == code
        await expect_error(admin.CreateProjectWebhookEndpoint(admin_pb2.CreateProjectWebhookEndpointRequest(
            project_id="alpha", url="https://hooks.example.com/x", event_types=["batch.exploded"]), metadata=ADMIN),
            grpc.StatusCode.INVALID_ARGUMENT)
        # Progress thresholds: alone they ask for batch.progress; the default types are the terminal four.
        progress = await admin.CreateProjectWebhookEndpoint(admin_pb2.CreateProjectWebhookEndpointRequest(
            project_id="beta", url="https://hooks.example.com/p", progress_thresholds=[50, 10]), metadata=ADMIN)
        assert list(progress.event_types) == [*TERMINAL_WEBHOOK_EVENT_TYPES, "batch.progress"]
        assert list(progress.progress_thresholds) == [10, 50]
        err = await expect_error(admin.CreateProjectWebhookEndpoint(admin_pb2.CreateProjectWebhookEndpointRequest(
            project_id="beta", url="https://hooks.example.com/p", progress_thresholds=[100]), metadata=ADMIN),
            grpc.StatusCode.INVALID_ARGUMENT)
        assert err.envelope["param"] == "progress_thresholds" and "1 to 99" in err.message
    async with admin_gateway(admin_settings(db_url)) as (_, _c, admin):
        listed = await admin.ListProjectWebhookEndpoints(
            admin_pb2.ListProjectWebhookEndpointsRequest(project_id="alpha"), metadata=ADMIN)
        assert [e.enabled for e in listed.data] == [True], "a restart's webhooks-file sync leaves it alone"
        gone = await admin.DeleteProjectWebhookEndpoint(admin_pb2.DeleteProjectWebhookEndpointRequest(
            project_id="alpha", endpoint_id=created.id), metadata=ADMIN)
        assert gone.deleted and gone.id == created.id
        listed = await admin.ListProjectWebhookEndpoints(
            admin_pb2.ListProjectWebhookEndpointsRequest(project_id="alpha"), metadata=ADMIN)
        assert [e.enabled for e in listed.data] == [False]
        await expect_error(admin.DeleteProjectWebhookEndpoint(admin_pb2.DeleteProjectWebhookEndpointRequest(
            project_id="beta", endpoint_id=created.id), metadata=ADMIN), grpc.StatusCode.NOT_FOUND)


async def test_a_revoked_key_is_refused_on_every_replica(postgres_url: str) -> None:
    """Two replicas on one PostgreSQL, default cache (5 s): a key created and revoked through
    replica 1 stops working on replica 2, whose cache knew it, without a restart."""
    async with admin_gateway(admin_settings(postgres_url)) as (_, c1, admin), \
            admin_gateway(admin_settings(postgres_url)) as (_, c2, _admin2):
        project = await admin.CreateProject(admin_pb2.CreateProjectRequest(name="two-replicas"), metadata=ADMIN)
        key = await admin.CreateProjectApiKey(admin_pb2.CreateProjectApiKeyRequest(project_id=project.id, name="k"),
                                              metadata=ADMIN)
        assert await works(c1, key.value) and await works(c2, key.value)  # both replicas have it cached now
        await admin.DeleteProjectApiKey(admin_pb2.DeleteProjectApiKeyRequest(project_id=project.id, key_id=key.id),
                                        metadata=ADMIN)
        assert not await works(c1, key.value)

        async def refused_on_replica_2() -> bool:
            return not await works(c2, key.value)

        await until("replica 2 to refuse the revoked key", refused_on_replica_2, timeout=30)
        assert await works(c2, KEY_A)


async def test_a_revoked_key_put_into_the_configuration_works_again(sqlite_url: str) -> None:
    """Configuration is the source of truth for configured keys, revoked or not."""
    async with admin_gateway(admin_settings(sqlite_url)) as (_, c, admin):
        key = await admin.CreateProjectApiKey(admin_pb2.CreateProjectApiKeyRequest(project_id="alpha", name="k"),
                                              metadata=ADMIN)
        await admin.DeleteProjectApiKey(admin_pb2.DeleteProjectApiKeyRequest(project_id="alpha", key_id=key.id),
                                        metadata=ADMIN)
        assert not await works(c, key.value)
    async with admin_gateway(admin_settings(sqlite_url, api_keys={KEY_A: "alpha", key.value: "alpha"})) as (_, c, _a):
        assert await works(c, key.value)


async def test_an_endpoint_added_through_the_admin_api_gets_signed_events(tmp_path: Path, sqlite_url: str) -> None:
    """The secret from the create answer verifies the deliveries (a real receiver checks them with
    the `standardwebhooks` package); the webhooks file only allows loopback, it lists no endpoint."""
    config = write_config(tmp_path / "webhooks.yaml", [])
    with WebhookReceiver(SECRET) as rx:
        async with admin_gateway(admin_settings(sqlite_url, webhooks_file=config)) as (_, c, admin):
            created = await admin.CreateProjectWebhookEndpoint(admin_pb2.CreateProjectWebhookEndpointRequest(
                project_id="alpha", url=rx.url, event_types=["batch.completed"]), metadata=ADMIN)
            rx.secret = created.secret  # the receiver verifies with the secret shown once

            async def delivered() -> bool:
                return any(d.payload and d.payload["data"]["id"] == batch.id for d in rx.accepted())

            batch = await c.wait_for((await c.create([chat_line("x")])).id)
            assert batch.status == "completed"
            await until("the admin-created endpoint to receive the event", delivered)
        assert all(r.verified for r in rx.requests)
        assert [d.payload["type"] for d in rx.accepted() if d.payload] == ["batch.completed"]


def test_the_admin_key_is_kept_as_its_hash_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_ADMIN_KEY", f"  {ADMIN_KEY} ")
    settings = Settings.from_env()
    assert settings.admin_key_sha256 == hash_key(ADMIN_KEY) and ADMIN_KEY not in repr(settings)
    monkeypatch.setenv("SLUICE_ADMIN_KEY", "")
    assert Settings.from_env().admin_key_sha256 == ""
    with pytest.raises(ConfigError, match="at least 16 characters"):
        admin_key_digest("too-short")
