"""Online models in Beam on the real Redis and PostgreSQL (Prism, bounded input).

The learner publishes what it learned when a bounded input ends; the scorer
of a later run picks that version up from the registry's Redis copy; drift
events land in the warehouse exactly once even when the stage runs again.
"""
import random

import apache_beam as beam
import psycopg
import pytest
from apache_beam.testing.util import assert_that

from onboardflow.models.features import feature_vector
from onboardflow.models.registry import ModelRegistry
from onboardflow.runners.local import local_pipeline_options
from onboardflow.transforms.online_models import SEGMENTATION, LearnOnlineModels, ScoreProfiles
from onboardflow.transforms.warehouse import WriteDriftEvents, apply_migrations

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


def profiles(n: int, seed: int, shift_at: int = None) -> list[dict]:
    """Pipeline-shaped profiles of two clearly different kinds of user."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        engaged = i % 2 == 0
        base = 40 if engaged else 1
        out.append({
            "user_key": f"k{seed}-{i}", "as_of": DAY_MS * 100 + i * 1000, "version": i,
            "engagement_score": base * rng.uniform(0.8, 1.2), "intent_score": base / 4 * rng.uniform(0.8, 1.2),
            "events_7d": int(base * 3 * rng.uniform(0.8, 1.2)), "events_30d": int(base * 9 * rng.uniform(0.8, 1.2)),
            "session_count": int(base * rng.uniform(0.8, 1.2)) + 1, "onboarding_progress": 0.5,
            "days_since_signup": 5, "feature_usage_score": 90.0 if engaged else 2.0,
            "cluster_id": (2 if rng.random() < 0.9 else 0) if shift_at is not None and i >= shift_at
            else rng.choice([0, 1]),
        })
    return out


@pytest.fixture
def migrated(pg_dsn, warehouse_schema):
    apply_migrations(pg_dsn, warehouse_schema)
    return warehouse_schema


def test_learner_publishes_when_usable_and_at_end_of_input_and_the_next_run_scores_with_it(
        redis_url, pg_dsn, migrated, redis_key_prefix):
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        _ = (p | beam.Create(profiles(600, seed=1))
             | LearnOnlineModels(redis_url, pg_dsn, migrated, redis_key_prefix, publish_seconds=3600,
                                 batch_size=100))
    with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=redis_key_prefix) as registry:
        served = registry.current(SEGMENTATION)
        versions = registry.versions(SEGMENTATION)
        # Published once as soon as it was usable (after the 500-update warm-up),
        # then at the end of the input: the end-of-input version is served.
        assert len(versions) == 2
        assert served is not None and served.id == versions[-1].id == "seg-000002"
        assert versions[0].counts["profiles"] < 600
        assert served.counts["profiles"] == 600
        assert registry.current("propensity") is None  # no labels yet: nothing trustworthy to serve

    probe = profiles(40, seed=2)

    def check(scored):
        assert len(scored) == 40
        assert {s["model_version"] for s in scored} == {"seg-000002"}
        by_kind = {}
        for s, original in zip(sorted(scored, key=lambda s: s["user_key"]),
                               sorted(probe, key=lambda s: s["user_key"])):
            engaged = original["feature_usage_score"] > 50
            by_kind.setdefault(engaged, set()).add(s["cluster_id"])
            assert s["segment_label"]
        # Each kind of user lands in its own cluster(s), never shared.
        assert not by_kind[True] & by_kind[False]

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        scored = p | beam.Create(probe) | ScoreProfiles(redis_url, redis_key_prefix, refresh_seconds=60)
        assert_that(scored, check)


def test_learner_prunes_old_versions_after_publishing_but_keeps_the_served_one(
        redis_url, pg_dsn, migrated, redis_key_prefix):
    # A publish after every batch (publish_seconds=0), keeping the newest 2:
    # the registry ends with every version listed, only 2 payloads left, and
    # the served one among them.
    prefix = redis_key_prefix + "r"
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        _ = (p | beam.Create(profiles(1500, seed=4))
             | LearnOnlineModels(redis_url, pg_dsn, migrated, prefix, publish_seconds=0, batch_size=100,
                                 keep_versions=2))
    with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=prefix) as registry:
        versions = registry.versions(SEGMENTATION)
        kept = [v for v in versions if not v.pruned]
        assert len(versions) > 3
        assert [v.id for v in kept] == [v.id for v in versions[-2:]]
        assert registry.current(SEGMENTATION).id == versions[-1].id
        assert registry.store.mirrored_versions(SEGMENTATION) == [int(v.id.split("-")[1]) for v in kept]


def test_a_new_learner_starts_from_the_serving_versions(redis_url, pg_dsn, migrated, redis_key_prefix):
    # A segmenter seeded offline (as `onboardflow train` publishes it) is served;
    # a learner with no state continues from it instead of starting cold: after
    # fewer updates than a cold warm-up needs, what it publishes at the end of
    # the input is that segmenter, having learned them.
    from onboardflow.models.segmentation import OnlineSegmenter

    prefix = redis_key_prefix + "s"
    seeded = OnlineSegmenter()
    for x in map(feature_vector, profiles(600, seed=7)):
        seeded.learn_one(x)
    assert seeded.ready and seeded.n_learned == 600
    with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=prefix) as registry:
        registry.publish(SEGMENTATION, seeded.to_bytes(), source="train")
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        _ = (p | beam.Create(profiles(60, seed=8))
             | LearnOnlineModels(redis_url, pg_dsn, migrated, prefix, publish_seconds=3600, batch_size=100))
    with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=prefix) as registry:
        versions = registry.versions(SEGMENTATION)
        assert [v.source for v in versions] == ["train", "online"]
        continued = OnlineSegmenter.from_bytes(registry.current(SEGMENTATION).payload)
    assert continued.n_learned == 660 and continued.ready


def test_drift_events_reach_the_warehouse_once_even_when_the_stage_runs_again(
        redis_url, pg_dsn, migrated, redis_key_prefix):
    data = profiles(4000, seed=3, shift_at=3000)
    runs = []
    for run in range(2):
        # The same run twice: each from a cold learner (its own registry
        # prefix; a learner starts from the serving version of its registry).
        with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
            drift = (p | beam.Create(data)
                     | LearnOnlineModels(redis_url, pg_dsn, migrated, redis_key_prefix + f"x{run}",
                                         publish_seconds=3600, batch_size=4000))
            _ = drift | WriteDriftEvents(pg_dsn, migrated)
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute(
                f'SELECT model_name, metric, detected_at FROM "{migrated}".drift_events').fetchall()
        assert rows, "the injected shift of the segment mix raised no drift event"
        assert {r[0] for r in rows} == {"clustering"}
        runs.append(sorted(rows))
    assert runs[1] == runs[0]


def test_timeouts_follow_the_watermark_and_a_warm_propensity_model_is_published(
        redis_url, pg_dsn, migrated, redis_key_prefix):
    # 200 users, one a day apart: each seen at progress 0.2, then a day later
    # either completed (even users) or at 0.4. Completions label the earlier
    # point positive at once; the rest become negatives only through the
    # watermark timer (LearnerState.expire), which a bounded input fires at
    # its end.
    rows = []
    for i in range(200):
        start = DAY_MS * (100 + i)
        base = {"user_key": f"p-{i}", "events_7d": 5, "session_count": 2, "days_since_signup": 1}
        rows.append({**base, "as_of": start, "version": start, "onboarding_progress": 0.2})
        rows.append({**base, "as_of": start + DAY_MS, "version": start + DAY_MS,
                     "onboarding_progress": 1.0 if i % 2 == 0 else 0.4})
    rows.sort(key=lambda r: r["as_of"])
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        _ = (p | beam.Create(rows)
             | LearnOnlineModels(redis_url, pg_dsn, migrated, redis_key_prefix, publish_seconds=3600,
                                 batch_size=50))
    with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=redis_key_prefix) as registry:
        served = registry.current("propensity")
    assert served is not None, "the propensity model never became warm"
    # 100 positives (the completers' first points) and the others' two points
    # each as negatives, except those whose 3-day horizon runs past the newest
    # event (day 300): user 199's two points and user 197's second stay
    # unlabelled (censored, not negative). 100 + 200 - 3.
    assert served.counts["labels"] == 297
