"""Schema-driven fuzzing (schemathesis) against the app's own OpenAPI document, over the tiny
random model: a few hundred generated requests, fitting the schema and not, and not one 5xx.

The server bounds n and max_tokens (and says so in the document), so that every generated
request finishes in milliseconds."""
from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from server_helpers import running_server

pytestmark = pytest.mark.slow

EXAMPLES = {"POST": 100, "GET": 15}  # per operation and generation mode
CHECKS = {GenerationMode.POSITIVE: [not_a_server_error, status_code_conformance, content_type_conformance,
                                    response_schema_conformance],
          GenerationMode.NEGATIVE: [not_a_server_error, negative_data_rejection, status_code_conformance]}


@pytest.fixture(scope="module")
def served(manager, tiny_hf):
    manager.use("tiny-hf")  # requests that name no model go to the tiny model
    with running_server(manager, max_n=2, max_tokens=8, max_body_bytes=200_000) as handle:
        yield handle


def fuzz(operation, mode: GenerationMode, statuses: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES[operation.method.upper()], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(checks=CHECKS[mode], timeout=60)
        statuses[(operation.method.upper(), operation.path, response.status_code)] += 1

    try:
        run()
    except Unsatisfiable:  # an operation without parameters or body has no invalid input
        assert mode is GenerationMode.NEGATIVE


def test_hundreds_of_generated_requests_get_no_5xx(served):
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    statuses: Counter = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in GenerationMode:
            fuzz(operation, mode, statuses)
    total = sum(statuses.values())
    print(f"{total} requests:", dict(sorted(statuses.items())))
    assert total >= 300
    assert not [key for key in statuses if key[2] >= 500]
    generated_ok = sum(n for (method, path, status), n in statuses.items() if method == "POST" and status == 200)
    assert generated_ok >= 20, "the fuzzer should also reach the generation paths"
    assert not served.app.state.generation.inflight
