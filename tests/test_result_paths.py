"""Every custom_id is reachable with the official SDK: by paging results with `after` (the SDK
sends a space in a query value as '+'), and by the per-line path
`/v1/batches/{batch_id}/results/{custom_id}`, which no sub-resource can shadow. Custom ids are
generated (Hypothesis), on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import httpx2
import openai
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.e2e import Stack
from tests.hostile import backend_stack_fixture  # noqa: F401  (the fixture `backend_stack`)

CHAT = "/v1/chat/completions"
# Storable custom ids: any text but NUL and lone surrogates (those are refused at intake).
custom_ids = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=40)


def path_segment(value: str) -> str:
    """`value` as one path segment: everything escaped, and '.'/'..' too (a client resolves those)."""
    return quote(value, safe="").replace(".", "%2E")


def line(custom_id: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": "sim/small", "messages": [{"role": "user", "content": "hi"}]}}


def completed_batch(client: openai.OpenAI, ids: list[str]) -> str:
    batch = client.batches.create(input_file_id="", endpoint=CHAT, completion_window="24h",
                                  extra_body={"requests": [line(c) for c in ids]})
    deadline = time.monotonic() + 60
    while batch.status != "completed":
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    return batch.id


def get(client: openai.OpenAI, path: str, params: dict[str, Any] | None = None) -> Any:
    response = client.get(path, cast_to=httpx2.Response, options={"params": params or {}})
    assert response.status_code == 200, response.text
    return response.json()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(custom_ids, min_size=1, max_size=7, unique=True))
@example(["a b", "a+b", "results", "cancel", "..", ".", "x/y", "100%", "?q=1#f", "é ü"])
def test_every_custom_id_is_reachable_with_the_sdk(backend_stack: Stack, ids: list[str]) -> None:
    client = backend_stack.sdk()
    batch_id = completed_batch(client, ids)
    paged: list[str] = []
    after: str | None = None
    while True:
        page = get(client, f"/batches/{batch_id}/results", {"limit": 2, **({"after": after} if after else {})})
        paged += [r["custom_id"] for r in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert paged == ids
    for custom_id in ids:
        one = get(client, f"/batches/{batch_id}/results/{path_segment(custom_id)}")
        assert one["custom_id"] == custom_id and one["status"] == "completed"


def test_the_short_path_is_shadowed_by_results_and_the_long_one_is_not(backend_stack: Stack) -> None:
    client = backend_stack.sdk()
    batch_id = completed_batch(client, ["results", "plain"])
    assert get(client, f"/batches/{batch_id}/results")["object"] == "list"  # the sub-resource wins
    assert get(client, f"/batches/{batch_id}/results/results")["custom_id"] == "results"
    assert get(client, f"/batches/{batch_id}/plain")["custom_id"] == "plain"  # the documented short form
