"""Storage of the admin API: projects (with their monthly budget), API keys as the admin sees
them, and webhook endpoints created through the API.

Keys are stored as their SHA-256 only (service/edge/auth.py); what the admin sees of a key is its
public id (`key_...`, random), its name, a redacted form made when the key was created (or, for
configured keys, at start-up), and when it was created, last used and revoked. A revoked key keeps
its row (revoked_at set) and is refused by `Store.project_for_key_hash`, as is every key of an
archived project. Configuration stays the source of truth for configured keys: they are listed
(`source: config`) but not revoked here.

Each method is one transaction. Tenant-facing code never calls these; the admin servicer does.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, func, or_, select, update

from service.domain.errors import Conflict, InvalidRequest, NotFound
from service.domain.model import now
from service.storage.db import insert_for
from service.storage.repository import Store
from service.storage.tables import ApiKeyRow, ProjectRow, WebhookEndpointRow

CONFIG, ADMIN = "config", "admin"
ADMIN_SOURCES = (ADMIN, "api")  # `api`: keys added by code before the admin API existed


def new_project_id() -> str:
    return "proj_" + secrets.token_hex(12)


def new_endpoint_id() -> str:
    return "whep_" + secrets.token_hex(12)


def redact(key: str) -> str:
    """The first and last few characters of a key, never more than a quarter of it."""
    head, tail = min(8, len(key) // 6), min(4, len(key) // 8)
    return f"{key[:head]}...{key[len(key) - tail:] if tail else ''}"


def _after(created_at: Any, row_id: Any, anchor_created_at: int, anchor_id: str) -> Any:
    """Rows after the cursor's row in (created_at, id) order: oldest-first keyset pagination."""
    return or_(created_at > anchor_created_at, and_(created_at == anchor_created_at, row_id > anchor_id))


def _project_not_found(project_id: str) -> NotFound:
    return NotFound(f"No project found with id '{project_id[:128]}'.", param="project_id", code="project_not_found")


