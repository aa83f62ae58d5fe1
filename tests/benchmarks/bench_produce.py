"""Benchmark: how fast `onboardflow produce` gets events into the real local Kafka.

Prints three figures, each the median of ``--runs`` runs of ~``--events``
messages into a fresh 4-partition topic (deleted afterwards):

* generate:   JourneyGenerator alone (journeys + Avro serialization), msg/s
* produce:    produce() of pre-generated messages (acks=all, flush included), msg/s
* end-to-end: generation and production together, as `onboardflow produce` runs, msg/s

    .venv/bin/python tests/benchmarks/bench_produce.py [--events 50000] [--runs 3]

Not collected by pytest (bench_*.py); needs the broker of `make services-up`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

from kafka.admin import KafkaAdminClient, NewTopic

from onboardflow.runners.cli.produce import produce, producer_settings
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator

BOOTSTRAP = f"{os.environ.get('KAFKA_HOST', '127.0.0.1')}:{os.environ.get('KAFKA_PORT', '9092')}"


def fresh_topic(admin: KafkaAdminClient) -> str:
    name = f"bench-produce-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bootstrap-servers", default=BOOTSTRAP)
    args = parser.parse_args()

    # ~300 events per user over the 45-day horizon: enough users to reach the cap.
    config = GeneratorConfig(seed=1, users=max(50, args.events // 150), malformed_fraction=0.01)
    settings = producer_settings()
    print(f"{args.events:,} messages x {args.runs} runs, broker {args.bootstrap_servers}, "
          f"compression={settings['compression_type']}, linger_ms={settings['linger_ms']}, "
          f"batch_size={settings['batch_size']}")

    generate, pure, end_to_end = [], [], []
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap_servers, client_id="onboardflow-bench")
    topics = []
    try:
        for run in range(args.runs):
            start = time.perf_counter()
            messages = list(JourneyGenerator(config).messages(max_messages=args.events))
            generate.append(len(messages) / (time.perf_counter() - start))

            topics.append(fresh_topic(admin))
            stats = produce(messages, args.bootstrap_servers, topics[-1], progress=False)
            assert stats.ok and stats.total_sent == len(messages), stats.summary()
            pure.append(stats.rate)

            topics.append(fresh_topic(admin))
            stats = produce(JourneyGenerator(config).messages(max_messages=args.events),
                            args.bootstrap_servers, topics[-1], progress=False)
            assert stats.ok, stats.summary()
            end_to_end.append(stats.rate)
            print(f"run {run + 1}: generate {generate[-1]:,.0f}/s  produce {pure[-1]:,.0f}/s  "
                  f"end-to-end {end_to_end[-1]:,.0f}/s")
    finally:
        if topics:
            admin.delete_topics(topics)
        admin.close()

    print(f"median generate:   {statistics.median(generate):,.0f} msg/s")
    print(f"median produce:    {statistics.median(pure):,.0f} msg/s")
    print(f"median end-to-end: {statistics.median(end_to_end):,.0f} msg/s")


if __name__ == "__main__":
    main()
