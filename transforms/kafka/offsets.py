"""Where a read starts on each partition.

In: ``--kafka_start_position`` text and the offsets a broker reports for one
partition. Out: ``StartPosition`` and ``resolve_start_offset(...)``, the first
offset to read, always inside the partition's log.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union


@dataclasses.dataclass(frozen=True)
class StartPosition:
    """Where a read starts on partitions: committed, earliest, latest or timestamp.

    Parse from text with ``StartPosition.parse("timestamp:1700000000000")``.
    """

    kind: str
    timestamp_ms: Optional[int] = None

    KINDS = ("committed", "earliest", "latest", "timestamp")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"start position must be one of {self.KINDS}, got {self.kind!r}")
        if (self.kind == "timestamp") != (self.timestamp_ms is not None):
            raise ValueError("a timestamp start position needs timestamp_ms, the others must not have it")
        if self.timestamp_ms is not None and self.timestamp_ms < 0:
            raise ValueError("timestamp start position must be a non-negative epoch millisecond value")

    @classmethod
    def parse(cls, text: Union[str, "StartPosition"]) -> "StartPosition":
        if isinstance(text, StartPosition):
            return text
        value = text.strip().lower()
        if value.startswith("timestamp:"):
            raw = value.split(":", 1)[1].strip()
            try:
                millis = int(raw)
            except ValueError:
                raise ValueError(f"timestamp start position needs epoch milliseconds, got {raw!r}") from None
            return cls("timestamp", millis)
        return cls(value)

    def __str__(self) -> str:
        return f"timestamp:{self.timestamp_ms}" if self.kind == "timestamp" else self.kind


def resolve_start_offset(
    position: StartPosition,
    *,
    beginning: int,
    end: int,
    committed: Optional[int] = None,
    offset_for_time: Optional[int] = None,
) -> int:
    """The first offset to read on one partition, given what the broker reports.

    ``beginning``/``end`` are the partition's log start and end offsets,
    ``committed`` the group's committed offset (None when the group never
    committed), ``offset_for_time`` the answer of ``offsets_for_times`` (None
    when no record is at or after the timestamp). The result is always inside
    ``[beginning, end]``: a committed offset that retention already deleted
    restarts at the log start, as Kafka's ``auto.offset.reset=earliest`` would.
    """
    if position.kind == "earliest":
        offset = beginning
    elif position.kind == "latest":
        offset = end
    elif position.kind == "committed":
        offset = beginning if committed is None else committed
    else:  # timestamp: nothing at/after it means "start at the end".
        offset = end if offset_for_time is None else offset_for_time
    return min(max(offset, beginning), end)
