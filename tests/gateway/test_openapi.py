"""The OpenAPI schema at /docs/openapi.json tells the truth: schemathesis fuzzes every route of
a running gateway (tiny model, API keys on) and checks that each answer's status is documented
and its body and content type match the schema; without a key, that the route refuses."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from tests.gateway.conftest import base_config, make_key, running

CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,  # replays each request without its key: an authenticated route must refuse
]
MODEL = "tiny"  # the registry's model (conftest's tiny_registry)
EXAMPLES = 12  # per route: enough to reach the common errors in well under a minute
# answers a fuzzer rarely draws (a valid request is a narrow target): sent first, same checks
GOOD = {
    "POST /v1/completions": {"model": MODEL, "prompt": "The function", "max_tokens": 2},
    "POST /v1/chat/completions": {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Return the sum."}],
        "max_tokens": 2,
    },
    "POST /v1/tokenize": {"model": MODEL, "prompt": "The function"},
}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, tiny_registry):
    config = base_config(tmp_path_factory.mktemp("openapi"), tiny_registry)
    _, key = make_key(config.database, "acme", ["inference", "models:read"])
    with running(config) as gw:
        yield gw, key


def _with_known_model(case, use_it: bool):
    """Half the cases name the registry's model: a fuzzer never guesses a model name, and the
    200 answers are what the success schemas promise."""
    if use_it and isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
    return case


def _fuzz(operation, url: str, headers: dict[str, str], seen: dict[str, set[int]]) -> None:
    """Sends `operation` its GOOD requests (streamed and not), then EXAMPLES generated ones,
    and checks each answer against CHECKS; records the statuses seen."""
    label = operation.label
    good = GOOD.get(label)
    streams = (False, True) if label.endswith("completions") else (None,)
    for stream in streams if good else ():
        body = good | ({"stream": stream} if stream is not None else {})
        response = operation.Case(body=body).call_and_validate(
            base_url=url, headers=headers, checks=CHECKS
        )
        assert response.status_code == 200, response.text
        seen.setdefault(label, set()).add(response.status_code)

    @given(st.tuples(operation.as_strategy(), st.booleans()))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(drawn):
        case = _with_known_model(*drawn)
        response = case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)
        seen.setdefault(label, set()).add(response.status_code)

    fuzz()


def test_every_route_answers_as_its_openapi_schema_says(keyed):
    gw, key = keyed
    schema = schemathesis.openapi.from_url(f"{gw.url}/docs/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/tokenize"} <= paths
    seen: dict[str, set[int]] = {}

    for operation in operations:
        _fuzz(operation, gw.url, {"Authorization": f"Bearer {key}"}, seen)

    # the generated requests reached the routes' refusals too, not only their answers
    for label in GOOD:
        assert seen[label] - {200}, (label, seen[label])


def test_the_schema_documents_no_litestar_error_bodies(keyed):
    gw, _ = keyed
    document = httpx.get(f"{gw.url}/docs/openapi.json", timeout=15).json()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                body = str(response.get("content", {}))
                assert "status_code" not in body and "detail" not in body, (path, method, status)
                if status.startswith(("4", "5")) and path.startswith("/v1/"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
