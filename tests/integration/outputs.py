"""Reading what a pipeline run left behind, shared by the integration tests.

``read_topic``: every record of a topic, from its log start to the end
offsets of now. ``redis_dump``: every Redis key under a prefix with its raw
content. ``counters``: a Beam result's onboardflow counters.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

import redis
from apache_beam.metrics.metric import MetricsFilter
from kafka import KafkaConsumer, TopicPartition


def read_topic(bootstrap: str, topic: str, timeout_s: float = 60) -> list:
    """Every record of ``topic`` (``ConsumerRecord``s), from the log start to the end offsets of now."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        records = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def counters(result) -> Counter:
    """The pipeline's own counters, (namespace, name) -> committed value summed over steps."""
    out: Counter = Counter()
    for c in result.metrics().query(MetricsFilter())["counters"]:
        if c.key.metric.namespace.startswith("onboardflow"):
            out[(c.key.metric.namespace, c.key.metric.name)] += c.committed
    return out


def redis_dump(redis_url: str, prefix: str) -> dict[bytes, Any]:
    """Every key under ``prefix`` with its raw content (hash fields, set members, stream entries, ...)."""
    client = redis.Redis.from_url(redis_url)
    try:
        dump: dict[bytes, Any] = {}
        read = {b"hash": client.hgetall, b"set": client.smembers, b"string": client.get,
                b"list": lambda k: client.lrange(k, 0, -1), b"stream": client.xrange,
                b"zset": lambda k: client.zrange(k, 0, -1, withscores=True)}
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            kind = client.type(key)
            if kind == b"none":
                continue  # deleted since SCAN saw it (a running pipeline emptied a segment set)
            # A type not known here is still visible in the dump, by its name.
            dump[key] = read[kind](key) if kind in read else kind
        return dump
    finally:
        client.close()
