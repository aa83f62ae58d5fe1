"""Schema evolution checks: can a reader of one schema version read data written with another?

In: two Avro schemas (dicts or JSON text). Out: the problems found, empty when
compatible. The checking itself is the ``avro`` package's
``ReaderWriterCompatibilityChecker``, the reference implementation of Avro's
schema resolution rules; levels follow Confluent Schema Registry's:

* ``BACKWARD``: the new schema reads data written with the previous one
  (consumers upgrade first); the default;
* ``FORWARD``: the previous schema reads data written with the new one;
* ``FULL``: both; the ``*_TRANSITIVE`` levels check against every earlier
  version, not only the latest.

``tests/unit/test_compatibility.py`` holds every subject of the shipped
registry (schemas/registry.json) to BACKWARD across its versions.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Union

import avro.schema
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

SchemaLike = Union[str, dict, list]

LEVELS = ("NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE")
DEFAULT_LEVEL = "BACKWARD"


def _parse(schema: SchemaLike) -> avro.schema.Schema:
    return avro.schema.parse(schema if isinstance(schema, str) else json.dumps(schema))


def reader_problems(reader: SchemaLike, writer: SchemaLike) -> list[str]:
    """Why ``reader`` cannot read data written with ``writer`` (empty: it can)."""
    result = ReaderWriterCompatibilityChecker().get_compatibility(_parse(reader), _parse(writer))
    if result.compatibility is SchemaCompatibilityType.compatible:
        return []
    return sorted(f"{message} (at {location})" for message in result.messages for location in result.locations)


def problems(new: SchemaLike, earlier: Sequence[SchemaLike], level: str = DEFAULT_LEVEL) -> list[str]:
    """What stops ``new`` from following ``earlier`` (oldest first) at ``level``; empty when it may."""
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}; one of {', '.join(LEVELS)}")
    if level == "NONE" or not earlier:
        return []
    against = list(earlier) if level.endswith("_TRANSITIVE") else [earlier[-1]]
    found: list[str] = []
    for old in against:
        if level.startswith(("BACKWARD", "FULL")):
            found += [f"new schema cannot read old data: {p}" for p in reader_problems(new, old)]
        if level.startswith(("FORWARD", "FULL")):
            found += [f"old schema cannot read new data: {p}" for p in reader_problems(old, new)]
    return found


def is_compatible(new: SchemaLike, earlier: Sequence[Any], level: str = DEFAULT_LEVEL) -> bool:
    return not problems(new, earlier, level)
