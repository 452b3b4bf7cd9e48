"""Check the fake's Anthropic, Groq and Gemini traffic against those providers' official Python SDKs.

No official machine-readable spec of these three could be obtained, so their official SDKs (pinned
in pyproject's dev extras) stand in for one, as `conformance.Conformance` does for the others
(same interface, same `Violation`s, same fixture):

- Anthropic (`anthropic`): the create body against `BatchCreateParams` (strictly: no field the
  SDK does not declare; see tests/sdk_types.py), list query parameters against `BatchListParams`,
  `x-api-key`/`anthropic-version` present; answers against `MessageBatch`, the list page,
  `DeletedMessageBatch`, each results line against `MessageBatchIndividualResponse`, errors
  against `ErrorResponse` (pydantic validation of the SDK's response models).
- Groq (`groq`): the upload form against `FileCreateParams`, each JSONL line against OpenAI's
  `BatchRequestInput` (Groq documents OpenAI's line format) with its `body` against Groq's chat
  `CompletionCreateParams`, the create body against `BatchCreateParams`; answers against the
  SDK's `File*Response` / `Batch*Response` models.
- Gemini (`google-genai`): the `batchGenerateContent` body (`batch.inputConfig`, inline requests or
  a file name) and each line of an uploaded JSONL file, every `GenerateContentRequest` field
  against the SDK's pydantic type for it (`Content`, `Tool`, `ToolConfig`, `GenerationConfig`,
  `SafetySetting`; `extra='forbid'`, camelCase or snake_case as the API accepts). Its answers are
  checked by the SDK itself, in tests/test_sdk_oracles.py (the SDK converts them before typing).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
from typing_extensions import TypedDict

from tests.sdk_types import type_errors

from .conformance import Violation, jsonl_objects, schema_errors
from .core import parse_multipart

Check = Callable[[Any], list[str]]


def _model(tp: Any) -> Check:
    """Validation as the SDK's pydantic type (a model, or any type pydantic can adapt)."""
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(tp)

    def check(value: Any) -> list[str]:
        try:
            adapter.validate_python(value)
        except pydantic.ValidationError as e:
            return [f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors()[:10]]
        return []
    return check


def _typed(tp: Any) -> Check:
    return lambda value: type_errors(value, tp)


@dataclass(frozen=True)
class SdkRoute:
    method: str
    pattern: re.Pattern[str]
    query: Any = None  # TypedDict of the query parameters (None: none allowed)
    body: Check | None = None  # JSON body check (None: no body allowed)
    form: Any = None  # TypedDict of a multipart form (file fields are bytes)
    response: Check | None = None  # 2xx JSON answer (None: bytes or unchecked)
    jsonl_response: Check | None = None  # 2xx JSONL answer, per line
    bytes_body: bool = False  # a body that is not JSON is data (an upload), not a mistake


def _route(method: str, regex: str, **kw: Any) -> SdkRoute:
    return SdkRoute(method, re.compile("^" + regex + "$"), **kw)


class SdkConformance:
    """Requests and answers of one provider, checked against its official SDK's types."""

    def __init__(self, provider: str, routes: list[SdkRoute], auth: Callable[[Mapping[str, str],
                 Mapping[str, list[str]]], list[str]], error: Check | None,
                 lines: Callable[[bytes], list[tuple[int, str]]] | None = None,
                 auth_query: tuple[str, ...] = ()) -> None:
        self.provider = provider
        self.routes = routes
        self.auth = auth
        self.error = error
        self.lines = lines
        self.auth_query = auth_query

    def _v(self, method: str, path: str, where: str, message: str) -> Violation:
        return Violation(self.provider, method, path, where, message)

    def route(self, method: str, path: str) -> SdkRoute | None:
        return next((r for r in self.routes if r.method == method and r.pattern.match(path)), None)

    def check_request(self, method: str, path: str, query: Mapping[str, list[str]], headers: Mapping[str, str],
                      body: bytes) -> list[Violation]:
        r = self.route(method, path)
        if r is None:
            return [self._v(method, path, "request", "the official SDK has no such operation")]
        out = self.auth(headers, query)
        allowed = set(_hints(r.query)) | set(self.auth_query)
        out += [f"query parameter {k!r} is not one the SDK sends" for k in query if k not in allowed]
        if r.query is not None:
            values = {k: _coerce(v[-1]) for k, v in query.items() if k not in self.auth_query}
            out += [f"query {e}" for e in type_errors(values, r.query)]
        ctype = headers.get("content-type", "")
        if r.form is not None:
            if not ctype.startswith("multipart/form-data"):
                out.append(f"expected a multipart/form-data body, got {ctype!r}")
            else:
                form = {k: ("<bytes>" if filename is not None else data.decode())
                        for k, (filename, data) in parse_multipart(ctype, body).items()}
                out += [f"form {e}" for e in type_errors(form, r.form) if not e.startswith("file:")]
        elif r.body is not None:
            try:
                value = json.loads(body.decode("utf-8")) if body else None
            except (UnicodeDecodeError, ValueError) as e:
                if not r.bytes_body:
                    out.append(f"body is not JSON: {e}")
            else:
                out += [f"body {e}" for e in r.body(value)]
        elif body:
            out.append(f"a {len(body)}-byte body was sent to an operation the SDK sends without one")
        return [self._v(method, path, "request", m) for m in out]

    def check_lines(self, method: str, path: str, purpose: str, data: bytes) -> list[Violation]:
        if self.lines is None:
            return []
        return [self._v(method, path, f"line {n}", m) for n, m in self.lines(data)]

    def check_output_lines(self, batch_id: str, rows: list[Any]) -> list[Violation]:
        return []

    def check_response(self, method: str, path: str, status: int, headers: Mapping[str, str],
                       body: bytes) -> list[Violation]:
        r = self.route(method, path)
        if r is None:
            return []
        check = self.error if status >= 400 else r.response
        if check is None and r.jsonl_response is None:
            return []
        if status < 400 and r.jsonl_response is not None:
            out = []
            for n, line in enumerate(body.decode("utf-8", errors="replace").splitlines(), start=1):
                if line.strip():
                    out += [f"line {n}: {e}" for e in r.jsonl_response(json.loads(line))]
            return [self._v(method, path, "response", m) for m in out]
        assert check is not None
        try:
            value = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return [self._v(method, path, "response", f"body is not JSON: {e}")]
        return [self._v(method, path, "response", f"status {status} {e}") for e in check(value)]


