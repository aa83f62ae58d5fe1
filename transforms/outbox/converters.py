"""Outbox entries -> Kafka records and warehouse rows, one converter per stream.

In: ``(entry_id, fields)`` with field values as bytes. Out: ``Converted(records, rows)``.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Optional

from ..profile_store.encoding import decode_profile
from ..warehouse.rows import profile_snapshot_row, segment_change_row
from .keys import Converted, OutboxRecord


def _text(value: bytes) -> str:
    return value.decode("utf-8")


def _segments(raw: Optional[bytes]) -> list[str]:
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [s for s in value if isinstance(s, str)] if isinstance(value, list) else []


class SegmentChangeConverter:
    """Segment-change entries -> ``SegmentChange`` records (Avro, keyed by user_key) and warehouse rows.

    ``rules`` (a ``RuleSet``) names each change's reason; ``serialize`` maps a
    SegmentChange dict to the framed Avro value.
    """

    def __init__(self, rules, serialize: Callable[[dict], bytes]):
        self._rules, self._serialize = rules, serialize

    def __call__(self, entry_id: str, fields: dict) -> Converted:
        user_key, version, at = _text(fields["u"]), int(fields["v"]), int(fields["at"])
        reason = _text(fields["why"]) if "why" in fields else None
        changes = self._rules.diff(_segments(fields.get("old")), _segments(fields.get("new")), at,
                                   reason=reason, user_key=user_key, version=version)
        records, rows = [], []
        for n, change in enumerate(changes):
            change = dict(change)
            records.append(OutboxRecord(f"{entry_id}/{n}", user_key.encode("ascii"), self._serialize(change)))
            rows.append(segment_change_row(change))
        return Converted(records, rows)


def profile_snapshot_converter(entry_id: str, fields: dict) -> Converted:
    """Profile-snapshot entries -> ``profile_snapshots`` rows (the profile as the hash holds it)."""
    profile = decode_profile(json.loads(fields["f"]))
    return Converted([], [profile_snapshot_row(profile)])


def dead_letter_converter(entry_id: str, fields: dict) -> Converted:
    """Dead-letter entries -> the DLQ topic's records, keyed by the source record's raw key."""
    key = fields["k"] if fields.get("hk") == b"1" else None
    return Converted([OutboxRecord(f"{entry_id}/0", key, fields["v"])], [])
