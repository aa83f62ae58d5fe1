"""The fuzzed path and its properties, shared by the fuzzer and the corpus replay test.

One fuzz input is one Kafka record in a small envelope (``record_from_bytes``
/ ``record_to_bytes``): what a producer controls of a record, i.e. its
CreateTime timestamp, its key and its value. ``check_record`` sends it down
the path both pipelines run (pipelines/flink/events.py
``DecodeAndAnonymize.process_element``, tests/benchmarks/plain_loop.py)::

    OnboardingEventDecoder.decode ─► event_time_ms ─► normalize_event ─► EventAnonymizer.anonymize
      └─ rejected: decoder.dead_letter(stage="decode") ─► encode_dead_letter ─► rows.dead_letter_row

and raises ``PropertyViolation`` when one of these properties fails:

* nothing but ``InvalidEvent`` (reason in ``schemas/wire.py`` ``REASONS``)
  comes out of decoding; normalization and anonymization raise nothing;
* the reason agrees with the header: ``not_framed`` (None, short, no magic
  byte), ``unknown_schema_id`` (an id the registry lacks),
  ``incompatible_schema`` (another subject's schema) exactly when the header
  says so; an accepted event equals fastavro's own resolution of its writer
  schema into the reader schema (the decoder's v1 shortcut included);
* a rejected record becomes a dead letter with that reason, stage
  ``decode``, its key and value byte for byte; it encodes with
  ``encode_dead_letter``, decodes back to the same letter, and becomes a
  warehouse dead-letter row whose hash is that of the raw value;
* an accepted event is routed by its consent (personalization /
  analytics-only / consent-filtered with nothing kept) or dead-lettered by
  the anonymizer with a reason; a routed event carries a 64-hex ``user_key``
  (the HMAC of its identity), an IPv4 /24 or IPv6 /48 ``ip_prefix``, no ``@``
  in ``email_domain`` or ``referrer_host``, and none of its raw user_id,
  anonymous_id, email or IP address (as sent, or the address parsed out of
  it) in its free-text fields (property keys and values, session_id, device,
  os, app_version), matched as the anonymizer matches them: case-insensitive,
  as a substring from 4 characters, else as the whole value (``event_id`` is
  passed through unchanged by design and not checked); and it makes a
  warehouse ``events`` row; a user agent or locale longer than 4,096
  characters was not cached (the anonymizer's caches are bounded in entries,
  not bytes).

No engine and no fuzzer imported: tests/unit/test_fuzz_corpus.py replays the
committed corpus through ``check_record`` without atheris. docs/security.md "Fuzzing".
"""
from __future__ import annotations

import hashlib
import hmac
import io
import ipaddress
import re
import struct
from collections.abc import Mapping
from typing import Any, Optional

from fastavro import schemaless_reader

from onboardflow.schemas import EVENTS_SUBJECT, load_schema
from onboardflow.schemas.schema_registry import SchemaNotFound
from onboardflow.schemas.wire import REASONS, AvroDeserializer, InvalidEvent, epoch_millis_schema
from onboardflow.transforms import anonymize as core
from onboardflow.transforms.anonymize import ANONYMIZE_REASONS, EventAnonymizer, Pseudonymizer
from onboardflow.transforms.decode import READER_SCHEMA, OnboardingEventDecoder
from onboardflow.transforms.kafka.records import KafkaRecord, event_time_ms
from onboardflow.transforms.normalize import normalize_event
from onboardflow.transforms.warehouse import rows

TOPIC = "onboarding.events"
SECRET = b"fuzz-pseudonymization-secret-0123456789"

# Envelope: flags (bit 0: key is None, bit 1: value is None), CreateTime (int64,
# big-endian), key length (uint16), key, then the value to the end.
ENVELOPE = struct.Struct(">BqH")
KEY_NONE, VALUE_NONE = 1, 2

_FRAMING_REASONS = frozenset({"not_framed", "unknown_schema_id", "incompatible_schema"})
DEVICE_CLASSES = frozenset({"desktop", "mobile", "tablet", "bot", "unknown"})
ROUTES = frozenset({core.PERSONALIZATION, core.ANALYTICS_ONLY, core.CONSENT_FILTERED, core.DEAD_LETTER})
_HEX64 = re.compile(r"[0-9a-f]{64}")
_COUNTRY = re.compile(r"[A-Z]{2}")


class PropertyViolation(AssertionError):
    """A fuzz input broke one of the properties in the module docstring."""


def record_to_bytes(key: Optional[bytes], value: Optional[bytes], timestamp_ms: int = 1_717_000_000_000) -> bytes:
    """The envelope of one record (the format of the corpus files)."""
    flags = (KEY_NONE if key is None else 0) | (VALUE_NONE if value is None else 0)
    key = key or b""
    return ENVELOPE.pack(flags, timestamp_ms, len(key)) + key + (value or b"")


