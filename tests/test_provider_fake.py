"""Tests of the loopback provider fake itself (tests/provider_fake), over real HTTP with httpx."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.provider_fake import ProviderFake

REPO = Path(__file__).resolve().parents[1]


_OPEN: list[httpx.Client] = []


def opened(*args: Any, **kwargs: Any) -> httpx.Client:
    """An httpx client that the test which made it closes when it ends (see `close_clients`)."""
    c = httpx.Client(*args, **kwargs)
    _OPEN.append(c)
    return c


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


@pytest.fixture(scope="module")
def server() -> Iterator[ProviderFake]:
    with ProviderFake() as fake:
        yield fake


@pytest.fixture
def fake(server: ProviderFake) -> ProviderFake:
    server.reset()
    server.configure(polls_per_state=1, anthropic_eventual_404=False)
    return server


def chat_line(cid: str, text: str, model: str = "gpt-4o-mini", url: str = "/v1/chat/completions") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "system", "content": "be brief"},
                                                  {"role": "user", "content": text}]}}


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


def parse_jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def taken(fake: ProviderFake) -> list[str]:
    """The spec violations this test provoked on purpose (taken, so the conformance fixture passes)."""
    return [f"{v.where}: {v.message}" for v in fake.take_violations()]


# ============================================================================ OpenAI


def oa(fake: ProviderFake, key: str | None = None) -> httpx.Client:
    return opened(base_url=fake.url("openai"),
                        headers={"Authorization": f"Bearer {key or fake.key('openai')}"})


def oa_create(c: httpx.Client, rows: list[dict[str, Any]], endpoint: str = "/v1/chat/completions") -> dict:
    up = c.post("/files", files={"file": ("in.jsonl", jsonl(rows))}, data={"purpose": "batch"})
    assert up.status_code == 200, up.text
    assert up.json()["object"] == "file" and up.json()["purpose"] == "batch"
    r = c.post("/batches", json={"input_file_id": up.json()["id"], "endpoint": endpoint,
                                 "completion_window": "24h", "metadata": {"job": "t"}})
    assert r.status_code == 200, r.text
    return r.json()


def poll(c: httpx.Client, path: str, field: str, terminal: set[str], limit: int = 20) -> tuple[dict, list[str]]:
    seen = []
    for _ in range(limit):
        obj = c.get(path).json()
        seen.append(obj[field])
        if obj[field] in terminal:
            return obj, seen
    raise AssertionError(f"never terminal: {seen}")


OA_TERMINAL = {"completed", "failed", "expired", "cancelled"}


def test_openai_happy_path_with_fail_line(fake: ProviderFake) -> None:
    c = oa(fake)
    rows = [chat_line("a", "hello there world"), chat_line("b", "please FAIL this"),
            chat_line("c", "CACHE THINK one two")]
    b = oa_create(c, rows)
    assert b["status"] == "validating" and b["object"] == "batch" and b["request_counts"]["total"] == 0
    # OpenAI's spec types output_file_id etc. without null: absent until set
    assert "output_file_id" not in b and b["metadata"] == {"job": "t"} and b["model"] == "gpt-4o-mini"
    b, seen = poll(c, f"/batches/{b['id']}", "status", OA_TERMINAL)
    assert seen == ["in_progress", "finalizing", "completed"]
    assert b["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert isinstance(b["completed_at"], int) and b["in_progress_at"] and b["finalizing_at"]
    out = parse_jsonl(c.get(f"/files/{b['output_file_id']}/content").text)
    err = parse_jsonl(c.get(f"/files/{b['error_file_id']}/content").text)
    assert [x["custom_id"] for x in out] == ["c", "a"]  # not input order
    by_id = {x["custom_id"]: x for x in out}
    body = by_id["a"]["response"]["body"]
    assert by_id["a"]["error"] is None and by_id["a"]["response"]["status_code"] == 200
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "echo: hello there world"
    # P = words("be brief") + words("hello there world") = 5 ; O = 1 + 3
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9,
                             "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                           "accepted_prediction_tokens": 0,
                                                           "rejected_prediction_tokens": 0}}
    u = by_id["c"]["response"]["body"]["usage"]
    assert (u["prompt_tokens"], u["prompt_tokens_details"]["cached_tokens"]) == (6, 3)
    assert (u["completion_tokens"], u["completion_tokens_details"]["reasoning_tokens"]) == (5 + 3, 3)
    assert [x["custom_id"] for x in err] == ["b"]
    assert err[0]["response"]["status_code"] == 400 and err[0]["error"] is None
    assert err[0]["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert b["usage"]["input_tokens"] == 11 and b["usage"]["output_tokens"] == 12
    state = httpx.get(fake.base_url + "/_fake/state").json()
    assert state["batch_creates"]["openai"] == 1 and state["file_uploads"]["openai"] == 1


def test_openai_embeddings(fake: ProviderFake) -> None:
    c = oa(fake)
    rows = [{"custom_id": "e1", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "text-embedding-3-small", "input": "some words here"}}]
    b = oa_create(c, rows, endpoint="/v1/embeddings")
    fake.complete("openai", b["id"])
    b = c.get(f"/batches/{b['id']}").json()
    line = parse_jsonl(c.get(f"/files/{b['output_file_id']}/content").text)[0]
    body = line["response"]["body"]
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_openai_auth_and_validation_errors(fake: ProviderFake) -> None:
    r = oa(fake, key="wrong").get("/batches")
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    c = oa(fake)
    r = c.post("/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
                                 "completion_window": "24h"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_file_id"
    up = c.post("/files", files={"file": ("in.jsonl", b"x")}, data={"purpose": "batch"}).json()
    r = c.post("/batches", json={"input_file_id": up["id"], "endpoint": "/v1/chat/completions",
                                 "completion_window": "48h"})
    assert r.status_code == 400
    # async validation: duplicate custom_id and url mismatch -> failed with errors
    b = oa_create(c, [chat_line("a", "x"), chat_line("a", "y"), chat_line("z", "q", url="/v1/embeddings")])
    b, seen = poll(c, f"/batches/{b['id']}", "status", OA_TERMINAL)
    assert seen == ["failed"] and b["failed_at"]
    codes = {e["code"] for e in b["errors"]["data"]}
    assert {"duplicate_custom_id", "url_mismatch"} <= codes
    assert "output_file_id" not in b and "error_file_id" not in b
    assert taken(fake) == ["line 1: not JSON: Expecting value: line 1 column 1 (char 0)",
                           "request: body completion_window: '48h' is not one of ['24h']"]


def test_openai_fault_429_then_success(fake: ProviderFake) -> None:
    c = oa(fake)
    b = oa_create(c, [chat_line("a", "hi")])
    r = httpx.post(fake.base_url + "/_fake/faults", json={
        "provider": "openai", "method": "GET", "path_regex": "/batches/", "status": 429, "retry_after": 1,
        "times": 2})
    assert r.status_code == 200
    for _ in range(2):
        r = c.get(f"/batches/{b['id']}")
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    r = c.get(f"/batches/{b['id']}")
    assert r.status_code == 200 and r.json()["status"] == "in_progress"  # faulted polls did not count
    log = httpx.get(fake.base_url + "/_fake/state").json()["requests"]
    assert [e["status"] for e in log if e["method"] == "GET"] == [429, 429, 200]


def test_fault_500_custom_body_and_delay(fake: ProviderFake) -> None:
    fake.add_fault(provider="openai", method="POST", path_regex="/batches$", status=503,
                   body={"error": {"message": "overloaded", "type": "server_error", "param": None,
                                   "code": None}})
    c = oa(fake)
    up = c.post("/files", files={"file": ("in.jsonl", jsonl([chat_line("a", "x")]))},
                data={"purpose": "batch"}).json()
    payload = {"input_file_id": up["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    r = c.post("/batches", json=payload)
    assert r.status_code == 503 and r.json()["error"]["message"] == "overloaded"
    fake.add_fault(provider="openai", method="GET", path_regex="/batches", delay_seconds=0.5)
    with pytest.raises(httpx.ReadTimeout):
        c.get("/batches", timeout=0.1)
    assert fake.state()["batch_creates"]["openai"] == 0


def test_openai_cancel_and_race(fake: ProviderFake) -> None:
    c = oa(fake)
    b = oa_create(c, [chat_line("fast", "quick one"), chat_line("slow", "SLOW one")])
    assert c.get(f"/batches/{b['id']}").json()["status"] == "in_progress"
    r = c.post(f"/batches/{b['id']}/cancel").json()
    assert r["status"] == "cancelling" and r["cancelling_at"]
    b2 = c.get(f"/batches/{b['id']}").json()
    assert b2["status"] == "cancelled" and b2["cancelled_at"]
    assert [x["custom_id"] for x in parse_jsonl(c.get(f"/files/{b2['output_file_id']}/content").text)] == ["fast"]
    err = parse_jsonl(c.get(f"/files/{b2['error_file_id']}/content").text)
    assert err == [{"id": err[0]["id"], "custom_id": "slow", "response": None,
                    "error": {"code": "batch_cancelled", "message": err[0]["error"]["message"]}}]
    # race: cancel arriving while finalizing ends completed
    b = oa_create(c, [chat_line("a", "x")])
    c.get(f"/batches/{b['id']}")
    assert c.get(f"/batches/{b['id']}").json()["status"] == "finalizing"
    assert c.post(f"/batches/{b['id']}/cancel").json()["status"] == "cancelling"
    assert c.get(f"/batches/{b['id']}").json()["status"] == "completed"
    # cancel after completion: unchanged
    assert c.post(f"/batches/{b['id']}/cancel").json()["status"] == "completed"
    # race forced via settings, from in_progress
    b = oa_create(c, [chat_line("a", "x")])
    httpx.post(f"{fake.base_url}/_fake/batches/openai/{b['id']}/settings", json={"cancel_race": True})
    c.post(f"/batches/{b['id']}/cancel")
    assert c.get(f"/batches/{b['id']}").json()["status"] == "completed"


def test_openai_expire_fail_and_polls_per_state(fake: ProviderFake) -> None:
    c = oa(fake)
    b = oa_create(c, [chat_line("a", "x"), chat_line("s", "SLOW y")])
    c.get(f"/batches/{b['id']}")
    r = httpx.post(f"{fake.base_url}/_fake/batches/openai/{b['id']}/expire")
    assert r.json()["state"] == "expired"
    b = c.get(f"/batches/{b['id']}").json()
    assert b["status"] == "expired" and b["expired_at"]
    err = parse_jsonl(c.get(f"/files/{b['error_file_id']}/content").text)
    assert err[0]["custom_id"] == "s" and err[0]["error"]["code"] == "batch_expired"
    b = oa_create(c, [chat_line("a", "x")])
    fake.fail("openai", b["id"], reason="nope")
    b = c.get(f"/batches/{b['id']}").json()
    assert b["status"] == "failed" and b["errors"]["data"][0]["message"] == "nope"
    b = oa_create(c, [chat_line("a", "x")])
    fake.settings("openai", b["id"], polls_per_state=2)
    _, seen = poll(c, f"/batches/{b['id']}", "status", OA_TERMINAL)
    assert seen == ["validating", "in_progress", "in_progress", "finalizing", "finalizing", "completed"]


def test_openai_list_pagination(fake: ProviderFake) -> None:
    c = oa(fake)
    ids = [oa_create(c, [chat_line("a", "x")])["id"] for _ in range(3)]
    p1 = c.get("/batches", params={"limit": 2}).json()
    assert p1["object"] == "list" and p1["has_more"] is True and len(p1["data"]) == 2
    p2 = c.get("/batches", params={"limit": 2, "after": p1["last_id"]}).json()
    assert p2["has_more"] is False
    assert sorted(x["id"] for x in p1["data"] + p2["data"]) == sorted(ids)


# ============================================================================ Azure / Groq


def test_azure_specifics(fake: ProviderFake) -> None:
    av = {"api-version": "2024-10-21"}
    c = opened(base_url=fake.url("azure"), headers={"api-key": fake.key("azure")}, params=av)
    assert httpx.get(fake.url("azure") + "/batches", headers={"api-key": fake.key("azure")}).status_code == 400
    assert taken(fake) == ["request: required query parameter 'api-version' is missing"]
    bad = httpx.get(fake.url("azure") + "/batches", headers={"api-key": "nope"}, params=av)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"  # the spec's ErrorCode
    rows = [chat_line("a", "hi", model="my-deploy", url="/chat/completions"),
            chat_line("b", "yo", model="my-deploy", url="/chat/completions")]
    created = c.post("/files", files={"file": ("in.jsonl", jsonl(rows))}, data={"purpose": "batch"})
    up = created.json()
    assert created.status_code == 201 and up["status"] == "pending"
    assert c.get(f"/files/{up['id']}").json()["status"] == "pending"
    assert c.get(f"/files/{up['id']}").json()["status"] == "processed"
    b = c.post("/batches", json={"input_file_id": up["id"], "endpoint": "/chat/completions",
                                 "completion_window": "24h"}).json()
    b, _ = poll(c, f"/batches/{b['id']}", "status", OA_TERMINAL)
    assert b["status"] == "completed" and b["error_file_id"]
    assert c.get(f"/files/{b['error_file_id']}/content").content == b""  # zero-byte error file
    assert len(parse_jsonl(c.get(f"/files/{b['output_file_id']}/content").text)) == 2
    rows[1]["body"]["model"] = "other-deploy"
    up = c.post("/files", files={"file": ("in.jsonl", jsonl(rows))}, data={"purpose": "batch"}).json()
    b = c.post("/batches", json={"input_file_id": up["id"], "endpoint": "/chat/completions",
                                 "completion_window": "24h"}).json()
    b = c.get(f"/batches/{b['id']}").json()
    # Azure 2024-10-21's BatchErrors: `data` is one object, `line` a string
    assert b["status"] == "failed" and b["errors"]["data"]["code"] == "model_mismatch"


def test_groq_specifics(fake: ProviderFake) -> None:
    c = opened(base_url=fake.url("groq"), headers={"Authorization": f"Bearer {fake.key('groq')}"})
    data = jsonl([chat_line("a", "hi", model="llama-3.1-8b-instant")])
    assert c.post("/files", files={"file": ("in.jsonl", data)}, data={"purpose": "fine-tune"}).status_code == 400
    up = c.post("/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}).json()
    r = c.post("/batches", json={"input_file_id": up["id"], "endpoint": "/v1/embeddings",
                                 "completion_window": "24h"})
    assert r.status_code == 400
    b = c.post("/batches", json={"input_file_id": up["id"], "endpoint": "/v1/chat/completions",
                                 "completion_window": "7d"}).json()
    assert "model" not in b and "usage" not in b
    b, _ = poll(c, f"/batches/{b['id']}", "status", OA_TERMINAL)
    assert b["status"] == "completed"
    lst = c.get("/batches").json()
    assert set(lst) == {"object", "data"}
    # the official groq SDK's types (tests/provider_fake/sdk_conformance.py) say both were wrong
    assert taken(fake) == ["request: form purpose: 'fine-tune' is not one of ['batch']",
                           "request: body endpoint: '/v1/embeddings' is not one of ['/v1/chat/completions']"]


# ============================================================================ Together


def test_together(fake: ProviderFake) -> None:
    c = opened(base_url=fake.url("together"), headers={"Authorization": f"Bearer {fake.key('together')}"})
    rows = [{"custom_id": "a", "body": {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}},
            {"custom_id": "b", "body": {"model": "m", "messages": [{"role": "user", "content": "FAIL"}]}}]
    assert c.post("/files/upload", files={"file": ("i.jsonl", jsonl(rows))},
                  data={"purpose": "batch", "file_name": "i.jsonl"}).status_code == 400
    assert taken(fake) == ["request: body purpose: 'batch' is not one of ['fine-tune', 'eval', 'eval-sample', "
                           "'eval-output', 'eval-summary', 'batch-generated', 'batch-api']"]
    up = c.post("/files/upload", files={"file": ("i.jsonl", jsonl(rows))},
                data={"purpose": "batch-api", "file_name": "input.jsonl"}).json()
    assert up["filename"] == "input.jsonl" and up["Processed"] is True and up["FileType"] == "jsonl"
    r = c.post("/batches", json={"input_file_id": up["id"], "endpoint": "/v1/chat/completions"})
    assert r.status_code == 201
    job = r.json()["job"]
    assert job["status"] == "VALIDATING" and re.match(r"\d{4}-\d\d-\d\dT", job["created_at"])
    assert "request_counts" not in job and job["progress"] == 0
    job, seen = poll(c, f"/batches/{job['id']}", "status", {"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"})
    assert seen == ["IN_PROGRESS", "COMPLETED"] and job["progress"] == 100
    out = parse_jsonl(c.get(f"/files/{job['output_file_id']}/content").text)
    err = parse_jsonl(c.get(f"/files/{job['error_file_id']}/content").text)
    assert [x["custom_id"] for x in out] == ["a"] and [x["custom_id"] for x in err] == ["b"]
    assert isinstance(c.get("/batches").json(), list)
    denied = httpx.get(fake.url("together") + "/batches")
    assert denied.status_code == 401 and denied.json() == {"error": "Invalid API key provided."}
    assert taken(fake) == ["request: credentials missing: needs bearerAuth (Authorization: Bearer <token>)"]


# ============================================================================ Anthropic


AB = "/v1/messages/batches"


def an(fake: ProviderFake, **headers: str) -> httpx.Client:
    h = {"x-api-key": fake.key("anthropic"), "anthropic-version": "2023-06-01"}
    h.update(headers)
    return opened(base_url=fake.url("anthropic"), headers=h)


def an_req(cid: str, text: str) -> dict[str, Any]:
    return {"custom_id": cid, "params": {"model": "claude-x", "max_tokens": 100, "system": "be brief",
                                         "messages": [{"role": "user", "content": text}]}}


def test_anthropic_happy_path(fake: ProviderFake) -> None:
    c = an(fake)
    r = c.post(AB, json={"requests": [an_req("a", "hello there"), an_req("b", "FAIL please"),
                                      an_req("c", "CACHE one two three")]})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["type"] == "message_batch" and b["processing_status"] == "in_progress"
    assert b["request_counts"] == {"processing": 3, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    assert b["results_url"] is None and b["id"].startswith("msgbatch_")
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", b["created_at"]) and b["expires_at"]
    assert b["results_url"] is None and c.get(f"{AB}/{b['id']}/results").status_code == 400
    fake.settings("anthropic", b["id"], polls_per_state=2)
    mid = c.get(f"{AB}/{b['id']}").json()
    assert mid["processing_status"] == "in_progress" and mid["request_counts"]["succeeded"] == 0
    b = c.get(f"{AB}/{b['id']}").json()
    assert b["processing_status"] == "ended" and b["ended_at"]
    assert b["request_counts"] == {"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0, "expired": 0}
    assert b["results_url"].startswith(fake.base_url)
    lines = parse_jsonl(httpx.get(b["results_url"], headers=c.headers).text)
    assert [x["custom_id"] for x in lines] == ["c", "b", "a"]
    by = {x["custom_id"]: x["result"] for x in lines}
    msg = by["a"]["message"]
    assert by["a"]["type"] == "succeeded" and msg["type"] == "message" and msg["role"] == "assistant"
    assert msg["content"] == [{"type": "text", "text": "echo: hello there"}]
    assert msg["usage"]["input_tokens"] == 4 and msg["usage"]["output_tokens"] == 3
    cu = by["c"]["message"]["usage"]  # P = 2 + 4 = 6, C = 3
    assert (cu["input_tokens"], cu["cache_read_input_tokens"], cu["cache_creation_input_tokens"]) == (3, 3, 0)
    assert by["b"]["type"] == "errored"
    assert by["b"]["error"]["type"] == "error"
    assert by["b"]["error"]["error"]["type"] == "invalid_request_error"


def test_anthropic_validation_and_auth(fake: ProviderFake) -> None:
    r = an(fake, **{"x-api-key": "bad"}).get(AB)
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    c = opened(base_url=fake.url("anthropic"), headers={"x-api-key": fake.key("anthropic")})
    assert c.get(AB).status_code == 400  # anthropic-version missing
    c = an(fake)
    r = c.post(AB, json={"requests": [an_req("bad.id:1", "x")]})
    assert r.status_code == 400 and "custom_id" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    req = an_req("ok", "x")
    del req["params"]["max_tokens"]
    assert c.post(AB, json={"requests": [req]}).status_code == 400
    assert c.post(AB, json={"requests": [an_req("d", "x"), an_req("d", "y")]}).status_code == 400
    assert fake.state()["batch_creates"]["anthropic"] == 0
    assert taken(fake) == ["request: no anthropic-version header", "request: body requests[0].params: required "
                           "field 'max_tokens' missing (MessageCreateParamsNonStreaming)"]


def test_anthropic_cancel_expire_eventual_404_and_list(fake: ProviderFake) -> None:
    c = an(fake)
    b = c.post(AB, json={"requests": [an_req("a", "x"), an_req("s", "SLOW")]}).json()
    r = c.post(f"{AB}/{b['id']}/cancel").json()
    assert r["processing_status"] == "canceling" and r["cancel_initiated_at"]
    b = c.get(f"{AB}/{b['id']}").json()
    assert b["processing_status"] == "ended" and b["request_counts"]["canceled"] == 1
    by = {x["custom_id"]: x["result"] for x in parse_jsonl(httpx.get(b["results_url"], headers=c.headers).text)}
    assert by["s"] == {"type": "canceled"} and by["a"]["type"] == "succeeded"
    b = c.post(AB, json={"requests": [an_req("s1", "SLOW"), an_req("s2", "SLOW too")]}).json()
    httpx.post(f"{fake.base_url}/_fake/batches/anthropic/{b['id']}/expire")
    b = c.get(f"{AB}/{b['id']}").json()
    assert b["processing_status"] == "ended" and b["request_counts"]["expired"] == 2
    assert b["cancel_initiated_at"] is None
    fake.configure(anthropic_eventual_404=True)
    b = c.post(AB, json={"requests": [an_req("a", "x")]}).json()
    r = c.get(f"{AB}/{b['id']}")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert c.get(f"{AB}/{b['id']}").status_code == 200
    p1 = c.get(AB, params={"limit": 2}).json()
    assert p1["has_more"] is True and len(p1["data"]) == 2
    p2 = c.get(AB, params={"limit": 2, "after_id": p1["last_id"]}).json()
    assert p2["has_more"] is False and len(p2["data"]) == 1


# ============================================================================ Gemini


def gm(fake: ProviderFake) -> httpx.Client:
    return opened(base_url=fake.url("gemini"), headers={"x-goog-api-key": fake.key("gemini")})


def g_req(text: str) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}],
            "systemInstruction": {"parts": [{"text": "be brief"}]}}


GM_TERMINAL = {f"BATCH_STATE_{s}" for s in ("SUCCEEDED", "FAILED", "CANCELLED", "EXPIRED")}


def g_poll(c: httpx.Client, name: str) -> tuple[dict, list[str]]:
    seen = []
    for _ in range(10):
        op = c.get(f"/v1beta/{name}").json()
        seen.append(op["metadata"]["state"])
        if seen[-1] in GM_TERMINAL:
            return op, seen
    raise AssertionError(seen)


def test_gemini_inline(fake: ProviderFake) -> None:
    c = gm(fake)
    reqs = [{"request": g_req("hello there"), "metadata": {"key": "r1"}},
            {"request": g_req("please FAIL"), "metadata": {"key": "r2"}},
            {"request": g_req("THINK CACHE a b c"), "metadata": {"key": "r3"}}]
    r = c.post("/v1beta/models/gemini-2.5-flash:batchGenerateContent",
               json={"batch": {"display_name": "j", "input_config": {"requests": {"requests": reqs}}}})
    assert r.status_code == 200, r.text
    op = r.json()
    assert op["name"].startswith("batches/") and "done" not in op
    assert op["metadata"]["state"] == "BATCH_STATE_PENDING" and op["metadata"]["model"] == "models/gemini-2.5-flash"
    assert op["metadata"]["batchStats"] == {"requestCount": "3", "pendingRequestCount": "3"}
    op, seen = g_poll(c, op["name"])
    assert seen == ["BATCH_STATE_RUNNING", "BATCH_STATE_SUCCEEDED"] and op["done"] is True
    assert op["metadata"]["batchStats"] == {"requestCount": "3", "successfulRequestCount": "2",
                                            "failedRequestCount": "1"}
    inl = op["response"]["inlinedResponses"]["inlinedResponses"]
    assert op["metadata"]["output"]["inlinedResponses"]["inlinedResponses"] == inl
    assert [x["metadata"]["key"] for x in inl] == ["r1", "r2", "r3"]  # input order
    first = inl[0]["response"]
    assert first["candidates"][0]["content"] == {"parts": [{"text": "echo: hello there"}], "role": "model"}
    assert first["usageMetadata"] == {"promptTokenCount": 4, "candidatesTokenCount": 3, "totalTokenCount": 7}
    assert inl[1]["error"]["code"] == 3 and "response" not in inl[1]
    u3 = inl[2]["response"]["usageMetadata"]  # P = 2 + 5 = 7
    assert u3 == {"promptTokenCount": 7, "candidatesTokenCount": 6, "totalTokenCount": 16,
                  "thoughtsTokenCount": 3, "cachedContentTokenCount": 3}


def test_gemini_file_mode(fake: ProviderFake) -> None:
    c = gm(fake)
    data = jsonl([{"key": "k1", "request": g_req("one")}, {"key": "k2", "request": g_req("two FAIL")}])
    start = c.post("/upload/v1beta/files", json={"file": {"display_name": "in"}}, headers={
        "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(len(data)),
        "X-Goog-Upload-Header-Content-Type": "application/jsonl"})
    assert start.status_code == 200
    url = start.headers["X-Goog-Upload-URL"]
    fin = httpx.post(url, content=data, headers={"X-Goog-Upload-Command": "upload, finalize",
                                                 "X-Goog-Upload-Offset": "0"})
    assert fin.status_code == 200 and fin.headers["X-Goog-Upload-Status"] == "final"
    fname = fin.json()["file"]["name"]
    assert fname.startswith("files/")
    op = c.post("/v1beta/models/gemini-2.5-flash:batchGenerateContent",
                json={"batch": {"displayName": "j", "inputConfig": {"fileName": fname}}}).json()
    op, _ = g_poll(c, op["name"])
    rf = op["response"]["responsesFile"]
    r = c.get(f"/download/v1beta/{rf}:download", params={"alt": "media"})
    lines = parse_jsonl(r.text)
    assert [x["key"] for x in lines] == ["k2", "k1"]
    assert lines[0]["error"]["code"] == 3 and "candidates" in lines[1]["response"]
    assert c.get(f"/download/v1beta/{fname}:download", params={"alt": "media"}).status_code == 400
    assert fake.state()["file_uploads"]["gemini"] == 1


def test_gemini_cancel_expire_fail_auth_list(fake: ProviderFake) -> None:
    c = gm(fake)

    def create() -> str:
        body = {"batch": {"input_config": {"requests": {"requests": [{"request": g_req("x")}]}}}}
        return c.post("/v1beta/models/m:batchGenerateContent", json=body).json()["name"]

    n1, n2, n3 = create(), create(), create()
    assert c.post(f"/v1beta/{n1}:cancel").json() == {}
    op = c.get(f"/v1beta/{n1}").json()
    assert op["metadata"]["state"] == "BATCH_STATE_CANCELLED" and "response" not in op
    httpx.post(f"{fake.base_url}/_fake/batches/gemini/{n2}/expire")
    op = c.get(f"/v1beta/{n2}").json()
    assert op["metadata"]["state"] == "BATCH_STATE_EXPIRED" and op["done"] and "response" not in op
    fake.fail("gemini", n3, "bad input")
    op = c.get(f"/v1beta/{n3}").json()
    assert op["metadata"]["state"] == "BATCH_STATE_FAILED" and op["error"]["message"] == "bad input"
    bad = httpx.get(fake.url("gemini") + "/v1beta/batches", headers={"x-goog-api-key": "nope"})
    assert bad.status_code == 400 and bad.json()["error"]["status"] == "INVALID_ARGUMENT"
    assert httpx.get(fake.url("gemini") + "/v1beta/batches").status_code == 403
    assert taken(fake) == ["request: no x-goog-api-key (or ?key=)"]
    p1 = c.get("/v1beta/batches", params={"pageSize": 2}).json()
    assert len(p1["operations"]) == 2 and p1["nextPageToken"]
    p2 = c.get("/v1beta/batches", params={"pageSize": 2, "pageToken": p1["nextPageToken"]}).json()
    assert len(p2["operations"]) == 1 and "nextPageToken" not in p2


# ============================================================================ Mistral


def test_mistral(fake: ProviderFake) -> None:
    c = opened(base_url=fake.url("mistral"), headers={"Authorization": f"Bearer {fake.key('mistral')}"})
    rows = [{"custom_id": "a", "body": {"messages": [{"role": "user", "content": "hi there"}]}},
            {"custom_id": "b", "body": {"messages": [{"role": "user", "content": "FAIL"}]}}]
    up = c.post("/files", files={"file": ("in.jsonl", jsonl(rows))}, data={"purpose": "batch"}).json()
    assert up["purpose"] == "batch" and up["num_lines"] == 2
    r = c.post("/batch/jobs", json={"input_files": [up["id"]], "endpoint": "/v1/bogus", "model": "m"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "endpoint"]
    assert [t[:40] for t in taken(fake)] == ["request: body endpoint: '/v1/bogus' is n"]
    job = c.post("/batch/jobs", json={"input_files": [up["id"]], "endpoint": "/v1/chat/completions",
                                      "model": "mistral-small-latest"}).json()
    assert job["status"] == "QUEUED" and job["total_requests"] == 2
    job, seen = poll(c, f"/batch/jobs/{job['id']}", "status",
                     {"SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"})
    assert seen == ["RUNNING", "SUCCESS"]
    assert (job["succeeded_requests"], job["failed_requests"], job["completed_requests"]) == (1, 1, 2)
    out = parse_jsonl(c.get(f"/files/{job['output_file']}/content").text)
    assert out[0]["custom_id"] == "a" and out[0]["response"]["body"]["model"] == "mistral-small-latest"
    assert parse_jsonl(c.get(f"/files/{job['error_file']}/content").text)[0]["custom_id"] == "b"
    # inline requests, cancel
    slow = {"custom_id": "s", "body": {"messages": [{"role": "user", "content": "SLOW"}]}}
    inline = c.post("/batch/jobs", json={"requests": [*rows, slow], "endpoint": "/v1/chat/completions",
                                         "model": "m"}).json()
    c.get(f"/batch/jobs/{inline['id']}")
    assert c.post(f"/batch/jobs/{inline['id']}/cancel").json()["status"] == "CANCELLATION_REQUESTED"
    j = c.get(f"/batch/jobs/{inline['id']}", params={"inline": "true"}).json()
    assert j["status"] == "CANCELLED" and {o["custom_id"] for o in j["outputs"]} == {"a", "b", "s"}
    httpx.post(f"{fake.base_url}/_fake/batches/mistral/{job['id']}/expire")  # terminal: no-op
    third = c.post("/batch/jobs", json={"requests": rows, "endpoint": "/v1/chat/completions", "model": "m"}).json()
    fake.expire("mistral", third["id"])
    assert c.get(f"/batch/jobs/{third['id']}").json()["status"] == "TIMEOUT_EXCEEDED"
    lst = c.get("/batch/jobs", params={"page": 0, "page_size": 2}).json()
    assert lst["object"] == "list" and lst["total"] == 3 and len(lst["data"]) == 2
    assert len(c.get("/batch/jobs", params={"page": 1, "page_size": 2}).json()["data"]) == 1
    assert httpx.get(fake.url("mistral") + "/batch/jobs").status_code == 401
    assert taken(fake) == ["request: credentials missing: needs ApiKey (Authorization: Bearer <token>)"]


# ============================================================================ process mode


def test_subprocess_mode() -> None:
    with subprocess.Popen([sys.executable, "-m", "tests.provider_fake", "--port", "0"], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        _run_subprocess_fake(proc)


def _run_subprocess_fake(proc: subprocess.Popen[str]) -> None:
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"PORT (\d+)\n", line)
        assert m, line
        base = f"http://127.0.0.1:{m.group(1)}"
        r = httpx.get(base + "/openai/v1/batches", headers={"Authorization": "Bearer fake-openai-key"})
        assert r.status_code == 200 and r.json()["data"] == []
        assert httpx.post(base + "/_fake/reset").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ============================================================================ fault switches for engine tests


def finished_openai_batches(fake: ProviderFake, c: httpx.Client, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        b = oa_create(c, [chat_line("a", f"hello {i}"), chat_line("b", "FAIL it")])
        fake.complete("openai", b["id"])
        out.append(c.get(f"/batches/{b['id']}").json())
    return out


def test_results_download_failing_forever_per_batch_or_globally(fake: ProviderFake) -> None:
    c = oa(fake)
    first, second = finished_openai_batches(fake, c, 2)
    fake.add_fault(provider="openai", kind="results", batch=first["id"], status=404, times=None)
    for _ in range(5):  # forever: every download of that batch's output or error file
        assert c.get(f"/files/{first['output_file_id']}/content").status_code == 404
        assert c.get(f"/files/{first['error_file_id']}/content").status_code == 404
    assert c.get(f"/files/{second['output_file_id']}/content").status_code == 200  # another batch
    assert c.get(f"/batches/{first['id']}").status_code == 200  # status polls are not results
    assert fake.state()["faults_pending"] == [None]
    fake.clear_faults()
    fake.add_fault(provider="openai", kind="results", raw_body='{"custom_id": "sl-0", "resp', times=None)
    for b in (first, second):
        r = c.get(f"/files/{b['output_file_id']}/content")
        assert r.status_code == 200 and r.text == '{"custom_id": "sl-0", "resp'  # unreadable, every time
    fake.clear_faults()
    fake.add_fault(kind="results", status=500, times=None)  # any provider
    an_c = an(fake)
    ab = an_c.post(AB, json={"requests": [an_req("a", "hi")]}).json()
    fake.complete("anthropic", ab["id"])
    assert an_c.get(f"{AB}/{ab['id']}/results").status_code == 500
    assert an_c.get(f"{AB}/{ab['id']}").status_code == 200
    log = [(r["kind"], r["batch"], r["status"]) for r in fake.state()["requests"] if r["fault"]]
    assert ("results", ab["id"], 500) in log


def test_status_that_stays_unknown_and_nonsense_counts(fake: ProviderFake) -> None:
    """What a batch *reports* can be pinned, whatever it really does; the fake's answers then break
    the spec on purpose, so they are not checked against it."""
    c = oa(fake)
    b = oa_create(c, [chat_line("a", "one"), chat_line("b", "two"), chat_line("c", "three")])
    fake.settings("openai", b["id"], reported_status="mystery_state", reported_counts={"completed": 95, "failed": 5})
    for _ in range(6):
        got = c.get(f"/batches/{b['id']}").json()
        assert got["status"] == "mystery_state"
        assert got["request_counts"]["completed"] == 95 and got["request_counts"]["failed"] == 5
    assert fake.state()["batches"]["openai"][b["id"]]["kind"] == "completed"  # it really finished
    fake.configure(reported_status="weird")  # every new batch, any provider
    try:
        assert oa_create(c, [chat_line("a", "x")])["status"] == "weird"
        ab = an(fake).post(AB, json={"requests": [an_req("a", "hi")]}).json()
        assert ab["processing_status"] == "weird"
    finally:
        fake.configure(reported_status=None)
    assert oa_create(c, [chat_line("a", "x")])["status"] == "validating"
    fake.settings("anthropic", ab["id"], reported_counts={"succeeded": 95})
    assert an(fake).get(f"{AB}/{ab['id']}").json()["request_counts"]["succeeded"] == 95


def test_provider_that_stops_answering(fake: ProviderFake) -> None:
    c = oa(fake)
    fake.add_fault(provider="openai", method="GET", path_regex="/batches$", hang=True, times=None)
    for _ in range(2):
        with pytest.raises(httpx.ReadTimeout):
            c.get("/batches", timeout=0.3)
    fake.clear_faults()  # hung requests are released (their connections dropped)
    assert c.get("/batches").status_code == 200
    fake.add_fault(provider="openai", reset=True, times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        c.get("/batches")
    assert c.get("/batches").status_code == 200
    port = fake.port
    fake.refuse_connections()
    try:
        for _ in range(2):
            with pytest.raises(httpx.ConnectError):
                c.get("/batches")
    finally:
        fake.accept_connections()
    assert fake.port == port and c.get("/batches").status_code == 200


def test_cancel_calls_recorded_per_batch(fake: ProviderFake) -> None:
    c = oa(fake)
    b = oa_create(c, [chat_line("a", "SLOW one")])
    other = oa_create(c, [chat_line("a", "x")])
    c.post(f"/batches/{b['id']}/cancel")
    fake.add_fault(provider="openai", kind="cancel", status=500, times=1)
    assert c.post(f"/batches/{b['id']}/cancel").status_code == 500  # a faulted call reached the provider too
    assert fake.cancel_calls("openai", b["id"]) == 2 and fake.cancel_calls("openai", other["id"]) == 0
    assert fake.state()["cancels"]["openai"] == {b["id"]: 2}
    an_c = an(fake)
    ab = an_c.post(AB, json={"requests": [an_req("a", "SLOW")]}).json()
    an_c.post(f"{AB}/{ab['id']}/cancel")
    assert fake.cancel_calls("anthropic", ab["id"]) == 1
