"""Experiments through the real `onboardflow serve`, Redis and PostgreSQL (issue 20, item 2).

A deployment of its own (``i20exp``, api_server.py) with an experiments file
of the test's: ``everyone`` (no eligibility), ``stalled_only`` (segment
``onboarding_stalled``) and ``ended`` (its window is over). Profiles are
written by the profile store's writer, as the pipeline writes them: with
their ``experiments`` field set by the core at their ``as_of``
(``ExperimentSet.with_experiments``), except a sixth of them, written as a
pipeline before that field wrote them. The server on port 8900 answers
decisions with the profiles' variants (for the older profiles, the variants
the core computes now), and records one exposure per experiment and user in
``experiment_exposures``, the first; a second server (8901) whose warehouse
is unreachable still answers every decision at once, with the same
variants, and counts the exposures it drops; a third (8902) with a long
flush interval writes what it holds when it is stopped.
"""
from __future__ import annotations

import time

import httpx
import psycopg
import pytest
from psycopg import sql

from onboardflow.tests.integration.api_server import ApiDeployment, ApiServer, now_ms, pipeline_profile, user_key
from onboardflow.transforms.experiments import ExperimentSet
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = pytest.mark.integration

DEPLOYMENT = "i20exp"
PORT, NO_WAREHOUSE_PORT, SLOW_FLUSH_PORT = 8900, 8901, 8902
UNREACHABLE_DSN = "postgresql://onboardflow:onboardflow@127.0.0.1:8949/onboardflow"
USERS = [f"exp-user-{i:03d}" for i in range(60)]
STALLED = set(USERS[:20])
#: Profiles written before the experiments field existed (stalled and not).
OLDER = set(USERS[15:25])
EXPERIMENTS_YAML = """
version: "t-1"
experiments:
  - name: everyone
    salt: "everyone-t1"
    status: running
    start: 2026-01-01T00:00:00Z
    variants: [{name: control, weight: 0.5}, {name: checklist, weight: 0.5}]
  - name: stalled_only
    salt: "stalled-t1"
    status: running
    start: 2026-01-01T00:00:00Z
    variants: [{name: control, weight: 0.34}, {name: video, weight: 0.33}, {name: call, weight: 0.33}]
    eligible: {segments_any: [onboarding_stalled]}
  - name: ended
    salt: "ended-t1"
    status: running
    start: 2026-01-01T00:00:00Z
    end: 2026-02-01T00:00:00Z
    variants: [{name: control, weight: 0.5}, {name: other, weight: 0.5}]
"""


@pytest.fixture(scope="module")
def deployment(redis_url, pg_dsn, kafka_bootstrap):
    d = ApiDeployment(redis_url, pg_dsn, kafka_bootstrap, deployment=DEPLOYMENT)
    apply_migrations(pg_dsn, d.schema)
    (d.dir / "experiments.yaml").write_text(EXPERIMENTS_YAML, encoding="utf-8")
    declared = ExperimentSet.load(d.dir / "experiments.yaml")
    profiles = [pipeline_profile(u, segments=["onboarding_stalled"] if u in STALLED else ["active_engaged"])
                for u in USERS]
    assert all(d.write(*(p if u in OLDER else declared.with_experiments(p) for u, p in zip(USERS, profiles))))
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def experiments(deployment) -> ExperimentSet:
    return ExperimentSet.load(deployment.dir / "experiments.yaml")


def serve(deployment, port, tmp_path_factory, *extra):
    args = deployment.serve_args(port, "--experiments-file", str(deployment.dir / "experiments.yaml"),
                                 "--rate-limit", "1000", "--rate-burst", "1000", *extra)
    return ApiServer(port, args, tmp_path_factory.mktemp(f"api{port}"), deployment=DEPLOYMENT)


@pytest.fixture(scope="module")
def server(deployment, tmp_path_factory):
    s = serve(deployment, PORT, tmp_path_factory, "--exposure-flush-ms", "100")
    yield s
    s.stop()


def auth(deployment, name="all"):
    return {"Authorization": f"Bearer {deployment.keys[name]}"}


def exposures(deployment) -> dict[tuple[str, str], tuple[str, int]]:
    """(experiment, user_key) -> (variant, served_at epoch ms)."""
    with psycopg.connect(deployment.pg_dsn) as conn:
        rows = conn.execute(sql.SQL("SELECT experiment, user_key, variant, served_at FROM {}").format(
            sql.Identifier(deployment.schema, "experiment_exposures"))).fetchall()
    return {(e, k): (v, int(t.timestamp() * 1000)) for e, k, v, t in rows}


