"""Decoding: raw Kafka records in, validated onboarding events or dead letters out.

Engine-free: the Kafka source (``pipelines/beam/kafka_source.py``) calls ``decode`` on
every record and ``dead_letter`` on every failure; there is no separate Beam
decoding step. The first stage of every pipeline. A record's value is a Confluent-framed Avro
``OnboardingEvent`` written with any registered version; it is resolved into
the pipeline's reader schema (``onboarding_event.v2``) and checked for what
the schema cannot express: an identity (user_id or anonymous_id), a non-empty
event_id and plausible timestamps. Whatever fails becomes a ``DeadLetter``
(schemas/dead_letter.avsc) carrying the raw bytes, a reason code and a PII-free
detail; nothing is dropped silently.

``OnboardingEventDecoder`` holds only configuration, so it pickles cheaply to
workers; its registry client and deserializer are built lazily on first use
in each worker. Reason codes: ``schemas/wire.py`` ``REASONS``; the dead-letter
path: docs/reliability.md.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Protocol

from ..schemas import DEAD_LETTER_SUBJECT, load_schema
from ..schemas.records import Event
from ..schemas.schema_registry import RegistryError, RegistryUnavailable, SchemaRegistry, registry_from_url
from ..schemas.wire import (
    AvroDeserializer,
    AvroSerializer,
    InvalidEvent,
    InvalidField,
    InvalidTimestamp,
    MissingIdentity,
)

READER_SCHEMA = ("onboarding_event", 2)
EARLIEST_EVENT_MS = 946_684_800_000  # 2000-01-01T00:00:00Z: nothing we track happened before
LATEST_EVENT_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z: beyond it a clock or encoder is broken
MAX_EVENT_ID_LENGTH = 128  # a UUID is 36; anything far longer is not an id


class RawRecord(Protocol):
    """What the decoder reads of a Kafka record (``KafkaRecord`` of the Kafka source has it)."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: Optional[int]
    key: Any
    value: Any


class OnboardingEventDecoder:
    """Turns KafkaRecords into event dicts (reader schema v2) or raises InvalidEvent.

    Events carry ``occurred_at`` / ``received_at`` as epoch-millis ints.
    ``registry_url``: None for the shipped file registry, a path or ``file://``
    URL, or an ``http(s)://`` Confluent Schema Registry. ``max_future_skew_ms``:
    how far occurred_at may lie after received_at (client clocks run ahead).
    """

    def __init__(self, registry_url: str | None = None, max_future_skew_ms: int = 86_400_000):
        self.registry_url = registry_url
        self.max_future_skew_ms = int(max_future_skew_ms)
        self._registry: SchemaRegistry | None = None
        self._deserializer: AvroDeserializer | None = None
        self._dead_letter_serializer: AvroSerializer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"registry_url": self.registry_url, "max_future_skew_ms": self.max_future_skew_ms}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"OnboardingEventDecoder(registry_url={self.registry_url!r}, "
            f"max_future_skew_ms={self.max_future_skew_ms})"
        )

    @property
    def registry(self) -> SchemaRegistry:
        if self._registry is None:
            self._registry = registry_from_url(self.registry_url)
        return self._registry

    def _build_deserializer(self) -> AvroDeserializer:
        self._deserializer = AvroDeserializer(self.registry, load_schema(*READER_SCHEMA))
        return self._deserializer

    def decode(self, record: RawRecord) -> Event:
        """The event in ``record.value`` (``schemas/records.py`` ``Event``), validated; InvalidEvent if there is none.

        Registry outages raise ``RegistryUnavailable`` instead: that is not the
        record's fault, and retrying beats dead-lettering good events.
        """
        deserializer = self._deserializer or self._build_deserializer()
        event = deserializer.deserialize(record.value)

        event_id = event["event_id"]
        if not event_id or len(event_id) > MAX_EVENT_ID_LENGTH:
            raise InvalidField(f"event_id: length {len(event_id)}, allowed 1..{MAX_EVENT_ID_LENGTH}")
        if not event["user_id"] and not event["anonymous_id"]:
            raise MissingIdentity("user_id and anonymous_id are both null or empty")
        occurred_at, received_at = event["occurred_at"], event["received_at"]
        if not EARLIEST_EVENT_MS <= occurred_at < LATEST_EVENT_MS:
            raise InvalidTimestamp("occurred_at outside 2000-01-01..2100-01-01")
        if not EARLIEST_EVENT_MS <= received_at < LATEST_EVENT_MS:
            raise InvalidTimestamp("received_at outside 2000-01-01..2100-01-01")
        if occurred_at - received_at > self.max_future_skew_ms:
            raise InvalidTimestamp(f"occurred_at more than {self.max_future_skew_ms} ms after received_at")
        return event

    def dead_letter(self, record: RawRecord, error: InvalidEvent, stage: str = "decode") -> dict:
        """The DeadLetter dict for a record that failed ``stage`` (raw bytes kept).

        ``error`` is normally an InvalidEvent; for any other exception the
        reason is ``registry_unavailable``, ``registry_error`` or
        ``internal_error`` and the detail only the exception's type (its
        message could quote the record).
        """
        return {
            "source_topic": str(record.topic),
            "source_partition": int(record.partition),
            "source_offset": int(record.offset),
            "kafka_timestamp": int(record.timestamp_ms) if record.timestamp_ms is not None else -1,
            "key": _raw_bytes(record.key),
            "value": _raw_bytes(record.value),
            "reason": _reason(error),
            "detail": error.detail if isinstance(error, InvalidEvent) else type(error).__name__,
            "stage": stage,
            "failed_at": time.time_ns() // 1_000_000,
        }

    def encode_dead_letter(self, dl: dict) -> bytes:
        """A DeadLetter dict as a framed Avro value for the dead-letter topic."""
        if self._dead_letter_serializer is None:
            self._dead_letter_serializer = AvroSerializer(
                self.registry, DEAD_LETTER_SUBJECT, load_schema("dead_letter")
            )
        return self._dead_letter_serializer.serialize(dl)


def _reason(error: BaseException) -> str:
    # Callers that dead-letter any exception (the Kafka source) still get a
    # specific code for registry trouble, so those records can be replayed.
    if isinstance(error, InvalidEvent):
        return error.reason
    if isinstance(error, RegistryError):
        return "registry_unavailable" if isinstance(error, RegistryUnavailable) else "registry_error"
    return "internal_error"


def _raw_bytes(value: Any) -> bytes | None:
    # Avro needs bytes; a str key/value (a misconfigured deserializer upstream)
    # is kept rather than lost.
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return None


__all__ = [
    "OnboardingEventDecoder",
    "RawRecord",
]
