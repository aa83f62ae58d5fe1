"""Element -> warehouse row, one function per table, and ``TableSpec`` tying each table to its columns.

In: an element of a pipeline stream (anonymized event, profile, segment
change, drift event, dead letter). Out: a tuple in the table's column order,
or ``RowError`` with a short reason code (a dead letter). Each element is a
dict of the shape its producing stage guarantees (the anonymizer's event,
``decode_profile``'s profile, ``SegmentChange`` and ``DriftEvent`` of
schemas/records.py), so only field values are checked here; dead letters,
which every stage produces, are also checked for being a mapping. Fields not in a
table are not stored: a new column is a migration, which keeps new (possibly
sensitive) fields out of the warehouse by default. Dead letters keep their
metadata only, never the raw payload (its size and SHA-256 instead).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import numbers
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

from ...schemas.records import DriftEvent, SegmentChange
from ..sinks.base import RecordRejected

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
MAX_DETAIL = 1000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class RowError(RecordRejected):
    """An element that cannot become a row; ``reason`` is a short dead-letter code."""


def _ts(ms: Any, name: str, *, required: bool = True) -> Optional[dt.datetime]:
    if ms is None:
        if required:
            raise RowError(f"missing_{name}", f"{name} is required")
        return None
    # `type(...) is int` first: the ABC check costs a measured share of a sink's CPU.
    if type(ms) is not int and (not isinstance(ms, numbers.Integral) or isinstance(ms, bool)):
        raise RowError("invalid_field", f"{name} must be epoch milliseconds (int)")
    try:
        return EPOCH + dt.timedelta(milliseconds=int(ms))
    except OverflowError:
        raise RowError("invalid_field", f"{name} is out of range") from None


def _int(value: Any, name: str) -> int:
    if type(value) is int:
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise RowError("invalid_field", f"{name} must be an int")
    return int(value)


def _text(value: Any, name: str, *, required: bool = False) -> Optional[str]:
    if value is None or value == "":
        if required:
            raise RowError(f"missing_{name}", f"{name} is required")
        return None if value is None else value
    if not isinstance(value, str):
        raise RowError("invalid_field", f"{name} must be a string")
    return value


def _flag(value: Any, name: str) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    raise RowError("invalid_field", f"{name} must be a boolean")


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(type(value).__name__)


# One encoder for every row: json.dumps with options builds a new one per call.
_ENCODE_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, allow_nan=False,
                                default=_json_default).encode


def _json(value: Any, name: str) -> str:
    try:
        return _ENCODE_JSON(value)
    except (TypeError, ValueError) as exc:
        raise RowError("invalid_field", f"{name} is not JSON-serializable ({type(exc).__name__})") from None


def _mapping(element: Any) -> Mapping[str, Any]:
    if not isinstance(element, Mapping):
        raise RowError("not_a_mapping", f"element is a {type(element).__name__}")
    return element


_CONTEXT_FIELDS = ("device", "os", "app_version", "locale", "country", "email_domain", "ip_prefix", "device_class")
_CONSENT_FLAGS = ("analytics", "personalization", "marketing")


def event_row(event: Mapping[str, Any]) -> tuple:
    """An anonymized event (``transforms.anonymize`` shape, or its flat variant) as an ``events`` row.

    Context fields are read from ``context`` or, failing that, the top level;
    consent from ``consent`` or flat ``consent_<flag>`` fields. Fields not in
    the table are not stored: a new column is a migration, which keeps new
    (possibly sensitive) fields out of the warehouse by default.
    """
    context = event.get("context") or {}
    consent = event.get("consent") or {}
    properties = event.get("properties")
    if properties is None:
        properties = {}
    referrer = event.get("referrer_host", event.get("referrer"))
    return (
        _text(event.get("event_id"), "event_id", required=True),
        _ts(event.get("occurred_at"), "occurred_at"),
        _ts(event.get("received_at"), "received_at", required=False),
        _text(event.get("event_type"), "event_type", required=True),
        _text(event.get("user_key"), "user_key"),
        _flag(event.get("identified"), "identified"),
        _text(event.get("session_id"), "session_id"),
        _json(properties, "properties"),
        *(_text(context.get(name, event.get(name)), name) for name in _CONTEXT_FIELDS),
        _text(referrer, "referrer_host"),
        *(_flag(consent.get(flag, event.get(f"consent_{flag}")), f"consent_{flag}") for flag in _CONSENT_FLAGS),
    )


def profile_snapshot_row(profile: Mapping[str, Any]) -> tuple:
    """A profile dict as a ``profile_snapshots`` row (the whole profile as jsonb)."""
    return (
        _text(profile.get("user_key"), "user_key", required=True),
        _int(profile.get("version"), "version"),
        _json(dict(profile), "snapshot"),
        _ts(_now_ms(), "written_at"),
    )


def segment_change_row(change: SegmentChange) -> tuple:
    """A ``SegmentChange`` (schemas/records.py) as a ``segment_changes`` row."""
    direction = change.get("change")
    if direction not in ("entered", "exited"):
        raise RowError("invalid_field", "change must be 'entered' or 'exited'")
    return (
        _text(change.get("user_key"), "user_key", required=True),
        _text(change.get("segment"), "segment", required=True),
        direction,
        _ts(change.get("at"), "at"),
        _text(change.get("reason"), "reason") or "",
        _int(change.get("version"), "version"),
    )


def drift_event_row(event: DriftEvent) -> tuple:
    """A ``DriftEvent`` (schemas/records.py) as a ``drift_events`` row."""
    value, threshold = event.get("value"), event.get("threshold")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RowError("invalid_field", "value must be a number")
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)):
        raise RowError("invalid_field", "threshold must be a number or null")
    return (
        _text(event.get("drift_id"), "drift_id", required=True),
        _text(event.get("model_name"), "model_name", required=True),
        _text(event.get("model_version"), "model_version", required=True),
        _text(event.get("detector"), "detector", required=True),
        _text(event.get("metric"), "metric", required=True),
        float(value),
        None if threshold is None else float(threshold),
        _int(event.get("window_events", 0), "window_events"),
        _text(event.get("action"), "action") or "none",
        _ts(event.get("detected_at"), "detected_at"),
    )


def exposure_row(exposure: Mapping[str, Any]) -> tuple:
    """An experiment exposure ``{experiment, user_key, variant, served_at}`` (runners/api/exposures.py) as an
    ``experiment_exposures`` row."""
    return (
        _text(exposure.get("experiment"), "experiment", required=True),
        _text(exposure.get("user_key"), "user_key", required=True),
        _text(exposure.get("variant"), "variant", required=True),
        _ts(exposure.get("served_at"), "served_at"),
    )


def identity_alias_row(stitch: Any) -> tuple:
    """A ``Stitch`` (transforms/identity.py) as an ``identity_aliases`` row."""
    if not isinstance(stitch, tuple) or len(stitch) < 6:
        raise RowError("not_a_stitch", f"element is a {type(stitch).__name__}")
    return (
        _text(stitch[0], "anonymous_key", required=True),
        _text(stitch[1], "user_key", required=True),
        _ts(stitch[2], "linked_at"),
        _text(stitch[3], "event_id", required=True),
        _text(stitch[4], "match", required=True),
        _text(stitch[5], "status", required=True),
    )


def _payload_bytes(letter: Mapping[str, Any]) -> Optional[bytes]:
    if "value" in letter:  # a Kafka record (schemas/dead_letter.avsc)
        value = letter["value"]
    else:  # an in-pipeline dead letter: {"stage", "reason", "event_id", "payload"}
        value = letter.get("payload")
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    # Canonical JSON so the same payload always hashes the same; repr for the odd
    # non-JSON value (bytes inside a dict): the hash only has to be stable.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=repr).encode("utf-8")


def _clean_text(value: Any, default: str) -> str:
    if not isinstance(value, str) or not value:
        return default
    # The last-resort sink should not itself reject a letter for a NUL byte.
    return value.replace("\x00", "")[:MAX_DETAIL]


def _coordinate(value: Any, default: int) -> int:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else default


def _kafka_time(ms: int) -> Optional[dt.datetime]:
    """A record's Kafka timestamp for the row: None for -1 (the broker had none) and for
    one no timestamp column holds (a producer sets CreateTime to any 64-bit value)."""
    if ms < 0:
        return None
    try:
        return _ts(ms, "kafka_timestamp")
    except RowError:
        return None


def dead_letter_row(element: Any) -> tuple:
    """Metadata of a dead letter, either shape: Kafka record or in-pipeline stage letter.

    The payload (``value`` or ``payload``) is reduced to its size and SHA-256;
    the raw key is not kept at all (it is typically the raw user id, and an
    unsalted hash of it would be reversible by guessing).
    """
    letter = _mapping(element)
    payload = _payload_bytes(letter)
    kafka_ts = _coordinate(letter.get("kafka_timestamp"), -1)
    failed_at = letter.get("failed_at")
    event_id = letter.get("event_id")
    return (
        _clean_text(letter.get("source_topic"), ""),
        _coordinate(letter.get("source_partition"), -1),
        _coordinate(letter.get("source_offset"), -1),
        _kafka_time(kafka_ts),
        _clean_text(letter.get("stage"), "unknown"),
        _clean_text(letter.get("reason"), "unknown"),
        _clean_text(letter.get("detail"), ""),
        _clean_text(event_id, "") or None,
        _ts(failed_at if isinstance(failed_at, int) and not isinstance(failed_at, bool) else _now_ms(), "failed_at"),
        None if payload is None else len(payload),
        hashlib.sha256(payload or b"").hexdigest(),
    )


@dataclass(frozen=True)
class TableSpec:
    """How elements become rows of one warehouse table (``stage``: the name of its dead letters)."""

    table: str
    columns: tuple[str, ...]
    to_row: Callable[[Any], tuple]  # raises RowError
    day_partition_column: Optional[str] = None
    #: ``(key columns, time column)``: a row whose key is already there replaces it only when its time is
    #: earlier, so the first occurrence wins whatever order batches arrive in. None: the row first written wins.
    earliest_wins: Optional[tuple[tuple[str, ...], str]] = None

    @property
    def stage(self) -> str:
        return f"warehouse.{self.table}"


EVENTS = TableSpec(
    "events",
    (
        "event_id", "occurred_at", "received_at", "event_type", "user_key", "identified", "session_id",
        "properties", *_CONTEXT_FIELDS, "referrer_host", *(f"consent_{f}" for f in _CONSENT_FLAGS),
    ),
    event_row,
    day_partition_column="occurred_at",
)
PROFILE_SNAPSHOTS = TableSpec(
    "profile_snapshots", ("user_key", "version", "snapshot", "written_at"), profile_snapshot_row
)
LATE_EVENTS = TableSpec("late_events", EVENTS.columns, event_row)
SEGMENT_CHANGES = TableSpec(
    "segment_changes", ("user_key", "segment", "change", "at", "reason", "version"), segment_change_row
)
DRIFT_EVENTS = TableSpec(
    "drift_events",
    ("drift_id", "model_name", "model_version", "detector", "metric", "value", "threshold", "window_events",
     "action", "detected_at"),
    drift_event_row,
)
DEAD_LETTERS = TableSpec(
    "dead_letters",
    (
        "source_topic", "source_partition", "source_offset", "kafka_timestamp", "stage", "reason", "detail",
        "event_id", "failed_at", "payload_size", "payload_sha256",
    ),
    dead_letter_row,
)
EXPERIMENT_EXPOSURES = TableSpec(
    "experiment_exposures", ("experiment", "user_key", "variant", "served_at"), exposure_row,
    earliest_wins=(("experiment", "user_key"), "served_at"),
)
IDENTITY_ALIASES = TableSpec(
    "identity_aliases", ("anonymous_key", "user_key", "linked_at", "event_id", "match", "status"),
    identity_alias_row, earliest_wins=(("anonymous_key", "user_key"), "linked_at"),
)
