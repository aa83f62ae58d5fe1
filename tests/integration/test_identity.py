"""Identity stitching on the real services: out-of-order aliases and a replay leave the same result.

Real Kafka, Redis and PostgreSQL; the Beam pipeline on Prism. One generated
population of recent journeys (the last five days, relative to the wall
clock), 30 % of users also browsing anonymously on another device before
signing up (most later log in there). Two topics hold the same events:

* **in order**: as the collector sends them (with its own late, out-of-order
  and duplicated events), keyed by user;
* **aliases last**: every event that carries both ids (the signups and logins
  that link a device) held back to the end, the rest shuffled and without
  Kafka keys over four partitions, so every visitor's anonymous activity,
  and the account's later anonymous events, reach the pipeline before the
  link does.

Each goes through a bounded run into its own Redis prefix and warehouse
schema. The accounts' profiles, the retired visitors, the visitors left and
the alias table must be the same; then the aliases-last topic is replayed
into its sinks and nothing changes. The allowed lateness covers the held-back
events, as a backfill's must (docs/identity.md: a too-late signup is kept out
of the profile like any too-late event, the link it makes is not).
"""
from __future__ import annotations

import random
import time

import psycopg
import pytest
from apache_beam.runners.runner import PipelineState
from kafka import KafkaProducer
from psycopg import sql

from onboardflow.runners.cli.run import run
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
from onboardflow.schemas import default_registry, load_schema
from onboardflow.schemas.units import DAY_MS
from onboardflow.schemas.wire import AvroDeserializer
from onboardflow.tests.conftest import delete_redis_prefix
from onboardflow.tests.integration.outputs import counters, redis_dump
from onboardflow.transforms.anonymize import Pseudonymizer, SecretKey
from onboardflow.transforms.profile_store.encoding import decode_profile

pytestmark = pytest.mark.integration

SECRET = SecretKey(b"identity-test-pseudonymization-k")
PARTITIONS = 4


def population(now_ms: int) -> tuple[JourneyGenerator, list]:
    config = GeneratorConfig(seed=7, users=120, start_ms=now_ms - 5 * DAY_MS, horizon_days=4.5,
                             signup_window_days=2.0, duplicate_fraction=0.01, late_fraction=0.01,
                             cross_device_share=0.3)
    generator = JourneyGenerator(config)
    return generator, list(generator.messages())


def aliases_last(messages: list, seed: int) -> list:
    """The same records: those of events carrying both ids last, the rest shuffled; no Kafka keys."""
    deserializer = AvroDeserializer(default_registry(), load_schema("onboarding_event"))
    linking, rest = [], []
    for m in messages:
        event = deserializer.deserialize(m.value)
        (linking if event["user_id"] and event["anonymous_id"] else rest).append(m._replace(key=None))
    random.Random(seed).shuffle(rest)
    assert len(linking) > 100
    return rest + linking


def produce(bootstrap: str, topic: str, messages: list) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i, m in enumerate(messages):
            producer.send(topic, key=m.key, value=m.value, partition=None if m.key else i % PARTITIONS)
        producer.flush()
    finally:
        producer.close()


def rounded(profile: dict) -> dict:
    """A profile without its wall-clock field, floats to 9 significant digits (sums differ in the last bit
    with the order of their terms)."""
    return {k: float(f"{v:.9g}") if isinstance(v, float) else v for k, v in profile.items() if k != "updated_at"}


def redis_state(redis_url: str, prefix: str) -> tuple[dict, dict, dict]:
    """(profiles by user_key, rounded; user_key -> segments; stitched visitor -> account)."""
    profiles, memberships, stitched = {}, {}, {}
    for key, content in redis_dump(redis_url, prefix).items():
        kind, _, name = key.decode()[len(prefix) + 1:].partition(":")
        if kind == "profile" and content:
            profiles[name] = rounded(decode_profile(content))
        elif kind == "segment":
            for member in content:
                memberships.setdefault(member.decode(), set()).add(name)
        elif kind == "stitched":
            stitched[name] = content.decode()
    return profiles, memberships, stitched


