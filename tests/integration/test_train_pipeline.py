"""`onboardflow train` end to end: a warehouse of known structure in, the right k and a served model out.

The warehouse is filled with profiles of generator users: each user's journey
(runners/sim/generator.py) is folded through the profile stage's own state class
(``UserProfileState``, as the streaming pipeline does) and written to
``profile_snapshots`` twice, early in the journey and at the end of the
horizon, so the job must pick each user's latest snapshot. Three personas
that behave very differently (fast adopters, churners, support seekers) are
the known structure: training must find three clusters that match them.
"""
import datetime as dt
import hashlib
import json

import psycopg
import pytest
from psycopg import sql
from sklearn.metrics import adjusted_rand_score

from onboardflow.models.features import FEATURES, feature_vector
from onboardflow.models.model_registry import ModelRegistry
from onboardflow.models.propensity import PropensityModel
from onboardflow.models.segmentation import Segmenter
from onboardflow.pipelines.train import read_snapshot_history
from onboardflow.runners.cli import train
from onboardflow.runners.sim.generator import DAY_MS, GeneratorConfig, JourneyGenerator
from onboardflow.transforms.profile import ProfileConfig, UserProfileState
from onboardflow.transforms.warehouse.migrations import apply_migrations
from onboardflow.transforms.warehouse.rows import PROFILE_SNAPSHOTS, profile_snapshot_row
from onboardflow.transforms.warehouse.writer import WarehouseWriter

pytestmark = pytest.mark.integration

PERSONAS = ("fast_adopter", "churner", "support_seeker")
USERS = 240
EARLY_SNAPSHOT_MS = 3 * DAY_MS


def _generator_profiles(users, seed=11):
    """(persona, early profile, final profile) per user, folded like the pipeline's profile stage."""
    gen = JourneyGenerator(GeneratorConfig(seed=seed, users=users, persona_mix={p: 1.0 for p in PERSONAS}))
    config = ProfileConfig()
    out = []
    for user in gen.users():
        # The pipeline's key is an HMAC of the user id; any 64-hex pseudonym will do here.
        user_key = hashlib.sha256(f"test/{user.user_id}".encode()).hexdigest()
        state, early = UserProfileState.new(config), None
        for event in gen.journey(user):
            if early is None and event["occurred_at"] > user.signup_ms + EARLY_SNAPSHOT_MS and state.as_of:
                early = state.snapshot(user_key)
            state.apply({"event_id": event["event_id"], "event_type": event["event_type"],
                         "occurred_at": event["occurred_at"], "properties": event["properties"]})
        state.advance_to(gen.horizon_end_ms)  # the lifecycle timer at the end: dormant users look dormant
        final = state.snapshot(user_key)
        out.append((user.persona, early, final))
    return out


def _fill_warehouse(dsn, schema, profiles, extra_rows=()):
    apply_migrations(dsn, schema)
    rows = [profile_snapshot_row(p) for _, early, final in profiles for p in (early, final) if p is not None]
    writer = WarehouseWriter(dsn, PROFILE_SNAPSHOTS, schema)
    try:
        assert writer.write(rows).inserted == len(rows)
    finally:
        writer.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for user_key, snapshot in extra_rows:
            conn.execute(sql.SQL("INSERT INTO {} (user_key, version, snapshot, written_at) "
                                 "VALUES (%s, 1, %s::jsonb, now())").format(
                sql.Identifier(schema, "profile_snapshots")), [user_key, json.dumps(snapshot)])


@pytest.fixture(scope="module")
def generated():
    return _generator_profiles(USERS)


def _args(pg_dsn, redis_url, schema, prefix, out, *extra):
    return ["--warehouse-dsn", pg_dsn, "--warehouse-schema", schema, "--redis-url", redis_url, "--key-prefix", prefix,
            "--out", str(out), "--k-min", "2", "--k-max", "6", "--min-users", "100", "--read-shards", "3", *extra]


