"""AdminService: projects, their API keys, budgets and webhook endpoints, for the admin key only.

The admin key (`SLUICE_ADMIN_KEY`) is known here only as its SHA-256 and compared in constant
time. A call without a key is UNAUTHENTICATED (401); a project's key, however valid, is
PERMISSION_DENIED (403), as is every key while no admin key is configured (the admin API is off).

New keys are 32 random bytes (`sk-proj-...`), returned once in the create answer; storage keeps
their hash. Revocation and archival take effect on every replica within the auth cache's
lifetime (service/edge/auth.py), since each replica re-reads a key's row that often.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from typing import Any, TypeAlias

import httpx

from service.domain.errors import InvalidRequest, PermissionDenied, Unauthenticated
from service.domain.events import ALL_WEBHOOK_EVENT_TYPES, progress_subscription
from service.edge.auth import Authenticator, bearer_key, hash_key
from service.edge.batch_service import DEFAULT_LIMIT, MAX_LIMIT, page_size
from service.edge.grpc_errors import translate_errors
from service.engine.webhooks import DestinationPolicy, new_secret
from service.storage.admin import AdminStore, redact
from service.storage.tables import ApiKeyRow, ProjectRow, WebhookEndpointRow
from sluice.v1 import admin_pb2, admin_pb2_grpc

Context: TypeAlias = Any  # grpc.aio.ServicerContext: grpcio ships no type stubs
Metadata: TypeAlias = Sequence[tuple[str, str | bytes]] | None
MAX_NAME = 256


def new_api_key() -> str:
    return "sk-proj-" + secrets.token_urlsafe(32)


def project_message(row: ProjectRow) -> admin_pb2.Project:
    msg = admin_pb2.Project(id=row.id, object="organization.project", name=row.name, created_at=row.created_at,
                            status="archived" if row.archived_at is not None else "active", source=row.source)
    if row.archived_at is not None:
        msg.archived_at = row.archived_at
    if row.monthly_budget_usd is not None:
        msg.monthly_budget_usd = row.monthly_budget_usd
    return msg


def key_message(row: ApiKeyRow, project: ProjectRow) -> admin_pb2.ProjectApiKey:
    msg = admin_pb2.ProjectApiKey(
        object="organization.project.api_key", redacted_value=row.redacted_value or "", name=row.name or "",
        created_at=row.created_at, id=row.id, owner=admin_pb2.ProjectApiKeyOwner(type="service_account"),
        project_id=row.project, source="config" if row.source == "config" else "admin",
        owner_project_access="inactive" if project.archived_at is not None else "active")
    if row.last_used_at is not None:
        msg.last_used_at = row.last_used_at
    return msg


def endpoint_message(row: WebhookEndpointRow) -> admin_pb2.ProjectWebhookEndpoint:
    return admin_pb2.ProjectWebhookEndpoint(
        id=row.id, object="webhook_endpoint", url=row.url, event_types=row.event_types.split(","),
        enabled=row.enabled, created_at=row.created_at, project_id=row.project, source=row.source,
        progress_thresholds=[int(t) for t in row.progress_thresholds.split(",") if t])


def _name(value: str, what: str) -> str:
    name = value.strip()
    if not 1 <= len(name) <= MAX_NAME:
        raise InvalidRequest(f"name must be 1 to {MAX_NAME} characters (the {what}'s label).", param="name",
                             code="invalid_name")
    return name


class AdminGate:
    """Who may call the admin API: the holder of the admin key, and nobody else."""

    def __init__(self, admin_key_sha256: str, auth: Authenticator) -> None:
        self.admin_key_sha256 = admin_key_sha256
        self.auth = auth

    async def check(self, metadata: Metadata) -> None:
        presented = hash_key(bearer_key(metadata))  # no key at all: 401
        if self.admin_key_sha256 and hmac.compare_digest(presented, self.admin_key_sha256):
            return
        if not self.admin_key_sha256:
            raise PermissionDenied("The admin API is off: start Sluice with SLUICE_ADMIN_KEY set to use it.",
                                   code="admin_api_disabled")
        try:
            await self.auth.project(metadata)
        except Unauthenticated:
            raise Unauthenticated("Incorrect admin key provided.", code="invalid_api_key") from None
        raise PermissionDenied("This call needs the admin key (SLUICE_ADMIN_KEY); a project's API key may not "
                               "manage projects or keys.", code="insufficient_permissions")


@translate_errors
class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, store: AdminStore, gate: AdminGate, webhook_policy: DestinationPolicy) -> None:
        self.store = store
        self.gate = gate
        self.auth = gate.auth
        self.policy = webhook_policy

    # --- projects ------------------------------------------------------------------------------

    async def ListProjects(self, request: admin_pb2.ListProjectsRequest,
                           context: Context) -> admin_pb2.ListProjectsResponse:
        await self.gate.check(context.invocation_metadata())
        limit = page_size(request.limit if request.HasField("limit") else None, DEFAULT_LIMIT, MAX_LIMIT)
        rows, has_more = await self.store.list_projects(limit, request.after, request.include_archived)
        out = admin_pb2.ListProjectsResponse(object="list", has_more=has_more, data=[project_message(r) for r in rows])
        if rows:
            out.first_id, out.last_id = rows[0].id, rows[-1].id
        return out

    async def CreateProject(self, request: admin_pb2.CreateProjectRequest, context: Context) -> admin_pb2.Project:
        await self.gate.check(context.invocation_metadata())
        return project_message(await self.store.create_project(_name(request.name, "project")))

    async def GetProject(self, request: admin_pb2.GetProjectRequest, context: Context) -> admin_pb2.Project:
        await self.gate.check(context.invocation_metadata())
        return project_message(await self.store.get_project(request.project_id))

    async def ArchiveProject(self, request: admin_pb2.ArchiveProjectRequest, context: Context) -> admin_pb2.Project:
        await self.gate.check(context.invocation_metadata())
        project = await self.store.archive_project(request.project_id)
        self.auth.forget(project=project.id)
        return project_message(project)

    async def SetProjectBudget(self, request: admin_pb2.SetProjectBudgetRequest,
                               context: Context) -> admin_pb2.Project:
        await self.gate.check(context.invocation_metadata())
        budget = request.monthly_budget_usd if request.HasField("monthly_budget_usd") else None
        return project_message(await self.store.set_budget(request.project_id, budget))

    # --- keys ----------------------------------------------------------------------------------

    async def ListProjectApiKeys(self, request: admin_pb2.ListProjectApiKeysRequest,
                                 context: Context) -> admin_pb2.ListProjectApiKeysResponse:
        await self.gate.check(context.invocation_metadata())
        limit = page_size(request.limit if request.HasField("limit") else None, DEFAULT_LIMIT, MAX_LIMIT)
        project = await self.store.get_project(request.project_id)
        rows, has_more = await self.store.list_keys(project.id, limit, request.after)
        out = admin_pb2.ListProjectApiKeysResponse(object="list", has_more=has_more,
                                                   data=[key_message(r, project) for r in rows])
        if rows:
            out.first_id, out.last_id = rows[0].id, rows[-1].id
        return out

    async def CreateProjectApiKey(self, request: admin_pb2.CreateProjectApiKeyRequest,
                                  context: Context) -> admin_pb2.ProjectApiKey:
        await self.gate.check(context.invocation_metadata())
        name = _name(request.name, "key")
        value = new_api_key()
        row = await self.store.create_key(request.project_id, hash_key(value), name, redact(value))
        msg = key_message(row, await self.store.get_project(row.project))
        msg.value = value  # the one time it is shown
        return msg

    async def GetProjectApiKey(self, request: admin_pb2.GetProjectApiKeyRequest,
                               context: Context) -> admin_pb2.ProjectApiKey:
        await self.gate.check(context.invocation_metadata())
        project = await self.store.get_project(request.project_id)
        return key_message(await self.store.get_key(project.id, request.key_id), project)

    async def DeleteProjectApiKey(self, request: admin_pb2.DeleteProjectApiKeyRequest,
                                  context: Context) -> admin_pb2.DeleteProjectApiKeyResponse:
        await self.gate.check(context.invocation_metadata())
        row = await self.store.revoke_key(request.project_id, request.key_id)
        self.auth.forget(key_hash=row.key_hash)
        return admin_pb2.DeleteProjectApiKeyResponse(object="organization.project.api_key.deleted", id=row.id,
                                                     deleted=True)

    # --- webhook endpoints -----------------------------------------------------------------------

    async def ListProjectWebhookEndpoints(self, request: admin_pb2.ListProjectWebhookEndpointsRequest,
                                          context: Context) -> admin_pb2.ListProjectWebhookEndpointsResponse:
        await self.gate.check(context.invocation_metadata())
        rows = await self.store.list_endpoints(request.project_id)
        return admin_pb2.ListProjectWebhookEndpointsResponse(object="list", data=[endpoint_message(r) for r in rows])

    async def CreateProjectWebhookEndpoint(self, request: admin_pb2.CreateProjectWebhookEndpointRequest,
                                           context: Context) -> admin_pb2.ProjectWebhookEndpoint:
        await self.gate.check(context.invocation_metadata())
        url = self._url(request.url)
        unknown = [e for e in request.event_types if e not in ALL_WEBHOOK_EVENT_TYPES]
        if unknown:
            raise InvalidRequest(f"event_types: unknown event type {unknown[0][:64]!r}; the types are "
                                 f"{', '.join(ALL_WEBHOOK_EVENT_TYPES)}.", param="event_types", code="invalid_value")
        try:
            events, thresholds = progress_subscription(request.event_types, list(request.progress_thresholds))
        except ValueError as exc:
            raise InvalidRequest(f"{exc}.", param="progress_thresholds", code="invalid_value") from None
        secret = new_secret()
        msg = endpoint_message(await self.store.create_endpoint(request.project_id, url, events, secret, thresholds))
        msg.secret = secret  # the one time it is shown
        return msg

    async def DeleteProjectWebhookEndpoint(self, request: admin_pb2.DeleteProjectWebhookEndpointRequest,
                                           context: Context) -> admin_pb2.DeleteProjectWebhookEndpointResponse:
        await self.gate.check(context.invocation_metadata())
        row = await self.store.delete_endpoint(request.project_id, request.endpoint_id)
        return admin_pb2.DeleteProjectWebhookEndpointResponse(object="webhook_endpoint.deleted", id=row.id,
                                                              deleted=True)

    def _url(self, url: str) -> str:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError):
            parsed = None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host or len(url) > 2048:
            raise InvalidRequest("url must be an http:// or https:// URL of at most 2048 characters.", param="url",
                                 code="invalid_url")
        refusal = self.policy.literal_refusal(url)
        if refusal:
            raise InvalidRequest(f"url: {refusal}", param="url", code="webhook_destination_refused")
        return url
