"""Read+decode rate of ReadFromKafka in bounded mode, on Prism (events/s).

Produces ~50k synthetic onboarding events (framed Avro from runners/sim/generator.py,
1% malformed) to a fresh 4-partition topic on the local broker, then reads the
topic back with ``ReadFromKafka(bounded=True, decoder=OnboardingEventDecoder())``
on Prism three times per variant and prints the median rate. The rate is
records / wall time of the whole pipeline run (job submission, partition
discovery, reading, decoding, a global count), i.e. what a replay job sees.

Variants: a single consumer per DoFn instance re-assigned between partitions
(the bounded default) or one consumer per partition (the streaming default),
each with the decoder and without it (the cost of the Kafka read alone).

    .venv/bin/python tests/benchmarks/bench_kafka_source.py [--records 50000] [--runs 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
import uuid

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from onboardflow.pipelines.beam.kafka_source import ReadFromKafka
from onboardflow.runners.local import local_pipeline_options
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
from onboardflow.transforms.decode import OnboardingEventDecoder

PARTITIONS = 4


def produce(bootstrap: str, topic: str, records: int) -> int:
    messages = JourneyGenerator(GeneratorConfig(seed=5, users=2000, malformed_fraction=0.01)).messages(
        max_messages=records)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10, batch_size=256 * 1024)
    sent = 0
    for message in messages:
        producer.send(topic, key=message.key, value=message.value)
        sent += 1
    producer.flush()
    producer.close()
    return sent


def read_once(bootstrap: str, topic: str, decode: bool, consumer_per_partition: bool) -> tuple[float, int]:
    """Seconds for one bounded run, and how many records the source reported reading."""
    pipeline = beam.Pipeline(options=local_pipeline_options(streaming=False))
    read = pipeline | ReadFromKafka(
        bootstrap, topic, start_position="earliest", bounded=True,
        decoder=OnboardingEventDecoder() if decode else None,
        consumer_per_partition=consumer_per_partition)
    records = (read.events, read.dead_letters) | beam.Flatten() if decode else read
    records | beam.combiners.Count.Globally()
    start = time.perf_counter()
    result = pipeline.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - start
    counters = result.metrics().query(MetricsFilter().with_name("records_read"))["counters"]
    return seconds, sum(c.committed for c in counters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    topic = f"bench-kafka-source-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap, client_id="bench-kafka-source")
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])
    try:
        t0 = time.perf_counter()
        sent = produce(args.bootstrap, topic, args.records)
        print(f"produced {sent} records to {PARTITIONS} partitions in {time.perf_counter() - t0:.1f} s")
        read_once(args.bootstrap, topic, decode=False, consumer_per_partition=True)  # warm Prism up
        variants = [
            ("read+decode, one consumer per DoFn (default)", True, False),
            ("read+decode, consumer per partition", True, True),
            ("read only, one consumer per DoFn (default)", False, False),
            ("read only, consumer per partition", False, True),
        ]
        for label, decode, per_partition in variants:
            rates = []
            for _ in range(args.runs):
                seconds, n = read_once(args.bootstrap, topic, decode, per_partition)
                if n != sent:
                    raise SystemExit(f"{label}: read {n} records, expected {sent}")
                rates.append(n / seconds)
            print(f"{label:46s} median {statistics.median(rates):9,.0f} records/s "
                  f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})")
    finally:
        admin.delete_topics([topic])
        admin.close()


if __name__ == "__main__":
    main()
