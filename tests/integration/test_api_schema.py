"""The committed OpenAPI document (docs/api/openapi.json) against the running service, fuzzed by schemathesis.

For every operation, schemathesis generates requests from the document
(valid and invalid path parameters, queries and headers: Hypothesis, 30
examples an operation) and sends them to `onboardflow serve` on port 8703
with a key holding every scope, over a deployment with real profiles. Each
response must be no 5xx, and its status, content type, headers and body must
conform to the document. (tests/unit/test_api_openapi.py holds the committed
document equal to the app's.)
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from onboardflow.runners.api.openapi import DOCUMENT
from onboardflow.tests.integration.api_server import ApiDeployment, ApiServer, pipeline_profile
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = pytest.mark.integration

PORT = 8703
schema = schemathesis.openapi.from_path(DOCUMENT)


@pytest.fixture(scope="module")
def server(redis_url, pg_dsn, kafka_bootstrap, tmp_path_factory):
    deployment = ApiDeployment(redis_url, pg_dsn, kafka_bootstrap)
    apply_migrations(pg_dsn, deployment.schema)
    # Users whose ids schemathesis is likely to draw (short strings), so profiles are found too.
    assert all(deployment.write(*(pipeline_profile(user_id, segments=["dormant", "needs_help"])
                                  for user_id in ("0", "a", "A", "00", "user"))))
    s = ApiServer(PORT, deployment.serve_args(PORT, "--rate-limit", "10000", "--rate-burst", "10000",
                                              "--bootstrap-servers", ""), tmp_path_factory.mktemp("schema"))
    yield s, deployment
    s.stop()
    deployment.cleanup()


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_response_conforms_to_the_committed_document_and_none_is_a_server_error(case, server):
    running, deployment = server
    case.call_and_validate(base_url=running.base_url,
                           headers={"Authorization": f"Bearer {deployment.keys['all']}"})


def test_the_service_serves_the_document_it_was_fuzzed_with(server):
    running, _ = server
    served = httpx.get(f"{running.base_url}/openapi.json").json()
    assert served == schema.raw_schema
