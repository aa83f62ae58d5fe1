"""RFM on the real services: the pipeline folds purchases, the batch job publishes the reference, scores follow.

Real Kafka, Redis and PostgreSQL; the Beam pipeline's bounded runs on Prism
(``onboardflow run``, reliability_harness). One seeded input of 20-day journeys
with purchases and seat add-ons:

1. a run into deployment *A* with no reference: every profile carries the raw
   RFM fields, equal to a count of the input's purchases per user, and no scores;
2. ``onboardflow rfm refresh`` on A fits the reference on A's profile store and
   publishes it (a second refresh of the same store publishes nothing new);
3. the same reference published into deployment *B*, then a run into B: every
   profile's scores are the reference's scores of its raw fields, tagged with
   the version, and the value segments in Redis are exactly those the rules give;
4. the same input replayed into B: Redis is exactly as it was.
"""
from __future__ import annotations

import uuid
from collections import defaultdict

import pytest

from onboardflow.models.model_registry import ModelRegistry
from onboardflow.models.rfm_reference import RFM_KIND, RfmReference
from onboardflow.runners.cli.produce import produce
from onboardflow.runners.cli.rfm import refresh_reference
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
from onboardflow.schemas.units import DAY_MS
from onboardflow.tests.integration.outputs import redis_dump
from onboardflow.tests.integration.reliability_harness import (
    Deployment,
    Outputs,
    create_topics,
    delete_topics,
    run_to_end,
    write_secret,
)
from onboardflow.transforms.anonymize import Pseudonymizer, load_secret
from onboardflow.transforms.rfm import amount_cents
from onboardflow.transforms.segment import DEFAULT_RULES_PATH, RuleSet
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = pytest.mark.integration

VALUE_SEGMENTS = ("high_intent_engaged", "low_intent_sporadic", "big_spender")


@pytest.fixture(scope="module")
def generated():
    import time

    now = int(time.time() * 1000)
    gen = JourneyGenerator(GeneratorConfig(seed=2024, users=80, start_ms=now - 21 * DAY_MS, horizon_days=20,
                                           malformed_fraction=0.0, duplicate_fraction=0.01, late_fraction=0.0))
    return gen, list(gen.messages())


@pytest.fixture(scope="module")
def setup(kafka_bootstrap, redis_url, pg_dsn, generated, tmp_path_factory):
    name = f"t-rfm-{uuid.uuid4().hex[:8]}"
    topic = f"{name}.events"
    create_topics(kafka_bootstrap, {topic: 2})
    stats = produce(generated[1], kafka_bootstrap, topic, progress=False)
    assert stats.ok
    secret_file = write_secret(tmp_path_factory.mktemp("secret"))
    made = [Deployment(f"{name}-{label}", kafka_bootstrap, topic, redis_url, pg_dsn, secret_file).create()
            for label in ("a", "b")]
    yield made, tmp_path_factory.mktemp("logs")
    for d in made:
        d.cleanup()
    delete_topics(kafka_bootstrap, [topic])


def purchases_by_user_key(generated, secret_file) -> dict[str, tuple[int, int, int]]:
    """user_key -> (purchases, cents, newest purchase time), counted from the input (consenting users)."""
    gen, messages = generated
    pseudonymizer = Pseudonymizer(load_secret(secret_file))
    seen, out = set(), defaultdict(lambda: [0, 0, None])
    for event in gen.events_in_event_time():
        if event["event_type"] != "purchase" or event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        row = out[pseudonymizer.user_key(event["user_id"])]
        row[0] += 1
        row[1] += amount_cents(event["properties"]["amount"])
        row[2] = max(row[2] or 0, event["occurred_at"])
    return {k: tuple(v) for k, v in out.items()}


def test_rfm_fields_scores_and_value_segments_in_redis_and_a_replay_changes_nothing(setup, generated):
    (a, b), logs = setup
    rules = RuleSet.load(DEFAULT_RULES_PATH)

    # 1. No reference: raw fields only.
    run_to_end(a, f"{a.name}-group", logs / "a.log", "--disable_online_models")
    first = Outputs.read(a)
    expected = purchases_by_user_key(generated, a.secret_file)
    buyers = {k: p for k, p in first.profiles.items() if p.get("rfm_frequency")}
    assert len(buyers) >= 10, "the input must hold enough buyers to rank"
    for user_key, profile in first.profiles.items():
        count, cents, newest = expected.get(user_key, (0, 0, None))
        assert (profile["rfm_frequency"], round(profile["rfm_monetary"] * 100), profile.get("rfm_last_purchase_at")) \
            == (count, cents, newest), user_key
        assert profile["rfm_amounts_ignored"] == 0
        assert profile.get("rfm_r") is None and profile.get("rfm_reference") is None
    assert not any(first.segments.get(s) for s in VALUE_SEGMENTS)

    # 2. The batch job publishes the reference of A's store; again, nothing new.
    refreshed = refresh_reference(a.redis_url, a.dsn, a.schema, a.prefix)
    assert refreshed.created and refreshed.reference.population == len(buyers)
    assert refreshed.profiles == len(first.profiles)
    again = refresh_reference(a.redis_url, a.dsn, a.schema, a.prefix)
    assert not again.created and again.reference == refreshed.reference

    # 3. The same reference served in B before its run: every buyer scored against it.
    apply_migrations(b.dsn, b.schema)
    with ModelRegistry(b.redis_url, b.dsn, b.schema, b.prefix) as registry:
        version = registry.publish(RFM_KIND, refreshed.reference.to_json(), source="test").version
        served = RfmReference.from_json(registry.current(RFM_KIND).payload, version.id)
    run_to_end(b, f"{b.name}-group", logs / "b.log", "--disable_online_models")
    scored = Outputs.read(b)
    assert scored.profiles.keys() == first.profiles.keys()
    memberships = scored.memberships()
    value_members = defaultdict(set)
    for user_key, profile in scored.profiles.items():
        want = served.score(profile)
        assert {k: profile.get(k) for k in want} == want, user_key
        assert profile.get("rfm_reference") == (version.id if profile["rfm_frequency"] else None)
        wanted_segments = rules.evaluate(profile, profile["as_of"])
        assert set(profile["segments"]) == wanted_segments == memberships.get(user_key, set()), user_key
        for segment in set(VALUE_SEGMENTS) & wanted_segments:
            value_members[segment].add(user_key)
    assert sum(1 for p in scored.profiles.values() if p.get("rfm_reference")) == len(buyers)
    assert value_members["big_spender"], "the top fifth of spenders is never empty"
    assert {s: scored.segments.get(s, set()) for s in VALUE_SEGMENTS} == {s: value_members[s] for s in VALUE_SEGMENTS}
    print("\nvalue segments:", {s: len(m) for s, m in value_members.items()},
          "reference:", refreshed.reference.describe())

    # 4. A replay of the same input into B: not one byte of a profile or a segment set changes.
    before = stored(b)
    run_to_end(b, f"{b.name}-replay", logs / "b-replay.log", "--disable_online_models")
    assert stored(b) == before


def stored(d: Deployment) -> dict:
    """The raw profile hashes (``updated_at`` included: an applied write would move it) and segment sets."""
    marks = (f"{d.prefix}:profile:".encode(), f"{d.prefix}:segment:".encode())
    return {k: v for k, v in redis_dump(d.redis_url, d.prefix).items() if k.startswith(marks)}