class AdminStore:
    """Shares the Store's sessions, so its writes queue on the same SQLite writer lock."""

    def __init__(self, store: Store) -> None:
        self.sessions = store.sessions
        self._dialect = store.engine.dialect.name

    def _insert(self, table: Any) -> Any:
        return insert_for(self._dialect, table)

    # --- start-up ----------------------------------------------------------------------------

    async def sync_config_projects(self, projects: Iterable[str]) -> None:
        """Give every project named in the configuration a row (insert-if-absent: an existing
        row, its budget and archival included, is left as it is)."""
        rows = [{"id": p, "name": p, "created_at": now(), "source": CONFIG} for p in sorted(set(projects))]
        if not rows:
            return
        async with self.sessions.begin() as s:
            await s.execute(self._insert(ProjectRow).values(rows).on_conflict_do_nothing(index_elements=["id"]))

    async def label_config_keys(self, redacted: dict[str, str]) -> None:
        """Store the redacted form of each configured key (hash -> redacted), which only the
        start-up sees in clear, and name it `configured` unless it has a name."""
        async with self.sessions.begin() as s:
            for key_hash, shown in redacted.items():
                await s.execute(update(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash, ApiKeyRow.source == CONFIG)
                                .values(redacted_value=shown, name=func.coalesce(ApiKeyRow.name, "configured")))

    # --- projects ------------------------------------------------------------------------------

    async def list_projects(self, limit: int, after: str, include_archived: bool) -> tuple[list[ProjectRow], bool]:
        """Oldest first; `after` is the id of the last project of the previous page."""
        query = select(ProjectRow)
        if not include_archived:
            query = query.where(ProjectRow.archived_at.is_(None))
        async with self.sessions() as s:
            if after:
                anchor = await s.get(ProjectRow, after)
                if anchor is None:
                    raise NotFound(f"No project '{after[:128]}' to list after.", param="after", code="cursor_not_found")
                query = query.where(_after(ProjectRow.created_at, ProjectRow.id, anchor.created_at, anchor.id))
            rows = list((await s.scalars(query.order_by(ProjectRow.created_at, ProjectRow.id).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def create_project(self, name: str) -> ProjectRow:
        row = ProjectRow(id=new_project_id(), name=name, created_at=now(), source=ADMIN)
        async with self.sessions.begin() as s:
            s.add(row)
        return row

    async def get_project(self, project_id: str) -> ProjectRow:
        async with self.sessions() as s:
            row = await s.get(ProjectRow, project_id)
        if row is None:
            raise _project_not_found(project_id)
        return row

    async def archive_project(self, project_id: str) -> ProjectRow:
        """Idempotent: archiving an archived project keeps its first `archived_at`."""
        async with self.sessions.begin() as s:
            await s.execute(update(ProjectRow).where(ProjectRow.id == project_id, ProjectRow.archived_at.is_(None))
                            .values(archived_at=now()))
        return await self.get_project(project_id)

    async def set_budget(self, project_id: str, monthly_usd: float | None) -> ProjectRow:
        if monthly_usd is not None and (not math.isfinite(monthly_usd) or monthly_usd < 0):
            raise InvalidRequest("monthly_budget_usd must be a number of US dollars, 0 or more (or null for none).",
                                 param="monthly_budget_usd", code="invalid_value")
        async with self.sessions.begin() as s:
            res = await s.execute(update(ProjectRow).where(ProjectRow.id == project_id)
                                  .values(monthly_budget_usd=monthly_usd))
            if not res.rowcount:  # type: ignore[attr-defined]
                raise _project_not_found(project_id)
        return await self.get_project(project_id)

    async def project_budget(self, project: str) -> float | None:
        """The project's budget in USD per calendar month (UTC), or None when it has none (or no
        row). Budget enforcement (issue #10) reads it here; an admin sets it with SetProjectBudget."""
        async with self.sessions() as s:
            value = await s.scalar(select(ProjectRow.monthly_budget_usd).where(ProjectRow.id == project))
        return None if value is None else float(value)

    async def _active_project(self, s: Any, project_id: str) -> ProjectRow:
        row: ProjectRow | None = await s.get(ProjectRow, project_id)
        if row is None:
            raise _project_not_found(project_id)
        if row.archived_at is not None:
            raise Conflict(f"Project '{project_id}' is archived: it takes no new keys or endpoints.",
                           param="project_id", code="project_archived")
        return row

    # --- keys ----------------------------------------------------------------------------------

    async def list_keys(self, project_id: str, limit: int, after: str) -> tuple[list[ApiKeyRow], bool]:
        """The project's keys that work (not revoked), oldest first."""
        await self.get_project(project_id)
        query = select(ApiKeyRow).where(ApiKeyRow.project == project_id, ApiKeyRow.revoked_at.is_(None))
        async with self.sessions() as s:
            if after:
                anchor = await s.scalar(select(ApiKeyRow).where(ApiKeyRow.id == after, ApiKeyRow.project == project_id))
                if anchor is None:
                    raise NotFound(f"No key '{after[:64]}' to list after.", param="after", code="cursor_not_found")
                query = query.where(_after(ApiKeyRow.created_at, ApiKeyRow.id, anchor.created_at, anchor.id))
            rows = list((await s.scalars(query.order_by(ApiKeyRow.created_at, ApiKeyRow.id).limit(limit + 1))).all())
        return rows[:limit], len(rows) > limit

    async def create_key(self, project_id: str, key_hash: str, name: str, redacted: str) -> ApiKeyRow:
        async with self.sessions.begin() as s:
            await self._active_project(s, project_id)
            row = ApiKeyRow(key_hash=key_hash, project=project_id, created_at=now(), source=ADMIN, name=name,
                            redacted_value=redacted)
            s.add(row)
        return row

    async def get_key(self, project_id: str, key_id: str) -> ApiKeyRow:
        """A working key of the project (another project's, or a revoked one, is not found)."""
        async with self.sessions() as s:
            row = await s.scalar(select(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.project == project_id,
                                                         ApiKeyRow.revoked_at.is_(None)))
        if row is None:
            await self.get_project(project_id)
            raise NotFound(f"No API key found with id '{key_id[:64]}' in project '{project_id[:128]}'.",
                           param="key_id", code="api_key_not_found")
        return row

    async def revoke_key(self, project_id: str, key_id: str) -> ApiKeyRow:
        """Mark the key revoked (compare-and-set: revoking twice finds it gone the second time)."""
        row = await self.get_key(project_id, key_id)
        if row.source == CONFIG:
            raise Conflict(f"API key '{key_id}' comes from the configuration (SLUICE_API_KEYS): remove it there and "
                           "restart the servers to revoke it.", param="key_id", code="api_key_from_configuration")
        async with self.sessions.begin() as s:
            res = await s.execute(update(ApiKeyRow).where(ApiKeyRow.key_hash == row.key_hash,
                                                          ApiKeyRow.revoked_at.is_(None)).values(revoked_at=now()))
        if not res.rowcount:  # type: ignore[attr-defined]
            raise NotFound(f"No API key found with id '{key_id[:64]}' in project '{project_id[:128]}'.",
                           param="key_id", code="api_key_not_found")
        return row

    # --- webhook endpoints -----------------------------------------------------------------------

    async def list_endpoints(self, project_id: str) -> list[WebhookEndpointRow]:
        await self.get_project(project_id)
        async with self.sessions() as s:
            return list((await s.scalars(select(WebhookEndpointRow).where(WebhookEndpointRow.project == project_id)
                                         .order_by(WebhookEndpointRow.created_at, WebhookEndpointRow.id))).all())

    async def create_endpoint(self, project_id: str, url: str, event_types: Sequence[str],
                              secret: str, progress_thresholds: Sequence[int] = ()) -> WebhookEndpointRow:
        t = now()
        async with self.sessions.begin() as s:
            await self._active_project(s, project_id)
            row = WebhookEndpointRow(id=new_endpoint_id(), project=project_id, url=url,
                                     event_types=",".join(event_types), secret=secret, enabled=True,
                                     created_at=t, updated_at=t, source=ADMIN,
                                     progress_thresholds=",".join(map(str, progress_thresholds)))
            s.add(row)
        return row

    async def delete_endpoint(self, project_id: str, endpoint_id: str) -> WebhookEndpointRow:
        """Disable an endpoint created through the API (its delivery history stays)."""
        async with self.sessions.begin() as s:
            row = await s.scalar(select(WebhookEndpointRow).where(WebhookEndpointRow.id == endpoint_id,
                                                                  WebhookEndpointRow.project == project_id))
            if row is None or not row.enabled:
                raise NotFound(f"No webhook endpoint found with id '{endpoint_id[:64]}' in project "
                               f"'{project_id[:128]}'.", param="endpoint_id", code="webhook_endpoint_not_found")
            if row.source != ADMIN:
                raise Conflict(f"Webhook endpoint '{endpoint_id}' comes from the webhooks file (SLUICE_WEBHOOKS_FILE): "
                               "remove it there and restart the servers.", param="endpoint_id",
                               code="webhook_endpoint_from_configuration")
            row.enabled, row.updated_at = False, now()
        return row
