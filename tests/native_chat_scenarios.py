"""Whole-batch scenarios for the Anthropic, Gemini and Mistral native adapters: a real in-process
Sluice (gRPC, engine, SQLite) in front of the loopback provider fake.

A fake batch is kept in one state with a huge `polls_per_state` ("held") and moved explicitly:
`step` advances it exactly one state under the fake's lock (no Sluice poll can slip in between),
`release` lets it run. Waits poll a condition with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from adapters.anthropic import AnthropicAdapter
from adapters.base import NativeBatchAdapter
from adapters.gemini import GeminiAdapter
from adapters.mistral import MistralAdapter
from adapters.sim import SimProvider
from service.domain.model import Price
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, ProviderEntry, Router
from sluice.v1 import batch_pb2
from tests.harness import Client, gateway, make_settings, md, until
from tests.native_scenarios import waits_after_faults
from tests.provider_fake import ProviderFake
from tests.provider_fake.core import advance

HOLD = 10**9
PRICE = Price(input_per_mtok=3.0, output_per_mtok=15.0, batch_discount=0.5)
WAIT = 30.0
SYSTEM = "be brief"
# custom_ids Anthropic would refuse (dots, slashes, spaces, > 64 chars): Sluice maps them to line ids.
ODD_ID = "req.1/odd id:é"
LONG_ID = "x" * 90


@dataclass(frozen=True)
class Flavor:
    provider: str
    adapter: type[NativeBatchAdapter]
    model: str
    status_path: str  # regex of the batch status GET (for faults)
    create_path: str  # regex of the create POST (for faults)
    first_state: str
    running_state: str  # the state in which work has begun (partial results exist)
    cancelled_state: str
    cached: bool  # reports cached prompt tokens
    reasoning: bool  # reports reasoning tokens apart
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def sluice_model(self) -> str:
        return f"{self.provider}/{self.model}"

    def with_options(self, **options: Any) -> Flavor:
        return Flavor(**{**self.__dict__, "options": {**self.options, **options}})


ANTHROPIC = Flavor("anthropic", AnthropicAdapter, "claude-test", r"/messages/batches/[^/]+$",
                   r"/messages/batches$", "in_progress", "in_progress", "ended", cached=True, reasoning=False)
GEMINI = Flavor("gemini", GeminiAdapter, "gemini-test", r"/v1beta/batches/[^/:]+$", r":batchGenerateContent$",
                "BATCH_STATE_PENDING", "BATCH_STATE_RUNNING", "BATCH_STATE_CANCELLED", cached=True, reasoning=True)
MISTRAL = Flavor("mistral", MistralAdapter, "mistral-test", r"/batch/jobs/[^/]+$", r"/batch/jobs$",
                 "QUEUED", "RUNNING", "CANCELLED", cached=False, reasoning=False)


# --------------------------------------------------------------------------- fake control


def serve_fake() -> Iterator[ProviderFake]:
    """Body of a module-scoped fixture: one fake per test module."""
    with ProviderFake() as fake:
        yield fake


def fresh(fake: ProviderFake) -> ProviderFake:
    """Body of a per-test fixture: no batches, faults or counters from earlier tests."""
    fake.reset()
    fake.configure(polls_per_state=1, anthropic_eventual_404=False)
    return fake


def fake_id(provider_batch_id: str) -> str:
    return provider_batch_id.removeprefix("batches/")


def step(fake: ProviderFake, flavor: Flavor, provider_batch_id: str) -> str:
    """Move a held fake batch exactly one state; returns the new state."""
    with fake.store.lock:
        batch = fake.store.get_batch(flavor.provider, fake_id(provider_batch_id))
        assert batch is not None
        batch.polls_per_state = 1
        advance(batch)
        batch.polls_per_state = HOLD
        fake.providers[flavor.provider].ensure_final(batch)
        return batch.state


def release(fake: ProviderFake, flavor: Flavor, provider_batch_id: str) -> None:
    fake.settings(flavor.provider, provider_batch_id, polls_per_state=1)


def fake_state(fake: ProviderFake, flavor: Flavor, provider_batch_id: str) -> str:
    state: str = fake.state()["batches"][flavor.provider][fake_id(provider_batch_id)]["state"]
    return state


def requests_to(fake: ProviderFake, flavor: Flavor, method: str, path_part: str) -> list[dict[str, Any]]:
    return [r for r in fake.state()["requests"]
            if r["provider"] == flavor.provider and r["method"] == method and path_part in r["path"]]


# --------------------------------------------------------------------------- Sluice side


def make_router(fake: ProviderFake, flavor: Flavor) -> Router:
    base = fake.url(flavor.provider) if flavor.provider == "mistral" else fake.base_url + f"/{flavor.provider}"
    adapter = flavor.adapter(flavor.provider, base_url=base, api_key=fake.key(flavor.provider),  # type: ignore[call-arg]
                             options=dict(flavor.options))
    return Router({
        SIM: ProviderEntry(provider=SimProvider(SIM), default_price=DEFAULT_SIM_PRICE),
        flavor.provider: ProviderEntry(provider=adapter, models={flavor.model}, prices={flavor.model: PRICE}),
    })


def line(flavor: Flavor, custom_id: str, text: str, url: str = "/v1/chat/completions",
         **extra: Any) -> batch_pb2.BatchRequestLine:
    body = struct_pb2.Struct()
    if url == "/v1/embeddings":
        body.update({"model": flavor.sluice_model, "input": text, **extra})
    else:
        body.update({"model": flavor.sluice_model, "max_tokens": 64, **extra,
                     "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]})
    return batch_pb2.BatchRequestLine(custom_id=custom_id, method="POST", url=url, body=body)


async def submitted(c: Client, batch_id: str) -> str:
    """Wait until Sluice has submitted the batch and marked it in_progress; its provider batch id.
    (Both: the engine stores the id and then moves validating → in_progress in a second write.)"""
    async def check() -> str | None:
        batch = await c.get(batch_id)
        ready = batch.HasField("provider_batch_id") and batch.status == "in_progress"
        return batch.provider_batch_id if ready else None
    pid: str = await until(f"{batch_id} submitted", check)
    return pid


async def results_by_id(c: Client, batch_id: str) -> dict[str, dict[str, Any]]:
    return {r.custom_id: json_format.MessageToDict(r, preserving_proto_field_name=True)
            for r in await c.results(batch_id)}


def words(text: str) -> int:
    return len(text.split())


def expected_usage(flavor: Flavor, text: str) -> dict[str, int]:
    """The fake's token formula (tests/provider_fake/__init__.py) seen through the adapter."""
    prompt = words(SYSTEM) + words(text)
    cached = prompt // 2 if "CACHE" in text else 0
    reasoning = 3 if "THINK" in text else 0
    completion = words("echo: " + text) + reasoning
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cached": cached if flavor.cached else 0, "reasoning": reasoning if flavor.reasoning else 0}


