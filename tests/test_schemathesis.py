"""Schemathesis against the REST face: requests generated from OpenAI's own OpenAPI description of
the Batch and Files APIs (vendored in tests/specs/), valid and invalid ones, sent through Envoy to
a real server, on SQLite and on PostgreSQL. Whatever comes in, nothing answers 5xx, and every answer the spec
describes matches its schema."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.e2e import KEY_A, Stack
from tests.hostile import backend_stack_fixture  # noqa: F401  (the fixture `backend_stack`: both backends)

SPEC = Path(__file__).parent / "specs" / "openai-batch-files.openapi.yaml"

schema = schemathesis.openapi.from_path(SPEC)
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_openai_schema_requests_never_get_a_5xx(case: schemathesis.Case, backend_stack: Stack) -> None:
    response = case.call(base_url=backend_stack.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
