"""Online models in Beam on the real Redis and PostgreSQL (Prism, bounded input).

The learner refits the segmenter on the profile store at event-time marks and
at the end of the input, publishes, and re-scores every stored profile (the
sweep: nobody waits for their next event); a later run's scorer picks the
version up from the registry's Redis copy; drift events land in the warehouse
exactly once even when the stage runs again; label timeouts follow the
watermark.
"""
import hashlib
import random

import apache_beam as beam
import psycopg
import pytest
from apache_beam.testing.util import assert_that

from onboardflow.models.model_registry import ModelRegistry
from onboardflow.models.segmentation import SegmentSettings
from onboardflow.pipelines.beam.online_models import LearnOnlineModels, ScoreProfiles
from onboardflow.pipelines.beam.warehouse import WriteDriftEvents
from onboardflow.runners.local import local_pipeline_options
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.online_models import SEGMENTATION
from onboardflow.transforms.profile_store.encoding import decode_profile, encode_profile
from onboardflow.transforms.profile_store.keys import ProfileKeys
from onboardflow.transforms.profile_store.writer import RedisProfileWriter
from onboardflow.transforms.rescore import ProfileSweep
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = pytest.mark.integration

DAILY = SegmentSettings(refit_ms=DAY_MS, n_clusters=2, min_users=20)


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def profiles(n: int, seed: int, shift_at: int = None, days: int = 1) -> list[dict]:
    """Pipeline-shaped profiles of two clearly different kinds of user, spread over ``days`` of event time."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        engaged = i % 2 == 0
        base = 40 if engaged else 1
        content = int(base * 3 * rng.uniform(0.8, 1.2)) + 2
        at = DAY_MS * 100 + (i * days * DAY_MS) // n + 1000
        out.append({
            "user_key": key(f"{seed}-{i}"), "as_of": at, "version": at * 1000 + 5,
            "signup_at": DAY_MS * 99, "days_since_signup": 5.0, "events_total": content + 1,
            "event_counts": ({"signup": 1, "feature_used": content} if engaged
                             else {"signup": 1, "page_view": content}),
            "session_count": int(base * rng.uniform(0.8, 1.2)) + 1, "onboarding_progress": 0.9 if engaged else 0.1,
            "median_visit_events": 12.0 if engaged else 2.0, "distinct_features": 8 if engaged else 0,
            "segments": [],
            "cluster_id": (2 if rng.random() < 0.9 else 0) if shift_at is not None and i >= shift_at
            else rng.choice([0, 1]),
        })
    return out


def store(redis_url: str, prefix: str, rows: list[dict]) -> None:
    """Write ``rows`` unscored into the profile store, as the pipeline's writer would."""
    writer = RedisProfileWriter(redis_url, prefix, outbox=False)
    unscored = [{k: v for k, v in r.items() if k != "cluster_id"} for r in rows]
    assert all(o.applied for o in writer.write([encode_profile(p) for p in unscored]))
    writer.close()


def stored(redis_client, prefix: str) -> dict[str, dict]:
    keys = ProfileKeys(prefix)
    return {name.decode()[len(keys.profile_prefix):]: decode_profile(redis_client.hgetall(name))
            for name in redis_client.scan_iter(match=keys.profile_prefix + "*")}


@pytest.fixture
def migrated(pg_dsn, warehouse_schema):
    apply_migrations(pg_dsn, warehouse_schema)
    return warehouse_schema


def test_the_learner_refits_at_marks_and_at_the_end_and_every_stored_profile_is_scored(
        redis_url, redis_client, pg_dsn, migrated, redis_key_prefix):
    rows = profiles(300, seed=1, days=3)
    store(redis_url, redis_key_prefix, rows)
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        _ = p | beam.Create(rows) | LearnOnlineModels(redis_url, pg_dsn, migrated, redis_key_prefix,
                                                      segments=DAILY, batch_size=50)
    with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=redis_key_prefix) as registry:
        versions = registry.versions(SEGMENTATION)
        served = registry.current(SEGMENTATION)
    # The three days hold marks at days 101 and 102 (refits, unless the input
    # had already run a day past them), and the end of the input refits once
    # more on every final profile: that is the version served.
    assert 1 <= len(versions) <= 3
    assert served.id == versions[-1].id and served.counts["population"] == 300

    # The sweep: every profile in the store carries the served model's cluster,
    # although none of them was written again after the publish.
    now = stored(redis_client, redis_key_prefix)
    assert len(now) == 300
    assert {p["model_version"] for p in now.values()} == {served.id}
    by_kind: dict = {}
    for row in rows:
        profile = now[row["user_key"]]
        assert isinstance(profile["cluster_id"], int) and profile["segment_label"] and profile["onboarding_track"]
        by_kind.setdefault(row["onboarding_progress"] > 0.5, set()).add(profile["cluster_id"])
    assert len(by_kind[True]) == len(by_kind[False]) == 1 and by_kind[True] != by_kind[False]

    # A later run's scorers read the served version.
    probe = profiles(40, seed=2)

    def check(scored):
        assert {s["model_version"] for s in scored} == {served.id}
        assert {s["cluster_id"] for s in scored} == set().union(*by_kind.values())

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        assert_that(p | beam.Create(probe) | ScoreProfiles(redis_url, redis_key_prefix, refresh_seconds=60), check)