def test_train_finds_the_personas_and_serves_a_seeded_segmenter(
        generated, pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path, capsys):
    broken_key = "f" * 64
    _fill_warehouse(pg_dsn, warehouse_schema, generated, extra_rows=[(broken_key, ["not", "a", "profile"])])

    report = train.run(_args(pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path))

    # One row per user (the latest snapshot), the broken one dead-lettered with its reason.
    assert report["counts"] == {"users": USERS, "users_in_warehouse": USERS + 1, "dead_letters": 1}
    letters = [json.loads(line) for line in (tmp_path / "dead_letters.jsonl").read_text().splitlines()]
    assert letters == [{"stage": "train", "reason": "not_a_mapping", "detail": "snapshot is a list",
                        "user_key": broken_key}]
    rows = {r["user_key"]: r["x"] for r in map(json.loads, (tmp_path / "features.jsonl").read_text().splitlines())}
    for _, _, final in generated[:20]:
        assert rows[final["user_key"]] == pytest.approx([feature_vector(final)[n] for n in FEATURES])

    # The known structure: three personas, three clusters.
    metrics = report["metrics"]
    assert metrics["k"] == 3
    assert [s["k"] for s in metrics["k_scores"]] == [2, 3, 4, 5, 6]
    assert metrics["online_agreement"] >= 0.99

    # What is served is that model: it separates the personas on their final profiles.
    with ModelRegistry(redis_url, pg_dsn, warehouse_schema, redis_key_prefix) as registry:
        served = registry.current("segmentation")
    assert served.id == report["published"]["version"] == "seg-000001"
    assert served.source == "train" and served.metrics["k"] == 3 and served.counts["users"] == USERS
    segmenter = Segmenter.from_bytes(served.payload)
    predicted = [segmenter.predict_one(feature_vector(final)) for _, _, final in generated]
    assert adjusted_rand_score([persona for persona, _, _ in generated], predicted) >= 0.9

    # The report: console, text, JSON and a PNG plot.
    console = capsys.readouterr().out
    assert "<- chosen" in console and "published seg-000001" in console
    assert (tmp_path / "train-report.txt").read_text().strip() in console
    assert json.loads((tmp_path / "train-report.json").read_text())["metrics"]["k"] == 3
    assert (tmp_path / "k-selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_retraining_an_unchanged_warehouse_registers_no_second_version(
        generated, pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path):
    _fill_warehouse(pg_dsn, warehouse_schema, generated)
    first = train.run(_args(pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path / "a", "--pca", "0.9"))

    again = train.run(_args(pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path / "b", "--pca", "0.9"))

    assert first["published"] == {"version": "seg-000001", "created": True, "serving": True}
    assert again["published"] == {"version": "seg-000001", "created": False, "serving": True}
    assert again["metrics"]["pca_components"] == first["metrics"]["pca_components"] >= 1
    with ModelRegistry(redis_url, pg_dsn, warehouse_schema, redis_key_prefix) as registry:
        assert [v.id for v in registry.versions("segmentation")] == ["seg-000001"]


def test_train_on_too_few_profiles_exits_3_and_publishes_nothing(
        generated, pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path, capsys):
    _fill_warehouse(pg_dsn, warehouse_schema, generated[:30])

    code = train.main(_args(pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path))

    assert code == train.EXIT_TOO_FEW
    err = capsys.readouterr().err
    assert "30 users" in err and "at least 100" in err
    with ModelRegistry(redis_url, pg_dsn, warehouse_schema, redis_key_prefix) as registry:
        assert registry.versions("segmentation") == []


