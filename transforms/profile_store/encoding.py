"""Profile dict <-> Redis hash fields, and the validation a profile passes before it is stored.

In: a profile dict (``user_key``, ``version``, ``segments``, any feature
fields). Out: ``EncodedProfile`` (the fields as one JSON object of strings,
ready for the upsert script), or ``ProfileEncodingError`` with a reason code.
``decode_profile`` turns an HGETALL reply back into the typed dict.

Encoding is generic so a new feature needs no sink change: strings as they
are, ints in decimal, floats as Python's shortest round-trip ``repr``,
booleans as ``true`` / ``false``, maps and lists as compact JSON with sorted
keys; ``None`` leaves the field out. The hash field ``_types`` maps each field
to its type (``str``, ``int``, ``float``, ``bool``, ``json``) so readers decode
without guessing (a ``segment_label`` of ``"7"`` stays a string). The
contract: docs/redis-contract.md.
"""
from __future__ import annotations

import json
import numbers
import re
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

from ..sinks.base import RecordRejected

TYPES_FIELD = "_types"
WRITE_ID_FIELD = "_write_id"
# The segments the hash held before the last accepted write (JSON list): lets a
# retried write whose reply was lost still report the store's segment changes.
PREVIOUS_SEGMENTS_FIELD = "_prev_segments"
RESERVED_FIELDS = frozenset({TYPES_FIELD, WRITE_ID_FIELD, PREVIOUS_SEGMENTS_FIELD})

# Lua numbers are doubles: versions above 2**53 would compare inexactly.
MAX_VERSION = 2**53 - 1
_USER_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ProfileEncodingError(RecordRejected):
    """A profile that cannot be stored; ``reason`` is a short code for dead letters."""


class EncodedProfile(NamedTuple):
    """A profile ready for the upsert script."""

    user_key: str
    version: int
    segments: tuple[str, ...]
    fields: bytes  # UTF-8 JSON object: hash field name -> encoded string value


# Encoders made once: json.dumps with options builds a new one per call.
_compact_json = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False).encode
_fields_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def encode_value(name: str, value: Any) -> tuple[str, str]:
    """(type, text) for one non-None field value; ``ProfileEncodingError`` for a type the encoding lacks."""
    # Exact-type fast paths first: ABC checks (numbers.Integral) cost more
    # than the whole encoding of a plain field, and profiles are mostly plain.
    kind = type(value)
    if kind is str:
        return "str", value
    if kind is float:
        return "float", repr(value)
    if kind is int:
        return "int", str(value)
    if isinstance(value, bool):
        return "bool", "true" if value else "false"
    if isinstance(value, str):
        return "str", value
    if isinstance(value, numbers.Integral):
        return "int", str(int(value))
    if isinstance(value, numbers.Real):
        return "float", repr(float(value))
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, (Mapping, list, tuple)):
        try:
            return "json", _compact_json(value)
        except (TypeError, ValueError) as exc:
            # Names the field, never its value (house rule: no data in logs).
            raise ProfileEncodingError("unencodable_field", f"field {name!r}: {type(exc).__name__}") from None
    raise ProfileEncodingError("unencodable_field", f"field {name!r} has type {type(value).__name__}")


def decode_value(kind: Optional[str], text: str) -> Any:
    """The value of one hash field from its ``_types`` entry (None: a string)."""
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        return text == "true"
    if kind == "json":
        return json.loads(text)
    return text  # "str", and fields written by someone else without a type


def encode_profile(profile: Any, *, default_updated_at: Optional[int] = None) -> EncodedProfile:
    """Validate one profile dict and encode it for the hash (see module docstring).

    Raises ``ProfileEncodingError`` for: not a mapping, ``user_key`` that is
    not a 64-hex HMAC pseudonym (a raw id must never become a Redis key),
    ``version`` that is not an int in [0, 2**53), ``segments`` that is not a
    list of non-empty strings, a reserved or non-string field name, or a value
    of a type the encoding does not cover.
    """
    if not isinstance(profile, Mapping):
        raise ProfileEncodingError("not_a_mapping", f"profile is a {type(profile).__name__}")
    user_key = profile.get("user_key")
    if not isinstance(user_key, str) or not _USER_KEY_RE.match(user_key):
        raise ProfileEncodingError("invalid_user_key", "user_key must be a 64-character lower-case hex pseudonym")
    version = profile.get("version")
    if (
        not isinstance(version, numbers.Integral)
        or isinstance(version, bool)
        or not 0 <= int(version) <= MAX_VERSION
    ):
        raise ProfileEncodingError("invalid_version", "version must be an int in [0, 2**53)")
    version = int(version)
    raw_segments = profile.get("segments")
    if raw_segments is None:
        raw_segments = []
    if not isinstance(raw_segments, (list, tuple, set, frozenset)) or not all(
        isinstance(s, str) and s for s in raw_segments
    ):
        raise ProfileEncodingError("invalid_segments", "segments must be a list of non-empty strings")
    ordered = sorted(raw_segments) if isinstance(raw_segments, (set, frozenset)) else raw_segments
    segments = tuple(dict.fromkeys(ordered))

    values: dict[str, Any] = dict(profile)
    values["version"] = version
    values["segments"] = list(segments)
    if values.get("updated_at") is None:
        values["updated_at"] = now_ms() if default_updated_at is None else default_updated_at
    types: dict[str, str] = {}
    encoded: dict[str, str] = {}
    if not all(isinstance(name, str) and name for name in values):
        raise ProfileEncodingError("invalid_field_name", "field names must be non-empty strings")
    for name in sorted(values):
        if name in RESERVED_FIELDS:
            raise ProfileEncodingError("reserved_field", f"field {name!r} is reserved by the profile store")
        value = values[name]
        if value is None:
            continue  # absent = null, see the contract
        kind, encoded[name] = encode_value(name, value)
        types[name] = kind
    encoded[TYPES_FIELD] = _compact_json(types)
    try:
        fields = _fields_json(encoded).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate in some string: not representable in UTF-8, hence not in Redis.
        raise ProfileEncodingError("unencodable_field", "a string is not valid Unicode (lone surrogate)") from None
    return EncodedProfile(user_key, version, segments, fields)


def decode_profile(raw: Mapping[Union[bytes, str], Union[bytes, str]]) -> dict[str, Any]:
    """The typed profile dict from an HGETALL reply (bytes or str), sink fields removed."""
    fields = {
        (k.decode("utf-8") if isinstance(k, bytes) else k): (v.decode("utf-8") if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    try:
        types = json.loads(fields.get(TYPES_FIELD) or "{}")
    except ValueError:
        types = {}
    if not isinstance(types, dict):
        types = {}
    return {
        name: decode_value(types.get(name), text)
        for name, text in sorted(fields.items())
        if name not in RESERVED_FIELDS
    }
