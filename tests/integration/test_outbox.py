"""The outboxes (transforms/outbox/) against the real Redis, Kafka and PostgreSQL.

What is pinned: an applied profile write and its history are one Redis
script (a stale write records nothing); the relay moves segment changes to
the topic and the warehouse and snapshots to the warehouse, each once; a
relay killed after sending but before moving its cursor is followed by one
that sends nothing twice; records Kafka did not acknowledge are sent again
although newer ones landed in their partition; dead letters are recorded
once per source coordinate; the fold of each user's change history equals
their memberships in Redis.
"""
from __future__ import annotations

import hashlib
import hmac
from collections import Counter, defaultdict

import psycopg
import pytest
from psycopg import sql

from onboardflow.schemas import default_registry, load_schema
from onboardflow.schemas.wire import AvroDeserializer
from onboardflow.tests.integration.outputs import read_topic
from onboardflow.transforms.outbox import relay as outbox
from onboardflow.transforms.outbox.dead_letters import DeadLetterOutbox
from onboardflow.transforms.outbox.keys import DEAD_LETTERS, PROFILE_SNAPSHOTS, SEGMENT_CHANGES, OutboxKeys
from onboardflow.transforms.outbox.settings import RelaySettings, make_relays
from onboardflow.transforms.profile_store.encoding import encode_profile
from onboardflow.transforms.profile_store.store import ProfileStore
from onboardflow.transforms.profile_store.writer import RedisProfileWriter
from onboardflow.transforms.warehouse.migrations import apply_migrations

pytestmark = pytest.mark.integration

SECRET = b"outbox-secret-0123456789abcdef"
T0 = 1_780_000_000_000


def key_of(user_id: str) -> str:
    return hmac.new(SECRET, user_id.encode(), hashlib.sha256).hexdigest()


def profile(user: str, as_of: int, segments, n: int = 0) -> dict:
    return {"user_key": key_of(user), "version": as_of * 1000 + n, "as_of": as_of, "updated_at": as_of,
            "segments": list(segments), "events_total": n + 1}


@pytest.fixture
def deployment(redis_url, redis_key_prefix, kafka_topic, kafka_bootstrap, pg_dsn, warehouse_schema):
    apply_migrations(pg_dsn, warehouse_schema)
    settings = RelaySettings(redis_url, redis_key_prefix, kafka_bootstrap,
                             segment_changes_topic=kafka_topic(3, "segment-changes"),
                             dead_letter_topic=kafka_topic(2, "dlq"),
                             warehouse_dsn=pg_dsn, warehouse_schema=warehouse_schema)
    writer = RedisProfileWriter(redis_url, redis_key_prefix, profile_ttl_s=3600)
    relays = make_relays(settings)
    yield settings, writer, relays
    writer.close()
    for relay in relays.values():
        relay.close()


def write(writer, *profiles):
    return writer.write([encode_profile(p) for p in profiles])


def changes_on_topic(bootstrap: str, topic: str) -> list[dict]:
    decode = AvroDeserializer(default_registry(), load_schema("segment_change"))
    return [decode.deserialize(r.value) for r in read_topic(bootstrap, topic)]


def warehouse_changes(settings: RelaySettings) -> list[tuple]:
    with psycopg.connect(settings.warehouse_dsn) as conn:
        return conn.execute(sql.SQL("SELECT user_key, segment, change, version FROM {}.segment_changes")
                            .format(sql.Identifier(settings.warehouse_schema))).fetchall()


def fold(changes) -> dict[str, set]:
    """Each user's segments after applying their entered/exited history in version order."""
    members: dict[str, set] = defaultdict(set)
    for user, segment, change, _ in sorted(changes, key=lambda c: (c[3], c[2] == "entered")):
        (members[user].add if change == "entered" else members[user].discard)(segment)
    return {u: s for u, s in members.items() if s}


def redis_memberships(settings: RelaySettings) -> dict[str, set]:
    store = ProfileStore(settings.redis_url, key_prefix=settings.key_prefix)
    members: dict[str, set] = defaultdict(set)
    for segment in store.segments():
        for user in store.segment_members(segment):
            members[user].add(segment)
    store.close()
    return dict(members)


def test_applied_writes_record_their_history_atomically_and_stale_writes_record_nothing(deployment, redis_client):
    settings, writer, _ = deployment
    keys = OutboxKeys(settings.key_prefix)
    write(writer, profile("a", T0, ["activated"]), profile("b", T0, []))
    write(writer, profile("a", T0 + 1, ["activated", "power_user"]), profile("b", T0 + 1, []))
    outcomes = write(writer, profile("a", T0, ["dormant"]))  # stale: an older version
    assert [o.applied for o in outcomes] == [False]
    changes = redis_client.xrange(keys.stream(SEGMENT_CHANGES))
    snapshots = redis_client.xrange(keys.stream(PROFILE_SNAPSHOTS))
    # a: [] -> [activated] -> [activated, power_user]; b never changes segments.
    assert [(f[b"u"].decode(), f[b"old"], f[b"new"]) for _, f in changes] == [
        (key_of("a"), b"[]", b'["activated"]'),
        (key_of("a"), b'["activated"]', b'["activated","power_user"]'),
    ]
    assert len(snapshots) == 4  # every applied write, changed segments or not


