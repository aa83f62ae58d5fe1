"""The pure parts of the outboxes: record ids, dead-letter ids, entry conversion.

The relay against real Redis, Kafka and PostgreSQL: tests/integration/test_outbox.py.
"""
import json

from onboardflow.transforms.outbox.converters import (
    SegmentChangeConverter,
    dead_letter_converter,
    profile_snapshot_converter,
)
from onboardflow.transforms.outbox.dead_letters import dead_letter_id
from onboardflow.transforms.outbox.keys import OutboxKeys, OutboxRecord, parse_record_id
from onboardflow.transforms.segment import DEFAULT_RULES_PATH, RuleSet

USER = "ab" * 32


def test_record_ids_order_like_the_stream_then_the_index():
    ids = ["1700000000000-0/0", "1700000000000-0/1", "1700000000000-1/0", "1700000000001-0/0"]
    assert sorted(ids, key=parse_record_id) == ids
    assert parse_record_id("1700000000000-2") == (1700000000000, 2, 0)
    # An entry's records sort before the next entry's, whatever their number.
    assert parse_record_id("5-0/999999999") < parse_record_id("5-1/0")


def test_a_dead_letter_id_is_its_source_coordinate_or_the_payload_hash():
    letter = {"source_topic": "onboarding.events", "source_partition": 3, "source_offset": 1200, "value": b"x"}
    assert dead_letter_id(letter) == "onboarding.events/3/1200"
    assert dead_letter_id({**letter, "source_offset": -1}) == dead_letter_id({"value": b"x"})
    assert dead_letter_id({"value": b"x"}).startswith("sha256:")
    assert dead_letter_id({"value": b"x"}) != dead_letter_id({"value": b"y"})


def test_keys_of_one_prefix():
    keys = OutboxKeys("obf")
    assert keys.stream("segment-changes") == "obf:outbox:segment-changes"
    assert (keys.lock("dead-letters"), keys.cursor("dead-letters")) == (
        "obf:outbox:dead-letters:lock", "obf:outbox:dead-letters:cursor")
    assert keys.dead_letter_ids == "obf:dead-letters:ids"


def test_a_segment_change_entry_becomes_one_record_and_one_row_per_change_with_the_rules_reasons():
    convert = SegmentChangeConverter(RuleSet.load(DEFAULT_RULES_PATH), lambda change: json.dumps(change).encode())
    fields = {"u": USER.encode(), "v": b"1700000000000005", "at": b"1700000000000",
              "old": b'["dormant"]', "new": b'["activated","dormant_not_a_rule"]'}
    converted = convert("1700000000001-0", fields)
    changes = [json.loads(r.value) for r in converted.records]
    assert [(c["segment"], c["change"]) for c in changes] == [
        ("activated", "entered"), ("dormant", "exited"), ("dormant_not_a_rule", "entered")]
    assert [c["reason"] for c in changes][2] == "segment:dormant_not_a_rule"
    assert all(c["user_key"] == USER and c["version"] == 1700000000000005 and c["at"] == 1700000000000
               for c in changes)
    assert [r.record_id for r in converted.records] == [f"1700000000001-0/{n}" for n in range(3)]
    assert all(r.key == USER.encode() for r in converted.records)
    assert [row[:3] for row in converted.rows] == [
        (USER, "activated", "entered"), (USER, "dormant", "exited"), (USER, "dormant_not_a_rule", "entered")]


def test_a_sweep_entry_carries_its_own_reason():
    convert = SegmentChangeConverter(RuleSet.load(DEFAULT_RULES_PATH), lambda change: json.dumps(change).encode())
    fields = {"u": USER.encode(), "v": b"5000", "at": b"5", "old": b'["activated"]', "new": b"[]", "why": b"expired"}
    [record] = convert("9-0", fields).records
    assert json.loads(record.value)["reason"] == "expired"


def test_a_snapshot_entry_becomes_the_profile_as_the_hash_holds_it():
    fields = {"user_key": USER, "version": "7000", "events_total": "3", "segments": '["activated"]',
              "_types": json.dumps({"user_key": "str", "version": "int", "events_total": "int", "segments": "json"})}
    converted = profile_snapshot_converter("1-0", {"u": USER.encode(), "v": b"7000", "f": json.dumps(fields).encode()})
    assert converted.records == []
    [row] = converted.rows
    assert row[:2] == (USER, 7000)
    assert json.loads(row[2]) == {"user_key": USER, "version": 7000, "events_total": 3, "segments": ["activated"]}