def wait_for_rows(deployment, count: int, timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        rows = exposures(deployment)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def expected_exposures(experiments) -> dict[tuple[str, str], str]:
    out = {}
    for u in USERS:
        key = user_key(u)
        out[("everyone", key)] = experiments["everyone"].variant(key)
        if u in STALLED:
            out[("stalled_only", key)] = experiments["stalled_only"].variant(key)
    return out


def test_decisions_serve_the_cores_variants_and_record_each_first_exposure_once(server, deployment, experiments):
    started = now_ms()
    with httpx.Client(base_url=server.base_url, headers=auth(deployment, "profiles"), timeout=10) as http:
        bodies = {u: http.get(f"/v1/decisions/{u}").json() for u in USERS}
        finished = now_ms()
        for u, body in bodies.items():
            key = user_key(u)
            assert body["experiments"] == experiments.assign(
                {"user_key": key, "segments": body["segments"], "onboarding_track": body["track"]}, finished)
            assert set(body["experiments"]) == ({"everyone", "stalled_only"} if u in STALLED else {"everyone"})
        expected = expected_exposures(experiments)
        rows = wait_for_rows(deployment, len(expected))
        assert {pair: variant for pair, (variant, _) in rows.items()} == expected
        assert all(started <= served_at <= finished for _, served_at in rows.values())
        # The variants split about evenly (60 users; a loose check, the unit tests hold the statistics).
        assert 15 <= sum(v == "checklist" for (e, _), v in expected.items() if e == "everyone") <= 45

        # Asking again serves the same variants and keeps the first exposure time.
        again = {u: http.get(f"/v1/decisions/{u}").json()["experiments"] for u in USERS}
        assert again == {u: b["experiments"] for u, b in bodies.items()}
        time.sleep(0.5)
        assert exposures(deployment) == rows
    assert metric(server.base_url, "onboardflow_api_exposures_written_total") == len(expected)


def test_an_unknown_user_gets_the_fallback_with_no_experiment_and_no_exposure(server, deployment):
    before = exposures(deployment)
    body = httpx.get(f"{server.base_url}/v1/decisions/never-seen-user", headers=auth(deployment), timeout=10).json()
    assert body["fallback"] is True and body["experiments"] == {}
    time.sleep(0.4)
    assert exposures(deployment) == before


def test_erasing_a_user_removes_their_exposures(server, deployment, experiments):
    victim = USERS[0]
    wait_for_rows(deployment, len(expected_exposures(experiments)))
    assert any(k == user_key(victim) for _, k in exposures(deployment))
    response = httpx.delete(f"{server.base_url}/v1/users/{victim}", headers=auth(deployment), timeout=30)
    assert response.status_code == 200
    assert response.json()["removed"]["warehouse.experiment_exposures"] == 2
    assert not any(k == user_key(victim) for _, k in exposures(deployment))


def test_without_a_reachable_warehouse_decisions_are_served_at_once_and_drops_are_counted(
        deployment, experiments, tmp_path_factory):
    s = serve(deployment, NO_WAREHOUSE_PORT, tmp_path_factory, "--exposure-flush-ms", "50",
              "--warehouse-dsn", UNREACHABLE_DSN)
    try:
        with httpx.Client(base_url=s.base_url, headers=auth(deployment, "profiles"), timeout=10) as http:
            slowest = 0.0
            for u in USERS[20:40]:
                t0 = time.monotonic()
                response = http.get(f"/v1/decisions/{u}")
                slowest = max(slowest, time.monotonic() - t0)
                assert response.status_code == 200
                assert response.json()["experiments"] == {"everyone": experiments["everyone"].variant(user_key(u))}
        assert slowest < 1.0
        deadline = time.monotonic() + 15
        while metric(s.base_url, 'onboardflow_api_exposures_dropped_total{reason="warehouse_unavailable"}') < 20:
            assert time.monotonic() < deadline, "the dropped exposures were not counted"
            time.sleep(0.2)
        assert metric(s.base_url, "onboardflow_api_exposures_written_total") == 0
    finally:
        s.stop()


def test_a_stopping_server_writes_the_exposures_it_holds(deployment, experiments, tmp_path_factory):
    with psycopg.connect(deployment.pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(deployment.schema, "experiment_exposures")))
    s = serve(deployment, SLOW_FLUSH_PORT, tmp_path_factory, "--exposure-flush-ms", "600000")
    try:
        for u in USERS[40:50]:
            assert httpx.get(f"{s.base_url}/v1/decisions/{u}", headers=auth(deployment), timeout=10).status_code == 200
        time.sleep(0.3)
        assert exposures(deployment) == {}  # held: the batch waits for its flush interval
    finally:
        s.stop()
    assert set(exposures(deployment)) == {("everyone", user_key(u)) for u in USERS[40:50]}


def test_decisions_serve_the_profiles_field_not_their_own_reading_of_the_segments(server, deployment, experiments):
    # The pipeline wrote this profile's field when the user was stalled (so in `stalled_only`); the segments
    # written here say otherwise. The API serves the field, the pipeline's judgement at the profile's as_of;
    # `ended`, in the field too, is not served: the server's file has it over.
    key = user_key("exp-user-field")
    served = {name: experiments[name].variant(key) for name in ("everyone", "stalled_only")}
    profile = pipeline_profile("exp-user-field", segments=["active_engaged"], experiments={**served, "ended": "other"})
    assert deployment.write(profile) == [True]
    body = httpx.get(f"{server.base_url}/v1/decisions/exp-user-field", headers=auth(deployment), timeout=10).json()
    assert body["fallback"] is False and body["experiments"] == served
    deadline = time.monotonic() + 15
    while {e: v for (e, k), (v, _) in exposures(deployment).items() if k == key} != served:
        assert time.monotonic() < deadline, "the exposures of the profile's variants were not written"
        time.sleep(0.1)
