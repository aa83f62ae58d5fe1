"""The Kafka side of a relay: explicit partitions, ordered idempotent sends, recovery of what landed.

``KafkaOutboxTarget.send(records, stream_key)`` sends and flushes, returning
the records Kafka did not acknowledge. ``newest_ids(stream_key)`` reads, per
partition, the newest ``outbox-id`` that stream wrote there (scanning back
from the end): what a relay after a crash must not send again.
"""
from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Sequence
from typing import Optional

from ..connections import kafka_config
from .keys import OUTBOX_HEADER, OUTBOX_ID_HEADER, OutboxRecord, parse_record_id
from .retry import KafkaRelayError, RelayCancelled

#: Seconds between two metadata requests while a topic has no partitions yet (a topic being created).
PARTITIONS_POLL_S = 0.2


class KafkaOutboxTarget:
    """One Kafka topic an outbox is relayed to (producer created on first use)."""

    def __init__(self, bootstrap_servers: str, topic: str, delivery_timeout_ms: int = 300_000):
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self._delivery_timeout_ms = delivery_timeout_ms
        self._producer = None
        self._partitions: Optional[list[int]] = None
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop waiting for the topic's partitions (any thread): ``partitions()`` raises ``RelayCancelled``."""
        self._cancelled.set()

    @property
    def producer(self):
        if self._producer is None:
            from kafka import KafkaProducer
            self._producer = KafkaProducer(**kafka_config(
                self.bootstrap_servers, client_id="onboardflow-outbox-relay",
                acks="all", enable_idempotence=True, max_in_flight_requests_per_connection=1,
                retries=2**31 - 1, retry_backoff_ms=200, delivery_timeout_ms=self._delivery_timeout_ms,
                linger_ms=5, request_timeout_ms=30_000,
            ))
        return self._producer

    def partitions(self) -> list[int]:
        if self._partitions is None:
            deadline = time.monotonic() + 60
            found = self.producer.partitions_for(self.topic)
            while not found:
                # A missing topic answers at once: poll, do not spin (a deleted topic once kept
                # two relay threads at half a core each for the whole retry budget).
                if self._cancelled.wait(PARTITIONS_POLL_S):
                    raise RelayCancelled(f"topic {self.topic!r}: cancelled while waiting for its partitions")
                if time.monotonic() > deadline:
                    raise KafkaRelayError(f"topic {self.topic!r} has no partitions")
                found = self.producer.partitions_for(self.topic)
            self._partitions = sorted(found)
        return self._partitions

    def partition_for(self, record: OutboxRecord) -> int:
        """The Java client's default partition for the key; a keyless record by its id."""
        from kafka.partitioner.default import murmur2
        parts = self.partitions()
        if record.key is not None:
            return parts[(murmur2(record.key) & 0x7FFFFFFF) % len(parts)]
        return parts[zlib.crc32(record.record_id.encode()) % len(parts)]

    def send(self, records: Sequence[OutboxRecord], stream_key: str) -> list[OutboxRecord]:
        """Send and flush ``records``; returns those Kafka did not acknowledge (none on success)."""
        futures = []
        for record in records:
            headers = [(OUTBOX_HEADER, stream_key.encode()), (OUTBOX_ID_HEADER, record.record_id.encode())]
            futures.append(self.producer.send(
                self.topic, key=record.key, value=record.value, headers=headers,
                partition=self.partition_for(record)))
        self.producer.flush()
        return [record for record, future in zip(records, futures) if future.failed()]

    def newest_ids(self, stream_key: str, window: int = 1000) -> dict[int, tuple[int, int, int]]:
        from kafka import KafkaConsumer, TopicPartition
        newest: dict[int, tuple[int, int, int]] = {}
        consumer = KafkaConsumer(**kafka_config(self.bootstrap_servers, enable_auto_commit=False,
                                                client_id="onboardflow-outbox-recovery", consumer_timeout_ms=10_000))
        try:
            wanted = stream_key.encode()
            for p in self.partitions():
                tp = TopicPartition(self.topic, p)
                consumer.assign([tp])
                begin, end = consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
                upper = end
                while upper > begin and p not in newest:
                    lower = max(begin, upper - window)
                    consumer.seek(tp, lower)
                    for message in _read_until(consumer, tp, upper):
                        headers = dict(message.headers or ())
                        if headers.get(OUTBOX_HEADER) == wanted and OUTBOX_ID_HEADER in headers:
                            rid = parse_record_id(headers[OUTBOX_ID_HEADER].decode())
                            newest[p] = max(newest.get(p, rid), rid)
                    upper = lower
        finally:
            consumer.close()
        return newest

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


def _read_until(consumer, tp, upper: int):
    while consumer.position(tp) < upper:
        batch = consumer.poll(timeout_ms=1000).get(tp, [])
        for message in batch:
            if message.offset >= upper:
                return
            yield message
