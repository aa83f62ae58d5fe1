"""Model snapshots as bytes: what the registry stores and the scorers load.

A snapshot is ``MAGIC | format version (1 byte) | kind length (1 byte) | kind |
zlib(body)``. The header lets a reader refuse the wrong kind of model (a
propensity snapshot handed to the segmenter) or a format it does not know with
a clear ``SnapshotError`` instead of a decoding surprise. Two formats:

* **2, portable** (``dump_json``): the body is a UTF-8 JSON document of plain
  numbers, strings and base64 strings (``pack_floats``, ``pack_ints``: little-endian
  float64 / int64 arrays). No pickle: any Python with any River or numpy
  version can read it, so what one dependency set writes (the Beam worker's
  numpy 2 / River 0.26) the other loads (the Flink job's numpy < 2.2 /
  River 0.23). Model snapshots the registry serves use it
  (``PropensityModel.to_bytes``; the segmenter has its own JSON, docs/models.md).
* **1, pickle** (``dump``): engine-local state only -- the online learner's
  keyed state (``transforms/online_models.py``), written and read by one
  engine's workers with one dependency set. ``load`` still reads format-1
  model snapshots published before the portable format; a pickle runs code
  when loaded, so load it only from the project's own registry or state.
"""
from __future__ import annotations

import base64
import json
import pickle
import sys
import zlib
from array import array
from typing import Any, Iterable

MAGIC = b"OBFM"
#: The engine-local pickle format (``dump``).
FORMAT_VERSION = 1
#: The portable JSON format (``dump_json``).
PORTABLE_FORMAT = 2


class SnapshotError(ValueError):
    """The bytes are not a snapshot of the expected kind and format."""


def _header(kind: str, version: int, level: int) -> bytes:
    name = kind.encode("ascii")
    if not 0 < len(name) < 256:
        raise ValueError("kind must be 1..255 ASCII characters")
    if not 0 <= level <= 9:
        raise ValueError("level must be 0..9")
    return MAGIC + bytes([version, len(name)]) + name


def dump(kind: str, state: Any, level: int = 6) -> bytes:
    """``state`` pickled as format-1 snapshot bytes of ``kind`` (engine-local state); ``level``: zlib 1..9."""
    head = _header(kind, FORMAT_VERSION, level)
    return head + zlib.compress(pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), level=level)


def dump_json(kind: str, document: dict, level: int = 6) -> bytes:
    """``document`` (JSON-serializable, finite numbers) as portable format-2 snapshot bytes of ``kind``."""
    head = _header(kind, PORTABLE_FORMAT, level)
    try:
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN or infinity: a broken model, refused rather than written unreadable
        raise ValueError(f"{kind} snapshot: {exc}") from None
    return head + zlib.compress(text.encode("utf-8"), level=level)


def load(kind: str, data: bytes) -> Any:
    """The state in snapshot ``data``: the unpickled object (format 1) or the JSON document (format 2, a dict).

    Raises SnapshotError if it is not a ``kind`` snapshot of a known format.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"snapshot must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) + 2 or not data.startswith(MAGIC):
        raise SnapshotError("not an onboardflow model snapshot")
    version, size = data[len(MAGIC)], data[len(MAGIC) + 1]
    if version not in (FORMAT_VERSION, PORTABLE_FORMAT):
        raise SnapshotError(f"unsupported snapshot format {version}")
    start = len(MAGIC) + 2
    found = data[start:start + size].decode("ascii", errors="replace")
    if found != kind:
        raise SnapshotError(f"snapshot holds a {found!r} model, expected {kind!r}")
    try:
        body = zlib.decompress(data[start + size:])
        if version == PORTABLE_FORMAT:
            document = json.loads(body.decode("utf-8"))
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            return document
        return pickle.loads(body)
    except (zlib.error, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise SnapshotError(f"corrupt {kind} snapshot: {type(exc).__name__}") from None


def format_of(data: bytes) -> int:
    """The format version byte of snapshot ``data`` (SnapshotError if it is not a snapshot)."""
    data = bytes(data[:len(MAGIC) + 1])
    if len(data) <= len(MAGIC) or not data.startswith(MAGIC):
        raise SnapshotError("not an onboardflow model snapshot")
    return data[len(MAGIC)]


def _packed(typecode: str, values: Iterable) -> str:
    arr = array(typecode, values)
    if sys.byteorder == "big":
        arr.byteswap()
    return base64.b64encode(arr.tobytes()).decode("ascii")


def _unpacked(typecode: str, text: str) -> array:
    arr = array(typecode)
    arr.frombytes(base64.b64decode(text.encode("ascii"), validate=True))
    if sys.byteorder == "big":
        arr.byteswap()
    return arr


def pack_floats(values: Iterable[float]) -> str:
    """``values`` as base64 of little-endian float64s (exact, NaN and infinities included)."""
    return _packed("d", values)


def unpack_floats(text: str) -> array:
    """The float64 array ``pack_floats`` wrote."""
    return _unpacked("d", text)


def pack_ints(values: Iterable[int]) -> str:
    """``values`` as base64 of little-endian int64s."""
    return _packed("q", values)


def unpack_ints(text: str) -> array:
    """The int64 array ``pack_ints`` wrote."""
    return _unpacked("q", text)