def _hints(tp: Any) -> dict[str, Any]:
    import typing
    return typing.get_type_hints(tp) if tp is not None else {}


def _coerce(raw: str) -> Any:
    if re.fullmatch(r"-?\d+", raw):
        return int(raw)
    return {"true": True, "false": False}.get(raw, raw)


def _bearer(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> list[str]:
    auth = headers.get("authorization", "")
    return [] if auth.lower().startswith("bearer ") and auth[7:].strip() else ["no Authorization: Bearer <key>"]


# --------------------------------------------------------------------------- Anthropic


def _anthropic() -> SdkConformance:
    from anthropic.pagination import SyncPage
    from anthropic.types import ErrorResponse
    from anthropic.types.messages import (
        DeletedMessageBatch,
        MessageBatch,
        MessageBatchIndividualResponse,
        batch_create_params,
        batch_list_params,
    )

    base = "/anthropic/v1/messages/batches"
    one = base + r"/[^/]+"

    def auth(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> list[str]:
        out = [] if headers.get("x-api-key") or headers.get("authorization") else ["no x-api-key"]
        return out + ([] if headers.get("anthropic-version") else ["no anthropic-version header"])

    return SdkConformance("anthropic", [
        _route("POST", base, body=_typed(batch_create_params.BatchCreateParams), response=_model(MessageBatch)),
        _route("GET", base, query=batch_list_params.BatchListParams, response=_model(SyncPage[MessageBatch])),
        _route("GET", one, response=_model(MessageBatch)),
        _route("DELETE", one, response=_model(DeletedMessageBatch)),
        _route("POST", one + "/cancel", response=_model(MessageBatch)),
        _route("GET", one + "/results", jsonl_response=_model(MessageBatchIndividualResponse)),
    ], auth, _model(ErrorResponse))


# --------------------------------------------------------------------------- Groq


def _groq() -> SdkConformance:
    from groq.types import (
        BatchCancelResponse,
        BatchCreateResponse,
        BatchListResponse,
        BatchRetrieveResponse,
        FileCreateResponse,
        FileDeleteResponse,
        FileInfoResponse,
        FileListResponse,
        batch_create_params,
        file_create_params,
    )
    from groq.types.chat import completion_create_params

    v = "/groq/openai/v1"

    def lines(data: bytes) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        for n, obj, problem in jsonl_objects(data):
            if problem:
                out.append((n, problem))
                continue
            out += [(n, m) for m in schema_errors("openai-batch-lines.json", "#/components/schemas/BatchRequestInput",
                                                  obj)]
            body = obj.get("body") if isinstance(obj, dict) else None
            out += [(n, f"body {m}") for m in type_errors(body, completion_create_params.CompletionCreateParams)]
        return out

    return SdkConformance("groq", [
        _route("POST", v + "/files", form=file_create_params.FileCreateParams, response=_model(FileCreateResponse)),
        _route("GET", v + "/files", response=_model(FileListResponse)),
        _route("GET", v + r"/files/[^/]+", response=_model(FileInfoResponse)),
        _route("DELETE", v + r"/files/[^/]+", response=_model(FileDeleteResponse)),
        _route("GET", v + r"/files/[^/]+/content"),
        _route("POST", v + "/batches", body=_typed(batch_create_params.BatchCreateParams),
               response=_model(BatchCreateResponse)),
        _route("GET", v + "/batches", response=_model(BatchListResponse)),
        _route("GET", v + r"/batches/[^/]+", response=_model(BatchRetrieveResponse)),
        _route("POST", v + r"/batches/[^/]+/cancel", response=_model(BatchCancelResponse)),
    ], _bearer, None, lines=lines)


# --------------------------------------------------------------------------- Gemini


def _gemini() -> SdkConformance:
    from google.genai import types

    adapter = _model

    fields: dict[str, Check] = {
        "contents": adapter(list[types.Content]), "systemInstruction": adapter(types.Content),
        "tools": adapter(list[types.Tool]), "toolConfig": adapter(types.ToolConfig),
        "safetySettings": adapter(list[types.SafetySetting]), "generationConfig": adapter(types.GenerationConfig),
        "cachedContent": adapter(str), "labels": adapter(dict[str, str]), "model": adapter(str),
    }
    snake = {re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k): v for k, v in fields.items()}
    fields |= snake

    def request(value: Any, where: str) -> list[str]:
        if not isinstance(value, dict):
            return [f"{where}: expected a GenerateContentRequest object"]
        out = [f"{where}: unknown field {k!r}" for k in value if k not in fields]
        out += [f"{where}.{k}.{e}" for k, v in value.items() if k in fields for e in fields[k](v)]
        return out + ([] if "contents" in value else [f"{where}: no contents"])

    def create(body: Any) -> list[str]:
        batch = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(batch, dict) or set(body) != {"batch"}:
            return ["expected {\"batch\": {...}}"]
        known = {"displayName", "display_name", "inputConfig", "input_config", "model"}
        out = [f"batch: unknown field {k!r}" for k in batch if k not in known]
        cfg = batch.get("inputConfig", batch.get("input_config"))
        if not isinstance(cfg, dict):
            return [*out, "batch.inputConfig missing"]
        if set(cfg) - {"requests", "fileName", "file_name"} or len(cfg) != 1:
            return [*out, f"batch.inputConfig must be one of requests or fileName, got {sorted(cfg)}"]
        if "requests" in cfg:
            reqs = cfg["requests"].get("requests") if isinstance(cfg["requests"], dict) else None
            if not isinstance(reqs, list):
                return [*out, "batch.inputConfig.requests.requests must be a list"]
            for i, item in enumerate(reqs):
                where = f"requests[{i}]"
                if not isinstance(item, dict) or set(item) - {"request", "metadata"}:
                    out.append(f"{where}: expected {{request, metadata}}")
                    continue
                out += request(item.get("request"), f"{where}.request")
                out += [f"{where}.metadata.{e}" for e in adapter(dict[str, str])(item.get("metadata") or {})]
        return out

    def lines(data: bytes) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        for n, obj, _ in jsonl_objects(data):  # lines that are not JSON: not a batch input file
            if isinstance(obj, dict) and "request" in obj:
                extra = set(obj) - {"key", "request"}
                out += [(n, f"unknown field {k!r}") for k in sorted(extra)]
                out += [(n, m) for m in request(obj["request"], "request")]
        return out

    def auth(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> list[str]:
        return [] if headers.get("x-goog-api-key") or query.get("key") else ["no x-goog-api-key (or ?key=)"]

    g = "/gemini/v1beta"
    return SdkConformance("gemini", [
        _route("POST", g + r"/models/[^/:]+:batchGenerateContent", body=create),
        _route("GET", g + "/batches", query=_ListQuery),
        _route("GET", g + r"/batches/[^/:]+"),
        _route("DELETE", g + r"/batches/[^/:]+"),
        _route("POST", g + r"/batches/[^/:]+:cancel", body=lambda b: [] if b in ({}, None) else ["expected {}"]),
        _route("GET", g + r"/files/[^/:]+"),
        _route("GET", r"/gemini(/download)?/v1beta/files/[^/:]+:download", query=_AltMedia),
        _route("POST", "/gemini/upload/v1beta/files", query=_Upload, bytes_body=True,
               body=lambda b: [] if b is None else _model(_UploadStart)(b)),
    ], _gemini_auth_or_session(auth), None, lines=lines, auth_query=("key",))


class _ListQuery(TypedDict, total=False):
    """What google-genai's `batches.list` sends."""

    pageSize: int
    pageToken: str


class _AltMedia(TypedDict):
    alt: str


class _Upload(TypedDict, total=False):
    upload_id: str
    upload_protocol: str


class _UploadStart(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    file: dict[str, Any]


def _gemini_auth_or_session(auth: Callable[[Mapping[str, str], Mapping[str, list[str]]], list[str]]
                            ) -> Callable[[Mapping[str, str], Mapping[str, list[str]]], list[str]]:
    """The resumable upload's session URL authorises itself (no key on the second request)."""
    def check(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> list[str]:
        return [] if query.get("upload_id") else auth(headers, query)
    return check


@functools.cache
def sdk_checker(provider: str) -> SdkConformance | None:
    """The SDK-based checker of a provider without an official spec here, or None."""
    build = {"anthropic": _anthropic, "groq": _groq, "gemini": _gemini}.get(provider)
    return build() if build else None
