"""Checks on a new batch and on each of its request lines.

Inline `requests` and uploaded JSONL lines go through the same `LineValidator`, so both get the
same rules and the same error codes; only the way a problem is located differs (`requests[3]`
for inline, `line 4` for files).

Routing happens here, once: each line's model is resolved to a provider and the provider's own
model name, which is stored with the line, and the line is checked against what that provider
declares it can take (`adapters.base.Capabilities`: endpoints, one model per job). A batch a
provider cannot run is refused now, naming the line, rather than accepted and failed at submit.
A batch's lines may go to several providers, and more lines than a provider takes in one batch
are fine: intake plans the parts (one provider batch each) the engine runs.
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass, field
from typing import Any

from adapters.base import Capabilities
from service.domain.errors import InvalidRequest, clip
from service.domain.model import (
    COMPLETION_WINDOWS,
    MAX_CUSTOM_ID_LEN,
    MAX_JSON_DEPTH,
    MAX_LINE_VALUES,
    MAX_METADATA_KEY_LEN,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_LEN,
    MAX_MODEL_LEN,
    MAX_OBJECT_ID_LEN,
    SUPPORTED_ENDPOINTS,
)
from service.domain.tokens import BodyTokens
from service.intake.estimate import Estimator
from service.providers.routing import Route, Router, UnknownModel
from service.storage.repository import NewPart, NewRequest

__all__ = ["MAX_CUSTOM_ID_LEN", "LineProblem", "LineValidator", "check_completion_window", "check_endpoint",
           "check_metadata", "is_object_id", "is_text", "json_shape_problem"]

MIXED = "mixed"  # the `provider` of a batch whose lines go to several providers
_OBJECT_ID = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_OBJECT_ID_LEN}}}")


def is_text(value: str) -> bool:
    """True when `value` can be stored and sent anywhere as text: valid Unicode (no lone
    surrogate, which JSON's `\\ud800` escape can produce) and no NUL (PostgreSQL refuses NUL in
    text; SQLite would store it). The one rule for every stored string, on every backend."""
    return "\x00" not in value and (value.isascii() or _encodable(value))


def is_object_id(value: str) -> bool:
    """The shape of every id Sluice hands out (`batch_...`, `file-...`): anything else is
    unknown without a database look-up (and never reaches one: no NUL, no 5,000-character key)."""
    return _OBJECT_ID.fullmatch(value) is not None


def json_shape_problem(value: Any, max_depth: int = MAX_JSON_DEPTH, max_values: int = MAX_LINE_VALUES) -> str | None:
    """What makes a parsed JSON value unacceptable, or None: nesting deeper than `max_depth`
    (the value itself is level 1), more than `max_values` values, or a string (key or value) that
    is not text. Iterative, so no input can exhaust the stack."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    count = 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > max_values:
            return f"has more than {max_values:,} JSON values"
        if isinstance(item, dict):
            if depth > max_depth:
                return f"nests deeper than {max_depth} levels"
            for key, child in item.items():
                if not (key.isascii() or _encodable(key)):
                    return "has a key that is not valid Unicode text (a lone surrogate)"
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                return f"nests deeper than {max_depth} levels"
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and not (item.isascii() or _encodable(item)):
            return "has a string that is not valid Unicode text (a lone surrogate)"
    return None


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class LineProblem(Exception):
    """What is wrong with one line: `field` is the line's field at fault (`custom_id`, ...)."""

    code: str
    message: str
    field: str | None = None


def check_endpoint(endpoint: str) -> str:
    if endpoint not in SUPPORTED_ENDPOINTS:
        raise InvalidRequest(
            f"Unsupported endpoint {clip(endpoint)}; use one of {', '.join(SUPPORTED_ENDPOINTS)}.",
            param="endpoint", code="invalid_endpoint")
    return endpoint


