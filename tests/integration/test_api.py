"""The personalization API (`onboardflow serve`) against the real Redis, PostgreSQL and Kafka (issue 19).

One server on port 8700 serves a deployment of its own (``i19api`` and a
unique prefix, api_server.py) whose profiles are written by the profile
store's writer, as the pipeline writes them. Every route is called with each
kind of key: the route's scope works, no key / a wrong key / a revoked key
is 401, a key without the scope is 403 naming it. The fallbacks: an unknown
user, a stale profile, and Redis stopped (a redis-server of the test's own,
port 8750, under a second server on 8702); the rate limit on a third (8701).
"""
from __future__ import annotations

import datetime as dt
import time
from urllib.parse import quote

import httpx
import psycopg
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from psycopg import sql

from onboardflow.models.model_registry import ModelStore
from onboardflow.models.model_registry.versions import ModelVersion, Pointer
from onboardflow.tests.integration.api_server import (
    SECRET,
    ApiDeployment,
    ApiServer,
    OwnRedis,
    now_ms,
    pipeline_profile,
    user_key,
)
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = pytest.mark.integration

PORT, LIMITED_PORT, OUTAGE_PORT, WORKERS_PORT, OWN_REDIS_PORT = 8700, 8701, 8702, 8705, 8750
ALICE, BOB, STALE = "alice@example.com", "bob-1234", "carol-stale"
# Devices before login: one with a visitor profile of its own, one identity stitching retired into ALICE.
DEVICE, STITCHED_DEVICE = "device-7f3a/ios", "device-91c0"
MEMBERS = [f"member-{i:03d}" for i in range(37)]


@pytest.fixture(scope="module")
def deployment(redis_url, pg_dsn, kafka_bootstrap):
    d = ApiDeployment(redis_url, pg_dsn, kafka_bootstrap)
    apply_migrations(pg_dsn, d.schema)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="onboardflow-tests")
    admin.create_topics([NewTopic(d.topic, num_partitions=2, replication_factor=1)])
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(5):
        producer.send(d.topic, value=b"{}", partition=i % 2)
    producer.flush()
    producer.close()
    assert all(d.write(pipeline_profile(ALICE),
                       pipeline_profile(BOB, onboarding_track=None, segments=["needs_help"],
                                        milestones=["tutorial_completed"]),
                       pipeline_profile(STALE, updated_at=now_ms() - 3 * 3600 * 1000)))
    assert all(d.write(*(pipeline_profile(m, segments=["dormant"]) for m in MEMBERS)))
    # A visitor's profile is stored under the pseudonym of "anon:" + its device id (transforms/anonymize.py);
    # the stitched one is retired into ALICE as the pipeline's identity stage does (RETIRE_VISITOR_LUA).
    assert all(d.write(pipeline_profile("anon:" + DEVICE, segments=["highly_engaged_new"], onboarding_track="guided"),
                       pipeline_profile("anon:" + STITCHED_DEVICE, segments=["needs_help"])))
    assert d.writer.retire([(user_key("anon:" + STITCHED_DEVICE), user_key(ALICE), now_ms())]) == [True]
    ModelStore(redis_url, d.prefix).mirror(
        ModelVersion("segmentation", 3, "ab" * 32, dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc),
                     source="online", payload=b"{}"),
        Pointer("segmentation", 3, 4, True, dt.datetime(2026, 12, 2, tzinfo=dt.timezone.utc)))
    yield d
    d.cleanup()
    admin.delete_topics([d.topic])
    admin.close()


