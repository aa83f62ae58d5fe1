"""ReadFromKafka / WriteToKafka against the real local broker, on Prism.

Every test gets fresh 4-partition topics (the ``kafka_topic`` fixture) and its
own consumer group, produces with kafka-python, runs a Beam pipeline on Prism
(LOOPBACK workers, see runners/local.py) and checks what came out of it and
what the group committed. Streaming pipelines write what they read back to
Kafka, the test waits until the expected records (and commits) are there and
then cancels the job.
"""
import json
import time
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineState
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from onboardflow.pipelines.beam.kafka_sink import WriteToKafka
from onboardflow.pipelines.beam.kafka_source import ReadFromKafka
from onboardflow.runners.local import local_pipeline_options
from onboardflow.transforms.kafka.records import KafkaRecord

pytestmark = pytest.mark.integration

PARTITIONS = 4
BASE_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z


class BadEvent(ValueError):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class JsonEventDecoder:
    """The decoder interface of transforms/decode.py, for JSON test events."""

    def decode(self, record: KafkaRecord) -> dict:
        try:
            event = json.loads(record.value)
        except (TypeError, ValueError):
            raise BadEvent("not_json") from None
        if not isinstance(event, dict) or "occurred_at" not in event:
            raise BadEvent("missing_occurred_at")
        return event

    def dead_letter(self, record: KafkaRecord, error: Exception, stage: str = "decode") -> dict:
        return {
            "stage": stage,
            "reason": getattr(error, "reason", type(error).__name__),
            "source_partition": record.partition,
            "source_offset": record.offset,
            "kafka_timestamp": record.timestamp_ms,
        }


def produce(bootstrap, topic, records):
    """Send (partition, key, value, timestamp_ms) tuples; returns them with their offsets."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        futures = [
            (producer.send(topic, key=key, value=value, partition=partition, timestamp_ms=ts), key, value, ts)
            for partition, key, value, ts in records
        ]
        producer.flush()
        sent = []
        for future, key, value, ts in futures:
            meta = future.get(timeout=30)
            sent.append(KafkaRecord(topic, meta.partition, meta.offset, ts, key, value))
        return sent
    finally:
        producer.close()


def json_events(n, first_id=0, base_ms=BASE_MS):
    """n JSON events spread round-robin over the partitions, 1 s apart in event time."""
    return [
        (i % PARTITIONS, f"user-{i % 7}".encode(), json.dumps({"id": i, "occurred_at": base_ms + i * 1000}).encode(),
         base_ms + i * 1000 + 250)
        for i in range(first_id, first_id + n)
    ]


def group_offsets(bootstrap, topic, group):
    """(committed offsets, end offsets) of every partition, as {partition: offset}."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        committed = {tp.partition: consumer.committed(tp) for tp in tps}
        end = {tp.partition: offset for tp, offset in consumer.end_offsets(tps).items()}
        return committed, end
    finally:
        consumer.close()


def read_topic(bootstrap, topic, expected, timeout_s=60):
    """Records of ``topic`` from the start, until ``expected`` arrived (or timeout)."""
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=500)
    records = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer)
        return records
    finally:
        consumer.close()


def run_until(pipeline, condition, timeout_s=120):
    """Run a streaming pipeline until ``condition()`` holds, then cancel it cleanly."""
    result = pipeline.run()
    try:
        deadline = time.monotonic() + timeout_s
        while not condition():
            state = result.state
            assert state not in (PipelineState.FAILED, PipelineState.DONE, PipelineState.CANCELLED), state
            assert time.monotonic() < deadline, "streaming pipeline did not get there in time"
            time.sleep(0.5)
    finally:
        result.cancel()
    assert result.state == PipelineState.CANCELLED
    return result


def keyed(record):
    return (record.partition, record.offset, record.key, record.value)


def collect(pcoll, path):
    """Append a PCollection's elements to ``path`` as JSON lines, to check after the run.

    Checked after the run rather than with ``assert_that``, so a failure names
    the missing and doubled offsets instead of ending in a worker traceback.
    """
    def append(element, path=str(path)):
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(element) + "\n")

    return pcoll | "Collect" >> beam.Map(append)


def collected(path):
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def differences(got, expected):
    """What a read lost, doubled or invented, as (partition, offset) lists."""
    got_count, want = Counter(got), Counter(expected)
    return {
        "missing": sorted(k[:2] for k in (want - got_count).elements()),
        "doubled_or_unexpected": sorted(k[:2] for k in (got_count - want).elements()),
    }


