"""Objects made from the providers' vendored specs, to feed adapters what the specs say they may get.

- `examples(document, method, path)`: the response examples an operation documents (OpenAI's
  `x-oaiMeta` strings, read leniently: they carry trailing commas and `{ ... }` elisions; OpenAPI
  `examples`/`example` on the media type).
- `synthesize(document, pointer)`: an instance of a schema with *every* property present, each from
  the property's own `example`/`examples` when that is valid for it, else its first enum value,
  default, or a plain value of its type. Checked against the schema by the caller.
- `enum_values(document, pointer)`, `optional_properties(document, pointer)`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from tests.provider_fake.conformance import load_document, resolve, schema_errors

JSON = dict[str, Any]


def node(document: str, pointer: str) -> Any:
    doc = load_document(document)
    target: Any = doc
    for part in pointer[2:].split("/"):
        target = target[part.replace("~1", "/").replace("~0", "~")]
    return resolve(doc, target)


def lenient_json(text: str) -> Any:
    """The JSON of an OpenAI doc example: `{ ... }` elisions dropped, trailing commas removed."""
    text = re.sub(r",?\s*\{\s*\.\.\.\s*\}\s*", "", text)
    text = re.sub(r",(\s*[}\]])", r"\1", text)
    return json.loads(text)


def examples(document: str, method: str, path: str) -> list[Any]:
    op = load_document(document)["paths"][path][method.lower()]
    found: list[Any] = []
    meta = (op.get("x-oaiMeta") or {}).get("examples")
    if isinstance(meta, dict) and isinstance(meta.get("response"), str):
        found.append(lenient_json(meta["response"]))
    for response in (op.get("responses") or {}).values():
        for content in (response.get("content") or {}).values():
            for example in (content.get("examples") or {}).values():
                if isinstance(example, dict) and "value" in example:
                    found.append(example["value"])
            if "example" in content:
                found.append(content["example"])
    return found


def _valid(doc: JSON, schema: Any, value: Any) -> bool:
    try:
        jsonschema.validate(value, _inline(doc, schema, 0))
    except (jsonschema.ValidationError, jsonschema.SchemaError):
        return False
    return True


def _inline(doc: JSON, schema: Any, depth: int) -> Any:
    """`schema` with local `$ref`s expanded (bounded), for a quick check of one example."""
    if depth > 8:
        return {}
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline(doc, resolve(doc, schema), depth + 1)
        return {k: _inline(doc, v, depth + 1) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_inline(doc, v, depth + 1) for v in schema]
    return schema


def _synth(doc: JSON, schema: Any, depth: int) -> Any:
    schema = resolve(doc, schema)
    if not isinstance(schema, dict):
        return None
    for key in ("example", "examples", "default"):
        candidates = schema.get(key)
        for value in (candidates if key == "examples" and isinstance(candidates, list) else [candidates]):
            if value is not None and key in schema and _valid(doc, schema, value):
                return value
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list):
        return next(v for v in schema["enum"] if v is not None)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list):
            options = [s for s in schema[key] if resolve(doc, s).get("type") != "null"]
            if options:
                return _synth(doc, options[0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" or "properties" in schema:
        if depth > 6:
            return {}
        return {name: _synth(doc, prop, depth + 1) for name, prop in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [_synth(doc, schema.get("items", {}), depth + 1)] if depth <= 3 else []  # recursive schemas end
    return {"integer": 1, "number": 1.5, "boolean": False, "string": "x"}.get(str(kind), "x")


def synthesize(document: str, pointer: str) -> Any:
    doc = load_document(document)
    return _synth(doc, node(document, pointer), 0)


def enum_values(document: str, pointer: str) -> list[Any]:
    schema = node(document, pointer)
    doc = load_document(document)
    if "enum" not in schema:
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in schema.get(key, []):
                if "enum" in resolve(doc, sub):
                    schema = resolve(doc, sub)
    return [v for v in schema["enum"] if v is not None]


def optional_properties(document: str, pointer: str) -> list[str]:
    schema = node(document, pointer)
    return [p for p in schema.get("properties", {}) if p not in schema.get("required", [])]


def assert_valid(document: str, pointer: str, instance: Any) -> None:
    problems = schema_errors(document, pointer, instance)
    assert not problems, f"not valid against {document}{pointer}: {problems}"
