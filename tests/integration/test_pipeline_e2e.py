"""End to end: the onboarding pipeline on Prism against the real Kafka, Redis and PostgreSQL.

Every test produces the same small, deterministic journey stream (a fixed-seed
``JourneyGenerator``: a few hundred users over two weeks, with malformed,
duplicate, out-of-order and late messages) to a fresh 4-partition topic, runs
``pipelines/onboarding.py`` on it with a fixed pseudonymization secret, and
checks the outcome against what the generator says it produced. Each test has
its own consumer groups, dead-letter and segment-change topics, Redis key
prefix and warehouse schema (migrated by ``run()``, dropped afterwards), so
tests never see each other's data.

What is pinned:

* accounting: every produced message is either a decoded event or a dead
  letter with the reason of its malformation, every decoded event is routed
  by consent, duplicates are dropped exactly once, and the dead-letter topic
  and the warehouse agree with the metrics;
* a bounded run leaves the consumer group at the end offsets;
* no raw e-mail, IP, user id or anonymous id reaches Redis, the warehouse or
  the segment-changes topic (the dead-letter topic keeps raw bytes by design);
* every consenting user's profile equals an independent computation from the
  generator's events (counts, sessions, first/last event, tutorial, features);
* a replay from the start changes nothing in Redis or the warehouse (profile
  snapshots and segment changes included);
* streaming and bounded processing of the same input give the same profiles.
"""
from __future__ import annotations

import hashlib
import random
import re
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Optional

import psycopg
import pytest
import redis
from apache_beam.runners.runner import PipelineState
from kafka import KafkaConsumer, TopicPartition
from psycopg import sql

from onboardflow.models import snapshot
from onboardflow.models.features import feature_vector
from onboardflow.models.model_registry import ModelRegistry
from onboardflow.models.propensity import PropensityModel
from onboardflow.models.segmentation import Segmenter
from onboardflow.runners.cli.produce import produce
from onboardflow.runners.cli.run import run
from onboardflow.runners.local import stop_streaming_job
from onboardflow.runners.sim.generator import (
    DUPLICATE,
    MALFORMATION_REASONS,
    VALID,
    GeneratedMessage,
    GeneratorConfig,
    JourneyGenerator,
    UserProfile,
)
from onboardflow.schemas import default_registry, load_schema
from onboardflow.schemas.wire import AvroDeserializer
from onboardflow.tests.integration.outputs import counters, read_topic, redis_dump
from onboardflow.transforms.anonymize import Pseudonymizer, SecretKey, ip_prefix
from onboardflow.transforms.online_models import PROPENSITY, SEGMENTATION
from onboardflow.transforms.profile_store.encoding import decode_profile
from onboardflow.transforms.profile_store.store import ProfileStore
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SECRET = SecretKey(b"e2e-test-pseudonymization-key-32")
PARTITIONS = 4
# ~26k messages. Consent rates below the defaults so that all three consent
# routes (profiles, analytics only, dropped) carry a good share of the events.
CONFIG = GeneratorConfig(
    seed=2026, users=300, horizon_days=14.0, cross_device_share=0.3,
    malformed_fraction=0.01, duplicate_fraction=0.01, late_fraction=0.01,
    personalization_consent_rate=0.8, analytics_consent_rate=0.6,
)
# The generator sends 1% of events up to 3 days late. Every run allows a day
# more than that, so no event is too late by construction and what a run keeps
# does not depend on how far the watermark got when a late event arrived (the
# watermark does move during a bounded run too: the Kafka source reports it at
# every checkpoint). Dropping too-late events is the profile stage's unit tests' job.
LATENESS_HOURS = CONFIG.max_lateness_ms / 3_600_000 + 24
SESSION_GAP_MS = 30 * 60_000
SOURCE = "onboardflow.kafka_source"
OBF = "onboardflow"
PERSONALIZATION, ANALYTICS_ONLY, FILTERED = "personalization", "analytics_only", "consent_filtered"
WAREHOUSE_TABLES = ("events", "late_events", "profile_snapshots", "segment_changes", "dead_letters")


# --------------------------------------------------------------------------- the input


