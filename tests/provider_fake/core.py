"""Shared core of the provider fake: requests/responses, state store, batch lifecycle, JSONL, usage."""

from __future__ import annotations

import datetime as _dt
import email.parser
import email.policy
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

JSON = dict[str, Any]

PROVIDERS = ("openai", "azure", "groq", "together", "anthropic", "gemini", "mistral")

DEFAULT_KEYS: dict[str, str] = {p: f"fake-{p}-key" for p in PROVIDERS}

# Markers looked for in the *user* text of a request line.
FAIL_MARKER = "FAIL"
SLOW_MARKER = "SLOW"
CACHE_MARKER = "CACHE"
THINK_MARKER = "THINK"
REASONING_TOKENS = 3


# --------------------------------------------------------------------------- HTTP plumbing


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    base_url: str

    @classmethod
    def build(cls, method: str, raw_path: str, headers: dict[str, str], body: bytes, base_url: str) -> Request:
        path, _, qs = raw_path.partition("?")
        return cls(method, unquote(path), parse_qs(qs, keep_blank_values=True), headers, body, base_url)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def arg(self, name: str, default: str | None = None) -> str | None:
        vals = self.query.get(name)
        return vals[0] if vals else default

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None

    def bearer(self) -> str | None:
        auth = self.header("authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None


@dataclass
class Response:
    """`status` 0 means: answer nothing and close the connection (a provider that drops it)."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return Response(status, json.dumps(obj).encode(), h)


def raw_response(status: int, body: bytes, content_type: str = "application/octet-stream") -> Response:
    return Response(status, body, {"Content-Type": content_type})


class HttpError(Exception):
    """Raised by handlers; the provider turns it into its own error envelope."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.extra = status, message, kind, extra


Handler = Callable[[Request, "re.Match[str]"], Response]


@dataclass
class Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


def route(method: str, regex: str, handler: Handler) -> Route:
    return Route(method, re.compile("^" + regex + "$"), handler)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Return {field name: (filename or None, value bytes)} of a multipart/form-data body."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    out: dict[str, tuple[str | None, bytes]] = {}
    if not msg.is_multipart():
        return out
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            payload = part.get_payload(decode=True)
            out[str(name)] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return out


def parse_form(req: Request) -> dict[str, tuple[str | None, bytes]]:
    ctype = req.header("content-type") or ""
    if ctype.startswith("multipart/form-data"):
        return parse_multipart(ctype, req.body)
    if ctype.startswith("application/x-www-form-urlencoded"):
        return {k: (None, v[0].encode()) for k, v in parse_qs(req.body.decode()).items()}
    raise HttpError(400, "expected a multipart/form-data body")


# --------------------------------------------------------------------------- JSONL, clocks, ids


def parse_jsonl(data: bytes) -> list[tuple[int, Any | None, str]]:
    """(line number starting at 1, parsed object or None if invalid, raw text) for non-blank lines."""
    out: list[tuple[int, Any | None, str]] = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line), line))
        except ValueError:
            out.append((n, None, line))
    return out