@pytest.fixture(scope="module")
def server(deployment, tmp_path_factory):
    s = ApiServer(PORT, deployment.serve_args(PORT, "--stale-after", "1h", "--rate-limit", "1000",
                                              "--rate-burst", "1000"), tmp_path_factory.mktemp("api"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        yield client


def auth(deployment, name: str) -> dict:
    return {"Authorization": f"Bearer {deployment.keys[name]}"}


# --------------------------------------------------------------------------- profiles


def test_a_profile_comes_back_typed_with_its_pseudonym_and_never_the_raw_id(http, deployment):
    response = http.get(f"/v1/profiles/{ALICE}", headers=auth(deployment, "profiles"))
    assert response.status_code == 200
    body = response.json()
    assert body["user_key"] == user_key(ALICE)
    assert isinstance(body["version"], int) and isinstance(body["engagement_score"], float)
    assert body["event_counts"] == {"login": 4, "feature_used": 6, "tutorial_step": 2}
    assert body["segments"] == ["active_engaged"] and body["milestones"] == []
    assert body["purchased_plan"] is None  # absent in the store: null, every contract field present
    assert ALICE not in response.text


def test_the_etag_is_the_version_and_if_none_match_answers_304_until_the_profile_changes(http, deployment):
    first = http.get(f"/v1/profiles/{BOB}", headers=auth(deployment, "profiles"))
    tag = first.headers["ETag"]
    assert str(first.json()["version"]) in tag
    again = http.get(f"/v1/profiles/{BOB}", headers={**auth(deployment, "profiles"), "If-None-Match": tag})
    assert (again.status_code, again.content, again.headers["ETag"]) == (304, b"", tag)
    newer = pipeline_profile(BOB, onboarding_track=None, segments=["needs_help"], milestones=["tutorial_completed"])
    newer["version"] = first.json()["version"] + 1
    assert deployment.write(newer) == [True]
    changed = http.get(f"/v1/profiles/{BOB}", headers={**auth(deployment, "profiles"), "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag


def test_an_unknown_user_is_a_404_with_a_clear_body_naming_only_the_pseudonym(http, deployment):
    response = http.get("/v1/profiles/nobody-here", headers=auth(deployment, "profiles"))
    assert response.status_code == 404
    assert response.json()["error"] == "not_found" and "no profile" in response.json()["detail"]
    assert response.json()["user_key"] == user_key("nobody-here") and "nobody-here" not in response.text


def test_a_user_id_with_slashes_line_breaks_and_unicode_is_looked_up_as_given(http, deployment):
    odd = "tenant/7/üser 42\nsecond line"
    assert deployment.write(pipeline_profile(odd)) == [True]
    response = http.get(f"/v1/profiles/{quote(odd, safe='')}", headers=auth(deployment, "profiles"))
    assert response.status_code == 200 and response.json()["user_key"] == user_key(odd)


def test_a_visitor_is_looked_up_by_device_id_and_a_stitched_one_gets_its_accounts_profile(http, deployment):
    own = http.get(f"/v1/visitors/profile/{quote(DEVICE, safe='')}", headers=auth(deployment, "profiles"))
    assert own.status_code == 200 and own.json()["user_key"] == user_key("anon:" + DEVICE)
    assert own.json()["onboarding_track"] == "guided" and DEVICE not in own.text
    tag = own.headers["ETag"]
    again = http.get(f"/v1/visitors/profile/{quote(DEVICE, safe='')}",
                     headers={**auth(deployment, "profiles"), "If-None-Match": tag})
    assert again.status_code == 304
    stitched = http.get(f"/v1/visitors/profile/{STITCHED_DEVICE}", headers=auth(deployment, "profiles"))
    account = http.get(f"/v1/profiles/{ALICE}", headers=auth(deployment, "profiles"))
    assert stitched.status_code == 200 and stitched.json() == account.json()
    assert stitched.json()["user_key"] == user_key(ALICE) and stitched.headers["ETag"] == account.headers["ETag"]
    unknown = http.get("/v1/visitors/profile/device-never-seen", headers=auth(deployment, "profiles"))
    assert unknown.status_code == 404 and unknown.json()["user_key"] == user_key("anon:device-never-seen")
    assert "device-never-seen" not in unknown.text and "stitched" in unknown.json()["detail"]


def test_a_visitors_decision_comes_from_its_own_or_its_accounts_profile_and_an_unknown_one_falls_back(
        http, deployment):
    own = http.get(f"/v1/visitors/decision/{quote(DEVICE, safe='')}", headers=auth(deployment, "profiles")).json()
    assert (own["fallback"], own["user_key"], own["segments"]) == (
        False, user_key("anon:" + DEVICE), ["highly_engaged_new"])
    stitched = http.get(f"/v1/visitors/decision/{STITCHED_DEVICE}", headers=auth(deployment, "profiles")).json()
    account = http.get(f"/v1/decisions/{ALICE}", headers=auth(deployment, "profiles")).json()
    assert stitched["fallback"] is False and stitched["user_key"] == user_key(ALICE)
    assert (stitched["track"], stitched["segments"], stitched["next_steps"]) == (
        account["track"], account["segments"], account["next_steps"])
    unknown = http.get("/v1/visitors/decision/device-never-seen", headers=auth(deployment, "profiles")).json()
    assert (unknown["fallback"], unknown["fallback_reason"]) == (True, "unknown_user")


# --------------------------------------------------------------------------- decisions


def test_a_decision_has_the_pipelines_track_and_the_steps_the_user_has_not_done(http, deployment):
    body = http.get(f"/v1/decisions/{ALICE}", headers=auth(deployment, "profiles")).json()
    assert (body["fallback"], body["fallback_reason"], body["track"], body["track_rule"]) == (
        False, None, "advanced", "profile")
    assert body["segments"] == ["active_engaged"] and body["segment_label"] == "power adopter"
    assert [s["id"] for s in body["next_steps"]] == ["connect_integration", "automate_workflow", "create_api_key"]
    assert body["experiments"] == {} and body["user_key"] == user_key(ALICE)


def test_a_profile_without_a_track_gets_the_track_policys_choice_and_done_steps_are_skipped(http, deployment):
    body = http.get(f"/v1/decisions/{BOB}", headers=auth(deployment, "profiles")).json()
    assert (body["track"], body["track_rule"], body["fallback"]) == ("guided", "asks_for_help", False)
    assert [s["id"] for s in body["next_steps"]] == ["book_onboarding_call", "browse_help_center"]


def test_an_unknown_user_and_a_stale_profile_get_the_fallback_decision_not_an_error(http, deployment):
    unknown = http.get("/v1/decisions/never-seen", headers=auth(deployment, "profiles"))
    stale = http.get(f"/v1/decisions/{STALE}", headers=auth(deployment, "profiles"))
    assert unknown.status_code == stale.status_code == 200
    assert (unknown.json()["fallback"], unknown.json()["fallback_reason"]) == (True, "unknown_user")
    assert (stale.json()["fallback"], stale.json()["fallback_reason"]) == (True, "stale_profile")
    for body in (unknown.json(), stale.json()):
        assert body["track"] == "standard" and body["segments"] == []
        assert [s["id"] for s in body["next_steps"]] == ["finish_tutorial", "create_dashboard", "import_data"]


# --------------------------------------------------------------------------- segments


def test_segment_members_page_through_the_whole_set_by_cursor_as_pseudonyms(http, deployment):
    seen, cursor, pages = [], "0", 0
    while cursor is not None:
        page = http.get("/v1/segments/dormant/members", params={"cursor": cursor, "limit": 10},
                        headers=auth(deployment, "segments")).json()
        seen += page["members"]
        cursor, pages = page["next_cursor"], pages + 1
    assert set(seen) == {user_key(m) for m in MEMBERS} and pages >= 2
    assert not any(m in seen for m in MEMBERS)


def test_segment_sizes_list_every_rule_segment(http, deployment):
    body = http.get("/v1/segments", headers=auth(deployment, "segments")).json()
    sizes = {s["name"]: s["size"] for s in body["segments"]}
    assert sizes["dormant"] == len(MEMBERS) and sizes["needs_help"] == 1 and sizes["onboarding_stalled"] == 0
    assert body["rules_version"].startswith("2025-01.2")


def test_an_unknown_segment_is_a_404_naming_the_known_ones(http, deployment):
    response = http.get("/v1/segments/nope/members", headers=auth(deployment, "segments"))
    assert response.status_code == 404 and "dormant" in response.json()["detail"]


# --------------------------------------------------------------------------- status


def test_status_shows_the_serving_model_versions_and_the_consumer_lag(http, deployment):
    body = http.get("/v1/status", headers=auth(deployment, "profiles")).json()
    assert body["models"]["segmentation"]["version_id"] == "seg-000003"
    assert body["models"]["segmentation"]["pinned"] is True and body["models"]["propensity"] is None
    assert body["lag"]["group"] == deployment.group
    assert (body["lag"]["total_lag"], body["lag"]["partitions"], body["lag"]["kafka_error"]) == (5, 2, None)


# --------------------------------------------------------------------------- erasure


def test_delete_erases_the_user_and_records_the_keys_name_as_who_asked(http, deployment, pg_dsn):
    victim = "erase-me-please"
    assert deployment.write(pipeline_profile(victim, segments=["dormant"])) == [True]
    response = http.delete(f"/v1/users/{victim}", headers=auth(deployment, "eraser"))
    assert response.status_code == 200
    report = response.json()
    assert report["user_key"] == user_key(victim) and victim not in response.text
    assert report["removed"]["redis.profile"] == 1 and report["removed"]["redis.segment_memberships"] == 1
    assert http.get(f"/v1/profiles/{victim}", headers=auth(deployment, "profiles")).status_code == 404
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(sql.SQL("SELECT user_key, requested_by, source FROM {}.erasure_audit WHERE erasure_id = %s")
                           .format(sql.Identifier(deployment.schema)), (report["erasure_id"],)).fetchone()
    assert row == (user_key(victim), "api-key:eraser", "api")
    # The erased user stays out: a replayed write of the pipeline is refused.
    assert deployment.write(pipeline_profile(victim)) == [False]


# --------------------------------------------------------------------------- authorization

ROUTES = [  # (method, path, scope)
    ("GET", f"/v1/profiles/{ALICE}", "profiles:read"),
    ("GET", f"/v1/decisions/{ALICE}", "profiles:read"),
    ("GET", f"/v1/visitors/profile/{STITCHED_DEVICE}", "profiles:read"),
    ("GET", f"/v1/visitors/decision/{STITCHED_DEVICE}", "profiles:read"),
    ("GET", "/v1/status", "profiles:read"),
    ("GET", "/v1/segments", "segments:read"),
    ("GET", "/v1/segments/dormant/members", "segments:read"),
    ("DELETE", "/v1/users/nobody-to-erase", "users:erase"),
]
KEY_FOR_SCOPE = {"profiles:read": "profiles", "segments:read": "segments", "users:erase": "eraser"}


@pytest.mark.parametrize("method,path,scope", ROUTES)
def test_every_route_needs_a_valid_key_with_its_scope(http, deployment, method, path, scope):
    missing = http.request(method, path)
    assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    for bad in ("obf_000000000000_" + "x" * 43, "not-a-key", deployment.keys["revoked"],
                deployment.keys["all"][:-1] + ("A" if deployment.keys["all"][-1] != "A" else "B")):
        refused = http.request(method, path, headers={"Authorization": f"Bearer {bad}"})
        assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    for name, key in deployment.keys.items():
        if name in ("all", "revoked") or name == KEY_FOR_SCOPE[scope]:
            continue
        forbidden = http.request(method, path, headers={"Authorization": f"Bearer {key}"})
        assert forbidden.status_code == 403 and forbidden.json()["missing_scope"] == scope
        assert scope in forbidden.json()["detail"]
    allowed = http.request(method, path, headers=auth(deployment, KEY_FOR_SCOPE[scope]))
    assert allowed.status_code == 200


def test_operational_routes_and_the_operator_page_need_no_key(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"ready": True, "redis": True, "secret": True, "keys": 4}
    page = http.get("/operator")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for element in ("api-key", "save-key", "user-id", "lookup", "profile", "segments", "models", "lag", "error"):
        assert f'id="{element}"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    script = http.get("/operator/operator.js")
    assert script.status_code == 200 and "sessionStorage" in script.text and "localStorage" not in script.text


def test_metrics_count_requests_by_route_template_and_fallbacks_by_reason_without_ids(http, deployment):
    http.get("/v1/decisions/metrics-unknown-user", headers=auth(deployment, "profiles"))
    text = http.get("/metrics").text
    assert 'route="/v1/decisions/{user_id}"' in text and 'status="200"' in text
    assert 'onboardflow_api_decision_fallbacks_total{reason="unknown_user"}' in text
    assert "onboardflow_api_request_duration_seconds_bucket" in text
    assert "metrics-unknown-user" not in text and user_key("metrics-unknown-user") not in text


def test_the_access_log_is_json_with_route_templates_and_key_names_never_ids_or_keys(http, server, deployment):
    http.get(f"/v1/decisions/{ALICE}", headers=auth(deployment, "profiles"))
    time.sleep(0.2)
    lines = server.access_lines()
    decision = [line for line in lines if line["route"] == "/v1/decisions/{user_id}" and line["key"] == "profiles"]
    assert decision and {"at", "method", "route", "status", "latency_ms", "key"} <= decision[-1].keys()
    text = server.access_log.read_text() + server.stderr_log.read_text()
    for secret in (ALICE, BOB, user_key(ALICE), *deployment.keys.values(), SECRET.decode()):
        assert secret not in text


# --------------------------------------------------------------------------- rate limit


def test_a_key_over_its_rate_gets_429_with_retry_after_and_other_keys_are_unaffected(deployment, tmp_path):
    limited = ApiServer(LIMITED_PORT, deployment.serve_args(LIMITED_PORT, "--rate-limit", "0.5", "--rate-burst", "3"),
                        tmp_path)
    try:
        with httpx.Client(base_url=limited.base_url, timeout=10) as client:
            codes = [client.get("/v1/segments", headers=auth(deployment, "segments")).status_code for _ in range(4)]
            refused = client.get("/v1/segments", headers=auth(deployment, "segments"))
            other = client.get(f"/v1/decisions/{ALICE}", headers=auth(deployment, "profiles"))
    finally:
        limited.stop()
    assert codes == [200, 200, 200, 429]
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"] == "rate_limited" and refused.json()["retry_after_s"] >= 1
    assert other.status_code == 200


# --------------------------------------------------------------------------- several workers


def test_two_workers_answer_on_one_port_and_metrics_sum_both(deployment, tmp_path):
    workers = ApiServer(WORKERS_PORT, deployment.serve_args(WORKERS_PORT, "--workers", "2", "--rate-limit", "1000"),
                        tmp_path)
    try:
        with httpx.Client(base_url=workers.base_url, timeout=10) as client:
            answered = []
            for _ in range(60):  # a new connection each: the kernel spreads them over both workers
                answered.append(client.get(f"/v1/decisions/{ALICE}", headers={**auth(deployment, "profiles"),
                                                                            "Connection": "close"}))
            metrics = client.get("/metrics").text
    finally:
        workers.stop()
    assert {r.status_code for r in answered} == {200} and {r.json()["fallback"] for r in answered} == {False}
    [count] = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith('onboardflow_api_requests_total{method="GET",route="/v1/decisions/{user_id}",'
                                  'status="200"}')]
    assert count == 60, "/metrics does not sum both workers' requests"
    pids = {line["worker"] for line in workers.access_lines() if line["route"] == "/v1/decisions/{user_id}"}
    assert len(pids) == 2, f"one worker answered everything: {pids}"


# --------------------------------------------------------------------------- Redis stopped


def test_with_redis_stopped_decisions_fall_back_readyz_is_503_and_kafka_down_is_a_field(deployment, tmp_path):
    own = OwnRedis(OWN_REDIS_PORT)
    own.start()
    outage = None
    try:
        # Kafka on a port nobody listens on: the status must still answer, naming the failure.
        args = deployment.serve_args(OUTAGE_PORT, "--redis-url", own.url, "--bootstrap-servers", "127.0.0.1:8749")
        outage = ApiServer(OUTAGE_PORT, args, tmp_path)
        headers = auth(deployment, "all")
        with httpx.Client(base_url=outage.base_url, timeout=15) as client:
            assert client.get("/readyz").status_code == 200
            status = client.get("/v1/status", headers=headers)
            own.stop()
            started = time.monotonic()
            decision = client.get(f"/v1/decisions/{ALICE}", headers=headers)
            took = time.monotonic() - started
            ready = client.get("/readyz")
            profile = client.get(f"/v1/profiles/{ALICE}", headers=headers)
            stopped_status = client.get("/v1/status", headers=headers)
            own.start()
            recovered = client.get("/readyz")
    finally:
        if outage is not None:
            outage.stop()
        own.stop()
    assert status.status_code == 200 and status.json()["lag"]["kafka_error"]
    assert status.json()["lag"]["total_lag"] is None
    assert decision.status_code == 200 and took < 2.0
    assert (decision.json()["fallback"], decision.json()["fallback_reason"]) == (True, "store_unavailable")
    assert decision.json()["user_key"] == user_key(ALICE)
    assert ready.status_code == 503 and ready.json()["redis"] is False and ready.json()["secret"] is True
    assert profile.status_code == 503 and profile.json()["error"] == "store_unavailable"
    assert stopped_status.status_code == 200 and stopped_status.json()["models_error"]
    assert recovered.status_code == 200