def check_completion_window(window: str) -> str:
    window = window or "24h"
    if window not in COMPLETION_WINDOWS:
        raise InvalidRequest(f"Unsupported completion_window {clip(window)}; only '24h' is supported.",
                             param="completion_window", code="invalid_completion_window")
    return window


MIN_EXPIRES_AFTER, MAX_EXPIRES_AFTER = 3600, 30 * 24 * 3600  # OpenAI's bounds for expires_after[seconds]


def check_expires_after(anchor: str | None, seconds: int | str | None, param: str) -> int:
    """OpenAI's `{anchor: "created_at", seconds}` (a file's `expires_after`, a batch's
    `output_expires_after`): the seconds, or a 400 naming `<param>.anchor` / `<param>.seconds`."""
    if anchor != "created_at":
        raise InvalidRequest(f"{param}[anchor] must be 'created_at', got {clip(str(anchor or ''))}.",
                             param=f"{param}.anchor", code=f"invalid_{param}")
    try:
        value: int | None = int(str(seconds).strip())
    except ValueError:
        value = None
    if value is None or not MIN_EXPIRES_AFTER <= value <= MAX_EXPIRES_AFTER:
        raise InvalidRequest(f"{param}[seconds] must be an integer from {MIN_EXPIRES_AFTER} (1 hour) to "
                             f"{MAX_EXPIRES_AFTER} (30 days), got {clip(str(seconds))}.",
                             param=f"{param}.seconds", code=f"invalid_{param}")
    return value


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    if not metadata:
        return None
    if len(metadata) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"metadata has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed.",
                             param="metadata", code="too_many_metadata_keys")
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_LEN or not is_text(key):
            raise InvalidRequest(f"metadata key {clip(key, 20)} must be text of at most {MAX_METADATA_KEY_LEN} "
                                 "characters.", param="metadata", code="invalid_metadata")
        if not isinstance(value, str) or len(value) > MAX_METADATA_VALUE_LEN or not is_text(value):
            raise InvalidRequest(
                f"metadata value of {clip(key)} must be a string of at most {MAX_METADATA_VALUE_LEN} characters.",
                param=f"metadata.{key}", code="invalid_metadata")
    return {k: str(v) for k, v in metadata.items()}


@dataclass
class _OpenPart:
    """The part a provider's next line goes into, while intake fills it."""

    part_no: int
    provider: str
    lines: int = 0
    size: int = 0
    models: set[str] = field(default_factory=set)


