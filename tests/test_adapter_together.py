"""Together native batch adapter: whole batches through the real Sluice engine against the provider
fake (the same scenarios as OpenAI's), plus Together's own wire details and status map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.base import BatchJob, ProviderState, RequestLine
from adapters.openai_format import together_job_status, together_status
from adapters.together import TogetherAdapter
from service.providers.registry import load_entries
from tests import native_scenarios as sc
from tests.native_scenarios import Flavor, fake_server  # noqa: F401  (module-scoped fixture)
from tests.provider_fake import ProviderFake

TOGETHER = Flavor("together", TogetherAdapter, "meta-llama/Llama-3.3-70B-Instruct-Turbo", detailed_usage=False,
                  has_cancelling=False)


@pytest.fixture
def fake(fake_server: ProviderFake) -> ProviderFake:  # noqa: F811
    return sc.fresh(fake_server)


@pytest.fixture
def db(db_url: str) -> str:
    """Both backends (conftest's `db_url`)."""
    return db_url


async def test_full_batch(fake: ProviderFake, db: str) -> None:
    await sc.full_batch(fake, db, TOGETHER)


async def test_cancel(fake: ProviderFake, db: str) -> None:
    await sc.cancel_batch(fake, db, TOGETHER)


async def test_expiry(fake: ProviderFake, db: str) -> None:
    await sc.expire_batch(fake, db, TOGETHER)


async def test_transient_faults_do_not_fail_the_batch(fake: ProviderFake, db: str) -> None:
    await sc.transient_faults(fake, db, TOGETHER)


async def test_non_retryable_submit_error_fails_the_batch(fake: ProviderFake, db: str) -> None:
    await sc.submit_rejected(fake, db, TOGETHER)


async def test_provider_side_failure(fake: ProviderFake, db: str) -> None:
    await sc.provider_failed(fake, db, TOGETHER)


async def test_restart_mid_poll_creates_one_provider_batch(fake: ProviderFake, db: str) -> None:
    await sc.restart_mid_poll(fake, db, TOGETHER)


async def test_find_submitted_recovers_a_lost_submission(fake: ProviderFake, db: str) -> None:
    await sc.recover_lost_submission(fake, db, TOGETHER)


async def test_upload_as_the_spec_documents_and_input_format(fake: ProviderFake) -> None:
    """The only upload Together's spec has: multipart `POST /files/upload` with `purpose=batch-api`,
    `file_name` and `file`; then `POST /batches` (201, `{"job": ...}`). Lines are `{custom_id, body}`
    with Sluice's ids; `find_submitted` finds the job by its file's name."""
    adapter = TogetherAdapter("together", base_url=fake.url("together"), api_key=fake.key("together"), options={})

    async def two() -> Any:
        for i in range(2):
            yield RequestLine(i, f"mine-{i}", "/v1/chat/completions",
                              {"model": "m", "messages": [{"role": "user", "content": f"line {i}"}]})

    pid = await adapter.submit(BatchJob("batch_t1", "/v1/chat/completions", "m", "24h", 2), two())
    calls = [(r["method"], r["path"], r["status"]) for r in fake.state()["requests"]]
    assert calls == [("POST", "/together/v1/files/upload", 200), ("POST", "/together/v1/batches", 201)]
    with fake.store.lock:
        batch = fake.store.batches["together"][pid]
        f = fake.store.files["together"][batch.data["input_file_id"]]
        assert f.purpose == "batch-api" and f.filename == "sluice-batch_t1.jsonl"
        rows = [json.loads(x) for x in f.data.splitlines()]
    assert rows == [{"custom_id": f"sl-{i}", "body": {"model": "m", "messages": [{"role": "user",
                                                                                   "content": f"line {i}"}]}}
                    for i in range(2)]
    assert await adapter.find_submitted("batch_t1") == pid
    assert await adapter.find_submitted("batch_unknown") is None
    await adapter.aclose()


def test_the_fake_refuses_the_legacy_upload_flow(fake: ProviderFake) -> None:
    """`POST /files` (the old redirect flow's first step) is no operation of the spec: the fake
    answers 405 and records the violation, so an adapter that used it would fail its tests."""
    r = httpx.post(fake.url("together") + "/files", headers={"Authorization": f"Bearer {fake.key('together')}"},
                   data={"purpose": "batch-api", "file_name": "x.jsonl", "file_type": "jsonl"})
    assert r.status_code == 405
    (violation,) = fake.take_violations()
    assert violation.where == "request" and "no POST on this path" in violation.message
    assert fake.state()["file_uploads"]["together"] == 0


async def test_embeddings_refused_at_create(fake: ProviderFake, db: str) -> None:
    from google.protobuf import struct_pb2

    from sluice.v1 import batch_pb2

    body = struct_pb2.Struct()
    body.update({"model": TOGETHER.sluice_model, "input": "hello"})
    line = batch_pb2.BatchRequestLine(custom_id="e", method="POST", url="/v1/embeddings", body=body)
    await sc.refused_at_create(fake, db, sc.make_router(fake, TOGETHER), [line], "unsupported_endpoint",
                               "requests[0].url", endpoint="/v1/embeddings")


async def test_providers_yaml(fake: ProviderFake, tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(f"""
providers:
  together:
    base_url: {fake.url("together")}
    api_key_env: TOGETHER_KEY
    options: {{completion_window: 48h}}
    models: [meta-llama/Llama-3.3-70B-Instruct-Turbo]
""")
    entries = load_entries(path, {"TOGETHER_KEY": "k"})
    adapter = entries["together"].provider
    assert isinstance(adapter, TogetherAdapter)
    job = BatchJob("batch_y", "/v1/chat/completions", "m", "24h", 1)
    assert adapter.create_body(job, "file-1")["completion_window"] == "48h"
    await adapter.aclose()


@pytest.mark.parametrize(("raw", "want"), [
    ("VALIDATING", ProviderState.VALIDATING), ("IN_PROGRESS", ProviderState.IN_PROGRESS),
    ("COMPLETED", ProviderState.COMPLETED), ("FAILED", ProviderState.FAILED), ("EXPIRED", ProviderState.EXPIRED),
    ("CANCELLED", ProviderState.CANCELLED), ("CANCELING", ProviderState.CANCELLING),
    ("completed", ProviderState.COMPLETED), ("QUEUED_SOMEHOW", ProviderState.IN_PROGRESS),
])
def test_together_status_map(raw: str, want: ProviderState) -> None:
    assert together_status(raw) is want


def test_together_job_status() -> None:
    job = {"id": "5f1c", "status": "FAILED", "progress": 0.0, "created_at": "2026-01-02T03:04:05.000Z",
           "error": "line 3: custom_id must be a string of 1-64 characters"}
    state = together_job_status(job)
    assert state.status is ProviderState.FAILED and state.ended and state.raw_status == "FAILED"
    assert (state.total, state.completed, state.failed) == (None, None, None)  # Together has no counts
    assert state.errors[0].message.startswith("line 3")
    running = together_job_status({"status": "IN_PROGRESS", "progress": 50.0, "error": None})
    assert running.status is ProviderState.IN_PROGRESS and running.errors == ()


def test_created_response_is_unwrapped() -> None:
    adapter = TogetherAdapter("together", base_url="http://x/v1", api_key="k", options={})
    assert adapter.created_id({"job": {"id": "abc"}, "warning": "slow model"}) == "abc"
    assert adapter.created_id({"id": "bare"}) == "bare"