def test_the_same_input_refits_to_the_same_model_and_the_registry_keeps_one_version(
        redis_url, pg_dsn, migrated, redis_key_prefix):
    rows = profiles(200, seed=9)
    store(redis_url, redis_key_prefix, rows)
    payloads = []
    for _ in range(2):
        with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
            _ = p | beam.Create(rows) | LearnOnlineModels(redis_url, pg_dsn, migrated, redis_key_prefix,
                                                          segments=DAILY, batch_size=100)
        with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=redis_key_prefix) as registry:
            payloads.append(registry.current(SEGMENTATION).payload)
            versions = registry.versions(SEGMENTATION)
    assert payloads[0] == payloads[1]
    assert len(versions) == 1  # the second run's end-of-input fit is the same bytes: no new version


def test_the_sweep_rescores_in_place_but_never_over_a_newer_write(redis_url, redis_client, redis_key_prefix):
    rows = profiles(4, seed=3)
    store(redis_url, redis_key_prefix, rows)
    keys = ProfileKeys(redis_key_prefix)
    ttl_before = redis_client.pttl(keys.profile(rows[0]["user_key"]))
    sweep = ProfileSweep(redis_url, redis_key_prefix)
    population = sweep.population()
    assert [p["user_key"] for p in population] == sorted(r["user_key"] for r in rows)
    # The pipeline rewrites user 1 (a newer version) between the read and the sweep's write.
    newer = dict(rows[1], version=rows[1]["version"] + 1000, events_total=99)
    newer.pop("cluster_id")
    assert RedisProfileWriter(redis_url, redis_key_prefix, outbox=False).write([encode_profile(newer)])[0].applied

    counts = sweep.rescore(population, lambda p: dict(p, cluster_id=7, segment_label="team inviter",
                                                      model_version="seg-000009", propensity=None))
    sweep.close()
    assert (counts.profiles, counts.rescored, counts.moved_on, counts.unscored) == (4, 3, 1, 0)
    now = stored(redis_client, redis_key_prefix)
    for row in rows:
        profile = now[row["user_key"]]
        if row is rows[1]:
            assert "cluster_id" not in profile and profile["events_total"] == 99  # the newer write stands
        else:
            assert profile["cluster_id"] == 7 and profile["segment_label"] == "team inviter"  # typed (int)
            assert profile["version"] == row["version"] and profile["events_total"] == row["events_total"]
    assert 0 < redis_client.pttl(keys.profile(rows[0]["user_key"])) <= ttl_before  # the TTL is kept


def test_drift_events_reach_the_warehouse_once_even_when_the_stage_runs_again(
        redis_url, pg_dsn, migrated, redis_key_prefix):
    data = profiles(4000, seed=3, shift_at=3000)
    runs = []
    for run in range(2):
        # The same run twice: each from a cold learner (its own registry prefix).
        with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
            drift = (p | beam.Create(data)
                     | LearnOnlineModels(redis_url, pg_dsn, migrated, redis_key_prefix + f"x{run}",
                                         segments=DAILY, batch_size=4000))
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
        base = {"user_key": key(f"p-{i}"), "events_7d": 5, "session_count": 2, "days_since_signup": 1}
        rows.append({**base, "as_of": start, "version": start, "onboarding_progress": 0.2})
        rows.append({**base, "as_of": start + DAY_MS, "version": start + DAY_MS,
                     "onboarding_progress": 1.0 if i % 2 == 0 else 0.4})
    rows.sort(key=lambda r: r["as_of"])
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as p:
        _ = (p | beam.Create(rows)
             | LearnOnlineModels(redis_url, pg_dsn, migrated, redis_key_prefix, segments=DAILY, batch_size=50))
    with ModelRegistry(redis_url, pg_dsn, schema=migrated, key_prefix=redis_key_prefix) as registry:
        served = registry.current("propensity")
    assert served is not None, "the propensity model never became warm"
    # 100 positives (the completers' first points) and the others' two points
    # each as negatives, except those whose 3-day horizon runs past the newest
    # event (day 300): user 199's two points and user 197's second stay
    # unlabelled (censored, not negative). 100 + 200 - 3.
    assert served.counts["labels"] == 297
