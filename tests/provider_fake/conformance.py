"""Check the fake's traffic against the providers' official specs (vendored in `specs/`).

Every request the fake receives for OpenAI, Azure OpenAI, Mistral or Together is checked against
that provider's document: the path and method exist; path, query and header parameters are
declared and valid (an undeclared query parameter is a violation too); the security scheme the
operation declares is present (bearer token, `api-key` header); a JSON body, a multipart body or a
form matches the request schema; and each line of an uploaded batch input file matches the spec's
line schema where the spec has one (OpenAI's `BatchRequestInput`, Mistral's `BatchRequest`).
Every response the fake sends is checked against the response the operation documents for its
status (or `default`); an error status the operation does not document is checked against the
provider's own error envelope, an undocumented success status is a violation.

The checker only reports: `ProviderFake` records each finding as a `Violation`, and the
`provider_fake_conformance` fixture (tests/conftest.py) fails the test that caused it.

How the documents are read:
- OpenAPI 3.0 and 3.1 and Swagger 2.0 (Azure) are normalised to one model: operations with
  parameters, request media types and response schemas. Schemas are validated as JSON Schema
  2020-12 with `$ref`s resolved inside the document.
- `nullable: true` (OpenAPI 3.0, and still found in the 3.1 documents of Together, Mistral and
  OpenAI) allows `null`; without it `null` is invalid. Swagger's `type: file` and OpenAPI's
  `format: binary` strings are bytes: not parsed.
- Formats checked: `uuid`, `date-time` (RFC 3339), `email`; others (`unixtime`, `int64`) are
  annotations.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .core import parse_multipart

SPEC_DIR = Path(__file__).resolve().parent / "specs"
JSON = dict[str, Any]


@dataclass(frozen=True)
class Violation:
    """One way a request or response differs from the provider's spec."""

    provider: str
    method: str
    path: str
    where: str  # request | response | line N of an uploaded file
    message: str

    def __str__(self) -> str:
        return f"{self.provider} {self.method} {self.path} [{self.where}]: {self.message}"

    def as_json(self) -> JSON:
        return {"provider": self.provider, "method": self.method, "path": self.path, "where": self.where,
                "message": self.message}


@dataclass(frozen=True)
class SpecConfig:
    """Where a provider's document is and how the fake serves it."""

    document: str  # file in specs/
    prefix: str  # the fake's base path that stands for the spec's server URL
    line_schema: tuple[str, str] | None = None  # (document, pointer) of one JSONL line of a batch input file
    line_purposes: tuple[str, ...] = ("batch",)  # upload purposes whose files hold batch input lines
    output_line_schema: tuple[str, str] | None = None  # one line of a batch's output/error file
    # Error envelope for an error status the operation does not document: {status or "*": pointer}
    error_fallback: dict[str, str] = field(default_factory=dict)
    # Path prefix -> error_fallback, for providers whose envelope depends on the resource (Together)
    error_fallback_by_path: dict[str, dict[str, str]] = field(default_factory=dict)


SPECS: dict[str, SpecConfig] = {
    "openai": SpecConfig("openai.json", "/openai/v1",
                         line_schema=("openai-batch-lines.json", "#/components/schemas/BatchRequestInput"),
                         output_line_schema=("openai-batch-lines.json", "#/components/schemas/BatchRequestOutput"),
                         error_fallback={"*": "#/components/schemas/ErrorResponse"}),
    "azure": SpecConfig("azure.json", "/azure/openai",
                        line_schema=("openai-batch-lines.json", "#/components/schemas/BatchRequestInput")),
    "mistral": SpecConfig("mistral.json", "/mistral", line_schema=("mistral.json", "#/components/schemas/BatchRequest"),
                          error_fallback={"422": "#/components/schemas/HTTPValidationError"}),
    "together": SpecConfig("together.json", "/together/v1", line_purposes=("batch-api",),
                           error_fallback_by_path={"/files": {"*": "#/components/schemas/ErrorData"},
                                                   "/batches": {"*": "#/components/schemas/BatchErrorResponse"}}),
}

_FORMATS = jsonschema.FormatChecker(formats=("uuid", "email"))


