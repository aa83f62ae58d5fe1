"""Schema evolution checks: may a new schema version follow the earlier ones at a compatibility level?

In: a new Avro schema, the subject's earlier versions (oldest first, dicts or
JSON text) and a level. Out: the problems found, one line each, naming the
earlier version, the direction that breaks and avro's reason (empty when the
new version may follow). The checking itself is the ``avro`` package's
``ReaderWriterCompatibilityChecker``, the reference implementation of Avro's
schema resolution rules; the levels are Confluent Schema Registry's:

* ``BACKWARD`` (the default): the new schema reads data written with the
  latest earlier version (consumers upgrade first);
* ``FORWARD``: the latest earlier version reads data written with the new one
  (producers upgrade first);
* ``FULL``: both;
* ``BACKWARD_TRANSITIVE``, ``FORWARD_TRANSITIVE``, ``FULL_TRANSITIVE``: the
  same against every earlier version, not only the latest;
* ``NONE``: no check.

The registries (schemas/schema_registry.py) apply these on registration;
docs/security.md ("Schema governance") says how to evolve a schema safely.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Union

import avro.errors
import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

SchemaLike = Union[str, dict, list]

LEVELS = ("NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE")
DEFAULT_LEVEL = "BACKWARD"


class InvalidLevel(ValueError):
    """Not one of LEVELS."""


class UnreadableSchema(ValueError):
    """The avro package cannot parse the schema."""


def check_level(level: Any) -> str:
    """``level`` as one of LEVELS (case-insensitive); InvalidLevel otherwise."""
    name = level.strip().upper() if isinstance(level, str) else None
    if name not in LEVELS:
        raise InvalidLevel(f"invalid compatibility level {level!r}; one of {', '.join(LEVELS)}")
    return name


def versions_to_check(level: str, count: int) -> list[int]:
    """Which of ``count`` earlier versions (numbered from 1) a new one is checked against at ``level``."""
    level = check_level(level)
    if level == "NONE" or count <= 0:
        return []
    return list(range(1, count + 1)) if level.endswith("_TRANSITIVE") else [count]


def _parse(schema: SchemaLike) -> avro.schema.Schema:
    try:
        return avro.schema.parse(schema if isinstance(schema, str) else json.dumps(schema))
    except (avro.errors.AvroException, ValueError, TypeError) as err:
        raise UnreadableSchema(f"not a valid Avro schema: {type(err).__name__}: {err}") from None


def reader_problems(reader: SchemaLike, writer: SchemaLike) -> list[str]:
    """Why ``reader`` cannot read data written with ``writer`` (empty: it can)."""
    result = ReaderWriterCompatibilityChecker().get_compatibility(_parse(reader), _parse(writer))
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    # avro merges the findings of a record into sets, so messages and
    # locations are reported side by side rather than paired.
    kinds = {kind.name.upper() for kind in result.incompatibilities}
    messages = "; ".join(sorted(result.messages))
    if kinds == {"READER_FIELD_MISSING_DEFAULT_VALUE"}:
        messages = f"{messages}: in the reader without a default, not in the writer"
    locations = sorted(result.locations - {"/"}) or ["/"]
    return [f"{', '.join(sorted(kinds)) or 'INCOMPATIBLE'}: {messages} (at {', '.join(locations)})"]


def pair_problems(new: SchemaLike, old: SchemaLike, level: str = DEFAULT_LEVEL) -> list[str]:
    """What breaks between ``new`` and one earlier version ``old`` in the direction(s) of ``level``."""
    level = check_level(level)
    found: list[str] = []
    if level.startswith(("BACKWARD", "FULL")):
        found += [f"the new schema cannot read old data: {p}" for p in reader_problems(new, old)]
    if level.startswith(("FORWARD", "FULL")):
        found += [f"the old schema cannot read new data: {p}" for p in reader_problems(old, new)]
    return found


def problems(new: SchemaLike, earlier: Sequence[SchemaLike], level: str = DEFAULT_LEVEL) -> list[str]:
    """What stops ``new`` from following ``earlier`` (oldest first) at ``level``; empty when it may."""
    found: list[str] = []
    for version in versions_to_check(level, len(earlier)):
        found += [f"version {version}: {p}" for p in pair_problems(new, earlier[version - 1], level)]
    return found


def is_compatible(new: SchemaLike, earlier: Sequence[Any], level: str = DEFAULT_LEVEL) -> bool:
    return not problems(new, earlier, level)
