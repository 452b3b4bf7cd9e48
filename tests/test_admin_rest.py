"""The admin API through the real stack (`sluice run`: Envoy's transcoder in front of the server),
driven with the official `openai` SDK's admin client where it has the call and plain httpx where
it does not (creating a project key, budgets, webhook endpoints): a project and a key are created,
the key works on /v1/batches, is listed redacted, revoked, and answers 401 afterwards."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e import KEY_A, Stack, start_stack

ADMIN_KEY = "sk-admin-rest-test-0123456789abcdef"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("admin-stack")
    with start_stack(work, f"sqlite+aiosqlite:///{work}/sluice.db", SLUICE_ADMIN_KEY=ADMIN_KEY) as s:
        yield s


def admin_sdk(stack: Stack) -> openai.OpenAI:
    client = openai.OpenAI(base_url=stack.base_url, api_key="unused", admin_api_key=ADMIN_KEY, max_retries=0)
    stack._clients.append(client)
    return client


def batch_input() -> io.BytesIO:
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "sim/small", "messages": [{"role": "user", "content": "hi"}]}}
    return io.BytesIO((json.dumps(line) + "\n").encode())


def test_project_key_lifecycle_through_envoy(stack: Stack, tmp_path: Path) -> None:
    admin = admin_sdk(stack)
    project = admin.admin.organization.projects.create(name="Team REST")
    assert project.object == "organization.project" and project.status == "active" and project.name == "Team REST"
    assert project.archived_at is None
    assert admin.admin.organization.projects.retrieve(project.id).id == project.id
    assert project.id in [p.id for p in admin.admin.organization.projects.list()]

    http = stack.http(ADMIN_KEY)
    r = http.post(f"/v1/organization/projects/{project.id}/api_keys", json={"name": "ci"})
    assert r.status_code == 200, r.text
    created = r.json()
    value = created["value"]
    assert value.startswith("sk-proj-") and created["object"] == "organization.project.api_key"
    assert created["source"] == "admin" and created["project_id"] == project.id and created["name"] == "ci"
    assert value not in created["redacted_value"]

    user = stack.sdk(value)
    uploaded = user.files.create(file=("in.jsonl", batch_input()), purpose="batch")
    batch = user.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert [b.id for b in user.batches.list()] == [batch.id], "the new project sees its own batch only"
    assert batch.id not in [b.id for b in stack.sdk(KEY_A).batches.list()]

    keys = admin.admin.organization.projects.api_keys.list(project.id)
    assert [k.id for k in keys] == [created["id"]]
    raw = http.get(f"/v1/organization/projects/{project.id}/api_keys").json()
    assert "value" not in raw["data"][0] and value not in json.dumps(raw), "listed redacted, never the key"
    assert raw["data"][0]["last_used_at"] >= created["created_at"]
    key = admin.admin.organization.projects.api_keys.retrieve(created["id"], project_id=project.id)
    assert key.redacted_value == created["redacted_value"] and key.owner.type == "service_account"

    deleted = admin.admin.organization.projects.api_keys.delete(created["id"], project_id=project.id)
    assert deleted.deleted and deleted.id == created["id"]
    with pytest.raises(openai.AuthenticationError) as refused:
        user.batches.list()
    assert refused.value.status_code == 401
    assert refused.value.body["code"] == "invalid_api_key"  # type: ignore[index]


def test_admin_paths_refuse_project_keys_and_missing_keys(stack: Stack) -> None:
    r = stack.http(KEY_A).get("/v1/organization/projects")
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "insufficient_permissions" and "admin key" in error["message"]
    r = stack.http(None).get("/v1/organization/projects")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=stack.base_url, api_key="x", admin_api_key=KEY_A,
                      max_retries=0).admin.organization.projects.list()


def test_budget_archive_and_webhook_endpoints_over_rest(stack: Stack) -> None:
    http = stack.http(ADMIN_KEY)
    project = http.post("/v1/organization/projects", json={"name": "budgeted"}).json()
    r = http.post(f"/v1/organization/projects/{project['id']}/budget", json={"monthly_budget_usd": 250})
    assert r.status_code == 200 and r.json()["monthly_budget_usd"] == 250
    r = http.post(f"/v1/organization/projects/{project['id']}/budget", json={"monthly_budget_usd": -5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "monthly_budget_usd"
    r = http.post(f"/v1/organization/projects/{project['id']}/budget", json={"monthly_budget_usd": None})
    assert r.status_code == 200 and "monthly_budget_usd" not in r.json()

    r = http.post(f"/v1/organization/projects/{project['id']}/webhook_endpoints",
                  json={"url": "https://hooks.example.com/in", "event_types": ["batch.failed"]})
    assert r.status_code == 200, r.text
    endpoint = r.json()
    assert endpoint["secret"].startswith("whsec_")
    listed = http.get(f"/v1/organization/projects/{project['id']}/webhook_endpoints").json()
    assert [e["id"] for e in listed["data"]] == [endpoint["id"]] and "secret" not in listed["data"][0]
    r = http.delete(f"/v1/organization/projects/{project['id']}/webhook_endpoints/{endpoint['id']}")
    assert r.status_code == 200 and r.json() == {"object": "webhook_endpoint.deleted", "id": endpoint["id"],
                                                 "deleted": True}

    archived = admin_sdk(stack).admin.organization.projects.archive(project["id"])
    assert archived.status == "archived" and archived.archived_at is not None
    r = http.post(f"/v1/organization/projects/{project['id']}/archive")  # as curl -X POST sends it: no body
    assert r.status_code == 200 and r.json()["archived_at"] == archived.archived_at
    r = http.post(f"/v1/organization/projects/{project['id']}/api_keys", json={"name": "late"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "project_archived"
    r = http.get("/v1/organization/projects/proj_missing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "project_not_found"
