"""The shipped providers.example.yaml works as README.md says: keys switch providers on, models
route by prefix, alias and declared list, and a bad file fails with a message naming the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.providers.registry import ADAPTER_KINDS, ConfigError, load_entries
from service.providers.routing import SIM, Route, Router, UnknownModel

EXAMPLE = Path(__file__).resolve().parent.parent / "providers.example.yaml"
KEYS = {"OPENAI_API_KEY": "k", "AZURE_OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k", "GEMINI_API_KEY": "k",
        "GROQ_API_KEY": "k", "MISTRAL_API_KEY": "k", "TOGETHER_API_KEY": "k"}


async def test_every_example_provider_loads_when_its_key_is_set() -> None:
    entries = load_entries(EXAMPLE, KEYS)
    assert set(entries) == {"openai", "azure", "anthropic", "gemini", "groq", "mistral", "together"}
    assert {type(e.provider).__name__ for e in entries.values()} == {
        ADAPTER_KINDS[k].split(":")[1] for k in entries}
    router = Router(entries)
    assert router.resolve("openai/gpt-4o-mini") == Route("openai", "gpt-4o-mini")
    assert router.resolve("fast") == Route("openai", "gpt-4o-mini")
    assert router.resolve("claude-haiku-4-5") == Route("anthropic", "claude-haiku-4-5")
    assert router.resolve("together/meta-llama/Llama-3.3-70B-Instruct-Turbo").provider == "together"
    with pytest.raises(UnknownModel):
        router.resolve("no-such-model")
    assert router.price(Route("openai", "gpt-4o-mini")).batch_discount == 0.5
    assert router.price(Route("groq", "llama-3.1-8b-instant")).batch_discount == 0.25
    await router.aclose()


def test_without_keys_everything_goes_to_sim(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.providers.registry import build_router

    for name in KEYS:
        monkeypatch.delenv(name, raising=False)
    router = build_router(EXAMPLE)
    assert list(router.entries) == [SIM]
    assert router.resolve("gpt-4o-mini") == Route(SIM, "gpt-4o-mini")
    assert router.resolve("sim/demo") == Route(SIM, "demo")


async def test_only_providers_with_keys_are_active_and_sim_stays_reachable(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.providers.registry import build_router

    entries = load_entries(EXAMPLE, {"ANTHROPIC_API_KEY": "k"})
    assert list(entries) == ["anthropic"]
    await Router(entries).aclose()

    for name in KEYS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    router = build_router(EXAMPLE)
    try:
        assert list(router.entries) == [SIM, "anthropic"]
        # sim/... still goes to sim, and only to sim, now that a real provider is active
        assert router.resolve("sim/demo") == Route(SIM, "demo")
        assert router.resolve("claude-haiku-4-5") == Route("anthropic", "claude-haiku-4-5")
        # a model of a provider without a key is unknown, no longer silently simulated
        for model in ("gpt-4o-mini", "openai/gpt-4o-mini", "fast", "no-such-model"):
            with pytest.raises(UnknownModel):
                router.resolve(model)
    finally:
        await router.aclose()


@pytest.mark.parametrize(("text", "message"), [
    ("providers: [1, 2]", "'providers' must be a mapping"),
    ("providers:\n  x: {kind: nope, base_url: http://h}", "unknown kind 'nope'"),
    ("providers:\n  sim: {kind: openai, base_url: http://h}", "reserved"),
    ("providers:\n  openai: {kind: openai}", "base_url is required"),
    ("providers: {", "cannot read providers file"),
    ("providers:\n  o: {kind: openai, base_url: http://h, capacity: {concurrency: 0}}",
     "capacity.concurrency must be a positive integer"),
    ("providers:\n  o: {kind: openai, base_url: http://h, capacity: {parallel: 2}}",
     "capacity takes concurrency, requests_per_minute, tokens_per_minute"),
    ("providers:\n  o: {kind: openai, base_url: http://h, batch_limits: {max_lines: many}}",
     "batch_limits.max_lines must be a positive integer"),
])
def test_bad_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_entries(path, {})


def test_batch_limits_lower_and_capacity_is_read(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text("""
providers:
  openai:
    kind: openai
    base_url: http://h
    batch_limits: {max_lines: 1000, max_bytes: 999999999999}
  local:
    kind: openai_compatible
    base_url: http://l/v1
    capacity: {concurrency: 4, requests_per_minute: 600, tokens_per_minute: 100000}
""")
    entries = load_entries(path, {})
    caps = entries["openai"].capabilities
    # A configured limit can only lower what the adapter declares (OpenAI: 50,000 lines, 200 MB).
    assert (caps.max_lines, caps.max_bytes) == (1000, 200 * 2**20)
    assert entries["local"].capabilities.max_lines is None and entries["openai"].capacity is None
    capacity = entries["local"].capacity
    assert capacity is not None
    assert (capacity.concurrency, capacity.requests_per_minute, capacity.tokens_per_minute) == (4, 600, 100_000)