def record_from_bytes(data: bytes, offset: int = 0) -> KafkaRecord:
    """The record in an envelope; total: any bytes make a record (short input: all value, no key)."""
    if len(data) < ENVELOPE.size:
        return KafkaRecord(TOPIC, 0, offset, 1_717_000_000_000, None, bytes(data))
    flags, timestamp_ms, key_len = ENVELOPE.unpack_from(data)
    body = data[ENVELOPE.size:]
    key, value = bytes(body[:key_len]), bytes(body[key_len:])
    return KafkaRecord(TOPIC, 0, offset, timestamp_ms, None if flags & KEY_NONE else key,
                       None if flags & VALUE_NONE else value)


class FuzzedPath:
    """The decoder, anonymizer and dead-letter reader of one fuzzing process (built once), and
    what the checks compare with: the ids of the events subject, each with its writer schema."""

    def __init__(self) -> None:
        self.decoder = OnboardingEventDecoder()
        self.anonymizer = EventAnonymizer(Pseudonymizer(SECRET))
        registry = self.decoder.registry
        self.dead_letters = AvroDeserializer(registry, load_schema("dead_letter"))
        self.reader = epoch_millis_schema(load_schema(*READER_SCHEMA))
        self.event_writers = {i: epoch_millis_schema(registry.get_schema(i)) for i in registry.versions(EVENTS_SUBJECT)}


def _fail(message: str) -> None:
    raise PropertyViolation(message)


def check_record(path: FuzzedPath, record: KafkaRecord) -> str:
    """Run ``record`` down the path, check every property; return its outcome (a reason or a route)."""
    try:
        event = path.decoder.decode(record)
        event_time_ms(event)
    except InvalidEvent as error:
        return _check_decode_dead_letter(path, record, error)
    except Exception as error:  # noqa: BLE001 - the property under test
        _fail(f"decode raised {type(error).__name__}: {error}")
    _check_resolution(path, record.value, event)
    calls = _cache_calls()
    try:
        normalized, _ = normalize_event(event)
        route, out, stripped = path.anonymizer.anonymize(normalized)
    except Exception as error:  # noqa: BLE001 - the property under test
        _fail(f"normalize/anonymize raised {type(error).__name__}: {error}")
    _check_long_values_not_cached(normalized, calls)
    if route not in ROUTES:
        _fail(f"unknown route {route!r}")
    consent = event["consent"]
    if route == core.DEAD_LETTER:
        if out.get("reason") not in ANONYMIZE_REASONS or out.get("stage") != "anonymize":
            _fail(f"anonymize dead letter without a known reason: {out.get('reason')!r}")
        rows.dead_letter_row(out)
        return f"anonymize:{out['reason']}"
    expected = (core.PERSONALIZATION if consent["personalization"]
                else core.ANALYTICS_ONLY if consent["analytics"] else core.CONSENT_FILTERED)
    if route != expected:
        _fail(f"consent {consent} routed to {route}, expected {expected}")
    if route == core.CONSENT_FILTERED:
        if out is not None:
            _fail("a consent-filtered event kept a record")
        return route
    _check_anonymized(event, out)
    return route


def _check_resolution(path: FuzzedPath, value: bytes, event: Mapping[str, Any]) -> None:
    """The event is what Avro resolution of its writer schema into the reader schema gives
    (the decoder reads an older version with a shortcut: schemas/wire.py)."""
    schema_id = int.from_bytes(value[1:5], "big")
    if schema_id not in path.event_writers:
        _fail(f"an event decoded from schema id {schema_id}, not a version of {EVENTS_SUBJECT}")
    resolved = schemaless_reader(io.BytesIO(value[5:]), path.event_writers[schema_id], path.reader)
    if resolved != event:
        _fail(f"the event decoded from schema id {schema_id} differs from Avro's resolution")


def _expected_framing_reason(path: FuzzedPath, value: Optional[bytes]) -> Optional[str]:
    """The reason a value must be rejected for, judged from its header alone (None: by its payload)."""
    if value is None or len(value) < 5 or value[0] != 0:
        return "not_framed"
    schema_id = int.from_bytes(value[1:5], "big")
    try:
        path.decoder.registry.get_schema(schema_id)
    except SchemaNotFound:
        return "unknown_schema_id"
    return None if schema_id in path.event_writers else "incompatible_schema"