@_FORMATS.checks("date-time", raises=ValueError)
def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not re.match(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    _dt.datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    return True


def jsonl_objects(data: bytes) -> Iterator[tuple[int, Any, str | None]]:
    """(line number from 1, parsed object, None) per non-blank line, or (n, None, "not JSON: ...")."""
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line), None
        except ValueError as e:
            yield n, None, f"not JSON: {e}"


# --------------------------------------------------------------------------- documents


def _nullable(node: Any) -> Any:
    """`nullable: true` / `x-nullable: true` → JSON Schema that also accepts null."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False) is True or out.pop("x-nullable", False) is True:
        kind = out.get("type")
        if isinstance(kind, str) and "$ref" not in out:
            out["type"] = [kind, "null"]
            if isinstance(out.get("enum"), list) and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def load_document(name: str) -> JSON:
    """A vendored spec, parsed once per process and normalised (`nullable`)."""
    data: JSON = _nullable(json.loads((SPEC_DIR / name).read_text()))
    return data


@functools.cache
def _registry() -> Registry:
    resources = [(f"urn:spec:{p.name}",
                  Resource.from_contents(load_document(p.name), default_specification=DRAFT202012))
                 for p in sorted(SPEC_DIR.glob("*.json"))]
    return Registry().with_resources(resources)


@functools.cache
def _validator(document: str, pointer: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$ref": f"urn:spec:{document}{pointer}"}, registry=_registry(),
                                           format_checker=_FORMATS)


def schema_errors(document: str, pointer: str, instance: Any) -> list[str]:
    """Every way `instance` fails the schema at `pointer` in `document`, as `where: message`."""
    out = []
    for e in sorted(_validator(document, pointer).iter_errors(instance), key=lambda e: list(e.absolute_path)):
        where = "/".join(map(str, e.absolute_path)) or "<root>"
        out.append(f"{where}: {e.message[:300]}")
    return out


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def resolve(doc: JSON, node: Any) -> Any:
    """Follow local `$ref`s until a node that is not one."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        node = _pointer(doc, node["$ref"])
    return node


# --------------------------------------------------------------------------- operations


@dataclass
class Param:
    name: str
    location: str  # path | query | header
    required: bool
    pointer: str | None  # schema pointer in the document (OpenAPI 3), or None with `inline`
    inline: JSON | None = None  # Swagger 2.0: the parameter itself is the schema


@dataclass
class Operation:
    document: str
    method: str
    template: str
    regex: re.Pattern[str]
    path_names: list[str]
    params: list[Param]
    bodies: dict[str, str | JSON]  # media type -> schema pointer (or an inline schema)
    body_required: bool
    responses: dict[str, dict[str, str | JSON | None]]  # status -> media type -> schema pointer/inline/None
    security: list[dict[str, JSON]]  # alternatives; each maps scheme name -> scheme


def _template_regex(template: str) -> tuple[re.Pattern[str], list[str]]:
    names = re.findall(r"{([^}]+)}", template)
    pattern = re.sub(r"{[^}]+}", "([^/]+)", re.escape(template).replace(r"\{", "{").replace(r"\}", "}"))
    return re.compile("^" + pattern + "$"), names


