"""Issue #10 end to end: `sluice run` (server, engine, Envoy) as a child process on ports chosen at
run time, the official `openai` SDK through Envoy (and native gRPC on the same stack), real
providers replaced by the loopback provider fake (OpenAI, Anthropic) and an OpenAI-compatible
stub (an executor provider). Every Batch body is checked against OpenAI's schema.

Covered: an idempotent create raced from two clients; a batch with failed lines retried into a
second batch (on another model), with merged results and a merged output file; a batch of OpenAI,
Anthropic and sim lines with one output file, per-part status, and a cancel reaching every part;
an estimate whose cost range holds the cost charged on sim; a project over its budget refused
with 429 `insufficient_quota` and nothing stored, and the spend readable."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
import pytest

from sluice.v1 import batch_pb2, batch_pb2_grpc
from tests.compat_stub import CompatStub
from tests.e2e import KEY_A, KEY_B, Stack, check, raw_json, start_stack
from tests.harness import until
from tests.provider_fake import ProviderFake

CHAT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
BUDGET = 0.002  # US dollars a month for project beta


def providers_file(path: Path, fake: ProviderFake, stub: CompatStub) -> Path:
    path.write_text(f"""
providers:
  openai:
    kind: openai
    base_url: {fake.url("openai")}
    api_key_env: FAKE_OPENAI_KEY
    models:
      gpt-4o-mini: {{input_per_mtok: 0.15, output_per_mtok: 0.60}}
  anthropic:
    kind: anthropic
    base_url: {fake.base_url}/anthropic
    api_key_env: FAKE_ANTHROPIC_KEY
    models:
      claude-haiku-4-5: {{input_per_mtok: 1.00, output_per_mtok: 5.00}}
  local:
    kind: openai_compatible
    base_url: {stub.url}
    batch_discount: 0.0
    models:
      stub-model: {{input_per_mtok: 0.10, output_per_mtok: 0.10}}