def check_success(flavor: Flavor, result: dict[str, Any], text: str) -> dict[str, int]:
    assert result["status"] == "completed", result
    assert result["status_code"] == 200
    body = result["response"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == f"echo: {text}"
    assert body["choices"][0]["finish_reason"] == "stop"
    want = expected_usage(flavor, text)
    usage = body["usage"]
    assert usage["prompt_tokens"] == want["prompt_tokens"]
    assert usage["completion_tokens"] == want["completion_tokens"]
    assert usage["total_tokens"] == want["total_tokens"]
    if flavor.provider != "mistral":  # the Mistral fake reports OpenAI usage without details
        assert usage["prompt_tokens_details"]["cached_tokens"] == want["cached"]
        assert usage["completion_tokens_details"]["reasoning_tokens"] == want["reasoning"]
    # the per-result usage Sluice stored and priced
    u = result["usage"]
    assert int(u.get("input_tokens", 0)) == want["prompt_tokens"]
    assert int(u.get("output_tokens", 0)) == want["completion_tokens"]
    assert int(u.get("input_tokens_details", {}).get("cached_tokens", 0)) == want["cached"]
    assert int(u.get("output_tokens_details", {}).get("reasoning_tokens", 0)) == want["reasoning"]
    assert u["input_cost"] == pytest.approx(want["prompt_tokens"] * 3.0 * 0.5 / 1e6)
    assert u["output_cost"] == pytest.approx(want["completion_tokens"] * 15.0 * 0.5 / 1e6)
    return want


# --------------------------------------------------------------------------- scenarios


async def full_batch(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """Held at the first state, then released: statuses, counts, results on custom_id, bodies,
    usage and cost; exactly one batch created at the provider."""
    fake.configure(polls_per_state=HOLD)
    texts = {ODD_ID: "hello world", LONG_ID: "CACHE and THINK deeply", "plain": "third line here"}
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create([line(flavor, cid, t) for cid, t in texts.items()])
        assert created.provider == flavor.provider
        pid = await submitted(c, created.id)
        running = await c.get(created.id)
        assert running.status == "in_progress"
        assert fake_state(fake, flavor, pid) == flavor.first_state
        release(fake, flavor, pid)
        done = await c.wait_for(created.id, timeout=WAIT)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 3, 0)
        results = await results_by_id(c, created.id)
    assert set(results) == set(texts)
    prompt = completion = cached = reasoning = 0
    for cid, text in texts.items():
        want = check_success(flavor, results[cid], text)
        prompt += want["prompt_tokens"]
        completion += want["completion_tokens"]
        cached += want["cached"]
        reasoning += want["reasoning"]
    assert done.usage.input_tokens == prompt
    assert done.usage.output_tokens == completion
    assert done.usage.input_tokens_details.cached_tokens == cached
    assert done.usage.output_tokens_details.reasoning_tokens == reasoning
    assert done.usage.total_cost == pytest.approx((prompt * 3.0 + completion * 15.0) * 0.5 / 1e6)
    assert fake.state()["batch_creates"][flavor.provider] == 1


async def mixed_results(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    texts = {"ok-1": "hello world", "bad": "please FAIL now", "ok-2": "another fine line"}
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create([line(flavor, cid, t) for cid, t in texts.items()])
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    check_success(flavor, results["ok-1"], texts["ok-1"])
    check_success(flavor, results["ok-2"], texts["ok-2"])
    bad = results["bad"]
    assert bad["status"] == "failed"
    assert bad["status_code"] == 400
    assert "FAIL marker" in bad["response"]["error"]["message"]
    assert "FAIL marker" in bad["error"]["message"]
    assert done.usage.input_cost > 0


async def cancel_batch(fake: ProviderFake, db: str, flavor: Flavor, partial: bool = True) -> None:
    """Cancel while running: propagated to the provider, confirmed by its status, finished lines
    kept (when the provider returns them), unfinished ones cancelled."""
    fake.configure(polls_per_state=HOLD)
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create([line(flavor, "done-1", "hello world"), line(flavor, "slow-1", "SLOW one")])
        pid = await submitted(c, created.id)
        if flavor.running_state != flavor.first_state:
            assert step(fake, flavor, pid) == flavor.running_state
        cancelling = await c.stub.CancelBatch(batch_pb2.CancelBatchRequest(id=created.id), metadata=md())
        assert cancelling.status == "cancelling"

        async def cancel_seen() -> bool:
            return bool(requests_to(fake, flavor, "POST", "cancel"))
        await until("the cancel at the provider", cancel_seen)
        release(fake, flavor, pid)
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert done.status == "cancelled", done
    assert fake.state()["batches"][flavor.provider][fake_id(pid)]["kind"] == "cancelled"
    assert fake_state(fake, flavor, pid) == flavor.cancelled_state
    assert results["slow-1"]["status"] == "cancelled"
    assert results["slow-1"]["error"]["code"] == "batch_cancelled"
    if partial:
        check_success(flavor, results["done-1"], "hello world")
        assert done.request_counts.completed == 1
    else:
        assert results["done-1"]["status"] == "cancelled"


async def expire_batch(fake: ProviderFake, db: str, flavor: Flavor, texts: dict[str, str],
                       want_status: str, want_lines: dict[str, str], start: bool = True) -> None:
    fake.configure(polls_per_state=HOLD)
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create([line(flavor, cid, t) for cid, t in texts.items()])
        pid = await submitted(c, created.id)
        if start and flavor.running_state != flavor.first_state:
            step(fake, flavor, pid)
        fake.expire(flavor.provider, fake_id(pid))
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert done.status == want_status, done
    for cid, status in want_lines.items():
        assert results[cid]["status"] == status, results[cid]
        if status == "completed":
            check_success(flavor, results[cid], texts[cid])
        else:
            assert results[cid]["error"]["code"] == "batch_expired"


async def transient_faults(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """429 with Retry-After and 500s while polling slow the batch down, never fail it."""
    fake.configure(polls_per_state=2)
    fake.add_fault(provider=flavor.provider, method="GET", path_regex=flavor.status_path, status=429,
                   retry_after=0.2, times=2)
    fake.add_fault(provider=flavor.provider, method="GET", path_regex=flavor.status_path, status=500, times=2)
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create([line(flavor, "a", "hello world"), line(flavor, "b", "second line")])
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert done.status == "completed", done
    assert not done.HasField("errors")
    faulted = [r["status"] for r in fake.state()["requests"] if r["fault"]]
    assert faulted == [429, 429, 500, 500]
    waits = waits_after_faults(fake, flavor.provider, 429)
    assert len(waits) == 2 and min(waits) >= 0.2, f"Retry-After: 0.2 not honoured: waited {waits}"
    assert fake.state()["faults_pending"] == [0, 0]
    check_success(flavor, results["a"], "hello world")
    assert fake.state()["batch_creates"][flavor.provider] == 1


async def submit_rejected(fake: ProviderFake, db: str, flavor: Flavor, status: int = 400,
                          body: Any = None, message: str = "injected fault") -> None:
    """A non-retryable 4xx at create fails the batch with `errors`."""
    fake.add_fault(provider=flavor.provider, method="POST", path_regex=flavor.create_path, status=status,
                   body=body, times=1)
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create([line(flavor, "a", "hello world")])
        done = await c.wait_for(created.id, timeout=WAIT)
    assert done.status == "failed", done
    assert len(done.errors.data) == 1
    assert f"HTTP {status}" in done.errors.data[0].message
    assert message in done.errors.data[0].message
    state = fake.state()
    assert state["batch_creates"][flavor.provider] == 0, state["requests"]


async def submit_unsupported(fake: ProviderFake, db: str, flavor: Flavor, lines: list[batch_pb2.BatchRequestLine],
                             message: str, endpoint: str = "/v1/chat/completions") -> None:
    """A request the provider cannot express fails the batch at submit with a clear error."""
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create(lines, endpoint=endpoint)
        done = await c.wait_for(created.id, timeout=WAIT)
    assert done.status == "failed", done
    assert message in done.errors.data[0].message, done.errors
    assert fake.state()["batch_creates"][flavor.provider] == 0


async def restart_mid_poll(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """Sluice stops while the batch runs at the provider; a new Sluice on the same database
    finishes it without submitting again."""
    fake.configure(polls_per_state=HOLD)
    texts = {"a": "hello world", "b": "please FAIL now"}
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        created = await c.create([line(flavor, cid, t) for cid, t in texts.items()])
        pid = await submitted(c, created.id)
        if flavor.running_state != flavor.first_state:
            step(fake, flavor, pid)
        assert (await c.get(created.id)).status == "in_progress"
    release(fake, flavor, pid)
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        done = await c.wait_for(created.id, timeout=WAIT)
        results = await results_by_id(c, created.id)
    assert done.status == "completed", done
    assert done.provider_batch_id == pid
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    check_success(flavor, results["a"], "hello world")
    assert results["b"]["status"] == "failed"
    assert fake.state()["batch_creates"][flavor.provider] == 1


async def crash_while_creating(fake: ProviderFake, db: str, flavor: Flavor,
                               lines: list[batch_pb2.BatchRequestLine]) -> str:
    """Sluice stops while the create call is in flight: the provider creates the batch, Sluice never
    learns its id. Returns Sluice's batch id once the provider has the batch."""
    fake.add_fault(provider=flavor.provider, method="POST", path_regex=flavor.create_path, delay_seconds=1.0)
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (app, c):
        created = await c.create(lines)

        async def create_in_flight() -> bool:
            return bool(fake.state()["faults_pending"] == [0])
        await until("the create call in flight", create_in_flight)
        await app.engine.stop(grace_seconds=0.05)  # the crash: the submit step is cancelled mid-call
        assert not (await c.get(created.id)).HasField("provider_batch_id")

    async def created_at_provider() -> bool:
        return bool(fake.state()["batch_creates"][flavor.provider] == 1)
    await until("the provider to create the batch", created_at_provider)
    return str(created.id)


async def recover_lost_submission(fake: ProviderFake, db: str, flavor: Flavor) -> None:
    """After `crash_while_creating`, the next Sluice finds the batch with `find_submitted` instead of
    creating another."""
    batch_id = await crash_while_creating(fake, db, flavor, [line(flavor, "a", "hello world")])
    async with gateway(make_settings(db, poll_seconds=0.05), make_router(fake, flavor)) as (_, c):
        done = await c.wait_for(batch_id, timeout=WAIT)
        results = await results_by_id(c, batch_id)
    assert done.status == "completed", done
    check_success(flavor, results["a"], "hello world")
    assert fake.state()["batch_creates"][flavor.provider] == 1
