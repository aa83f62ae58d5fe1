"""Interop with the Confluent ecosystem on the real broker.

A producer built from confluent-kafka's own ``AvroSerializer`` and
``SchemaRegistryClient``, pointed at ``onboardflow registry serve`` (run in
process), writes events to a fresh topic; kafka-python reads the raw records
back and ``OnboardingEventDecoder`` decodes them. And the other way round:
what our serializer frames, Confluent's deserializer reads.
"""
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer as ConfluentAvroDeserializer
from confluent_kafka.schema_registry.avro import AvroSerializer as ConfluentAvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from kafka import KafkaConsumer, TopicPartition

from onboardflow.runners.cli.registry import RegistryServer
from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema, schema_path
from onboardflow.schemas.wire import AvroSerializer, unframe
from onboardflow.transforms.decode import OnboardingEventDecoder
from onboardflow.transforms.kafka.records import KafkaRecord

pytestmark = pytest.mark.integration

T0 = 1_717_000_000_000
V2_EVENT = {
    "event_id": "5e3f0c1a-8f0b-4f57-a6a4-2a9c1f0d7e11",
    "event_type": "invite_sent",
    "user_id": "acct-2001",
    "anonymous_id": None,
    "session_id": "sess-12",
    "occurred_at": T0,
    "received_at": T0 + 40,
    "properties": {"channel": "email"},
    "context": {"device": "MacBookPro18,1", "os": "macOS 14.4", "app_version": "3.2.0", "locale": "fr-FR",
                "ip": "192.0.2.44", "user_agent": "Mozilla/5.0 (Macintosh)", "email": "marie@example.fr"},
    "consent": {"analytics": True, "personalization": True, "marketing": False},
    "referrer": "https://blog.example/post",
}
V1_EVENT = {
    **{k: v for k, v in V2_EVENT.items() if k != "referrer"},
    "event_id": "5e3f0c1a-8f0b-4f57-a6a4-2a9c1f0d7e12",
    "event_type": "signup",
}


@pytest.fixture
def registry_server():
    with RegistryServer(default_registry(), port=0) as server:
        yield server


def _produce_with_confluent(bootstrap, topic, registry_url, schema_file, events):
    client = SchemaRegistryClient({"url": registry_url})
    # The fresh topic stands in for onboarding.events, so it writes that topic's subject.
    serializer = ConfluentAvroSerializer(
        client,
        schema_path(*schema_file).read_text(),
        conf={"subject.name.strategy": lambda ctx, record_name: EVENTS_SUBJECT},
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    context = SerializationContext(topic, MessageField.VALUE)
    values = []
    for event in events:
        value = serializer(event, context)
        values.append(value)
        producer.produce(topic, key=event["event_id"].encode(), value=value, partition=0)
    assert producer.flush(30) == 0
    return values


def _read_raw(bootstrap, topic, count):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=20_000)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    records = []
    try:
        for message in consumer:
            records.append(
                KafkaRecord(message.topic, message.partition, message.offset, message.timestamp,
                            message.key, message.value)
            )
            if len(records) == count:
                break
    finally:
        consumer.close()
    return records


def test_confluent_produced_events_decode_with_our_decoder(kafka_bootstrap, kafka_topic, registry_server):
    topic = kafka_topic(partitions=1)
    sent_v2 = _produce_with_confluent(kafka_bootstrap, topic, registry_server.url,
                                      ("onboarding_event", 2), [V2_EVENT])
    sent_v1 = _produce_with_confluent(kafka_bootstrap, topic, registry_server.url,
                                      ("onboarding_event", 1), [V1_EVENT])
    # Confluent's serializer registered the shipped schemas and got our ids.
    assert [unframe(v)[0] for v in sent_v2 + sent_v1] == [2, 1]

    records = _read_raw(kafka_bootstrap, topic, 2)
    assert [r.value for r in records] == sent_v2 + sent_v1

    decoder = OnboardingEventDecoder(registry_url=registry_server.url)
    assert decoder.decode(records[0]) == V2_EVENT
    assert decoder.decode(records[1]) == {**V1_EVENT, "referrer": None}
    assert OnboardingEventDecoder().decode(records[0]) == V2_EVENT


def test_our_framed_records_decode_with_confluents_deserializer(registry_server):
    raw = AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", 2)).serialize(V2_EVENT)
    client = SchemaRegistryClient({"url": registry_server.url})
    deserializer = ConfluentAvroDeserializer(client)
    decoded = deserializer(raw, SerializationContext("onboarding.events", MessageField.VALUE))
    # Confluent's deserializer turns timestamp-millis into datetimes; ours keeps millis.
    assert int(decoded.pop("occurred_at").timestamp() * 1000) == V2_EVENT["occurred_at"]
    assert int(decoded.pop("received_at").timestamp() * 1000) == V2_EVENT["received_at"]
    assert decoded == {k: v for k, v in V2_EVENT.items() if k not in ("occurred_at", "received_at")}
