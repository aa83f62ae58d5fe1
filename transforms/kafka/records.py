"""Kafka records, partition ranges, and the event time of a decoded record.

In: kafka-python records and decoded events. Out: ``KafkaRecord`` (one record,
value undecoded), ``KafkaPartition`` (one topic-partition and the offsets a
read covers) and ``event_time_ms(event)``, the epoch-ms element timestamp of a
decoded event, or ``EventTimeError`` with a ``reason`` for the dead letter;
``record_time_ms(timestamp)``, a record's own timestamp within the engine's range.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

#: Stop offset of a streaming restriction (Java KafkaIO uses Long.MAX_VALUE).
UNBOUNDED_STOP = sys.maxsize

#: Beam's representable timestamp range (MIN_TIMESTAMP/MAX_TIMESTAMP) in
#: epoch microseconds; an event time must fit inside it.
MIN_TIMESTAMP_MICROS = -9223372036854775000
MAX_TIMESTAMP_MICROS = 9223372036854775000
MIN_EVENT_MS = MIN_TIMESTAMP_MICROS // 1000 + 1
MAX_EVENT_MS = MAX_TIMESTAMP_MICROS // 1000 - 1


class KafkaRecord(NamedTuple):
    """One Kafka record as read from a topic-partition, value still undecoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: Optional[bytes]
    value: Optional[bytes]


class KafkaPartition(NamedTuple):
    """One topic-partition and where to read it (the source's element).

    ``stop_offset`` is None for a streaming (unbounded) read, else the partition's
    end offset taken when the pipeline started (exclusive).
    """

    topic: str
    partition: int
    start_offset: int
    stop_offset: Optional[int]
    #: Every (topic, partition) the same read covers, this one included: what
    #: ``PartitionWatermarks`` aligns this partition's watermark with.
    peers: tuple = ()


class EventTimeError(ValueError):
    """A decoded event has no usable ``occurred_at`` (epoch milliseconds int)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def record_time_ms(timestamp_ms: Optional[int]) -> int:
    """A record's Kafka timestamp as an element timestamp (epoch ms), clamped into the engine's range.

    A producer sets CreateTime to any 64-bit value; unclamped, one far in the
    future overflows the element timestamp and fails the bundle on every retry.
    None (no timestamp) counts as -1, as the broker reports it.
    """
    if timestamp_ms is None:
        return -1
    return min(max(int(timestamp_ms), MIN_EVENT_MS), MAX_EVENT_MS)


def event_time_ms(event: Mapping[str, Any]) -> int:
    """The decoded event's ``occurred_at`` (epoch ms), its timestamp downstream.

    Raises ``EventTimeError`` (reason ``occurred_at_missing_or_not_int`` or
    ``occurred_at_out_of_range``) when it is missing, not an int, or outside
    the engine's timestamp range.
    """
    # type() first: isinstance against typing.Mapping costs more than the rest.
    occurred_at = event.get("occurred_at") if type(event) is dict or isinstance(event, Mapping) else None
    if isinstance(occurred_at, bool) or not isinstance(occurred_at, int):
        raise EventTimeError("occurred_at_missing_or_not_int")
    if not MIN_EVENT_MS <= occurred_at <= MAX_EVENT_MS:
        raise EventTimeError("occurred_at_out_of_range")
    return occurred_at