@dataclass
class LineValidator:
    """Validates lines one at a time (so files can stream) and remembers what it needs across
    lines: custom_ids seen, the providers the models route to, and the parts the batch splits
    into. A batch may mix providers: each provider's lines form their own part(s), each checked
    against that provider's capabilities; a provider's per-batch line and byte limits start a new
    part instead of refusing the batch."""

    endpoint: str | None  # None: the first line's url sets it (uploads, before any batch exists)
    router: Router | None = None  # None: models are not routed (uploads)
    seen: set[str] = field(default_factory=set)
    providers: dict[str, str] = field(default_factory=dict)  # provider -> first model routed there
    models: set[str] = field(default_factory=set)
    routes: dict[str, Route] = field(default_factory=dict)  # model -> where it goes, resolved once
    provider_models: dict[str, set[str]] = field(default_factory=dict)  # provider -> its models
    lines: int = 0
    size: int = 0
    open_parts: dict[str, _OpenPart] = field(default_factory=dict)  # provider -> the part it fills now
    closed_parts: list[_OpenPart] = field(default_factory=list)
    line_parts: array[int] = field(default_factory=lambda: array("i"))  # part of each checked line
    estimator: Estimator | None = None  # tallies tokens and cost per part, when set
    # provider -> its capabilities (the adapter's, with configured limits), built once, not per line
    _caps: dict[str, Capabilities] = field(default_factory=dict, repr=False)

    def check(self, raw: Any, size: int = 0) -> NewRequest:
        """Validate one line (`size`: its encoded length, for the provider's byte limit)."""
        if not isinstance(raw, dict):
            raise LineProblem("invalid_json_line", "must be a JSON object")
        custom_id = raw.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise LineProblem("missing_custom_id", "custom_id is required and must be a non-empty string",
                              "custom_id")
        if len(custom_id) > MAX_CUSTOM_ID_LEN:
            raise LineProblem("invalid_custom_id", f"custom_id is longer than {MAX_CUSTOM_ID_LEN} characters",
                              "custom_id")
        if not is_text(custom_id):
            raise LineProblem("invalid_custom_id", "custom_id must be valid Unicode text without NUL characters",
                              "custom_id")
        if custom_id in self.seen:
            raise LineProblem("duplicate_custom_id", f"custom_id {clip(custom_id)} is used more than once",
                              "custom_id")
        method = raw.get("method")
        if method != "POST":
            raise LineProblem("invalid_method", f"method must be 'POST', got {clip(method, 16)}", "method")
        url = raw.get("url")
        if url not in SUPPORTED_ENDPOINTS:
            raise LineProblem("invalid_url", f"url {clip(url)} is not a supported endpoint "
                              f"({', '.join(SUPPORTED_ENDPOINTS)})", "url")
        self._check_endpoint(url)
        body = raw.get("body")
        if not isinstance(body, dict):
            raise LineProblem("invalid_body", "body must be a JSON object", "body")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise LineProblem("missing_model", "body.model is required", "body.model")
        if len(model) > MAX_MODEL_LEN or not is_text(model):
            raise LineProblem("invalid_model", f"body.model must be text of at most {MAX_MODEL_LEN} characters "
                              "without NUL characters", "body.model")
        shape = json_shape_problem(raw)
        if shape is not None:
            raise LineProblem("line_too_complex" if "values" in shape else "invalid_json_line",
                              f"the request line {shape}", "body")
        route, part_no = self._admit(url, model, size)
        if self.estimator is not None and route is not None:
            self.estimator.add(part_no, route, url, body)
        self.seen.add(custom_id)
        return NewRequest(custom_id=custom_id, model=model, body=body,
                          provider_model=route.model if route else None,
                          provider=route.provider if route else None, part_no=part_no)

    def check_indexed(self, url: str, model: str, size: int, tokens: BodyTokens) -> None:
        """Validate a line of an uploaded file from what its upload recorded of it (its url, model,
        size and the token counts of its body). The upload held the line to every rule `check`
        applies without a batch (a JSON object; custom_id present, short, text and unique in the
        file; method; url supported; body; model; shape); what a batch can still refuse is checked
        here by the same code as in `check`, in the same order: the url against the batch's
        endpoint, then the route, the provider's capabilities and the part it goes into."""
        self._check_endpoint(url)
        route, part_no = self._admit(url, model, size)
        if self.estimator is not None and route is not None:
            self.estimator.add_tokens(part_no, route, tokens)

    def _check_endpoint(self, url: str) -> None:
        if self.endpoint is None:
            self.endpoint = url
        if url != self.endpoint:
            raise LineProblem("url_mismatch", f"url {url!r} differs from the batch endpoint {self.endpoint!r}",
                              "url")

    def _admit(self, url: str, model: str, size: int) -> tuple[Route | None, int]:
        """Route the line (when there is a router) and place it in its part."""
        route = self._route(self.router, model, url, size) if self.router is not None else None
        part_no = self._place(route, size) if route is not None else 0
        self.models.add(model)
        return route, part_no

    def route_of(self, model: str) -> Route:
        """The route a checked line's model was resolved to (for a second pass over a file)."""
        return self.routes[model]

    def part_of(self, line: int) -> int:
        """The part the `line`-th checked line (0-based) went into (for a second pass over a file)."""
        return self.line_parts[line]

    def again(self, line: int, custom_id: str, body: dict[str, Any]) -> NewRequest:
        """The `line`-th checked line (0-based) as the store takes it, routed and placed in its part
        exactly as `check` did: a second pass over a file or a message need not keep every checked
        line in memory."""
        model = body["model"]
        route = self.routes[model]
        return NewRequest(custom_id=custom_id, model=model, body=body, provider_model=route.model,
                          provider=route.provider, part_no=self.line_parts[line])

    def _route(self, router: Router, model: str, url: str, size: int) -> Route:
        route = self.routes.get(model)
        if route is None:
            try:
                route = self.routes[model] = router.resolve(model)
            except UnknownModel:
                raise LineProblem("model_not_found", f"model {clip(model)} is not served by any configured provider",
                                  "body.model") from None
        self._check_capabilities(router, route, url, size)
        self.providers.setdefault(route.provider, model)
        self.provider_models.setdefault(route.provider, set()).add(route.model)
        return route

    def _capabilities(self, router: Router, provider: str) -> Capabilities:
        caps = self._caps.get(provider)
        if caps is None:
            caps = self._caps[provider] = router.entry(provider).capabilities
        return caps

    def _check_capabilities(self, router: Router, route: Route, url: str, size: int) -> None:
        caps = self._capabilities(router, route.provider)
        if url not in caps.endpoints:
            raise LineProblem("unsupported_endpoint", f"provider {route.provider!r} cannot batch {url} (it serves "
                              f"{', '.join(sorted(caps.endpoints))})", "url")
        models = self.provider_models.get(route.provider, set())
        if caps.one_model_per_job and models and route.model not in models:
            other = next(iter(models))
            raise LineProblem("mixed_models", f"provider {route.provider!r} runs one model per batch; this line "
                              f"uses {route.model!r} and an earlier one {other!r}: split the batch by model",
                              "body.model")
        if caps.max_bytes is not None and size > caps.max_bytes:
            raise LineProblem("batch_too_large", f"this request alone is larger than the {caps.max_bytes // 2**20} MB "
                              f"provider {route.provider!r} takes per batch", None)

    def _place(self, route: Route, size: int) -> int:
        """The part this line goes into: the provider's current one, or a new one when the line
        would take that past the provider's per-batch line or byte limit."""
        assert self.router is not None
        caps = self._capabilities(self.router, route.provider)
        part = self.open_parts.get(route.provider)
        full = part is not None and (
            (caps.max_lines is not None and part.lines + 1 > caps.max_lines)
            or (caps.max_bytes is not None and part.size + size > caps.max_bytes))
        if part is None or full:
            if part is not None:
                self.closed_parts.append(part)
            number = len(self.closed_parts) + len(self.open_parts) - (1 if part is not None else 0)
            part = self.open_parts[route.provider] = _OpenPart(number, route.provider)
        part.lines += 1
        part.size += size
        part.models.add(route.model)
        self.lines += 1
        self.size += size
        self.line_parts.append(part.part_no)
        return part.part_no

    @property
    def parts(self) -> list[NewPart]:
        """The parts the checked lines make, in order."""
        every = sorted([*self.closed_parts, *self.open_parts.values()], key=lambda p: p.part_no)
        return [NewPart(p.part_no, p.provider, next(iter(p.models)) if len(p.models) == 1 else None, p.lines, p.size)
                for p in every]

    @property
    def provider(self) -> str:
        """The batch's `provider`: its one provider, or `mixed` when its lines go to several."""
        if len(self.providers) > 1:
            return MIXED
        return next(iter(self.providers), "")

    @property
    def model(self) -> str | None:
        """The batch's `model` field: set when every line uses the same model."""
        return next(iter(self.models)) if len(self.models) == 1 else None

    @property
    def provider_model(self) -> str | None:
        """The provider's model name when every line resolves to the same one."""
        every = set().union(*self.provider_models.values()) if self.provider_models else set()
        return next(iter(every)) if len(every) == 1 and len(self.providers) == 1 else None