@pytest.mark.parametrize("consumer_per_partition", [True, False], ids=["consumer-per-partition", "shared-consumer"])
def test_bounded_read_returns_exactly_the_produced_records_and_commits_the_end_offsets(
        kafka_bootstrap, kafka_topic, unique_name, consumer_per_partition, tmp_path):
    topic = kafka_topic(partitions=PARTITIONS)
    group = f"{unique_name}-group"
    sent = produce(kafka_bootstrap, topic, json_events(203))
    out = tmp_path / "read.jsonl"

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        records = pipeline | ReadFromKafka(kafka_bootstrap, topic, consumer_group=group, bounded=True,
                                           consumer_per_partition=consumer_per_partition,
                                           poll_batch_size=37)
        collect(records | beam.Map(lambda r, ts=beam.DoFn.TimestampParam: (
            r.partition, r.offset, r.key.hex(), r.value.hex(), ts.micros // 1000)), out)

    read = collected(out)
    diff = differences([tuple(r[:4]) for r in read],
                       [(r.partition, r.offset, r.key.hex(), r.value.hex()) for r in sent])
    assert diff == {"missing": [], "doubled_or_unexpected": []}, diff
    broker_time = {(r.partition, r.offset): r.timestamp_ms for r in sent}
    off_broker_time = [(p, o, ts) for p, o, _, _, ts in read if ts != broker_time[(p, o)]]
    assert off_broker_time == [], "element timestamps differ from the records' broker timestamps"

    committed, end = group_offsets(kafka_bootstrap, topic, group)
    assert committed == end
    assert sum(end.values()) == 203


def test_committed_start_resumes_where_the_previous_run_stopped(kafka_bootstrap, kafka_topic, unique_name):
    topic = kafka_topic(partitions=PARTITIONS)
    group = f"{unique_name}-group"
    first = produce(kafka_bootstrap, topic, json_events(40))

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        records = pipeline | ReadFromKafka(kafka_bootstrap, topic, consumer_group=group, bounded=True)
        assert_that(records | beam.Map(keyed), equal_to([keyed(r) for r in first]))

    second = produce(kafka_bootstrap, topic, json_events(25, first_id=40))
    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        records = pipeline | ReadFromKafka(kafka_bootstrap, topic, consumer_group=group,
                                           start_position="committed", bounded=True)
        assert_that(records | beam.Map(keyed), equal_to([keyed(r) for r in second]))

    committed, end = group_offsets(kafka_bootstrap, topic, group)
    assert committed == end and sum(end.values()) == 65


def test_timestamp_start_reads_only_records_at_or_after_that_time(kafka_bootstrap, kafka_topic, unique_name):
    topic = kafka_topic(partitions=PARTITIONS)
    sent = produce(kafka_bootstrap, topic, json_events(60))
    cutoff = BASE_MS + 30 * 1000 + 250  # the broker timestamp of event 30
    expected = [keyed(r) for r in sent if r.timestamp_ms >= cutoff]
    assert len(expected) == 30

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        records = pipeline | ReadFromKafka(kafka_bootstrap, topic, consumer_group=f"{unique_name}-group",
                                           start_position=f"timestamp:{cutoff}", bounded=True)
        assert_that(records | beam.Map(keyed), equal_to(expected))


def test_earliest_start_without_a_group_reads_everything_and_commits_nothing(
        kafka_bootstrap, kafka_topic, unique_name):
    topic = kafka_topic(partitions=PARTITIONS)
    sent = produce(kafka_bootstrap, topic, json_events(30))

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        records = pipeline | ReadFromKafka(kafka_bootstrap, topic, start_position="earliest", bounded=True)
        assert_that(records | beam.Map(keyed), equal_to([keyed(r) for r in sent]))


def test_decoded_events_carry_their_event_time_and_bad_records_come_out_as_dead_letters(
        kafka_bootstrap, kafka_topic, unique_name):
    topic = kafka_topic(partitions=PARTITIONS)
    good = produce(kafka_bootstrap, topic, json_events(48))
    bad = produce(kafka_bootstrap, topic, [
        (0, b"k", b"{not json", BASE_MS + 111),
        (1, None, json.dumps({"id": "no-time"}).encode(), BASE_MS + 222),
        (2, b"k", None, BASE_MS + 333),  # a tombstone
        (3, b"k", json.dumps({"id": "x", "occurred_at": "yesterday"}).encode(), BASE_MS + 444),
    ])

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        result = pipeline | ReadFromKafka(kafka_bootstrap, topic, consumer_group=f"{unique_name}-group",
                                          bounded=True, decoder=JsonEventDecoder())
        events = result.events | "EventTime" >> beam.Map(
            lambda e, ts=beam.DoFn.TimestampParam: (e["id"], e["occurred_at"], ts.micros // 1000))
        assert_that(events, equal_to([(i, BASE_MS + i * 1000, BASE_MS + i * 1000) for i in range(48)]))
        dead = result.dead_letters | "DeadLetterTime" >> beam.Map(
            lambda d, ts=beam.DoFn.TimestampParam: (d["reason"], d["source_partition"], d["source_offset"],
                                                    d["stage"], ts.micros // 1000))
        assert_that(dead, equal_to([
            ("not_json", 0, bad[0].offset, "decode", BASE_MS + 111),
            ("missing_occurred_at", 1, bad[1].offset, "decode", BASE_MS + 222),
            ("not_json", 2, bad[2].offset, "decode", BASE_MS + 333),
            ("occurred_at_missing_or_not_int", 3, bad[3].offset, "decode", BASE_MS + 444),
        ]), label="DeadLetters")
    run = pipeline.result
    counters = {c.key.metric.name: c.committed for c in run.metrics().query(
        MetricsFilter().with_namespace("onboardflow.kafka_source"))["counters"]}
    assert counters["records_read"] == len(good) + len(bad)
    assert counters["events_decoded"] == 48
    assert counters["dead_letters"] == 4


def test_onboarding_event_decoder_runs_inside_the_source_with_event_time_and_dead_letter_reasons(
        kafka_bootstrap, kafka_topic, unique_name):
    from onboardflow.runners.sim.generator import MALFORMATION_REASONS, GeneratorConfig, JourneyGenerator
    from onboardflow.transforms.decode import OnboardingEventDecoder

    topic = kafka_topic(partitions=PARTITIONS)
    messages = list(JourneyGenerator(GeneratorConfig(seed=11, users=15, malformed_fraction=0.05))
                    .messages(max_messages=600))
    produce(kafka_bootstrap, topic, [(None, m.key, m.value, None) for m in messages])
    malformed = Counter(MALFORMATION_REASONS[m.kind] for m in messages if m.kind in MALFORMATION_REASONS)
    decodable = len(messages) - sum(malformed.values())
    assert decodable > 0 and len(malformed) == len(MALFORMATION_REASONS)

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        result = pipeline | ReadFromKafka(kafka_bootstrap, topic, consumer_group=f"{unique_name}-group",
                                          bounded=True, decoder=OnboardingEventDecoder())
        on_event_time = result.events | beam.Map(
            lambda e, ts=beam.DoFn.TimestampParam: ts.micros // 1000 == e["occurred_at"])
        assert_that(on_event_time | beam.combiners.Count.PerElement(), equal_to([(True, decodable)]))
        reasons = result.dead_letters | beam.Map(lambda d: (d["reason"], d["stage"]))
        assert_that(reasons | "CountReasons" >> beam.combiners.Count.PerElement(),
                    equal_to([((reason, "decode"), n) for reason, n in malformed.items()]), label="Reasons")


def test_streaming_read_delivers_records_as_they_arrive_and_commits_what_it_read(
        kafka_bootstrap, kafka_topic, unique_name):
    topic = kafka_topic(partitions=PARTITIONS)
    out = kafka_topic(partitions=1, suffix="out")
    group = f"{unique_name}-group"
    before = produce(kafka_bootstrap, topic, json_events(40))

    pipeline = beam.Pipeline(options=local_pipeline_options(streaming=True))
    (pipeline
     | ReadFromKafka(kafka_bootstrap, topic, consumer_group=group, start_position="committed")
     | beam.Map(lambda r: (r.key, r.value))
     | WriteToKafka(kafka_bootstrap, out))

    produced_more = []

    def delivered_and_committed():
        if not produced_more:
            if len(read_topic(kafka_bootstrap, out, expected=40, timeout_s=1)) < 40:
                return False
            # The job is up and has read the backlog: produce while it runs.
            produced_more.extend(produce(kafka_bootstrap, topic, json_events(40, first_id=40)))
            return False
        if len(read_topic(kafka_bootstrap, out, expected=80, timeout_s=1)) < 80:
            return False
        committed, end = group_offsets(kafka_bootstrap, topic, group)
        return committed == end and sum(end.values()) == 80

    run_until(pipeline, delivered_and_committed)

    written = read_topic(kafka_bootstrap, out, expected=80)
    sent = before + produced_more
    assert sorted((r.key, r.value) for r in written) == sorted((r.key, r.value) for r in sent)


def test_idle_partitions_let_event_time_windows_close_while_streaming(kafka_bootstrap, kafka_topic, unique_name):
    topic = kafka_topic(partitions=PARTITIONS)
    out = kafka_topic(partitions=1, suffix="out")
    now_ms = int(time.time() * 1000)
    window_start = (now_ms - 600_000) // 60_000 * 60_000  # a minute ~10 minutes ago
    # Only partition 0 gets events, all inside one minute: its max event time
    # stays inside the window, so only idleness can close it.
    produce(kafka_bootstrap, topic, [
        (0, b"u", json.dumps({"id": i, "occurred_at": window_start + i * 1000}).encode(), now_ms)
        for i in range(12)
    ])

    pipeline = beam.Pipeline(options=local_pipeline_options(streaming=True))
    read = pipeline | ReadFromKafka(kafka_bootstrap, topic, consumer_group=f"{unique_name}-group",
                                    decoder=JsonEventDecoder(), max_out_of_orderness=0, idle_timeout=1)
    (read.events
     | beam.WindowInto(window.FixedWindows(60))
     | beam.Map(lambda e: ("events", 1))
     | beam.CombinePerKey(sum)
     | beam.Map(lambda kv, w=beam.DoFn.WindowParam: (None, json.dumps([w.start.micros // 1000, kv[1]]).encode()))
     | WriteToKafka(kafka_bootstrap, out))

    fired = []
    run_until(pipeline, lambda: fired.extend(read_topic(kafka_bootstrap, out, expected=1, timeout_s=1)) or fired)

    assert [json.loads(r.value) for r in fired] == [[window_start, 12]]


def test_write_to_kafka_round_trip_acks_every_record_and_dead_letters_malformed_elements(
        kafka_bootstrap, kafka_topic):
    topic = kafka_topic(partitions=PARTITIONS)
    pairs = [(f"user-{i % 5}".encode(), f"value-{i}".encode()) for i in range(500)] + [(None, b"no key")]

    with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
        dead = (pipeline
                | beam.Create(pairs + [("str-key", b"v"), (b"k", "str value")])
                | WriteToKafka(kafka_bootstrap, topic, linger_ms=5, batch_size=16 * 1024))
        assert_that(dead | beam.Map(lambda d: (d["reason"], d["payload"])), equal_to([
            ("not_a_bytes_key_value_pair", ("str-key", b"v")),
            ("not_a_bytes_key_value_pair", (b"k", "str value")),
        ]))
    counters = {c.key.metric.name: c.committed for c in pipeline.result.metrics().query(
        MetricsFilter().with_namespace("onboardflow.kafka_sink"))["counters"]}
    assert counters == {"records_sent": 501, "invalid_elements": 2}

    written = read_topic(kafka_bootstrap, topic, expected=501)
    assert sorted((r.key or b"", r.value) for r in written) == sorted((k or b"", v) for k, v in pairs)
    # Same key, same partition: the producer's default partitioner keeps a user's order.
    partitions_by_key = {}
    for r in written:
        partitions_by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(p) == 1 for k, p in partitions_by_key.items() if k is not None)


def test_a_record_kafka_rejects_fails_the_bundle_instead_of_being_lost(kafka_bootstrap, kafka_topic):
    topic = kafka_topic(partitions=1)
    too_large = b"x" * (3 * 1024 * 1024)  # over the broker's message.max.bytes (1 MiB)
    with pytest.raises(Exception, match="not acknowledged"):
        with beam.Pipeline(options=local_pipeline_options(streaming=False)) as pipeline:
            (pipeline
             | beam.Create([(b"k", b"small"), (b"k", too_large)])
             # The client-side size check is lifted so the broker is the one to refuse.
             | WriteToKafka(kafka_bootstrap, topic, producer_config={"max_request_size": 8 * 1024 * 1024}))
