"""Model snapshots as bytes: what the registry stores and the scorers load.

A snapshot is ``MAGIC | format version (1 byte) | kind length (1 byte) | kind |
zlib(pickle(state))``. The header lets a reader refuse the wrong kind of model
(a propensity snapshot handed to the segmenter) or a format it does not know
with a clear ``SnapshotError`` instead of an unpickling surprise.

Snapshots hold model state only -- River estimators, counters, and for the
propensity model the pending point-in-time features of users awaiting a label
(pseudonymous keys and numbers, no raw ids). They are pickles: load them only
from the project's own registry, never from an untrusted source.
"""
from __future__ import annotations

import pickle
import zlib
from typing import Any

MAGIC = b"OBFM"
FORMAT_VERSION = 1


class SnapshotError(ValueError):
    """The bytes are not a snapshot of the expected kind and format."""


def dump(kind: str, state: Any, level: int = 6) -> bytes:
    """``state`` as snapshot bytes of model ``kind``; ``level``: zlib compression (1 fastest, 9 smallest)."""
    name = kind.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError("kind must be 1..255 ASCII characters")
    if not 0 <= level <= 9:
        raise ValueError("level must be 0..9")
    body = zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), level=level)
    return MAGIC + bytes([FORMAT_VERSION, len(name)]) + name + body


def load(kind: str, data: bytes) -> Any:
    """The state in snapshot ``data``; raises SnapshotError if it is not a ``kind`` snapshot."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"snapshot must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) + 2 or not data.startswith(MAGIC):
        raise SnapshotError("not an onboardflow model snapshot")
    version, size = data[len(MAGIC)], data[len(MAGIC) + 1]
    if version != FORMAT_VERSION:
        raise SnapshotError(f"unsupported snapshot format {version}")
    start = len(MAGIC) + 2
    found = data[start:start + size].decode("ascii", errors="replace")
    if found != kind:
        raise SnapshotError(f"snapshot holds a {found!r} model, expected {kind!r}")
    try:
        return pickle.loads(zlib.decompress(data[start + size:]))
    except (zlib.error, pickle.UnpicklingError, EOFError) as exc:
        raise SnapshotError(f"corrupt {kind} snapshot: {type(exc).__name__}") from None