def aliases(dsn: str, schema: str) -> set:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return set(conn.execute(sql.SQL("SELECT anonymous_key, user_key, linked_at, event_id, status FROM {}")
                                .format(sql.Identifier(schema, "identity_aliases"))).fetchall())


def test_aliases_arriving_last_and_a_replay_leave_what_an_in_order_run_leaves(
        kafka_bootstrap, kafka_topic, redis_url, redis_key_prefix, pg_dsn, warehouse_schema, unique_name):
    now = int(time.time() * 1000)
    generator, messages = population(now)
    in_order, shuffled = kafka_topic(PARTITIONS, "in-order"), kafka_topic(PARTITIONS, "aliases-last")
    produce(kafka_bootstrap, in_order, messages)
    produce(kafka_bootstrap, shuffled, aliases_last(messages, seed=11))
    other_prefix, other_schema = f"{redis_key_prefix}-b", f"{warehouse_schema}_b"[:63]
    names = {"dlq": kafka_topic(1, "dlq"), "changes": kafka_topic(1, "changes")}

    def args(topic, group, prefix, schema):
        return [f"--kafka_bootstrap_servers={kafka_bootstrap}", f"--kafka_topics={topic}",
                "--kafka_start_position=earliest", f"--kafka_consumer_group={unique_name}-{group}",
                f"--dead_letter_topic={names['dlq']}", f"--segment_changes_topic={names['changes']}",
                f"--redis_url={redis_url}", f"--redis_key_prefix={prefix}", f"--warehouse_dsn={pg_dsn}",
                f"--warehouse_schema={schema}", "--disable_online_models", "--kafka_bounded",
                # The held-back signups are up to five days late: a backfill's lateness covers them.
                "--allowed_lateness_hours=168", "--dedup_horizon_hours=168"]

    try:
        first = run(args(in_order, "in-order", redis_key_prefix, warehouse_schema), secret=SECRET)
        assert first.state == PipelineState.DONE
        second = run(args(shuffled, "aliases-last", other_prefix, other_schema), secret=SECRET)
        assert second.state == PipelineState.DONE
        want_profiles, want_segments, want_stitched = redis_state(redis_url, redis_key_prefix)
        got_profiles, got_segments, got_stitched = redis_state(redis_url, other_prefix)

        pseudonymizer = Pseudonymizer(SECRET)
        accounts = {pseudonymizer.user_key(u.user_id) for u in generator.users() if u.consent["personalization"]}
        linked = {pseudonymizer.user_key(None, t["anonymous_id"]) for t in generator.identity_truth()
                  if t["deterministic"] and pseudonymizer.user_key(t["user_id"]) in accounts}
        assert len(want_stitched) > 50 and want_stitched.keys() <= linked
        assert got_stitched == want_stitched
        assert not linked & want_profiles.keys() and not linked & got_profiles.keys()  # visitors retired
        assert len(accounts & want_profiles.keys()) > 50
        assert got_profiles == want_profiles
        assert got_segments == want_segments
        assert aliases(pg_dsn, other_schema) == aliases(pg_dsn, warehouse_schema)
        # Both paths ran: in order, a linked device's later anonymous events are re-keyed to the account; with
        # the aliases last, a device's events are held and released when its link arrives. (Whether any event
        # is re-keyed in the second run depends on how the runner interleaves the partitions: not asserted.)
        assert counters(first)["onboardflow", "identity_events_rekeyed"] > 0
        assert counters(second)["onboardflow", "identity_events_released"] > 0

        before = (redis_dump(redis_url, other_prefix), aliases(pg_dsn, other_schema))
        replay = run(args(shuffled, "replay", other_prefix, other_schema), secret=SECRET)
        assert replay.state == PipelineState.DONE
        assert (redis_dump(redis_url, other_prefix), aliases(pg_dsn, other_schema)) == before
        assert counters(replay)["onboardflow", "profiles_written"] == 0
    finally:
        delete_redis_prefix(redis_url, other_prefix)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other_schema)))