def _operations(document: str) -> list[Operation]:
    doc = load_document(document)
    swagger = "swagger" in doc
    schemes = doc.get("securityDefinitions") if swagger else (doc.get("components") or {}).get("securitySchemes")
    schemes = schemes or {}
    ops: list[Operation] = []
    for template, item in doc.get("paths", {}).items():
        regex, names = _template_regex(template)
        base = f"#/paths/{_escape(template)}"
        shared = item.get("parameters") or []
        for method, op in item.items():
            if method not in ("get", "post", "put", "delete", "patch"):
                continue
            here = f"{base}/{method}"
            params: list[Param] = []
            bodies: dict[str, str | JSON] = {}
            body_required = False
            form: JSON = {"type": "object", "properties": {}, "required": []}
            raw_params = [(f"{base}/parameters/{i}", p) for i, p in enumerate(shared)] + \
                         [(f"{here}/parameters/{i}", p) for i, p in enumerate(op.get("parameters") or [])]
            for ptr, raw in raw_params:
                if isinstance(raw, dict) and "$ref" in raw:
                    ptr = raw["$ref"]
                    raw = resolve(doc, raw)
                loc = raw["in"]
                if swagger and loc == "body":
                    bodies["application/json"] = f"{ptr}/schema"
                    body_required = bool(raw.get("required"))
                elif swagger and loc == "formData":
                    spec = {k: v for k, v in raw.items() if k not in ("in", "name", "required", "description")}
                    if spec.get("type") == "file":
                        spec = {"type": "string"}
                    form["properties"][raw["name"]] = spec
                    if raw.get("required"):
                        form["required"].append(raw["name"])
                elif swagger:
                    spec = {k: v for k, v in raw.items() if k not in ("in", "name", "required", "description")}
                    params.append(Param(raw["name"], loc, bool(raw.get("required")), None, spec))
                else:
                    params.append(Param(raw["name"], loc, bool(raw.get("required")), f"{ptr}/schema"))
            if form["properties"]:
                for media in op.get("consumes") or ["multipart/form-data"]:
                    bodies[media] = form
                body_required = bool(form["required"])
            if not swagger and "requestBody" in op:
                rb_ptr = f"{here}/requestBody"
                rb = op["requestBody"]
                if "$ref" in rb:
                    rb_ptr, rb = rb["$ref"], resolve(doc, rb)
                body_required = bool(rb.get("required"))
                for media in rb.get("content", {}):
                    bodies[media] = f"{rb_ptr}/content/{_escape(media)}/schema"
            responses: dict[str, dict[str, str | JSON | None]] = {}
            for status, resp in (op.get("responses") or {}).items():
                r_ptr = f"{here}/responses/{status}"
                if isinstance(resp, dict) and "$ref" in resp:
                    r_ptr, resp = resp["$ref"], resolve(doc, resp)
                media: dict[str, str | JSON | None] = {}
                if swagger:
                    schema = resp.get("schema")
                    binary = schema is None or resolve(doc, schema).get("type") == "file"
                    for m in op.get("produces") or ["application/json"]:
                        media[m] = None if binary or "json" not in m else f"{r_ptr}/schema"
                else:
                    for m, content in (resp.get("content") or {}).items():
                        schema = content.get("schema")
                        binary = schema is None or "json" not in m or resolve(doc, schema).get("type") == "string"
                        media[m] = None if binary else f"{r_ptr}/content/{_escape(m)}/schema"
                responses[str(status)] = media
            security = op.get("security", doc.get("security")) or []
            alternatives = [{name: schemes.get(name, {}) for name in alt} for alt in security]
            ops.append(Operation(document, method.upper(), template, regex, names, params, bodies, body_required,
                                 responses, alternatives))
    # Literal paths before templated ones, so `/files/upload` is not read as `/files/{id}`.
    ops.sort(key=lambda o: len(o.path_names))
    return ops


@functools.cache
def operations(document: str) -> tuple[Operation, ...]:
    return tuple(_operations(document))


# --------------------------------------------------------------------------- value coercion


def _candidates(values: list[str]) -> list[Any]:
    """What a query/form string may stand for: itself, a number, a boolean, or the list of all values."""
    raw = values[-1]
    out: list[Any] = [raw]
    try:
        out.append(int(raw))
    except ValueError:
        pass
    try:
        out.append(float(raw))
    except ValueError:
        pass
    if raw in ("true", "false"):
        out.append(raw == "true")
    items: list[Any] = []
    for v in values:
        try:
            items.append(int(v))
        except ValueError:
            items.append(v)
    out += [list(values), items]
    return out


def _value_ok(document: str, param: Param, values: list[str]) -> list[str]:
    if param.inline is not None:
        schema = param.inline
        if schema.get("type") == "array":
            schema = {"type": "array", "items": schema.get("items", {})}
        validator = jsonschema.Draft202012Validator(schema, format_checker=_FORMATS)
        errs = [[e.message for e in validator.iter_errors(c)] for c in _candidates(values)]
    else:
        assert param.pointer is not None
        errs = [schema_errors(document, param.pointer, c) for c in _candidates(values)]
    return [] if any(not e for e in errs) else errs[0]


# --------------------------------------------------------------------------- the checker


