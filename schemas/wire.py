"""The Kafka wire format: Confluent Schema Registry framing around schemaless Avro.

Every value on our topics is ``0x00 | schema id (4 bytes, big-endian) | Avro
binary``, exactly what Confluent's serializers write, so Confluent clients and
ours interoperate. ``AvroSerializer`` registers (or looks up) its schema once
and frames records with the id; ``AvroDeserializer`` fetches each writer schema
by id once, and resolves writer into reader schema with Avro's rules (added
fields take their defaults, unknown enum symbols the enum default).

Decoding runs once per event at 10k+ events/s, so everything per schema is done
once per schema id: the writer schema is parsed once, and the reader schema is
dropped when it is identical to the writer's (fastavro then skips resolution).
fastavro re-matches writer and reader schemas on every record, which halves
throughput, so the usual evolution step gets a shortcut too: when the reader
only appends fields with immutable defaults and adds enum symbols (v1 -> v2),
the record is read with the writer schema alone and the defaults are added,
which is exactly what resolution would produce. Any other pair takes fastavro's
full resolution.

``timestamp-millis`` fields come out as epoch-millisecond ints: fastavro picks
its logical-type conversion from the *writer* schema, so the cached copy of
each writer schema has that logical type removed; the wire bytes are the same
and no datetime is ever built (ints are also cheaper to pickle between stages).

Bad input raises ``InvalidEvent`` with a ``reason`` from ``REASONS`` and a
``detail`` naming only field names, lengths and schema ids: never values,
which may be PII.
"""
from __future__ import annotations

import io
import struct
import time
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError

from .schema_registry import (
    InvalidSchema,
    SchemaLike,
    SchemaNotFound,
    SchemaRegistry,
    normalize,
    parse,
    plain_schema,
)

MAGIC_BYTE = 0
HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size  # 5

# Reason codes of InvalidEvent, a fixed set: dead-letter counters and dashboards key on them.
REASONS: dict[str, str] = {
    "not_framed": "empty, shorter than the 5-byte header, or not starting with magic byte 0",
    "unknown_schema_id": "the schema id in the header is not in the registry",
    "incompatible_schema": "the writer schema cannot be resolved into the reader schema (or is not Avro)",
    "avro_decode_error": "the Avro payload is malformed: truncated, bad varint/UTF-8/enum/union index, "
    "or trailing bytes",
    "missing_identity": "neither user_id nor anonymous_id is set",
    "invalid_timestamp": "occurred_at/received_at before 2000-01-01 or after 2100-01-01, "
    "or occurred_at more than the allowed skew after received_at",
    "invalid_field": "a required field is empty or out of bounds (e.g. empty event_id)",
}


