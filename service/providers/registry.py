"""Builds the Router from settings: the built-in `sim` provider plus the providers declared in
the configuration file (`SLUICE_PROVIDERS_FILE`, YAML; see providers.example.yaml).

A declared provider whose API key variable is unset is skipped with a log line, so one file
serves every environment: with no keys at all, everything runs on `sim`.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from adapters.base import Provider
from adapters.sim import SimProvider
from service.domain.model import Price
from service.providers.routing import DEFAULT_SIM_PRICE, SIM, CapacityLimits, ProviderEntry, Router

log = logging.getLogger(__name__)

# kind -> "module:Class". Every class takes (name, *, base_url, api_key, options).
ADAPTER_KINDS: dict[str, str] = {
    "openai": "adapters.openai:OpenAIAdapter",
    "azure": "adapters.openai:AzureOpenAIAdapter",
    "groq": "adapters.openai:GroqAdapter",
    "together": "adapters.together:TogetherAdapter",
    "anthropic": "adapters.anthropic:AnthropicAdapter",
    "gemini": "adapters.gemini:GeminiAdapter",
    "mistral": "adapters.mistral:MistralAdapter",
    "openai_compatible": "adapters.openai_compatible:OpenAICompatibleExecutor",
}


class ConfigError(Exception):
    """The configuration (a setting, the providers file) cannot be used; the message says what to
    change. The `sluice` command reports it as `sluice: <message>` and exits with status 2."""


def _adapter_class(kind: str) -> type[Provider]:
    module, _, cls = ADAPTER_KINDS[kind].partition(":")
    found: type[Provider] = getattr(importlib.import_module(module), cls)
    return found


def _price(raw: Any, discount: float) -> Price:
    raw = raw or {}
    return Price(input_per_mtok=float(raw.get("input_per_mtok", 0.0)),
                 output_per_mtok=float(raw.get("output_per_mtok", 0.0)),
                 batch_discount=float(raw.get("batch_discount", discount)))


def _limit(path: Path, name: str, section: str, raw: Any, key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{path}: provider {name!r}: {section}.{key} must be a positive integer, got {value!r}")
    return value


def _section(path: Path, name: str, spec: dict[str, Any], section: str, keys: tuple[str, ...]) -> dict[str, Any]:
    raw = spec.get(section) or {}
    if not isinstance(raw, dict) or set(raw) - set(keys):
        raise ConfigError(f"{path}: provider {name!r}: {section} takes {', '.join(keys)}")
    return raw


def load_entries(path: Path, environ: dict[str, str] | None = None) -> dict[str, ProviderEntry]:
    env = os.environ if environ is None else environ
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read providers file: {exc}") from None
    providers = data.get("providers") or {}
    if not isinstance(providers, dict):
        raise ConfigError(f"{path}: 'providers' must be a mapping of name -> settings")
    entries: dict[str, ProviderEntry] = {}
    for name, spec in providers.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{path}: provider {name!r}: settings must be a mapping")
        kind = spec.get("kind", name)
        if kind not in ADAPTER_KINDS:
            raise ConfigError(f"{path}: provider {name!r}: unknown kind {kind!r} (known: {', '.join(ADAPTER_KINDS)})")
        if name == SIM or "/" in name:
            raise ConfigError(f"{path}: provider name {name!r} is reserved or contains '/'")
        key_env = spec.get("api_key_env")
        api_key = env.get(key_env, "") if key_env else ""
        if key_env and not api_key:
            log.info("provider %s skipped: %s is not set", name, key_env)
            continue
        if "base_url" not in spec:
            raise ConfigError(f"{path}: provider {name!r}: base_url is required")
        discount = float(spec.get("batch_discount", 0.5))
        models = spec.get("models") or {}
        if isinstance(models, list):
            models = {m: None for m in models}
        adapter = _adapter_class(kind)(name, base_url=spec["base_url"], api_key=api_key,
                                       options=spec.get("options") or {})
        limits = _section(path, name, spec, "batch_limits", ("max_lines", "max_bytes"))
        cap = _section(path, name, spec, "capacity", ("concurrency", "requests_per_minute", "tokens_per_minute"))
        capacity = CapacityLimits(*(_limit(path, name, "capacity", cap, k)
                                    for k in ("concurrency", "requests_per_minute", "tokens_per_minute")))
        entries[name] = ProviderEntry(
            provider=adapter, models=set(models), aliases=dict(spec.get("aliases") or {}),
            prices={m: _price(p, discount) for m, p in models.items()},
            default_price=_price(spec.get("default_price"), discount),
            max_lines=_limit(path, name, "batch_limits", limits, "max_lines"),
            max_bytes=_limit(path, name, "batch_limits", limits, "max_bytes"),
            capacity=capacity if cap else None,
        )
        log.info("provider %s (%s) at %s: %d models", name, kind, spec["base_url"], len(models))
    return entries


def build_router(providers_file: Path | None, *, sim_latency_ms: float = 50.0, sim_failure_rate: float = 0.0,
                 executor_concurrency: int = 16) -> Router:
    sim = SimProvider(SIM, options={"latency_ms": sim_latency_ms, "failure_rate": sim_failure_rate,
                                    "concurrency": executor_concurrency})
    entries = {SIM: ProviderEntry(provider=sim, default_price=DEFAULT_SIM_PRICE)}
    if providers_file:
        entries.update(load_entries(providers_file))
    return Router(entries)
