"""The PostgreSQL schema the warehouse lives in: its default name and the check every entry point makes.

Everything lives in one schema (``warehouse`` by default), so tests use a
private schema each. A name is a lower-case SQL identifier; anything else is
refused before it reaches a query.
"""
from __future__ import annotations

import re

DEFAULT_SCHEMA = "warehouse"
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema(schema: str) -> str:
    """``schema`` itself, or ValueError when it is not a lower-case SQL identifier."""
    if not isinstance(schema, str) or not _SCHEMA_RE.match(schema):
        raise ValueError("schema must be a lower-case SQL identifier (letters, digits, '_')")
    return schema