@dataclass(frozen=True)
class Stream:
    """What the generator produced: the Kafka messages and, as ground truth, the events behind them."""

    messages: list[GeneratedMessage]
    counts: Counter
    #: (kind, event) of every valid event and duplicate, in the order they were sent
    events: list[tuple[str, dict]]
    users: list[UserProfile]

    @property
    def malformed(self) -> list[GeneratedMessage]:
        return [m for m in self.messages if m.kind in MALFORMATION_REASONS]


@pytest.fixture(scope="module")
def stream() -> Stream:
    generator = JourneyGenerator(CONFIG)
    messages = list(generator.messages())
    counts = Counter(generator.counts)
    # events() replays the same seeded stream messages() serialized.
    events = list(generator.events())
    assert Counter(kind for kind, _ in events) == Counter({VALID: counts[VALID], DUPLICATE: counts[DUPLICATE]})
    assert {MALFORMATION_REASONS[m.kind] for m in messages if m.kind in MALFORMATION_REASONS} == set(
        MALFORMATION_REASONS.values()), "every malformation kind must be in the input"
    return Stream(messages, counts, events, list(generator.users()))


def consent_route(event: dict) -> str:
    consent = event["consent"]
    if consent["personalization"]:
        return PERSONALIZATION
    return ANALYTICS_ONLY if consent["analytics"] else FILTERED


# --------------------------------------------------------------------------- a deployment per test


@dataclass
class Deployment:
    """The topics, Redis prefix and warehouse schema of one test, with the input already produced."""

    bootstrap: str
    topic: str
    dead_letter_topic: str
    segment_changes_topic: str
    redis_url: str
    prefix: str
    dsn: str
    schema: str
    name: str
    extra_prefixes: list[str] = field(default_factory=list)

    def group(self, label: str) -> str:
        return f"{self.name}-{label}"

    def other_prefix(self, label: str) -> str:
        prefix = f"{self.prefix}-{label}"
        self.extra_prefixes.append(prefix)
        return prefix

    def args(self, group: str, prefix: Optional[str] = None, *extra: str) -> list[str]:
        return [
            f"--kafka_bootstrap_servers={self.bootstrap}",
            f"--kafka_topics={self.topic}",
            "--kafka_start_position=earliest",
            f"--kafka_consumer_group={group}",
            f"--dead_letter_topic={self.dead_letter_topic}",
            f"--segment_changes_topic={self.segment_changes_topic}",
            f"--redis_url={self.redis_url}",
            f"--redis_key_prefix={prefix or self.prefix}",
            f"--warehouse_dsn={self.dsn}",
            f"--warehouse_schema={self.schema}",
            f"--allowed_lateness_hours={LATENESS_HOURS}",
            f"--dedup_horizon_hours={LATENESS_HOURS}",
            *extra,
        ]

    def run_bounded(self, group: str, prefix: Optional[str] = None, *extra: str):
        result = run(self.args(group, prefix, "--kafka_bounded", *extra), secret=SECRET)
        assert result.state == PipelineState.DONE
        return result


@pytest.fixture
def deployment(stream, kafka_bootstrap, kafka_topic, redis_url, redis_key_prefix, pg_dsn, warehouse_schema,
               unique_name):
    topic = kafka_topic(partitions=PARTITIONS)
    dead_letter_topic = kafka_topic(partitions=1, suffix="dlq")
    segment_changes_topic = kafka_topic(partitions=1, suffix="segment-changes")
    stats = produce(stream.messages, kafka_bootstrap, topic, progress=False)
    assert stats.ok and stats.total_sent == len(stream.messages)
    d = Deployment(kafka_bootstrap, topic, dead_letter_topic, segment_changes_topic, redis_url,
                   redis_key_prefix, pg_dsn, warehouse_schema, unique_name)
    yield d
    client = redis.Redis.from_url(redis_url)
    try:
        for prefix in d.extra_prefixes:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


# --------------------------------------------------------------------------- reading the outputs