""")
    return path


@pytest.fixture(scope="module")
def fake() -> Iterator[ProviderFake]:
    with ProviderFake() as server:
        yield server


@pytest.fixture(scope="module")
def stub() -> Iterator[CompatStub]:
    with CompatStub() as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fake: ProviderFake, stub: CompatStub) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("capabilities")
    env = {"SLUICE_PROVIDERS_FILE": str(providers_file(work / "providers.yaml", fake, stub)),
           "FAKE_OPENAI_KEY": fake.key("openai"), "FAKE_ANTHROPIC_KEY": fake.key("anthropic"),
           "SLUICE_BUDGETS": f"beta={BUDGET}", "SLUICE_MAX_BATCH_REQUESTS": "200000"}
    with start_stack(work, f"sqlite+aiosqlite:///{work}/sluice.db", **env) as s:
        yield s


@pytest.fixture
def clean_fake(fake: ProviderFake) -> ProviderFake:
    fake.reset()
    fake.configure(polls_per_state=1)
    return fake


def line(custom_id: str, text: str = "hello there", model: str = "sim/small", **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16, **body}}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def upload(client: openai.OpenAI, lines: list[dict[str, Any]]) -> str:
    return client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch").id


def create(client: openai.OpenAI, file_id: str, **kwargs: Any) -> Any:
    batch, _ = raw_json(client.batches.with_raw_response.create, input_file_id=file_id, endpoint=CHAT,
                        completion_window="24h", schema="Batch", **kwargs)
    return batch


def wait(client: openai.OpenAI, batch_id: str, done: Any = None, timeout: float = 90.0) -> Any:
    test = done or (lambda b: b.status in TERMINAL)

    async def check_batch() -> Any:
        batch, _ = raw_json(client.batches.with_raw_response.retrieve, batch_id, schema="Batch")
        return batch if test(batch) else None

    return asyncio.run(until(f"batch {batch_id}", check_batch, timeout))


def get(client: openai.OpenAI, path: str, **params: Any) -> Any:
    response = client.get(path, cast_to=httpx2.Response, options={"params": params})
    assert response.status_code == 200, response.text
    return response.json()


def post(client: openai.OpenAI, path: str, body: dict[str, Any], **headers: str) -> Any:
    response = client.post(path, body=body, cast_to=httpx2.Response, options={"headers": headers})
    assert response.status_code == 200, response.text
    return response.json()


def content(client: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def grpc_stub(stack: Stack) -> tuple[grpc.Channel, batch_pb2_grpc.BatchServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}")
    return channel, batch_pb2_grpc.BatchServiceStub(channel)


AUTH_A = (("authorization", f"Bearer {KEY_A}"),)


# --------------------------------------------------------------------------- idempotency


def test_an_idempotent_create_raced_from_two_clients_makes_one_batch(stack: Stack) -> None:
    file_id = upload(stack.sdk(), [line(f"r{i}", f"question {i}") for i in range(2000)])
    clients = [stack.sdk(), stack.sdk()]
    got: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(clients))

    def race(client: openai.OpenAI) -> None:
        try:
            start.wait()
            got.append(create(client, file_id, extra_headers={"Idempotency-Key": "race-1"}).id)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 2 and got[0] == got[1], (got, errors)
    listed = [b.id for b in stack.sdk().batches.list(limit=100)]
    assert listed.count(got[0]) == 1
    # The SDK's own retry of the same request (same key, same body) gets the same batch...
    assert create(stack.sdk(), file_id, extra_headers={"Idempotency-Key": "race-1"}).id == got[0]
    # ... and over gRPC the same key is the `idempotency-key` metadata.
    channel, batches = grpc_stub(stack)
    with channel:
        same = batches.CreateBatch(batch_pb2.CreateBatchRequest(input_file_id=file_id, endpoint=CHAT,
                                                                completion_window="24h"),
                                   metadata=(*AUTH_A, ("idempotency-key", "race-1")), timeout=60)
    assert same.id == got[0]
    # Another body with the key: a 422 the SDK does not retry, and nothing new stored.
    with pytest.raises(openai.UnprocessableEntityError) as info:
        create(stack.sdk(), file_id, metadata={"other": "body"}, extra_headers={"Idempotency-Key": "race-1"})
    assert info.value.code == "idempotency_key_reused" and got[0] in info.value.message
    check("ErrorResponse", info.value.response.json())
    assert [b.id for b in stack.sdk().batches.list(limit=100)] == listed
    assert wait(stack.sdk(), got[0]).status == "completed"


# --------------------------------------------------------------------------- retries


def test_failed_lines_retried_on_another_model_with_merged_results_and_file(stack: Stack, stub: CompatStub) -> None:
    client = stack.sdk()
    ids = [f"q{i}" for i in range(6)]
    lines = [line(cid, "SIM_FAIL this one" if i % 3 == 1 else f"question {i}") for i, cid in enumerate(ids)]
    first = wait(client, create(client, upload(client, lines)).id)
    assert first.status == "completed" and (first.request_counts.completed, first.request_counts.failed) == (4, 2)

    served = stub.served
    retry = client.post(f"/batches/{first.id}/retry", body={"model": "local/stub-model"},
                        cast_to=openai.types.Batch)  # the SDK parses it as a Batch
    body = check("Batch", post(client, f"/batches/{first.id}/retry", {"custom_ids": ["q0"]}))
    assert retry.retry_of == first.id and retry.request_counts.total == 2 and body["retry_of"] == first.id
    retry = wait(client, retry.id)
    assert retry.status == "completed" and retry.request_counts.completed == 2
    assert stub.served - served == 2  # just the failed lines ran again, on the other model
    retries = raw_json(client.batches.with_raw_response.retrieve, first.id, schema="Batch")[1]["retries"]
    assert retries == [retry.id, body["id"]]

    # The whole chain in one paginated call: every line once, its latest attempt.
    page = get(client, f"/batches/{retry.id}/results", across_retries="true", limit=4)
    rest = get(client, f"/batches/{retry.id}/results", across_retries="true", limit=4, after=page["next_cursor"])
    merged = page["data"] + rest["data"]
    assert [r["custom_id"] for r in merged] == ids and {r["status"] for r in merged} == {"completed"}
    assert [(r["batch_id"], r["attempt"]) for r in merged if r["custom_id"] in ("q1", "q4")] == [
        (retry.id, 2), (retry.id, 2)]
    assert merged[1]["model"] == "local/stub-model" and merged[1]["provider"] == "local"
    history = get(client, f"/batches/{first.id}/q1/attempts")["data"]
    assert [(h["attempt"], h["status"], h["provider"]) for h in history] == [(1, "failed", "sim"),
                                                                             (2, "completed", "local")]
    # One merged output file, in the first batch's order.
    output = content(client, retry.merged_output_file_id)
    assert [x["custom_id"] for x in output] == ids
    assert output[1]["response"]["body"]["choices"][0]["message"]["content"] == "stub says hello"
    assert getattr(retry, "merged_error_file_id", None) is None

    # Over gRPC: the same chain.
    channel, batches = grpc_stub(stack)
    with channel:
        listed = batches.ListBatchResults(batch_pb2.ListBatchResultsRequest(id=first.id, across_retries=True),
                                          metadata=AUTH_A, timeout=30)
    assert [(r.custom_id, r.batch_id) for r in listed.data] == [(m["custom_id"], m["batch_id"]) for m in merged]


# --------------------------------------------------------------------------- mixed providers


def test_openai_anthropic_and_sim_lines_in_one_batch(stack: Stack, clean_fake: ProviderFake) -> None:
    client = stack.sdk()
    models = ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5", "sim/small"]
    lines = [line(f"m{i}", "FAIL now" if i == 4 else f"question {i}", model=models[i % 3]) for i in range(9)]
    batch, body = raw_json(client.batches.with_raw_response.create, input_file_id=upload(client, lines),
                           endpoint=CHAT, completion_window="24h", schema="Batch")
    assert body["provider"] == "mixed"
    assert [(p["provider"], p["request_counts"]["total"]) for p in body["parts"]] == [
        ("openai", 3), ("anthropic", 3), ("sim", 3)]
    done = wait(client, batch.id)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (8, 1)
    _, body = raw_json(client.batches.with_raw_response.retrieve, batch.id, schema="Batch")
    parts = body["parts"]
    assert [(p["provider"], p["status"]) for p in parts] == [("openai", "completed"), ("anthropic", "completed"),
                                                             ("sim", "completed")]
    assert [p["request_counts"]["failed"] for p in parts] == [0, 1, 0]
    assert parts[0]["provider_batch_id"] and parts[1]["provider_batch_id"] and "provider_batch_id" not in parts[2]
    assert clean_fake.state()["batch_creates"]["openai"] == 1 == clean_fake.state()["batch_creates"]["anthropic"]
    output = content(client, done.output_file_id)
    assert [x["custom_id"] for x in output] == [f"m{i}" for i in range(9) if i != 4]
    assert [x["custom_id"] for x in content(client, done.error_file_id)] == ["m4"]
    assert done.usage.input_tokens > 0 and body["usage"]["total_cost"] > 0


def test_a_cancel_reaches_every_part(stack: Stack, clean_fake: ProviderFake) -> None:
    clean_fake.configure(polls_per_state=10**9)  # the providers hold their batches
    client = stack.sdk(KEY_B)
    models = ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5", "local/stub-model"]
    lines = [line(f"c{i}", f"question {i}", model=models[i % 3], max_tokens=1) for i in range(6)]
    batch = create(client, upload(client, lines))
    running = wait(client, batch.id, lambda b: all(p.get("provider_batch_id") for p in b.parts[:2]))
    assert [p["provider"] for p in running.parts] == ["openai", "anthropic", "local"]
    cancelled, _ = raw_json(client.batches.with_raw_response.cancel, batch.id, schema="Batch")
    assert cancelled.status in ("cancelling", "cancelled")

    async def both_cancelled() -> bool:
        sent = {r["provider"] for r in clean_fake.state()["requests"]
                if r["method"] == "POST" and r["path"].endswith("/cancel")}
        return sent == {"openai", "anthropic"}

    asyncio.run(until("a cancel at both native providers", both_cancelled, 60))
    for part in running.parts[:2]:
        clean_fake.settings(part["provider"], part["provider_batch_id"], polls_per_state=1)
    done = wait(client, batch.id)
    assert done.status == "cancelled"
    statuses = {p["provider"]: p["status"] for p in done.parts}
    assert statuses["openai"] == statuses["anthropic"] == "cancelled"
    assert statuses["local"] in ("cancelled", "completed")  # its two lines may have run before the cancel


# --------------------------------------------------------------------------- estimate and budget


def test_an_estimate_holds_the_cost_charged_on_sim(stack: Stack) -> None:
    client = stack.sdk()
    lines = [line(f"e{i}", " ".join(["word"] * (i * 7 + 1)) + " ünïcode, text: 42!", max_tokens=8 + i)
             for i in range(20)]
    lines.append({"custom_id": "nolimit", "method": "POST", "url": CHAT,
                  "body": {"model": "sim/small", "messages": [{"role": "system", "content": "be brief"},
                                                              {"role": "user", "content": "no max tokens"}]}})
    file_id = upload(client, lines)
    estimate = post(client, "/batches/estimate", {"input_file_id": file_id, "endpoint": CHAT,
                                                  "completion_window": "24h"})
    assert estimate["object"] == "batch.estimate" and estimate["line_count"] == 21
    (part,) = estimate["parts"]
    assert part["provider"] == "sim" and part["line_count"] == 21 and part["lines_without_max_tokens"] == 1
    tokens = part["input_tokens"]
    assert tokens["min"] <= tokens["estimate"] <= tokens["max"]
    assert part["output_tokens_max"] == sum(8 + i for i in range(20)) + 4096
    assert "UTF-8 bytes / 4" in estimate["method"]
    listed = [b.id for b in client.batches.list(limit=100)]
    assert listed == [b.id for b in client.batches.list(limit=100)]  # nothing stored by the estimate

    done = wait(client, create(client, file_id).id)
    assert done.status == "completed"
    charged = done.usage.model_extra["total_cost"] if done.usage.model_extra else None
    charged = charged if charged is not None else raw_json(client.batches.with_raw_response.retrieve, done.id,
                                                            schema="Batch")[1]["usage"]["total_cost"]
    assert estimate["cost_min"] <= charged <= estimate["cost_max"], (estimate, charged)
    assert tokens["min"] <= done.usage.input_tokens <= tokens["max"]
    # Inline requests estimate the same way, and a bad line is refused as create would.
    inline = post(client, "/batches/estimate", {"endpoint": CHAT, "requests": lines})
    assert (inline["cost_min"], inline["cost_max"]) == (estimate["cost_min"], estimate["cost_max"])
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/batches/estimate", body={"endpoint": CHAT, "requests": [line("a"), line("a")]},
                    cast_to=httpx2.Response)
    assert info.value.code == "duplicate_custom_id" and info.value.param == "requests[1].custom_id"


def test_a_project_over_its_budget_is_refused_and_nothing_is_stored(stack: Stack) -> None:
    client = stack.sdk(KEY_B)  # project beta: BUDGET dollars a month
    before = get(client, "/budget")
    assert before["project"] == "beta" and before["limit"] == BUDGET
    small = [line(f"s{i}", "a short question", max_tokens=16) for i in range(3)]
    done = wait(client, create(client, upload(client, small)).id)
    assert done.status == "completed"
    spent = raw_json(client.batches.with_raw_response.retrieve, done.id, schema="Batch")[1]["usage"]["total_cost"]
    after = get(client, "/budget")
    assert after["spent"] == pytest.approx(before["spent"] + spent, abs=1e-9)
    assert after["reserved"] == pytest.approx(before["reserved"], abs=1e-9)
    assert after["remaining"] == pytest.approx(BUDGET - after["spent"] - after["reserved"], abs=1e-9)

    big = [line(f"b{i}", "write a long essay", max_tokens=100_000) for i in range(10)]
    file_id = upload(client, big)
    listed = [b.id for b in client.batches.list(limit=100)]
    with pytest.raises(openai.RateLimitError) as info:
        create(client, file_id)
    err = info.value
    assert err.status_code == 429 and err.code == "insufficient_quota" and err.type == "insufficient_quota"
    assert err.response.headers["x-should-retry"] == "false"
    check("ErrorResponse", err.response.json())
    assert [b.id for b in client.batches.list(limit=100)] == listed  # nothing stored
    assert get(client, "/budget")["reserved"] == pytest.approx(after["reserved"], abs=1e-9)
    # Another project without a limit is not held to beta's.
    assert wait(stack.sdk(KEY_A), create(stack.sdk(KEY_A), upload(stack.sdk(KEY_A), big[:1])).id).status \
        == "completed"
    assert "limit" not in get(stack.sdk(KEY_A), "/budget")


# --------------------------------------------------------------------------- past provider limits


@pytest.mark.timeout(1200)  # its wait allows 900 s: four provider batches of 50,000 lines on a loaded machine
def test_a_200000_line_file_runs_as_provider_batches_of_at_most_50000(stack: Stack, clean_fake: ProviderFake) -> None:
    """Sluice's own limit raised to 200,000 lines (SLUICE_MAX_BATCH_REQUESTS); OpenAI takes 50,000
    per batch (its adapter's declared limit), so the batch is four OpenAI batches, transparently."""
    n = 200_000
    client = stack.sdk()
    template = ('{"custom_id":"r%06d","method":"POST","url":"/v1/chat/completions",'
                '"body":{"model":"openai/gpt-4o-mini","messages":[{"role":"user","content":"q %d"}]}}\n')
    data = "".join(template % (i, i) for i in range(n)).encode()
    file_id = client.files.create(file=("big.jsonl", data), purpose="batch").id
    batch = create(client, file_id)
    assert batch.request_counts.total == n
    assert [(p["provider"], p["request_counts"]["total"]) for p in batch.parts] == [("openai", 50_000)] * 4
    done = wait(client, batch.id, timeout=900)
    assert done.status == "completed", done
    assert (done.request_counts.completed, done.request_counts.failed) == (n, 0)
    state = clean_fake.state()
    assert state["batch_creates"]["openai"] == 4
    sizes = sorted(len(b.items) for b in clean_fake.store.batches["openai"].values())
    assert sizes == [50_000] * 4
    assert len({p["provider_batch_id"] for p in done.parts}) == 4
    lines = 0
    first = last = ""
    with client.files.with_streaming_response.content(done.output_file_id) as response:
        for raw in response.iter_lines():
            if raw:
                custom_id = json.loads(raw)["custom_id"]
                first = first or custom_id
                last = custom_id
                lines += 1
    assert (lines, first, last) == (n, "r000000", f"r{n - 1:06d}")


# --------------------------------------------------------------------------- executor capacity


def test_two_replicas_share_an_executor_providers_capacity(tmp_path: Path, postgres_url: str) -> None:
    """Two `sluice run` processes on one PostgreSQL database run three batches (two projects) on
    one OpenAI-compatible provider with `capacity: {concurrency: 4}`: the server never sees more
    than 4 requests at once, and when it answers 429 Sluice backs off and still finishes."""
    with CompatStub(latency=0.03) as server, ProviderFake() as unused:
        config = providers_file(tmp_path / "providers.yaml", unused, server)
        config.write_text(config.read_text() + "    capacity: {concurrency: 4}\n    options: {concurrency: 16}\n")
        env = {"SLUICE_PROVIDERS_FILE": str(config), "FAKE_OPENAI_KEY": "k", "FAKE_ANTHROPIC_KEY": "k"}
        with start_stack(tmp_path / "one", postgres_url, **env) as one, \
                start_stack(tmp_path / "two", postgres_url, **env) as two:
            work = [(one, KEY_A, "a"), (two, KEY_A, "b"), (two, KEY_B, "c")]
            made = []
            for stack, key, prefix in work:
                client = stack.sdk(key)
                lines = [line(f"{prefix}{i}", f"question {i}", model="local/stub-model") for i in range(80)]
                made.append((client, create(client, upload(client, lines)).id))
            wait(made[0][0], made[0][1], lambda b: b.request_counts.completed >= 10, timeout=120)
            server.throttle(4)
            done = [wait(client, batch_id, timeout=240) for client, batch_id in made]
    assert [d.status for d in done] == ["completed"] * 3, done
    assert all(d.request_counts.completed == 80 for d in done)
    assert server.throttled == 4 and server.served == 240
    assert 2 <= server.peak <= 4, server.peak
