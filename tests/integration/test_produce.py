"""`onboardflow produce` against the real local Kafka broker.

What lands on the topic is exactly what the generator made: every message,
keyed by user so each user's events share a partition in order, and the
malformed ones fail to decode for the reason their kind says. Delivery
failures are counted and turn into a non-zero exit.
"""
import uuid
from collections import Counter, defaultdict

import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic

from onboardflow.runners.cli.produce import main, produce
from onboardflow.runners.sim.generator import MALFORMATION_REASONS, GeneratedMessage, GeneratorConfig, JourneyGenerator
from onboardflow.schemas import default_registry, load_schema
from onboardflow.schemas.wire import AvroDeserializer, InvalidEvent

pytestmark = pytest.mark.integration

UNDECODABLE = ("garbage", "truncated", "unknown_schema_id")


def read_back(bootstrap, topic, expected, idle_ms=3000):
    """All records of ``topic``, reading until ``expected`` arrived and then ``idle_ms`` of silence."""
    consumer = KafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
        group_id=f"test-read-{uuid.uuid4().hex[:8]}", consumer_timeout_ms=idle_ms,
    )
    records = []
    try:
        for _ in range(40):  # up to ~2 minutes while the records trickle in
            records.extend(consumer)
            if len(records) >= expected:
                records.extend(consumer)  # one more idle spell: nothing beyond `expected`
                break
    finally:
        consumer.close()
    return records


def test_produce_delivers_every_message_keyed_by_user_with_the_malformed_ones_undecodable(
        kafka_bootstrap, kafka_topic):
    topic = kafka_topic(partitions=4)
    config = GeneratorConfig(seed=21, users=25, malformed_fraction=0.03, malformation_kinds=UNDECODABLE)
    messages = list(JourneyGenerator(config).messages(max_messages=4000))
    malformed = sum(m.kind in UNDECODABLE for m in messages)
    assert len(messages) == 4000 and abs(malformed - 120) <= 1

    stats = produce(messages, kafka_bootstrap, topic, progress=False)

    assert stats.ok and stats.total_sent == 4000
    assert stats.sent == Counter(m.kind for m in messages)
    records = read_back(kafka_bootstrap, topic, 4000)
    assert len(records) == 4000
    assert Counter((r.key, r.value) for r in records) == Counter((m.key, m.value) for m in messages)

    # one user (or anonymous visitor) -> one partition, events in the order sent
    partitions = defaultdict(set)
    for record in records:
        if record.key is not None:
            partitions[record.key].add(record.partition)
    assert all(len(p) == 1 for p in partitions.values())
    assert len({p for ps in partitions.values() for p in ps}) > 1
    sent_order = defaultdict(list)
    for message in messages:
        if message.key is not None:
            sent_order[message.key].append(message.value)
    read_order = defaultdict(list)
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        if record.key is not None:
            read_order[record.key].append(record.value)
    assert read_order == sent_order

    decoder = AvroDeserializer(default_registry(), load_schema("onboarding_event"))
    failures = Counter()
    for record in records:
        try:
            event = decoder.deserialize(record.value)
        except InvalidEvent as err:
            failures[err.reason] += 1
        else:
            assert record.key == (event["user_id"] or event["anonymous_id"]).encode("utf-8")
    assert sum(failures.values()) == malformed
    assert set(failures) == {MALFORMATION_REASONS[k] for k in UNDECODABLE}


def test_produce_command_sends_the_capped_stream_and_writes_ground_truth(kafka_bootstrap, kafka_topic,
                                                                          tmp_path, capsys):
    topic = kafka_topic(partitions=2)
    truth = tmp_path / "truth.csv"
    code = main(["--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--users", "15",
                 "--events", "1500", "--seed", "5", "--malformed-fraction", "0.02",
                 "--rate", "0", "--no-progress", "--ground-truth", str(truth)])
    assert code == 0
    out = capsys.readouterr().out
    assert f"produced 1,500 messages to {topic}" in out
    assert len(truth.read_text().splitlines()) == 16  # header + one row per user

    records = read_back(kafka_bootstrap, topic, 1500)
    expected = list(JourneyGenerator(GeneratorConfig(seed=5, users=15, malformed_fraction=0.02))
                    .messages(max_messages=1500))
    assert sorted(r.value for r in records) == sorted(m.value for m in expected)


def test_rejected_deliveries_are_counted_and_fail_the_run(kafka_bootstrap, unique_name):
    # A topic whose broker-side limit refuses the large record batches.
    topic = f"{unique_name}.small"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="onboardflow-tests")
    admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "2048"})])
    try:
        messages = [GeneratedMessage(b"k", b"x" * 100, "valid") for _ in range(5)]
        messages.append(GeneratedMessage(b"k", b"y" * 50_000, "garbage"))
        stats = produce(messages, kafka_bootstrap, topic, progress=False,
                        producer_config={"linger_ms": 0, "compression_type": None})
    finally:
        admin.delete_topics([topic])
        admin.close()
    assert not stats.ok
    assert stats.failed["garbage"] == 1
    assert sum(stats.attempted.values()) == 6
    assert stats.total_sent + stats.total_failed == 6
    assert "FAILED" in stats.summary()