class InvalidEvent(ValueError):
    """A record that cannot become an event; ``reason`` is a code from REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):
        return (_rebuild_invalid_event, (type(self), self.reason, self.detail))


def _rebuild_invalid_event(cls, reason, detail):
    error = InvalidEvent.__new__(cls)
    InvalidEvent.__init__(error, reason, detail)
    return error


class _Reason(InvalidEvent):
    reason_code = ""

    def __init__(self, detail: str):
        super().__init__(self.reason_code, detail)


class NotFramed(_Reason):
    reason_code = "not_framed"


class UnknownSchemaId(_Reason):
    reason_code = "unknown_schema_id"


class IncompatibleSchema(_Reason):
    reason_code = "incompatible_schema"


class AvroDecodeError(_Reason):
    reason_code = "avro_decode_error"


class MissingIdentity(_Reason):
    reason_code = "missing_identity"


class InvalidTimestamp(_Reason):
    reason_code = "invalid_timestamp"


class InvalidField(_Reason):
    reason_code = "invalid_field"


def frame(schema_id: int, payload: bytes) -> bytes:
    """Prefix an Avro payload with the Confluent header for ``schema_id``."""
    return HEADER.pack(MAGIC_BYTE, schema_id) + payload


def unframe(raw: bytes) -> tuple[int, bytes]:
    """(schema id, Avro payload) of a framed value; NotFramed if it is not one."""
    if raw is None or len(raw) < HEADER_SIZE:
        raise NotFramed(f"value of {0 if raw is None else len(raw)} bytes, header needs {HEADER_SIZE}")
    magic, schema_id = HEADER.unpack_from(raw)
    if magic != MAGIC_BYTE:
        raise NotFramed(f"magic byte {magic}, expected {MAGIC_BYTE}")
    return schema_id, bytes(raw[HEADER_SIZE:])


_MILLIS_TYPES = frozenset({"timestamp-millis", "local-timestamp-millis"})


def _without_millis_conversion(node: Any) -> Any:
    """Copy of plain schema JSON with millisecond timestamp logical types removed."""
    if isinstance(node, dict):
        copy = {k: _without_millis_conversion(v) for k, v in node.items()}
        if copy.get("logicalType") in _MILLIS_TYPES and copy.get("type") == "long":
            del copy["logicalType"]
        return copy
    if isinstance(node, list):
        return [_without_millis_conversion(v) for v in node]
    return node


def epoch_millis_schema(schema: SchemaLike) -> Any:
    """Parsed schema that reads/writes the same bytes but yields timestamps as int millis."""
    return parse(_without_millis_conversion(plain_schema(parse(schema))))


_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_IMMUTABLE_DEFAULTS = (type(None), bool, int, float, str)


def _shape(node: Any) -> Any:
    """A type with a primitive in dict form ({"type": "long"}) reduced to its name."""
    if isinstance(node, dict) and node.get("type") in _PRIMITIVES and "logicalType" not in node:
        return node["type"]
    return node


def _same_shape(writer: Any, reader: Any) -> bool:
    """True if bytes written with ``writer`` decode to the same values under ``reader``
    without resolution: the same types in the same order, enum symbols a subset."""
    writer, reader = _shape(writer), _shape(reader)
    if isinstance(writer, str) or isinstance(reader, str):
        return writer == reader
    if isinstance(writer, list) or isinstance(reader, list):
        return (
            isinstance(writer, list) and isinstance(reader, list) and len(writer) == len(reader)
            and all(_same_shape(w, r) for w, r in zip(writer, reader))
        )
    kind = writer.get("type")
    if kind != reader.get("type"):
        return False
    if kind == "record":
        w_fields, r_fields = writer["fields"], reader["fields"]
        return (
            writer["name"] == reader["name"] and len(w_fields) == len(r_fields)
            and all(w["name"] == r["name"] and _same_shape(w["type"], r["type"]) for w, r in zip(w_fields, r_fields))
        )
    if kind == "enum":
        # Read with the writer schema, symbols come out by name; only a symbol the
        # reader lacks (resolution would give the reader's default) needs resolution.
        return writer["name"] == reader["name"] and set(writer["symbols"]) <= set(reader["symbols"])
    if kind == "array":
        return _same_shape(writer["items"], reader["items"])
    if kind == "map":
        return _same_shape(writer["values"], reader["values"])
    # fixed and logical types: everything but documentation must match.
    ignored = ("doc", "aliases", "default")
    return {k: v for k, v in writer.items() if k not in ignored} == {
        k: v for k, v in reader.items() if k not in ignored
    }


def appended_defaults(writer: SchemaLike, reader: SchemaLike) -> dict | None:
    """The fields ``reader`` appends to the ``writer`` record, with their defaults, if
    reading with ``writer`` and adding them equals Avro resolution; None otherwise."""
    w = plain_schema(parse(writer))
    r = plain_schema(parse(reader))
    if not (isinstance(w, dict) and isinstance(r, dict) and w.get("type") == r.get("type") == "record"):
        return None
    if w["name"] != r["name"] or len(r["fields"]) < len(w["fields"]):
        return None
    shared, appended = r["fields"][: len(w["fields"])], r["fields"][len(w["fields"]):]
    if not _same_shape(w, {**r, "fields": shared}):
        return None
    if not all("default" in f and isinstance(f["default"], _IMMUTABLE_DEFAULTS) for f in appended):
        return None
    return {f["name"]: f["default"] for f in appended}


class AvroSerializer:
    """Frames records of one schema under one subject: ``serialize(record) -> bytes``.

    The schema id is registered (or looked up) on the first call and kept.
    Timestamps may be given as epoch-millis ints (the convention) or datetimes.
    """

    def __init__(self, registry: SchemaRegistry, subject: str, schema: SchemaLike):
        self.registry = registry
        self.subject = subject
        self.schema = parse(schema)
        self._header: bytes | None = None

    @property
    def schema_id(self) -> int:
        if self._header is None:
            self._header = HEADER.pack(MAGIC_BYTE, self.registry.register(self.subject, self.schema))
        return HEADER.unpack(self._header)[1]

    def serialize(self, record: dict) -> bytes:
        if self._header is None:
            self.schema_id  # noqa: B018 - registers once, sets the header
        out = io.BytesIO()
        out.write(self._header)
        schemaless_writer(out, self.schema, record)
        return out.getvalue()


class AvroDeserializer:
    """Decodes framed values of any registered writer schema into ``reader_schema``.

    ``deserialize(raw) -> dict`` raises NotFramed, UnknownSchemaId,
    IncompatibleSchema or AvroDecodeError (all InvalidEvent); registry outages
    (``RegistryUnavailable``) propagate so the caller can retry rather than
    dead-letter good data. Writer schemas are cached per id; ids the registry
    does not know are remembered for ``unknown_id_ttl_s`` so a flood of garbage
    does not become a flood of registry requests.
    """

    _MAX_UNKNOWN_IDS = 1024

    def __init__(self, registry: SchemaRegistry, reader_schema: SchemaLike, unknown_id_ttl_s: float = 30.0):
        self.registry = registry
        self.unknown_id_ttl_s = unknown_id_ttl_s
        self._reader_identity = normalize(reader_schema)
        self._reader = epoch_millis_schema(reader_schema)
        # schema id -> (writer schema, reader schema or None when not needed,
        #               fields the reader appends with their defaults, or None)
        self._plans: dict[int, tuple[Any, Any, dict | None]] = {}
        self._unknown_until: dict[int, float] = {}

    def _plan(self, schema_id: int) -> tuple[Any, Any, dict | None]:
        expiry = self._unknown_until.get(schema_id)
        if expiry is not None and expiry > time.monotonic():
            raise UnknownSchemaId(f"schema id {schema_id} not in registry")
        try:
            writer = self.registry.get_schema(schema_id)
        except SchemaNotFound:
            if len(self._unknown_until) >= self._MAX_UNKNOWN_IDS:
                self._unknown_until.clear()
            self._unknown_until[schema_id] = time.monotonic() + self.unknown_id_ttl_s
            raise UnknownSchemaId(f"schema id {schema_id} not in registry") from None
        except InvalidSchema:
            raise IncompatibleSchema(f"schema id {schema_id} is not a usable Avro schema") from None
        self._unknown_until.pop(schema_id, None)
        if normalize(writer) == self._reader_identity:
            plan = (self._reader, None, None)
        else:
            writer_millis = epoch_millis_schema(writer)
            appended = appended_defaults(writer_millis, self._reader)
            plan = (writer_millis, None, appended) if appended is not None else (writer_millis, self._reader, None)
        self._plans[schema_id] = plan
        return plan

    def deserialize(self, raw: bytes) -> dict:
        if type(raw) is not bytes:
            if not isinstance(raw, (bytearray, memoryview)):
                raise NotFramed(f"value is {type(raw).__name__}, not bytes")
            raw = bytes(raw)
        size = len(raw)
        if size < HEADER_SIZE:
            raise NotFramed(f"value of {size} bytes, header needs {HEADER_SIZE}")
        if raw[0] != MAGIC_BYTE:
            raise NotFramed(f"magic byte {raw[0]}, expected {MAGIC_BYTE}")
        schema_id = int.from_bytes(raw[1:5], "big")
        plan = self._plans.get(schema_id)
        if plan is None:
            plan = self._plan(schema_id)
        fo = io.BytesIO(raw)
        fo.seek(HEADER_SIZE)
        try:
            record = schemaless_reader(fo, plan[0], plan[1])
        except SchemaResolutionError:
            raise IncompatibleSchema(
                f"schema id {schema_id} does not resolve into the reader schema"
            ) from None
        except Exception as err:  # noqa: BLE001 - any malformed payload is bad input, never a crash
            raise AvroDecodeError(
                f"schema id {schema_id}: {type(err).__name__} in a {size - HEADER_SIZE}-byte payload"
            ) from None
        consumed = fo.tell()
        if consumed != size:
            raise AvroDecodeError(
                f"schema id {schema_id}: {size - consumed} trailing bytes after a {consumed - HEADER_SIZE}-byte record"
            )
        if type(record) is not dict:
            raise IncompatibleSchema(f"schema id {schema_id} does not describe a record")
        if plan[2]:
            record.update(plan[2])
        return record


__all__ = [
    "HEADER_SIZE",
    "MAGIC_BYTE",
    "REASONS",
    "AvroDecodeError",
    "AvroDeserializer",
    "AvroSerializer",
    "IncompatibleSchema",
    "InvalidEvent",
    "InvalidField",
    "InvalidTimestamp",
    "MissingIdentity",
    "NotFramed",
    "UnknownSchemaId",
    "appended_defaults",
    "epoch_millis_schema",
    "frame",
    "unframe",
]
