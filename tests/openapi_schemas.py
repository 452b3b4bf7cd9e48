"""Validate JSON against the schemas of OpenAI's OpenAPI spec (Batch and Files subset).

    from tests.openapi_schemas import validate
    validate("Batch", response.json())          # raises jsonschema.ValidationError

The spec is vendored at `tests/specs/openai-batch-files.openapi.yaml` (its source is named in
tests/specs/README.md). `$ref`s such as `#/components/schemas/Error` resolve against the whole
document; OpenAPI 3.1 schemas are JSON Schema 2020-12.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parent / "specs" / "openai-batch-files.openapi.yaml"
_URI = "urn:openai-openapi"


@functools.cache
def spec() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SPEC.read_text())
    return data


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(_URI, Resource.from_contents(spec(), default_specification=DRAFT202012))


def schema_names() -> list[str]:
    return sorted(spec()["components"]["schemas"])


@functools.cache
def _validator(schema_name: str) -> jsonschema.Draft202012Validator:
    if schema_name not in spec()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {SPEC}; have {schema_names()}")
    schema = {"$ref": f"{_URI}#/components/schemas/{schema_name}"}
    return jsonschema.Draft202012Validator(
        schema, registry=_registry(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def validate(schema_name: str, instance: Any) -> None:
    """Raise `jsonschema.ValidationError` unless `instance` matches `#/components/schemas/<name>`."""
    _validator(schema_name).validate(instance)


def errors(schema_name: str, instance: Any) -> list[str]:
    """Every violation, as `path: message` strings (empty when valid)."""
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in _validator(schema_name).iter_errors(instance)
    ]