class Conformance:
    """One provider's spec, ready to check the fake's requests and responses against it."""

    def __init__(self, provider: str, config: SpecConfig) -> None:
        self.provider = provider
        self.config = config
        self.doc = load_document(config.document)

    def _v(self, method: str, path: str, where: str, message: str) -> Violation:
        return Violation(self.provider, method, path, where, message)

    def operation(self, method: str, path: str) -> tuple[Operation | None, dict[str, str], str | None]:
        """The operation serving `path` (below the fake's prefix), its path values, or why none does."""
        sub = path[len(self.config.prefix):] if path.startswith(self.config.prefix) else None
        if sub is None:
            return None, {}, f"path is not under {self.config.prefix}"
        matched = False
        for op in operations(self.config.document):
            m = op.regex.match(sub)
            if not m:
                continue
            matched = True
            if op.method == method:
                return op, dict(zip(op.path_names, m.groups(), strict=True)), None
        if matched:
            return None, {}, f"the spec has no {method} on this path"
        return None, {}, f"the spec has no path matching {sub}"

    # --- requests
    def check_request(self, method: str, path: str, query: Mapping[str, list[str]], headers: Mapping[str, str],
                      body: bytes) -> list[Violation]:
        op, values, problem = self.operation(method, path)
        if op is None:
            return [self._v(method, path, "request", problem or "unknown operation")]
        out: list[str] = []
        out += self._security(op, query, headers)
        auth_query = {s.get("name") for alt in op.security for s in alt.values() if s.get("in") == "query"}
        declared = {p.name for p in op.params if p.location == "query"} | auth_query
        for name in sorted(set(query) - declared):
            out.append(f"query parameter {name!r} is not declared")
        for p in op.params:
            if p.location == "path":
                got = [values[p.name]] if p.name in values else []
            elif p.location == "query":
                got = list(query.get(p.name, []))
            elif p.location == "header":
                got = [headers[p.name.lower()]] if p.name.lower() in headers else []
            else:
                continue
            if not got:
                if p.required:
                    out.append(f"required {p.location} parameter {p.name!r} is missing")
                continue
            out += [f"{p.location} parameter {p.name!r}: {e}" for e in _value_ok(op.document, p, got)]
        out += self._body(op, headers, body)
        return [self._v(method, path, "request", m) for m in out]

    def _security(self, op: Operation, query: Mapping[str, list[str]], headers: Mapping[str, str]) -> list[str]:
        if not op.security:
            return []
        misses = []
        for alternative in op.security:
            missing = []
            for name, scheme in alternative.items():
                kind = scheme.get("type")
                if kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer":
                    auth = headers.get("authorization", "")
                    if not (auth.lower().startswith("bearer ") and auth[7:].strip()):
                        missing.append(f"{name} (Authorization: Bearer <token>)")
                elif kind == "apiKey":
                    where = scheme.get("in")
                    present = headers.get(str(scheme.get("name", "")).lower()) if where == "header" else (
                        query.get(str(scheme.get("name", ""))) if where == "query" else None)
                    if not present:
                        missing.append(f"{name} ({where} {scheme.get('name')!r})")
            if not missing:
                return []
            misses.append(" and ".join(missing))
        return [f"credentials missing: needs {' or '.join(misses)}"]

    def _body(self, op: Operation, headers: Mapping[str, str], body: bytes) -> list[str]:
        ctype = headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if not op.bodies:
            return [f"a {len(body)}-byte body was sent to an operation without a request body"] if body else []
        if not body and not media:
            return ["the request body is required and missing"] if op.body_required else []
        schema = op.bodies.get(media)
        if schema is None:
            return [f"content type {media or '<none>'!r} is not one of {sorted(op.bodies)}"]
        if media == "application/json" or media.endswith("+json"):
            try:
                instance = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                return [f"body is not JSON: {e}"]
        elif media == "multipart/form-data":
            instance = {}
            for name, (filename, data) in parse_multipart(ctype, body).items():
                instance[name] = "<binary>" if filename is not None else self._form_value(op, schema, name, data)
        elif media == "application/x-www-form-urlencoded":
            from urllib.parse import parse_qs
            instance = {k: self._form_value(op, schema, k, v[-1].encode())
                        for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        else:
            return []  # bytes: nothing to read
        return [f"body {e}" for e in self._errors(op.document, schema, instance)]

    def _form_value(self, op: Operation, schema: str | JSON, name: str, data: bytes) -> Any:
        """A multipart/form field as the type its property declares (forms carry only strings)."""
        text = data.decode("utf-8", errors="replace")
        node = schema if isinstance(schema, dict) else _pointer(self.doc, schema)
        prop = resolve(self.doc, resolve(self.doc, node).get("properties", {}).get(name, {}))
        types = {prop.get("type")} | {resolve(self.doc, s).get("type") for s in prop.get("anyOf", [])}
        if "integer" in types and re.fullmatch(r"-?\d+", text):
            return int(text)
        if "boolean" in types and text in ("true", "false"):
            return text == "true"
        return text

    def _errors(self, document: str, schema: str | JSON, instance: Any) -> list[str]:
        if isinstance(schema, str):
            return schema_errors(document, schema, instance)
        validator = jsonschema.Draft202012Validator({**schema, "$id": f"urn:spec:{document}"}, registry=_registry(),
                                                    format_checker=_FORMATS)
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:300]}"
                for e in validator.iter_errors(instance)]

    def check_lines(self, method: str, path: str, purpose: str, data: bytes) -> list[Violation]:
        """Each line of an uploaded batch input file against the spec's line schema (if it has one)."""
        if self.config.line_schema is None or purpose not in self.config.line_purposes:
            return []
        document, pointer = self.config.line_schema
        out = []
        for n, obj, problem in jsonl_objects(data):
            problems = [problem] if problem else schema_errors(document, pointer, obj)
            out += [self._v(method, path, f"line {n}", m) for m in problems]
        return out

    def check_output_lines(self, batch_id: str, rows: list[Any]) -> list[Violation]:
        """The lines of an output/error file the fake writes (served later as bytes)."""
        if self.config.output_line_schema is None:
            return []
        document, pointer = self.config.output_line_schema
        return [self._v("GET", f"output file of {batch_id}", f"line {n}", m)
                for n, row in enumerate(rows, start=1) for m in schema_errors(document, pointer, row)]

    # --- responses
    def check_response(self, method: str, path: str, status: int, headers: Mapping[str, str],
                       body: bytes) -> list[Violation]:
        op, _, _ = self.operation(method, path)
        if op is None:
            return []  # the request was already reported
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        media = ctype.split(";")[0].strip().lower()
        documented = op.responses.get(str(status)) or op.responses.get(f"{status // 100}XX") \
            or op.responses.get("default")
        if documented is None:
            if status < 400:
                return [self._v(method, path, "response", f"status {status} is not documented "
                                                          f"(documented: {sorted(op.responses)})")]
            pointer = self._fallback(op, status)
            if pointer is None:
                return []
            schema: str | JSON | None = pointer
        else:
            if not documented:
                return [] if not body else [self._v(method, path, "response",
                                                    f"status {status} documents no body, got {len(body)} bytes")]
            if all(v is None for v in documented.values()):
                return []  # bytes, whatever media type they are labelled with (OpenAI says application/json)
            if media not in documented:
                return [self._v(method, path, "response",
                                f"content type {media!r} is not one of {sorted(documented)} for status {status}")]
            schema = documented[media]
        if schema is None:
            return []  # bytes
        try:
            instance = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return [self._v(method, path, "response", f"body is not JSON: {e}")]
        return [self._v(method, path, "response", f"status {status} body {e}")
                for e in self._errors(op.document, schema, instance)]

    def _fallback(self, op: Operation, status: int) -> str | None:
        table = self.config.error_fallback
        for prefix, by_path in self.config.error_fallback_by_path.items():
            if op.template.startswith(prefix):
                table = by_path
        return table.get(str(status)) or table.get("*")

    def schema_of(self, name: str) -> str:
        """The pointer of a named schema (`components/schemas` or Swagger `definitions`)."""
        return f"#/definitions/{name}" if "swagger" in self.doc else f"#/components/schemas/{name}"


def _pointer(doc: JSON, pointer: str) -> Any:
    node: Any = doc
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@functools.cache
def checker(provider: str) -> Conformance | None:
    """The spec checker of a provider, or None for providers without an official spec here."""
    config = SPECS.get(provider)
    return Conformance(provider, config) if config else None
