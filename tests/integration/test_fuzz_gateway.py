"""Fuzzing the gateway from its own OpenAPI document (schemathesis) against a real tiny cluster:
valid and invalid bodies for every operation; no response may be a 5xx, every status and content
type must be documented, and every /v1 error must be in OpenAI's format. Derandomized with a
bounded number of examples, so a run is repeatable and fits CI; the README states the counts."""
import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 status_code_conformance)

from pdserve.launch import LocalCluster

MAX_EXAMPLES = 40
CASES: collections.Counter = collections.Counter()
REFUSED: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "fuzz.db"
    # A small max_tokens limit keeps each generated case short on a 2-core machine.
    c = LocalCluster(model="tiny", env={"PDSERVE_DATABASE__URL": f"sqlite:///{db}",
                                        "PDSERVE_GATEWAY__MAX_TOKENS_LIMIT": "8"}).start()
    yield c
    c.stop()
    print(f"\nfuzzed gateway cases per operation: {dict(CASES)} (total {sum(CASES.values())})")
    print(f"valid-by-schema cases refused: {REFUSED.most_common()}")


@schemathesis.check
def openai_error_format(ctx, response, case):
    """Every error of the OpenAI-compatible API is {"error": {"message", "type", "param", "code"}}."""
    if response.status_code < 400 or not case.path.startswith("/v1/"):
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), \
        f"{response.status_code} error is not JSON: {response.text[:200]!r}"
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], f"error without a message: {error}"
    assert isinstance(error["type"], str) and error["type"], f"error without a type: {error}"
    assert {"param", "code"} <= set(error), f"error lacks param/code: {error}"
    return None


def _operations(cluster):
    schema = schemathesis.openapi.from_url(f"{cluster.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_gateway_survives_its_own_schema(cluster, mode):
    operations = _operations(cluster)
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not op.body:
            continue    # nothing to make invalid in a GET without parameters
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            CASES[f"{mode.value} {case.method} {case.path}"] += 1
            response = case.call(base_url=cluster.url, timeout=60)
            if mode is GenerationMode.POSITIVE and response.status_code >= 400:
                REFUSED[f"{response.status_code} {case.path}: {response.text[:90]}"] += 1
            if response.status_code >= 500:   # schemathesis masks fields named *token* in its report
                print(f"{response.status_code} for {case.method} {case.path} with body {case.body!r}")
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                     content_type_conformance, negative_data_rejection,
                                                     openai_error_format])
        fuzz()
    assert all(p.proc.poll() is None for p in cluster.processes), "a component crashed"