def test_train_as_of_an_event_time_uses_the_snapshots_of_that_time(
        generated, pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path):
    _fill_warehouse(pg_dsn, warehouse_schema, generated)
    as_of_ms = JourneyGenerator(GeneratorConfig(seed=11, users=1)).start_ms + 20 * DAY_MS
    early = {e["user_key"]: e for _, e, _ in generated if e is not None and e["as_of"] <= as_of_ms}
    as_of = dt.datetime.fromtimestamp(as_of_ms / 1000, dt.timezone.utc).isoformat()

    report = train.run(_args(pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path,
                             "--as-of", as_of, "--no-publish", "--min-users", "50"))

    rows = {r["user_key"]: r["x"] for r in map(json.loads, (tmp_path / "features.jsonl").read_text().splitlines())}
    assert set(rows) == set(early) and len(early) >= 150
    for user_key, profile in list(early.items())[:20]:
        assert rows[user_key] == pytest.approx([feature_vector(profile)[n] for n in FEATURES])
    assert report["published"] is None and report["metrics"]["as_of_ms"] == as_of_ms
    with ModelRegistry(redis_url, pg_dsn, warehouse_schema, redis_key_prefix) as registry:
        assert registry.versions("segmentation") == []


def _history(users, seed=21, every_ms=DAY_MS // 2):
    """Per user, a snapshot every ``every_ms`` of event time in which they were active (as the sink writes)."""
    gen = JourneyGenerator(GeneratorConfig(seed=seed, users=users))
    rows, truth = [], {}
    for user in gen.users():
        user_key = hashlib.sha256(f"hist/{user.user_id}".encode()).hexdigest()
        truth[user_key] = user
        state, next_at = UserProfileState.new(ProfileConfig()), None
        for event in gen.journey(user):
            if not event.get("user_id"):
                continue
            if next_at is not None and event["occurred_at"] >= next_at:
                rows.append(state.snapshot(user_key))
                next_at = None
            state.apply({"event_id": event["event_id"], "event_type": event["event_type"],
                         "occurred_at": event["occurred_at"], "properties": event["properties"]})
            next_at = next_at or state.as_of + every_ms
        rows.append(state.snapshot(user_key))
    return rows, truth


def test_train_bootstraps_and_serves_a_propensity_model_from_the_snapshot_history(
        generated, pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path):
    _fill_warehouse(pg_dsn, warehouse_schema, generated)
    history, _ = _history(300)
    writer = WarehouseWriter(pg_dsn, PROFILE_SNAPSHOTS, warehouse_schema)
    try:
        writer.write([profile_snapshot_row(p) for p in history])
    finally:
        writer.close()

    # The history comes back in event-time order, every snapshot once.
    replayed = list(read_snapshot_history(pg_dsn, warehouse_schema, None, batch=500))
    assert len(replayed) == len(history) + sum(p is not None for _, early, final in generated for p in (early, final))
    assert [r["version"] for r in replayed] == sorted(r["version"] for r in replayed)

    report = train.run(_args(pg_dsn, redis_url, warehouse_schema, redis_key_prefix, tmp_path))

    prop = report["propensity"]
    assert prop["warm"] and prop["published"] == {"version": "prop-000001", "created": True, "serving": True}
    assert prop["positives"] >= 50 and prop["labelled"] - prop["positives"] >= 50
    # Prequential over a short history: until both classes have 50 labels the
    # model answers the prior (ties), which holds the figure down (0.66 here).
    assert prop["roc_auc"] > 0.6
    with ModelRegistry(redis_url, pg_dsn, warehouse_schema, redis_key_prefix) as registry:
        served = registry.current("propensity")
        assert served.source == "train" and served.counts["labels"] == prop["labelled"]
        model = PropensityModel.from_bytes(served.payload)
    assert model.warm and model.pending_users == 0  # no per-user data in what is served
    # It ranks a finished, engaged profile above a silent beginner.
    engaged = {"onboarding_progress": 0.8, "session_count": 12, "days_since_signup": 3.0, "events_7d": 150,
               "engagement_score": 300.0, "feature_usage_score": 90.0, "distinct_features": 8}
    silent = {"onboarding_progress": 0.0, "session_count": 1, "days_since_signup": 3.0, "events_7d": 2,
              "recency_ms": 3 * DAY_MS}
    at = 10 ** 13
    assert model.predict("a", feature_vector(engaged), at) > model.predict("b", feature_vector(silent), at)
    assert "propensity" in (tmp_path / "train-report.txt").read_text()