def test_the_relay_delivers_every_change_once_and_the_fold_of_the_history_equals_redis(
        deployment, kafka_bootstrap):
    settings, writer, relays = deployment
    history = [["activated"], ["activated", "power_user"], ["power_user"], [], ["at_risk"]]
    for step, segments in enumerate(history):
        write(writer, *(profile(f"u{i}", T0 + step, segments if i % 2 else segments[:1]) for i in range(20)))
        report = relays[SEGMENT_CHANGES].relay()
        assert report.skipped == 0
    relays[PROFILE_SNAPSHOTS].relay()
    on_topic = changes_on_topic(kafka_bootstrap, settings.segment_changes_topic)
    in_warehouse = warehouse_changes(settings)
    topic_rows = [(c["user_key"], c["segment"], c["change"], c["version"]) for c in on_topic]
    assert len(topic_rows) == len(set(topic_rows)) == len(in_warehouse) > 0
    assert Counter(topic_rows) == Counter(in_warehouse)
    assert fold(in_warehouse) == redis_memberships(settings)
    assert all(relay.backlog() == 0 for relay in relays.values())
    with psycopg.connect(settings.warehouse_dsn) as conn:
        snapshots = conn.execute(sql.SQL("SELECT count(*) FROM {}.profile_snapshots")
                                 .format(sql.Identifier(settings.warehouse_schema))).fetchone()[0]
    assert snapshots == 20 * len(history)
    print(f"relayed {len(topic_rows)} segment changes and {snapshots} snapshots, each once")


class _DiesAfterSending(Exception):
    pass


def test_a_relay_killed_between_sending_and_its_cursor_is_followed_by_one_that_sends_nothing_twice(
        deployment, kafka_bootstrap, monkeypatch):
    settings, writer, relays = deployment
    relay = relays[SEGMENT_CHANGES]
    write(writer, *(profile(f"u{i}", T0, ["activated"]) for i in range(30)))
    real = relay._fenced

    def die_at_commit(token, step, last, ids=()):
        if step == "commit":
            raise _DiesAfterSending()
        return real(token, step, last, ids)

    monkeypatch.setattr(relay, "_fenced", die_at_commit)
    with pytest.raises(_DiesAfterSending):
        relay.relay()
    monkeypatch.setattr(relay, "_fenced", real)
    assert len(read_topic(kafka_bootstrap, settings.segment_changes_topic)) == 30  # sent, cursor not moved
    write(writer, *(profile(f"u{i}", T0 + 1, ["activated", "power_user"]) for i in range(30)))
    report = relay.relay()
    assert (report.skipped, report.records) == (30, 30)
    rows = [(c["user_key"], c["segment"], c["change"], c["version"])
            for c in changes_on_topic(kafka_bootstrap, settings.segment_changes_topic)]
    assert len(rows) == len(set(rows)) == 60
    assert fold(rows) == redis_memberships(settings)


def test_records_kafka_did_not_acknowledge_are_sent_again_even_behind_newer_ones(
        deployment, kafka_bootstrap, monkeypatch, caplog):
    settings, writer, relays = deployment
    relay = relays[SEGMENT_CHANGES]
    target = relay._kafka
    write(writer, *(profile(f"u{i}", T0, ["activated"]) for i in range(12)))
    real_send = target.send
    calls = []

    def lose_every_third_once(records, stream_key):
        calls.append(len(records))
        if len(calls) > 1:
            return real_send(records, stream_key)
        real_send([r for i, r in enumerate(records) if i % 3], stream_key)
        return [r for i, r in enumerate(records) if not i % 3]

    monkeypatch.setattr(target, "send", lose_every_third_once)
    with caplog.at_level("WARNING", logger="onboardflow.transforms.outbox"):
        report = relay.relay()  # the failure is retried within the call
    assert "KafkaRelayError" in caplog.text
    # The retry found 8 records already in their partitions and sent the 4 lost ones.
    assert calls == [12, 4] and (report.records, report.skipped) == (4, 8)
    rows = [(c["user_key"], c["segment"], c["change"]) for c in
            changes_on_topic(kafka_bootstrap, settings.segment_changes_topic)]
    assert sorted(rows) == sorted((key_of(f"u{i}"), "activated", "entered") for i in range(12))


def test_a_killed_relays_lock_is_free_again_within_the_lease(deployment, redis_client):
    settings, writer, relays = deployment
    relay = relays[SEGMENT_CHANGES]
    lock = OutboxKeys(settings.key_prefix).lock(SEGMENT_CHANGES)
    redis_client.set(lock, "a-relay-that-was-killed", px=outbox.DEFAULT_LEASE_MS)
    write(writer, profile("u1", T0, ["activated"]))
    report = relay.relay()  # waits for the dead holder's lease, then relays
    assert report.entries == 1 and redis_client.get(lock) is None


def test_dead_letters_are_recorded_once_per_source_coordinate_and_relayed_with_their_raw_key(
        deployment, redis_client, kafka_bootstrap):
    settings, _, relays = deployment
    box = DeadLetterOutbox(redis_client, OutboxKeys(settings.key_prefix))
    letters = [(f"events/{i % 2}/{i}", (b"k%d" % i) if i % 3 else None, b"value-%d" % i) for i in range(10)]
    assert box.write(letters) == 10
    relays[DEAD_LETTERS].relay()
    assert box.write(letters[:6]) == 0  # a replay of the same coordinates
    relays[DEAD_LETTERS].relay()
    records = read_topic(kafka_bootstrap, settings.dead_letter_topic)
    assert sorted(((r.key, r.value) for r in records), key=repr) == sorted(((k, v) for _, k, v in letters), key=repr)