def group_offsets(bootstrap: str, topic: str, group: str) -> tuple[dict, dict]:
    """(committed offsets, end offsets) of every partition of ``topic``, as {partition: offset}."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        committed = {tp.partition: consumer.committed(tp) for tp in tps}
        end = {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
        return committed, end
    finally:
        consumer.close()


def query(dsn: str, schema: str, text: str, params=()) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(text, params).fetchall()


def table_counts(dsn: str, schema: str) -> dict[str, int]:
    return {table: query(dsn, schema, f"SELECT count(*) FROM {table}")[0][0] for table in WAREHOUSE_TABLES}


def final_profiles(redis_url: str, prefix: str) -> tuple[dict[str, dict], dict[str, set]]:
    """Decoded profiles by user_key (without the wall-clock ``updated_at``) and segment members."""
    profile_prefix, segment_prefix = f"{prefix}:profile:".encode(), f"{prefix}:segment:".encode()
    profiles, segments = {}, {}
    for key, content in redis_dump(redis_url, prefix).items():
        if not content:
            continue  # deleted between TYPE and the read
        if key.startswith(profile_prefix):
            profile = decode_profile(content)
            profile.pop("updated_at")
            profiles[key[len(profile_prefix):].decode()] = profile
        elif key.startswith(segment_prefix):
            segments[key[len(segment_prefix):].decode()] = {m.decode() for m in content}
    return profiles, segments


# --------------------------------------------------------------------------- 1. accounting


def test_every_produced_message_is_a_decoded_event_or_a_dead_letter_and_every_event_is_routed_by_consent(
        deployment, stream):
    result = deployment.run_bounded(deployment.group("run"))
    m = counters(result)

    # Source: produced = decoded + dead-lettered.
    decoded = stream.counts[VALID] + stream.counts[DUPLICATE]
    malformed = stream.malformed
    assert m[SOURCE, "records_read"] == len(stream.messages)
    assert m[SOURCE, "events_decoded"] == decoded
    assert m[SOURCE, "dead_letters"] == len(malformed)
    assert len(stream.messages) == decoded + len(malformed)

    # Consent gate: decoded = personalization + analytics only + filtered.
    routes = Counter(consent_route(event) for _, event in stream.events)
    assert all(routes[r] > 0 for r in (PERSONALIZATION, ANALYTICS_ONLY, FILTERED))
    assert m[OBF, "anonymized_personalization"] == routes[PERSONALIZATION]
    assert m[OBF, "anonymized_analytics_only"] == routes[ANALYTICS_ONLY]
    assert m[OBF, "consent_filtered"] == routes[FILTERED]
    assert m[OBF, "anonymize_dead_letter"] == 0
    assert sum(routes.values()) == decoded

    # Duplicates: dropped by the profile stage (personalization only), and
    # stored once by the warehouse (personalization and analytics only).
    duplicates = Counter(consent_route(event) for kind, event in stream.events if kind == DUPLICATE)
    assert duplicates[PERSONALIZATION] > 0 and duplicates[ANALYTICS_ONLY] > 0
    assert m[OBF, "duplicates_dropped"] == duplicates[PERSONALIZATION]
    assert m[OBF, "rows_duplicate_events"] == duplicates[PERSONALIZATION] + duplicates[ANALYTICS_ONLY]
    assert m[OBF, "too_late_events"] == 0  # all within the allowed lateness (LATENESS_HOURS)
    # ...and every other personalization event is folded into exactly one profile.
    profiles, _ = final_profiles(deployment.redis_url, deployment.prefix)
    assert sum(p["events_total"] for p in profiles.values()) == (
        routes[PERSONALIZATION] - duplicates[PERSONALIZATION])

    # The dead-letter topic: one record per malformed message, raw bytes unchanged.
    deserializer = AvroDeserializer(default_registry(), load_schema("dead_letter"))
    letters = [deserializer.deserialize(r.value)
               for r in read_topic(deployment.bootstrap, deployment.dead_letter_topic)]
    assert Counter((dl["key"], dl["value"], dl["reason"]) for dl in letters) == Counter(
        (msg.key, msg.value, MALFORMATION_REASONS[msg.kind]) for msg in malformed)
    assert {(dl["source_topic"], dl["stage"]) for dl in letters} == {(deployment.topic, "decode")}
    coordinates = {(dl["source_partition"], dl["source_offset"]) for dl in letters}
    assert len(coordinates) == len(malformed)

    # The warehouse's dead_letters: the same records, metadata and digest only.
    rows = query(deployment.dsn, deployment.schema,
                 "SELECT source_topic, source_partition, source_offset, stage, reason, payload_size, payload_sha256 "
                 "FROM dead_letters")
    assert Counter((r[4], r[5], r[6]) for r in rows) == Counter(
        (MALFORMATION_REASONS[msg.kind], len(msg.value), hashlib.sha256(msg.value).hexdigest()) for msg in malformed)
    assert {(r[0], r[1], r[2], r[3]) for r in rows} == {(deployment.topic, p, o, "decode") for p, o in coordinates}

    # The warehouse's events: each consented event once, duplicates and non-consented ones not at all.
    consented = {event["event_id"]: consent_route(event) for kind, event in stream.events
                 if kind == VALID and consent_route(event) != FILTERED}
    stored = query(deployment.dsn, deployment.schema, "SELECT event_id, consent_personalization FROM events")
    assert len(stored) == len(consented)
    assert dict(stored) == {event_id: route == PERSONALIZATION for event_id, route in consented.items()}
    assert m[OBF, "rows_written_events"] == len(consented)
    assert table_counts(deployment.dsn, deployment.schema)["late_events"] == 0


# --------------------------------------------------------------------------- 2. offsets


def test_a_bounded_run_leaves_the_consumer_group_committed_at_the_end_offsets(deployment, stream):
    group = deployment.group("run")
    committed, end = group_offsets(deployment.bootstrap, deployment.topic, group)
    assert set(committed.values()) == {None}
    assert sum(end.values()) == len(stream.messages)

    deployment.run_bounded(group)

    committed, end_after = group_offsets(deployment.bootstrap, deployment.topic, group)
    assert end_after == end
    assert committed == end


# --------------------------------------------------------------------------- 3. no raw PII downstream


def _trie_pattern(words) -> str:
    """A regex matching any of ``words``, as a trie: one pass over the text for thousands of needles."""
    trie: dict = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}
    def emit(node: dict) -> str:
        end = "" in node
        branches = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and not end else "(?:" + "|".join(branches) + ")"
        return body + "?" if end else body
    return emit(trie)


def raw_identifier_pattern(stream: Stream) -> re.Pattern:
    """Any raw e-mail, IP address, user id or anonymous id the generator put in the stream."""
    plain, ipv4, ipv6 = set(), set(), set()
    for _, event in stream.events:
        context = event["context"]
        for value in (event["user_id"], context["email"]):
            if value:
                plain.add(value.lower())
        if event["anonymous_id"]:
            anonymous_id = event["anonymous_id"].lower()
            plain.add(anonymous_id)
            plain.add(anonymous_id.removeprefix("anon-"))  # the device uuid alone identifies too
        if context["ip"]:
            (ipv6 if ":" in context["ip"] else ipv4).add(context["ip"].lower())
    plain.update(u.email.lower() for u in stream.users)
    plain.update(u.user_id.lower() for u in stream.users)
    assert len(ipv4) > 100 and len(ipv6) > 10 and len(plain) > 600
    # Addresses only count as whole addresses: "12.34.56.7" inside "112.34.56.70"
    # is another address, and an address followed by "/" is the network of an
    # ip_prefix (the pipeline keeps /24 and /48 networks by design).
    return re.compile(
        f"(?:{_trie_pattern(plain)})"
        f"|(?<![0-9.])(?:{_trie_pattern(ipv4)})(?![0-9./])"
        f"|(?<![0-9a-f:])(?:{_trie_pattern(ipv6)})(?![0-9a-f:/])")


def _value_text(value: bytes) -> str:
    """A Redis value as scannable text; model snapshots (zlib'd JSON, or pickles from before) are opened up first."""
    if value.startswith(snapshot.MAGIC):
        start = len(snapshot.MAGIC) + 2 + value[len(snapshot.MAGIC) + 1]
        return zlib.decompress(value[start:]).decode("latin-1")
    return value.decode()


def redis_text(redis_url: str, prefix: str) -> str:
    parts = []
    for key, content in redis_dump(redis_url, prefix).items():
        parts.append(key.decode())
        if isinstance(content, dict):
            for name, value in content.items():
                parts.extend((name.decode(), _value_text(value)))
        elif isinstance(content, (set, list)):
            parts.extend(v.decode() if isinstance(v, bytes) else repr(v) for v in content)
        else:
            parts.append(content.decode() if isinstance(content, bytes) else repr(content))
    return "\n".join(parts).lower()


def warehouse_texts(dsn: str, schema: str) -> dict[str, str]:
    """Every row of every table in ``schema`` (partitions through their parent), cast to text."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [name for (name,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition", [schema]).fetchall()]
        texts = {}
        for table in tables:
            rows = conn.execute(sql.SQL("SELECT t::text FROM {} AS t").format(sql.Identifier(schema, table))).fetchall()
            texts[table] = "\n".join(row for (row,) in rows).lower()
        return texts


def test_no_raw_email_ip_user_id_or_anonymous_id_reaches_redis_the_warehouse_or_the_segment_changes_topic(
        deployment, stream):
    deployment.run_bounded(deployment.group("run"))
    raw = raw_identifier_pattern(stream)
    # The scanner itself: it finds each kind of identifier as JSON would quote
    # it, and not the /24 or /48 networks the pipeline keeps on purpose.
    contexts = [e["context"] for _, e in stream.events if e["context"]["ip"] and e["anonymous_id"]]
    ipv4 = next(c["ip"] for c in contexts if ":" not in c["ip"])
    ipv6 = next(c["ip"] for c in contexts if ":" in c["ip"])
    known = next(e for _, e in stream.events if e["user_id"] and e["anonymous_id"] and e["context"]["email"])
    for needle in (ipv4, ipv6, known["user_id"], known["anonymous_id"], known["context"]["email"]):
        assert raw.search(f'{{"value":"{needle.lower()}"}}'), needle
    assert raw.search(f'"{ip_prefix(ipv4)}","{ip_prefix(ipv6)}"') is None

    in_redis = redis_text(deployment.redis_url, deployment.prefix)
    assert f"{deployment.prefix}:profile:" in in_redis  # the scan saw the profiles
    assert raw.findall(in_redis) == []

    tables = warehouse_texts(deployment.dsn, deployment.schema)
    assert set(WAREHOUSE_TABLES) <= set(tables)
    assert all(tables[t] for t in ("events", "profile_snapshots", "segment_changes", "dead_letters"))
    assert {table: raw.findall(text) for table, text in tables.items()} == {table: [] for table in tables}

    # Downstream consumers of segment changes get pseudonymous records only.
    # Not scanned: the dead-letter topic, which keeps the raw bytes of the
    # malformed records on purpose (schemas/dead_letter.avsc; same access
    # rules as the source topic).
    changes = read_topic(deployment.bootstrap, deployment.segment_changes_topic)
    assert changes
    records = "\n".join((r.key or b"").decode("latin-1") + " " + r.value.decode("latin-1") for r in changes).lower()
    assert raw.findall(records) == []


# --------------------------------------------------------------------------- 4. profiles


def independent_profile(events: list[dict]) -> dict:
    """The countable profile fields of one user, computed here from their raw events."""
    unique = list({e["event_id"]: e for e in events}.values())
    times = sorted(e["occurred_at"] for e in unique)
    by_type = Counter(e["event_type"] for e in unique)
    features = Counter(e["properties"]["feature"].strip().lower() for e in unique if e["event_type"] == "feature_used")
    return {
        "events_total": len(unique),
        "event_counts": dict(by_type),
        "session_count": 1 + sum(1 for a, b in zip(times, times[1:]) if b - a > SESSION_GAP_MS),
        "first_event_at": times[0],
        "last_event_at": times[-1],
        "signup_at": min(e["occurred_at"] for e in unique if e["event_type"] == "signup"),
        "tutorial_steps_done": len({e["properties"]["step"] for e in unique if e["event_type"] == "tutorial_step"}),
        "distinct_features": len(features),
        "features_used": dict(features),
    }


def test_profiles_in_redis_equal_an_independent_computation_from_the_users_events(deployment, stream):
    by_user = defaultdict(list)
    # Identity stitching: a device's anonymous events count for the account that device identified
    # as, whenever they arrive (device_owners: ids, then e-mail addresses).
    owner = device_owners(stream.events)
    stitched = 0
    for _, event in stream.events:
        if not event["consent"]["personalization"]:
            continue
        if event["user_id"]:
            by_user[event["user_id"]].append(event)
        elif event["anonymous_id"] in owner:
            by_user[owner[event["anonymous_id"]]].append(event)
            stitched += 1
    assert stitched > 100  # the visitors' page views before signup
    late = sum(1 for events in by_user.values() for e in events
               if e["received_at"] - e["occurred_at"] >= CONFIG.min_lateness_ms)
    duplicated = sum(len(events) - len({e["event_id"] for e in events}) for events in by_user.values())
    assert len(by_user) > 100 and late > 10 and duplicated > 10  # disorder the profiles must see through

    deployment.run_bounded(deployment.group("run"))

    user_ids = sorted(by_user)
    with ProfileStore(deployment.redis_url, SECRET, deployment.prefix) as store:
        profiles = dict(zip(user_ids, store.get_many(user_ids)))
    wrong = {}
    for user_id in user_ids:
        expected = independent_profile(by_user[user_id])
        actual = {name: (profiles[user_id] or {}).get(name) for name in expected}
        if actual != expected:
            wrong[user_id] = {name: (actual[name], want) for name, want in expected.items() if actual[name] != want}
    assert wrong == {}, f"{len(wrong)} of {len(user_ids)} profiles differ: field -> (redis, expected)"


def device_owners(events) -> dict[str, str]:
    """Raw device id -> raw account id, the deterministic links of the stream (personalization consent):
    an event carrying both ids (the earliest by event time), else an anonymous event of the device that
    gave an address an identified event of the account gave."""
    ordered = sorted((e for _, e in events if e["consent"]["personalization"]),
                     key=lambda e: (e["occurred_at"], e["event_id"]))
    owner, account_of = {}, {}
    for e in ordered:
        if e["user_id"] and e["anonymous_id"]:
            owner.setdefault(e["anonymous_id"], e["user_id"])
        if e["user_id"] and e["context"]["email"]:
            account_of.setdefault(e["context"]["email"].lower(), e["user_id"])
    for e in ordered:
        email = (e["context"]["email"] or "").lower()
        if not e["user_id"] and e["anonymous_id"] and email in account_of:
            owner.setdefault(e["anonymous_id"], account_of[email])
    return owner


def test_visitors_are_stitched_into_the_accounts_they_identify_as_and_their_own_profiles_retired(deployment, stream):
    """Ground truth from the stream itself: a device belongs to the account an event of it carried, or
    whose address it gave (deterministic links), its anonymous-only events count there (the test above),
    its own profile is gone from Redis with its segment memberships, and the alias table records exactly
    those links. Devices never identified keep their visitor profile."""
    pseudonymizer = Pseudonymizer(SECRET)
    truth = device_owners(stream.events)
    anonymous_only = {e["anonymous_id"] for _, e in stream.events
                      if e["anonymous_id"] and not e["user_id"] and e["consent"]["personalization"]}
    never_identified = anonymous_only - truth.keys()
    assert len(truth) > 200 and never_identified  # cross-device visitors who never logged in there

    deployment.run_bounded(deployment.group("run"))

    links = {(a, u): status for a, u, status in query(
        deployment.dsn, deployment.schema, "SELECT anonymous_key, user_key, status FROM identity_aliases")}
    want = {(pseudonymizer.user_key(None, a), pseudonymizer.user_key(u)) for a, u in truth.items()}
    made = {pair for pair, status in links.items() if status == "linked"}
    precision = len(made & want) / len(made)
    recall = len(made & want) / len(want)
    assert (precision, recall) == (1.0, 1.0), (precision, recall)  # no shared devices in this stream
    profiles, segments = final_profiles(deployment.redis_url, deployment.prefix)
    members = set().union(*segments.values())
    client = redis.Redis.from_url(deployment.redis_url)
    try:
        for anonymous_id, user_id in truth.items():
            device = pseudonymizer.user_key(None, anonymous_id)
            assert device not in profiles and device not in members
            if anonymous_id in anonymous_only:  # a visitor profile existed: retired into the account
                assert client.get(f"{deployment.prefix}:stitched:{device}") == pseudonymizer.user_key(user_id).encode()
        for anonymous_id in never_identified:
            assert pseudonymizer.user_key(None, anonymous_id) in profiles
    finally:
        client.close()


# --------------------------------------------------------------------------- 5. replay


def replay(deployment: Deployment) -> tuple[tuple, tuple, Counter]:
    """Run the bounded pipeline twice over the whole topic (two consumer groups, same sinks).

    Returns (Redis dump, warehouse row counts) after the first run and after
    the replay, and the replay's counters.
    """
    deployment.run_bounded(deployment.group("first"))
    before = (redis_dump(deployment.redis_url, deployment.prefix), table_counts(deployment.dsn, deployment.schema))
    assert before[1]["events"] > 0 and before[1]["profile_snapshots"] > 0 and before[1]["segment_changes"] > 0
    again = deployment.run_bounded(deployment.group("replay"))
    after = (redis_dump(deployment.redis_url, deployment.prefix), table_counts(deployment.dsn, deployment.schema))
    return before, after, counters(again)


def test_replaying_the_topic_from_the_start_changes_no_redis_key_and_stores_no_event_or_dead_letter_twice(
        deployment, stream):
    (redis_before, rows_before), (redis_after, rows_after), m = replay(deployment)

    assert m[SOURCE, "records_read"] == len(stream.messages)  # the replay did read everything again
    # Every profile the replay computes has a version Redis already holds (or
    # an older one): the upsert script skips them all, so not even updated_at
    # or _write_id change.
    assert redis_after == redis_before
    assert m[OBF, "profiles_written"] == 0
    for table in ("events", "late_events", "dead_letters"):
        assert rows_after[table] == rows_before[table], table
        assert m[OBF, f"rows_written_{table}"] == 0, table


def test_replaying_the_topic_from_the_start_adds_no_profile_snapshot_or_segment_change_row(deployment, stream):
    (_, rows_before), (_, rows_after), m = replay(deployment)

    assert m[SOURCE, "records_read"] == len(stream.messages)
    for table in ("profile_snapshots", "segment_changes"):
        assert rows_after[table] == rows_before[table], table
        assert m[OBF, f"rows_written_{table}"] == 0, table


# --------------------------------------------------------------------------- 6. streaming vs batch


def cancel(result, timeout_s: float = 60) -> None:
    """Cancel a streaming job and wait until it stopped writing (its errors stay visible)."""
    assert stop_streaming_job(result, timeout_s, quiet=False) is not None, "the streaming job did not stop"


def fixed_models() -> dict[str, bytes]:
    """A ready segmenter and a warm propensity model, learned from synthetic profiles."""
    rng = random.Random(11)
    rows, propensity = [], PropensityModel()
    for i in range(600):
        kind = i % 3  # support-heavy, feature-heavy and browse-only users
        sessions = rng.randint(1, 12)
        counts = {"support_message": rng.randint(0, 3) + 6 * (kind == 0),
                  "feature_used": rng.randint(0, 3) + 12 * (kind == 1),
                  "page_view": rng.randint(5, 30)}
        x = feature_vector({
            "event_counts": counts, "events_total": sum(counts.values()), "session_count": sessions,
            "days_since_signup": rng.uniform(0, 14), "distinct_features": counts["feature_used"] // 2,
            "onboarding_progress": rng.choice([0.0, 0.4, 1.0]), "engagement_score": rng.uniform(0, 40),
            "recency_ms": rng.uniform(0, 10) * 86_400_000, "events_7d": sum(counts.values()),
        })
        rows.append(x)
        propensity.predict(f"u{i}", x, i * 1000)
        propensity.label(f"u{i}", int(kind == 1), i * 1000 + 1)
    segmenter = Segmenter(n_clusters=3).fit(rows)
    assert segmenter.ready and propensity.warm
    return {SEGMENTATION: segmenter.to_bytes(), PROPENSITY: propensity.to_bytes()}


def serve_pinned(deployment, prefixes: list[str]) -> None:
    """Serve ``fixed_models()`` under every Redis prefix, pinned, before any run starts.

    Scoring reads whatever model is serving when a profile passes by, and a
    streaming learner refits at marks the watermark passes while the runs read
    at different speeds, so without a pin which profiles get scored, and by
    which version, depends on timing. Pinned, every run scores every update with the same
    versions from its first bundle, so the model fields (cluster, label,
    propensity, track, model_version) must agree like the rest; the learners
    still record their versions, unserved.
    """
    apply_migrations(deployment.dsn, deployment.schema)
    for i, prefix in enumerate(prefixes):
        with ModelRegistry(deployment.redis_url, deployment.dsn, schema=deployment.schema,
                           key_prefix=prefix) as registry:
            for kind, payload in fixed_models().items():
                if i == 0:
                    version = registry.publish(kind, payload, source="test").version
                    registry.rollback(kind, to_version=version.number, reason="test: pinned")
                else:
                    registry.sync(kind)  # the warehouse pointer is shared: mirror it here


def test_streaming_and_bounded_runs_of_the_same_input_end_with_the_same_profiles(deployment, stream,
                                                                                  assert_same_profiles):
    # Both runs allow LATENESS_HOURS: an event later than the allowed lateness
    # is (by design) kept out of the profile, and whether one is depends on
    # how far the watermark got when it arrived, which differs between runs.
    prefix = deployment.other_prefix("streaming")
    serve_pinned(deployment, [deployment.prefix, prefix])
    # A backfill ends at its newest event by default (--backfill_horizon=data);
    # a streaming run that caught up ends at the wall clock. Given the wall
    # clock as its horizon, the bounded run fires the same timers.
    deployment.run_bounded(deployment.group("bounded"), None, "--backfill_horizon=now")
    bounded_profiles, bounded_segments = final_profiles(deployment.redis_url, deployment.prefix)
    assert len(bounded_profiles) > len(stream.users) / 2

    # Event-time timers (new-user window, dormancy, state expiry) due by the
    # horizon (here: the wall clock) have all fired by the end of a bounded
    # run, where the watermark goes to +inf. In
    # streaming, a caught-up partition goes idle after --kafka_idle_timeout
    # and its watermark follows the wall clock, which is months past the
    # generator's fixed January 2026 timeline: the same timers fire. So
    # version and as_of (set by the last timer, dormancy) are compared too;
    # only the write time updated_at is not.
    group = deployment.group("streaming")
    result = run(deployment.args(group, prefix, "--streaming", "--kafka_idle_timeout=2"),
                 secret=SECRET, wait=False)
    try:
        # Settled: the group committed the end offsets and no profile changed
        # for several idle timeouts (the timers fire once partitions are idle).
        quiet_for_s, last, quiet_since = 12.0, None, time.monotonic()
        deadline = time.monotonic() + 300
        while True:
            assert result.state not in (PipelineState.FAILED, PipelineState.DONE, PipelineState.CANCELLED), \
                result.state
            assert time.monotonic() < deadline, "the streaming run did not settle in time"
            time.sleep(1.0)
            snapshot = final_profiles(deployment.redis_url, prefix)
            if snapshot != last:
                last, quiet_since = snapshot, time.monotonic()
                continue
            committed, end = group_offsets(deployment.bootstrap, deployment.topic, group)
            if snapshot[0] and committed == end and time.monotonic() - quiet_since >= quiet_for_s:
                break
    finally:
        cancel(result)

    streaming_profiles, streaming_segments = last
    assert_same_profiles(streaming_profiles, bounded_profiles)
    assert streaming_segments == bounded_segments
    # Both scored every update with the pinned versions (not the learners' own).
    assert {p["model_version"] for p in bounded_profiles.values()} == {"seg-000001+prop-000001"}
    assert table_counts(deployment.dsn, deployment.schema)["late_events"] == 0
