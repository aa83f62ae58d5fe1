"""Names of the outbox streams and keys, and the ids of the records a relay sends.

In: a key prefix, a stream name. Out: Redis key names; ``parse_record_id``
turns a record id ``<entry id>/<n>`` into a tuple that orders like the ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

SEGMENT_CHANGES = "segment-changes"
PROFILE_SNAPSHOTS = "profile-snapshots"
DEAD_LETTERS = "dead-letters"
STREAMS = (SEGMENT_CHANGES, PROFILE_SNAPSHOTS, DEAD_LETTERS)

#: Kafka headers of a relayed record: the stream it came from and its id.
OUTBOX_HEADER = "outbox"
OUTBOX_ID_HEADER = "outbox-id"


@dataclass(frozen=True)
class OutboxKeys:
    """The Redis key names of the outboxes under one key prefix."""

    prefix: str

    def stream(self, name: str) -> str:
        return f"{self.prefix}:outbox:{name}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:outbox:{name}:lock"

    def cursor(self, name: str) -> str:
        return f"{self.prefix}:outbox:{name}:cursor"

    @property
    def dead_letter_ids(self) -> str:
        return f"{self.prefix}:dead-letters:ids"


def parse_record_id(text: str) -> tuple[int, int, int]:
    """``"<ms>-<seq>/<n>"`` (or a bare stream id) -> a tuple that orders like the ids."""
    entry, _, index = text.partition("/")
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0), int(index or 0)


class OutboxRecord(NamedTuple):
    """One Kafka record of a relay: its deterministic id, key and value.

    No event-time timestamp: the broker stamps the record when it is sent.
    Kafka's retention goes by record timestamps, so a backfill's changes
    stamped with their (weeks-old) event time would be deleted at the next
    retention check; the event time is in the value (``at``).
    """

    record_id: str
    key: Optional[bytes]
    value: bytes


class Converted(NamedTuple):
    """What one outbox entry becomes: Kafka records and warehouse rows."""

    records: list
    rows: list
