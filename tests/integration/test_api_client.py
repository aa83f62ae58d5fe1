"""``onboardflow.client`` against the running service (`onboardflow serve` on port 8704, real Redis and warehouse).

Every method returns its typed value, and every refusal raises its typed
error: ``Unauthorized`` (no or a revoked key), ``Forbidden`` (with the
missing scope), ``NotFound``, ``RateLimited`` (with the wait).
"""
from __future__ import annotations

import pytest

from onboardflow.client import (
    Decision,
    ErasureReport,
    Forbidden,
    NotFound,
    OnboardflowClient,
    RateLimited,
    Status,
    Unauthorized,
    VersionedProfile,
)
from onboardflow.tests.integration.api_server import ApiDeployment, ApiServer, pipeline_profile, user_key
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = pytest.mark.integration

PORT = 8704
USER = "client-user-1"
DEVICE = "client-device-1"  # stitched into USER
MEMBERS = [f"crm-{i}" for i in range(23)]


@pytest.fixture(scope="module")
def service(redis_url, pg_dsn, kafka_bootstrap, tmp_path_factory):
    deployment = ApiDeployment(redis_url, pg_dsn, kafka_bootstrap)
    apply_migrations(pg_dsn, deployment.schema)
    assert all(deployment.write(pipeline_profile(USER), *(pipeline_profile(m, segments=["needs_help"])
                                                          for m in MEMBERS)))
    assert deployment.writer.retire([(user_key("anon:" + DEVICE), user_key(USER), 1)]) == [False]  # marker only
    server = ApiServer(PORT, deployment.serve_args(PORT, "--rate-limit", "1", "--rate-burst", "60",
                                                   "--bootstrap-servers", ""), tmp_path_factory.mktemp("client"))
    yield server, deployment
    server.stop()
    deployment.cleanup()


@pytest.fixture
def api(service):
    server, deployment = service
    with OnboardflowClient(server.base_url, deployment.keys["all"], timeout=5) as client:
        yield client


def test_profile_returns_the_typed_profile_and_none_while_the_etag_still_holds(api):
    current = api.profile(USER)
    assert isinstance(current, VersionedProfile) and current.profile["user_key"] == user_key(USER)
    assert isinstance(current.profile["propensity"], float) and current.profile["segments"] == ["active_engaged"]
    assert api.profile(USER, if_none_match=current.etag) is None


def test_decision_is_a_dataclass_with_steps_and_a_fallback_for_unknown_users(api):
    decision = api.decision(USER)
    assert isinstance(decision, Decision) and (decision.track, decision.fallback) == ("advanced", False)
    assert decision.next_steps[0].id == "connect_integration" and decision.experiments == {}
    unknown = api.decision("client-nobody")
    assert (unknown.fallback, unknown.fallback_reason) == (True, "unknown_user")


def test_a_stitched_device_gets_its_accounts_profile_and_decision(api):
    visitor = api.visitor_profile(DEVICE)
    assert isinstance(visitor, VersionedProfile) and visitor == api.profile(USER)
    assert api.visitor_profile(DEVICE, if_none_match=visitor.etag) is None
    assert api.visitor_decision(DEVICE) == api.decision(USER)
    with pytest.raises(NotFound):
        api.visitor_profile("client-device-never-seen")
    assert api.visitor_decision("client-device-never-seen").fallback_reason == "unknown_user"


def test_segment_members_iterate_every_pseudonym_once_and_sizes_are_a_dict(api):
    assert sorted(api.iter_segment_members("needs_help", limit=5)) == sorted(user_key(m) for m in MEMBERS)
    assert api.segment_sizes()["needs_help"] == len(MEMBERS)


def test_status_and_readiness(api):
    status = api.status()
    assert isinstance(status, Status) and status.lag is None
    assert set(status.models) == {"segmentation", "propensity", "rfm"}
    assert api.ready()


def test_erase_user_returns_the_report_and_the_profile_is_gone(api):
    report = api.erase_user(MEMBERS[0])
    assert isinstance(report, ErasureReport) and report.user_key == user_key(MEMBERS[0])
    assert report.removed["redis.profile"] == 1
    with pytest.raises(NotFound) as missing:
        api.profile(MEMBERS[0])
    assert missing.value.status == 404 and missing.value.error == "not_found"


def test_refusals_raise_typed_errors(service):
    server, deployment = service
    with OnboardflowClient(server.base_url, deployment.keys["revoked"]) as revoked:
        with pytest.raises(Unauthorized):
            revoked.decision(USER)
    with OnboardflowClient(server.base_url, deployment.keys["profiles"]) as reader:
        with pytest.raises(Forbidden) as forbidden:
            reader.segment_sizes()
        assert forbidden.value.missing_scope == "segments:read"
        assert deployment.keys["profiles"] not in repr(reader) and deployment.keys["profiles"] not in str(
            forbidden.value)
    with OnboardflowClient(server.base_url, deployment.keys["segments"]) as hasty:
        with pytest.raises(RateLimited) as limited:
            for _ in range(100):
                hasty.segment_sizes()
        assert limited.value.retry_after_s >= 1