def to_jsonl(rows: Iterable[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def now() -> int:
    return int(time.time())


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def short_hash(*parts: str, n: int = 24) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:n]


# --------------------------------------------------------------------------- request content and usage


def _texts(content: Any) -> list[str]:
    """Text of an OpenAI/Anthropic message content (string or list of parts)."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


@dataclass
class Prompt:
    """What the fake needs to know about one request: all text, the user text, the last user text."""

    all_text: list[str]
    user_text: list[str]

    @property
    def last_user(self) -> str:
        return self.user_text[-1] if self.user_text else ""

    def has(self, marker: str) -> bool:
        return any(marker in t for t in self.user_text)


def prompt_of_messages(body: JSON, system_key: str | None = None) -> Prompt:
    """OpenAI chat / Mistral / Anthropic bodies (`messages`, optional top-level `system`)."""
    all_t: list[str] = []
    user_t: list[str] = []
    if system_key and body.get(system_key) is not None:
        all_t += _texts(body[system_key])
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            continue
        t = _texts(m.get("content"))
        all_t += t
        if m.get("role") == "user":
            user_t += t
    return Prompt(all_t, user_t)


def prompt_of_responses(body: JSON) -> Prompt:
    inp = body.get("input")
    if isinstance(inp, str):
        return Prompt([inp], [inp])
    p = prompt_of_messages({"messages": inp if isinstance(inp, list) else []})
    if isinstance(body.get("instructions"), str):
        p.all_text.insert(0, body["instructions"])
    return p


def prompt_of_embeddings(body: JSON) -> Prompt:
    inp = body.get("input")
    items = [inp] if isinstance(inp, str) else [x for x in (inp or []) if isinstance(x, str)]
    return Prompt(list(items), list(items))


def prompt_of_gemini(req: JSON) -> Prompt:
    all_t: list[str] = []
    user_t: list[str] = []
    sys_inst = req.get("systemInstruction") or req.get("system_instruction")
    if isinstance(sys_inst, dict):
        all_t += _texts(sys_inst.get("parts"))
    for c in req.get("contents") or []:
        if not isinstance(c, dict):
            continue
        t = _texts(c.get("parts"))
        all_t += t
        if c.get("role", "user") == "user":
            user_t += t
    return Prompt(all_t, user_t)


def words(text: str) -> int:
    return len(text.split())


@dataclass
class Usage:
    """Provider-neutral token counts; see the package docstring for the formula."""

    prompt: int
    cached: int
    output: int
    reasoning: int

    @property
    def total(self) -> int:
        return self.prompt + self.output + self.reasoning


def reply_text(p: Prompt) -> str:
    return f"echo: {p.last_user}".strip()


def usage_for(p: Prompt) -> Usage:
    prompt = max(1, sum(words(t) for t in p.all_text))
    cached = prompt // 2 if p.has(CACHE_MARKER) else 0
    reasoning = REASONING_TOKENS if p.has(THINK_MARKER) else 0
    return Usage(prompt, cached, words(reply_text(p)), reasoning)


def fake_embedding(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 4) for b in digest[:dims]]


def fail_message(provider: str) -> str:
    return f"request rejected by the {provider} fake: its user content contains the FAIL marker"


# --------------------------------------------------------------------------- batches


@dataclass
class Lifecycle:
    """Provider state names. `path` is the happy path; index >= started_index means work has begun."""

    path: list[str]
    cancelling: str | None
    cancelled: str
    expired: str
    failed: str
    started_index: int = 1
    finishing: str | None = None  # a cancel arriving in this state loses the race (ends completed)


@dataclass
class Item:
    """One request inside a batch, already parsed by the provider module."""

    custom_id: str | None
    body: JSON
    prompt: Prompt
    kind: str = "chat"  # chat | embeddings | responses | anthropic | gemini | unsupported
    extra: JSON = field(default_factory=dict)

    @property
    def fails(self) -> bool:
        return self.prompt.has(FAIL_MARKER) or self.kind == "unsupported"

    @property
    def slow(self) -> bool:
        return self.prompt.has(SLOW_MARKER)


@dataclass
class FileRec:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    extra: JSON = field(default_factory=dict)


@dataclass
class Batch:
    provider: str
    id: str
    items: list[Item]
    life: Lifecycle
    polls_per_state: int
    state: str = ""
    kind: str = "running"  # running | completed | cancelled | expired | failed
    index: int = 0
    polls: int = 0
    started: bool = False
    cancel_requested: bool = False
    cancel_race: bool = False
    eventual_404: bool = False
    gets: int = 0
    validation_errors: list[JSON] = field(default_factory=list)
    fail_reason: str | None = None
    created_at: int = field(default_factory=now)
    times: dict[str, int] = field(default_factory=dict)
    data: JSON = field(default_factory=dict)
    finalized: bool = False
    # Fault injection: what the provider *reports*, whatever the batch really does (see README)
    reported_status: str | None = None
    reported_counts: JSON | None = None
    # Sums over the items by outcome, kept while the outcomes stay what they were: every outcome
    # depends only on `kind` and `started` (items never change), and a batch of 50,000 lines is
    # polled many times, so summing again at every poll made the fake the slowest part of a test.
    _sums: dict[tuple[str, str, bool], Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.state = self.life.path[0]
        self.started = self.life.started_index <= 0

    @property
    def terminal(self) -> bool:
        return self.kind != "running"

    def outcome(self, item: Item) -> str:
        """succeeded | errored | canceled | expired | none (batch failed before running)."""
        done = self.kind == "completed" or (self.started and not item.slow and self.kind != "failed")
        if done:
            return "errored" if item.fails else "succeeded"
        return {"cancelled": "canceled", "expired": "expired"}.get(self.kind, "none")

    def counts(self) -> dict[str, int]:
        def count() -> dict[str, int]:
            c = {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, "none": 0}
            for it in self.items:
                c[self.outcome(it)] += 1
            return c
        return dict(self.summed("counts", count))

    def summed(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()` (a sum over the items' outcomes), computed once per `kind` and `started`."""
        key = (name, self.kind, self.started)
        if key not in self._sums:
            self._sums[key] = compute()
        return self._sums[key]


class Store:
    """All mutable state of one fake. Guarded by `lock` (handlers run under it)."""

    def __init__(self, keys: dict[str, str] | None = None, polls_per_state: int = 1,
                 anthropic_eventual_404: bool = False) -> None:
        self.lock = threading.RLock()
        self.keys = dict(DEFAULT_KEYS)
        self.keys.update(keys or {})
        self.default_polls = polls_per_state
        self.default_eventual_404 = anthropic_eventual_404
        self.seq = 0  # never reset, so ids are not reused after /_fake/reset
        self.violations: list[Any] = []  # spec violations; only `take_violations` empties it
        self.default_overrides: JSON = {}  # reported_status / reported_counts of new batches
        self.off_spec = False  # set while rendering a response that carries a deliberate override
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.batches: dict[str, dict[str, Batch]] = {p: {} for p in PROVIDERS}
            self.files: dict[str, dict[str, FileRec]] = {p: {} for p in PROVIDERS}
            self.uploads: dict[str, JSON] = {}
            self.creates: dict[str, int] = {p: 0 for p in PROVIDERS}
            self.file_uploads: dict[str, int] = {p: 0 for p in PROVIDERS}
            self.log: list[JSON] = []
            self.bodies: list[tuple[str, str, str, bytes]] = []  # (provider, method, path, body) of each request
            self.faults: list[Fault] = []
            self.cancels: dict[str, dict[str, int]] = {p: {} for p in PROVIDERS}
            self.default_overrides.clear()

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def new_id(self, prefix: str, provider: str) -> str:
        return prefix + short_hash(provider, str(self.next_seq()))

    # files
    def add_file(self, provider: str, rec: FileRec, upload: bool = True) -> FileRec:
        self.files[provider][rec.id] = rec
        if upload:
            self.file_uploads[provider] += 1
        return rec

    def get_file(self, provider: str, file_id: str) -> FileRec | None:
        return self.files[provider].get(file_id)

    # batches
    def add_batch(self, batch: Batch) -> Batch:
        batch.eventual_404 = batch.eventual_404 or (batch.provider == "anthropic" and self.default_eventual_404)
        batch.reported_status = batch.reported_status or self.default_overrides.get("reported_status")
        batch.reported_counts = batch.reported_counts or self.default_overrides.get("reported_counts")
        batch.times[batch.state] = batch.created_at
        self.batches[batch.provider][batch.id] = batch
        self.creates[batch.provider] += 1
        return batch

    def get_batch(self, provider: str, batch_id: str) -> Batch | None:
        return self.batches[provider].get(batch_id)

    def snapshot(self) -> JSON:
        return {
            "batch_creates": dict(self.creates),
            "file_uploads": dict(self.file_uploads),
            "batches": {p: {bid: {"state": b.state, "kind": b.kind} for bid, b in d.items()}
                        for p, d in self.batches.items()},
            "requests": list(self.log),
            "faults_pending": [f.times for f in self.faults],
            "cancels": {p: dict(d) for p, d in self.cancels.items()},
            "violations": [v.as_json() for v in self.violations],
        }

    def overridden(self, b: Batch, obj: JSON, status_key: str, counts: JSON | None) -> JSON:
        """Apply a batch's fault-injection overrides to its rendered object: the status field
        `status_key` of `obj` and the count fields in `counts` (a dict inside `obj`, or `obj`)."""
        if b.reported_status is not None:
            obj[status_key] = b.reported_status
            self.off_spec = True
        if b.reported_counts:
            (counts if counts is not None else obj).update(b.reported_counts)
            self.off_spec = True
        return obj


# --------------------------------------------------------------------------- lifecycle transitions


def _set_state(b: Batch, state: str) -> None:
    b.state = state
    b.times.setdefault(state, now())


def advance(b: Batch) -> bool:
    """Count one status poll; move one state when `polls_per_state` polls are reached. True if moved."""
    if b.terminal:
        return False
    b.polls += 1
    if b.polls < b.polls_per_state:
        return False
    b.polls = 0
    life = b.life
    if life.cancelling is not None and b.state == life.cancelling:
        if b.cancel_race:
            finish(b, "completed")
        else:
            finish(b, "cancelled")
        return True
    if b.index == 0 and b.validation_errors:
        finish(b, "failed")
        return True
    b.index += 1
    if b.index >= life.started_index:
        b.started = True
    if b.index >= len(life.path) - 1:
        finish(b, "completed")
    else:
        _set_state(b, life.path[b.index])
    return True


def finish(b: Batch, kind: str, reason: str | None = None) -> None:
    if b.terminal:
        return
    b.kind = kind
    if reason:
        b.fail_reason = reason
    life = b.life
    state = {"completed": life.path[-1], "cancelled": life.cancelled, "expired": life.expired,
             "failed": life.failed}[kind]
    if kind == "completed":
        b.started = True
    _set_state(b, state)


def request_cancel(b: Batch) -> None:
    """Cancel semantics shared by all providers. A cancel that arrives once the work is finished
    (terminal, or in the `finishing` state, or with the `cancel_race` setting) ends `completed`."""
    if b.terminal or b.cancel_requested:
        return
    b.cancel_requested = True
    b.times["cancel_requested"] = now()
    if b.life.finishing is not None and b.state == b.life.finishing:
        b.cancel_race = True
    if b.life.cancelling is not None:
        b.polls = 0
        _set_state(b, b.life.cancelling)
    else:
        finish(b, "completed" if b.cancel_race else "cancelled")


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Target:
    """What a provider request is about: a batch (or none) and the kind of call."""

    batch_id: str | None = None
    kind: str = "other"  # create | status | cancel | results | other


@dataclass
class Fault:
    """An injected misbehaviour for the next `times` matching requests (None: forever)."""

    provider: str | None
    method: str | None
    path_regex: str | None
    status: int | None
    retry_after: float | None = None
    times: int | None = 1
    delay_seconds: float = 0.0
    body: Any = None
    raw_body: str | None = None  # sent verbatim (status defaults to 200): an unreadable answer
    hang: bool = False  # hold the request until faults are cleared or the fake stops, then drop it
    reset: bool = False  # close the connection without answering
    batch: str | None = None  # only requests about this provider batch (its status, cancel, results)
    kind: str | None = None  # only this kind of call: create | status | cancel | results

    @classmethod
    def from_json(cls, d: JSON) -> Fault:
        unknown = set(d) - {"provider", "method", "path_regex", "status", "retry_after", "times", "delay_seconds",
                            "body", "raw_body", "hang", "reset", "batch", "kind"}
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        times = d.get("times", 1)
        return cls(
            provider=d.get("provider"),
            method=(d.get("method") or None),
            path_regex=d.get("path_regex"),
            status=d.get("status"),
            retry_after=d.get("retry_after"),
            times=None if times is None or int(times) < 0 else int(times),
            delay_seconds=float(d.get("delay_seconds", 0) or 0),
            body=d.get("body"),
            raw_body=d.get("raw_body"),
            hang=bool(d.get("hang", False)),
            reset=bool(d.get("reset", False)),
            batch=(str(d["batch"]).removeprefix("batches/") if d.get("batch") else None),
            kind=d.get("kind"),
        )

    def matches(self, provider: str, method: str, path: str, target: Target) -> bool:
        if self.times is not None and self.times <= 0:
            return False
        if self.provider and self.provider != provider:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        if self.batch and self.batch != target.batch_id:
            return False
        if self.kind and self.kind != target.kind:
            return False
        return not (self.path_regex and not re.search(self.path_regex, path))


def take_fault(store: Store, provider: str, method: str, path: str, target: Target) -> Fault | None:
    with store.lock:
        for f in store.faults:
            if f.matches(provider, method, path, target):
                if f.times is not None:
                    f.times -= 1
                return f
    return None
