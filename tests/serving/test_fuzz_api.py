"""schemathesis (a property-based fuzzer) against the served app's own /openapi.json: every
operation, a bounded number of generated requests each (valid and invalid), and the checks that
no request gets a 5xx and that every response is what the schema says (status codes, content
types, bodies). The app is locked down the way an operator would expose it (small token and
batch limits) so generated requests stay cheap; the limits themselves are exercised."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_headers_conformance,
                                 response_schema_conformance, status_code_conformance)

from tests.helpers.serving import ServeApp

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
SMALL = {"default_max_tokens": 4, "max_tokens_limit": 8}


@pytest.fixture(scope="module")
def api_schema(serve_app: ServeApp) -> schemathesis.BaseSchema:
    base = serve_app(thinking=SMALL, fast=SMALL, limits={"max_batch_prompts": 4, "max_prompt_tokens": 256})
    return schemathesis.openapi.from_url(f"{base}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_request_gets_a_server_error(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS, timeout=60)