def _check_decode_dead_letter(path: FuzzedPath, record: KafkaRecord, error: InvalidEvent) -> str:
    if error.reason not in REASONS:
        _fail(f"InvalidEvent with undocumented reason {error.reason!r}")
    expected = _expected_framing_reason(path, record.value)
    framing = error.reason in _FRAMING_REASONS
    if (expected is not None or framing) and expected != error.reason:
        _fail(f"rejected as {error.reason}, its header says {expected or 'a readable event version'}")
    letter = path.decoder.dead_letter(record, error, stage="decode")
    if letter["reason"] != error.reason or letter["stage"] != "decode" or not letter["reason"]:
        _fail(f"dead letter reason/stage {letter['reason']!r}/{letter['stage']!r} for {error.reason!r}")
    if letter["value"] != record.value or letter["key"] != record.key:
        _fail("dead letter does not keep the raw key and value byte for byte")
    try:
        encoded = path.decoder.encode_dead_letter(letter)
    except Exception as err:  # noqa: BLE001 - the property under test
        _fail(f"encode_dead_letter raised {type(err).__name__}: {err}")
    if path.dead_letters.deserialize(encoded) != letter:
        _fail("the encoded dead letter does not decode back to the same letter")
    try:
        row = rows.dead_letter_row(letter)
    except Exception as err:  # noqa: BLE001 - the property under test
        _fail(f"dead_letter_row raised {type(err).__name__}: {err}")
    if row[-1] != hashlib.sha256(record.value or b"").hexdigest():
        _fail("dead-letter row hash is not the raw value's")
    return error.reason


_CACHED = (core.device_class, core.country_from_locale)
#: No cache may keep a client value longer than this (real user agents: a few hundred characters).
LONGEST_CACHED = 4096


def _cache_calls() -> list[int]:
    return [f.cache_info().hits + f.cache_info().misses for f in _CACHED]


def _check_long_values_not_cached(event: Mapping[str, Any], before: list[int]) -> None:
    """The anonymizer's caches (bounded in entries, not bytes) never keep a long client value."""
    context = event.get("context") or {}
    for f, value, calls_before, calls_after in zip(
            _CACHED, (context.get("user_agent"), context.get("locale")), before, _cache_calls()):
        if isinstance(value, str) and len(value) > LONGEST_CACHED and calls_after != calls_before:
            _fail(f"{f.__name__} cached a {len(value)}-character value")


def _pii_needles(event: Mapping[str, Any]) -> list[str]:
    """The raw identifiers of an event, plus the address parsed out of its IP field."""
    context = event.get("context") or {}
    needles = [event.get("user_id"), event.get("anonymous_id"), context.get("email"), context.get("ip")]
    address = _parsed_address(context.get("ip"))
    if address is not None:
        needles.append(address)
    return [n for n in needles if isinstance(n, str) and n]


def _parsed_address(raw: Any) -> Optional[str]:
    """The address in an IP field as the anonymizer reads it (port, list, brackets, zone removed)."""
    if not isinstance(raw, str):
        return None
    text = raw.strip().split(",", 1)[0].strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return None


def _leaks(text: str, needle: str) -> bool:
    return needle.lower() in text.lower() if len(needle) >= 4 else text.lower() == needle.lower()


def _free_text(out: Mapping[str, Any]):
    for i, (key, value) in enumerate(out["properties"].items()):
        yield f"the key of property #{i}", key
        yield f"the value of property #{i}", value if isinstance(value, str) else str(value)
    for field in ("session_id", "device", "os", "app_version"):
        if isinstance(out.get(field), str):
            yield field, out[field]


def _check_anonymized(event: Mapping[str, Any], out: Mapping[str, Any]) -> None:
    user_id, anonymous_id = event.get("user_id") or None, event.get("anonymous_id") or None
    identity = user_id.encode() if user_id else b"anon:" + anonymous_id.encode()
    if not _HEX64.fullmatch(out["user_key"] or "") or out["user_key"] != hmac.new(
            SECRET, identity, hashlib.sha256).hexdigest():
        _fail("user_key is not the HMAC of the event's identity")
    if out["identified"] is not (user_id is not None):
        _fail("identified does not say whether user_id was set")
    prefix = out["ip_prefix"]
    if prefix is not None:
        network = ipaddress.ip_network(prefix)
        wanted = 24 if network.version == 4 else 48
        if network.prefixlen != wanted:
            _fail(f"ip_prefix {prefix} is not an IPv4 /24 or IPv6 /48")
    for field in ("email_domain", "referrer_host"):
        if "@" in (out.get(field) or ""):
            _fail(f"{field} keeps an @")
    if out["country"] is not None and not _COUNTRY.fullmatch(out["country"]):
        _fail(f"country {out['country']!r} is not two capital letters")
    if out["device_class"] not in DEVICE_CLASSES:
        _fail(f"device_class {out['device_class']!r}")
    try:
        rows.event_row(out)
    except Exception as err:  # noqa: BLE001 - the property under test
        _fail(f"an accepted event does not make a warehouse row: {type(err).__name__}: {err}")
    for needle in _pii_needles(event):
        for where, text in _free_text(out):
            if _leaks(text, needle):
                _fail(f"raw PII survived in {where}")