def test_a_dead_letter_entry_keeps_its_raw_key_or_none():
    keyed = dead_letter_converter("1-0", {"id": b"t/0/1", "v": b"value", "k": b"raw-key", "hk": b"1"})
    keyless = dead_letter_converter("2-0", {"id": b"t/0/2", "v": b"value", "k": b"", "hk": b"0"})
    assert keyed.records == [OutboxRecord("1-0/0", b"raw-key", b"value")]
    assert keyless.records == [OutboxRecord("2-0/0", None, b"value")]
    assert keyed.rows == keyless.rows == []


def test_relays_take_the_pipelines_rule_set_through_a_pickle_and_count_warehouse_retries():
    import pickle

    import redis

    from onboardflow.transforms.outbox.keys import SEGMENT_CHANGES
    from onboardflow.transforms.outbox.settings import RelaySettings, make_relays

    rules = RuleSet.from_yaml("version: 1\nsegments:\n  - name: keen\n    when: {field: engagement_score, gt: 5}\n")
    settings = pickle.loads(pickle.dumps(RelaySettings("redis://unused:6379/0", "obf", warehouse_dsn="postgresql://x",
                                                       rules=rules)))
    counts = []
    relays = make_relays(settings, redis.Redis.from_url(settings.redis_url), count=lambda *c: counts.append(c))
    fields = {"u": USER.encode(), "v": b"7000", "at": b"7", "old": b"[]", "new": b'["keen"]'}
    converted = relays[SEGMENT_CHANGES]._convert("5-0", fields)
    # "rule:": a segment of these rules ("segment:keen" if the packaged rules had been loaded instead).
    assert [(row[1], row[2], row[4]) for row in converted.rows] == [("keen", "entered", "rule:keen")]
    assert settings.rules.version == rules.version != RuleSet.load(DEFAULT_RULES_PATH).version
    relays[SEGMENT_CHANGES]._warehouse.retried(ConnectionError("restart"))
    assert counts == [("warehouse_retries", 1)]


def _closed_port_client():
    import socket

    import redis

    with socket.socket() as probe:  # a port nothing listens on: every call is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def test_a_relay_that_cannot_reach_redis_says_redis_is_away_and_counts_each_failed_attempt(caplog):
    import logging

    import pytest
    import redis

    from onboardflow.transforms.outbox.keys import PROFILE_SNAPSHOTS
    from onboardflow.transforms.outbox.relay import OutboxRelay

    errors = []
    relay = OutboxRelay(_closed_port_client(), OutboxKeys("obf"), PROFILE_SNAPSHOTS, lambda *_: None,
                        redis_retry_s=0.25, on_redis_error=errors.append)
    with caplog.at_level(logging.WARNING, logger="onboardflow.transforms.outbox"), \
            pytest.raises(redis.exceptions.ConnectionError):
        relay.relay()
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and all("outbox profile-snapshots failed" in m and "Redis unavailable (ConnectionError)" in m
                           for m in retries)
    assert errors == ["outbox_relay"] * (len(retries) + 1)  # the attempt that gave up counts too


def test_the_dead_letter_outbox_counts_each_attempt_redis_refused():
    import pytest
    import redis

    from onboardflow.transforms.outbox.dead_letters import DeadLetterOutbox

    errors = []
    outbox = DeadLetterOutbox(_closed_port_client(), OutboxKeys("obf"), retry_s=0.25, on_redis_error=errors.append)
    with pytest.raises(redis.exceptions.ConnectionError):
        outbox.write([("t/0/1", None, b"raw")])
    assert len(errors) >= 2 and set(errors) == {"dead_letter_outbox"}


def test_an_outage_is_worded_by_the_service_that_is_away_never_by_the_errors_text():
    import redis
    from kafka.errors import KafkaTimeoutError

    from onboardflow.transforms.outbox.retry import KafkaRelayError, LostLease, outage

    assert outage(redis.exceptions.ConnectionError("user alice@example.com")) == "Redis unavailable (ConnectionError)"
    assert outage(KafkaTimeoutError()) == "Kafka unavailable (KafkaTimeoutError)"
    assert outage(KafkaRelayError("3 records not acknowledged")) == "Kafka unavailable (KafkaRelayError)"
    assert outage(LostLease("x")) == "relay lease lost to another relay"
    assert outage(ValueError("a row")) == "ValueError"
