"""Confluent framing, the serializer/deserializer pair and the InvalidEvent codes."""
import io
import pickle

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onboardflow.schemas import EVENTS_SUBJECT, default_registry, load_schema, load_schema_json
from onboardflow.schemas.schema_registry import FileSchemaRegistry, RegistryUnavailable, SchemaRegistry
from onboardflow.schemas.wire import (
    HEADER_SIZE,
    REASONS,
    AvroDecodeError,
    AvroDeserializer,
    AvroSerializer,
    IncompatibleSchema,
    InvalidEvent,
    InvalidField,
    InvalidTimestamp,
    MissingIdentity,
    NotFramed,
    UnknownSchemaId,
    appended_defaults,
    epoch_millis_schema,
    frame,
    unframe,
)

T0 = 1_717_000_000_000
EVENT = {
    "event_id": "e-1",
    "event_type": "signup",
    "user_id": "acct-77",
    "anonymous_id": None,
    "session_id": None,
    "occurred_at": T0,
    "received_at": T0 + 10,
    "properties": {"plan": "trial"},
    "context": {"device": None, "os": None, "app_version": None, "locale": None,
                "ip": "198.51.100.23", "user_agent": None, "email": "grace@example.com"},
    "consent": {"analytics": True, "personalization": False, "marketing": False},
    "referrer": None,
}


class CountingRegistry(SchemaRegistry):
    """The shipped registry, counting schema fetches (to pin the caching)."""

    def __init__(self):
        self.inner = default_registry()
        self.fetches = []

    def register(self, subject, schema):
        return self.inner.register(subject, schema)

    def get_schema(self, schema_id):
        self.fetches.append(schema_id)
        return self.inner.get_schema(schema_id)

    def latest(self, subject):
        return self.inner.latest(subject)

    def subjects(self):
        return self.inner.subjects()

    def versions(self, subject):
        return self.inner.versions(subject)


def v2_bytes(event=EVENT) -> bytes:
    return AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", 2)).serialize(event)


def test_frame_is_magic_zero_then_big_endian_id_then_payload():
    assert frame(258, b"avro") == b"\x00\x00\x00\x01\x02avro"
    assert unframe(b"\x00\x00\x00\x01\x02avro") == (258, b"avro")
    assert unframe(frame(2**32 - 1, b"")) == (2**32 - 1, b"")


@pytest.mark.parametrize("raw", [b"", b"\x00\x00\x00\x01", None])
def test_unframe_rejects_values_shorter_than_the_header(raw):
    with pytest.raises(NotFramed) as err:
        unframe(raw)
    assert err.value.reason == "not_framed"


def test_unframe_rejects_a_wrong_magic_byte():
    with pytest.raises(NotFramed, match="magic byte 1"):
        unframe(b"\x01\x00\x00\x00\x02xyz")


def test_serializer_output_is_confluent_framed_avro_with_the_registered_id():
    raw = v2_bytes()
    schema_id, payload = unframe(raw)
    assert schema_id == 2
    reader = epoch_millis_schema(load_schema("onboarding_event", 2))
    assert fastavro.schemaless_reader(io.BytesIO(payload), reader) == EVENT


def test_serializer_accepts_datetimes_too_and_deserializer_always_returns_millis():
    import datetime as dt

    when = dt.datetime(2024, 5, 29, 16, 26, 40, tzinfo=dt.timezone.utc)
    raw = v2_bytes({**EVENT, "occurred_at": when, "received_at": when})
    decoded = AvroDeserializer(default_registry(), load_schema("onboarding_event", 2)).deserialize(raw)
    assert decoded["occurred_at"] == decoded["received_at"] == T0
    assert type(decoded["occurred_at"]) is int


def test_deserializer_fetches_each_writer_schema_once():
    registry = CountingRegistry()
    deserializer = AvroDeserializer(registry, load_schema("onboarding_event", 2))
    v1 = AvroSerializer(registry, EVENTS_SUBJECT, load_schema("onboarding_event", 1))
    v1_event = {k: v for k, v in EVENT.items() if k != "referrer"}
    for _ in range(3):
        deserializer.deserialize(v2_bytes())
        deserializer.deserialize(v1.serialize(v1_event))
    assert sorted(registry.fetches) == [1, 2]


def test_unknown_schema_ids_are_remembered_rather_than_refetched():
    registry = CountingRegistry()
    deserializer = AvroDeserializer(registry, load_schema("onboarding_event", 2))
    for _ in range(5):
        with pytest.raises(UnknownSchemaId, match="schema id 4242"):
            deserializer.deserialize(frame(4242, b"\x00"))
    assert registry.fetches == [4242]


def test_registry_outage_is_not_an_invalid_event():
    class DownRegistry(CountingRegistry):
        def get_schema(self, schema_id):
            raise RegistryUnavailable("connection refused")

    deserializer = AvroDeserializer(DownRegistry(), load_schema("onboarding_event", 2))
    with pytest.raises(RegistryUnavailable):
        deserializer.deserialize(v2_bytes())


@pytest.mark.parametrize(
    "raw,reason",
    [
        (b"", "not_framed"),
        (b"\x00\x00", "not_framed"),
        (b"\x05\x00\x00\x00\x02" + b"\x00" * 20, "not_framed"),
        (frame(999, b"\x02ab"), "unknown_schema_id"),
        (frame(3, b"\x00" * 40), "incompatible_schema"),
    ],
    ids=["empty", "short", "bad-magic", "unknown-id", "dead-letter-schema-on-events"],
)
def test_deserializer_reason_codes_for_bad_frames(raw, reason):
    with pytest.raises(InvalidEvent) as err:
        AvroDeserializer(default_registry(), load_schema("onboarding_event", 2)).deserialize(raw)
    assert err.value.reason == reason


def test_truncated_payload_is_an_avro_decode_error_without_values_in_the_detail():
    raw = v2_bytes()
    deserializer = AvroDeserializer(default_registry(), load_schema("onboarding_event", 2))
    for cut in range(HEADER_SIZE, len(raw)):
        with pytest.raises(AvroDecodeError) as err:
            deserializer.deserialize(raw[:cut])
        assert err.value.reason == "avro_decode_error"
        for value in ("acct-77", "grace@example.com", "198.51.100.23", "trial"):
            assert value not in err.value.detail


def test_trailing_garbage_is_an_avro_decode_error():
    with pytest.raises(AvroDecodeError, match="3 trailing bytes"):
        AvroDeserializer(default_registry(), load_schema("onboarding_event", 2)).deserialize(v2_bytes() + b"xyz")


def test_invalid_utf8_in_a_string_is_an_avro_decode_error_that_does_not_echo_the_bytes():
    payload = bytearray(unframe(v2_bytes({**EVENT, "event_id": "abc"}))[1])
    assert payload[:4] == b"\x06abc"
    payload[1:4] = b"\xff\xfe\xfd"
    with pytest.raises(AvroDecodeError) as err:
        AvroDeserializer(default_registry(), load_schema("onboarding_event", 2)).deserialize(frame(2, bytes(payload)))
    assert "UnicodeDecodeError" in err.value.detail
    assert "\\xff" not in err.value.detail


def test_enum_index_out_of_range_is_an_avro_decode_error():
    payload = bytearray(unframe(v2_bytes({**EVENT, "event_id": "abc"}))[1])
    payload[4] = 0x7E  # zigzag 63: no such EventType symbol
    with pytest.raises(AvroDecodeError):
        AvroDeserializer(default_registry(), load_schema("onboarding_event", 2)).deserialize(frame(2, bytes(payload)))


def test_reason_codes_are_a_fixed_documented_set():
    assert set(REASONS) == {
        "not_framed", "unknown_schema_id", "incompatible_schema", "avro_decode_error",
        "missing_identity", "invalid_timestamp", "invalid_field",
    }
    for cls in (NotFramed, UnknownSchemaId, IncompatibleSchema, AvroDecodeError, MissingIdentity,
                InvalidTimestamp, InvalidField):
        error = cls("detail")
        assert isinstance(error, InvalidEvent)
        assert error.reason in REASONS


@pytest.mark.parametrize("error", [InvalidEvent("invalid_field", "event_id: length 0"), MissingIdentity("no ids")])
def test_invalid_events_survive_pickling_between_workers(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.reason, copy.detail, str(copy)) == (error.reason, error.detail, str(error))


def test_serializer_registers_its_schema_once(tmp_path):
    registry = FileSchemaRegistry(tmp_path / "registry.json", writable=True)
    serializer = AvroSerializer(registry, "things-value", {"type": "record", "name": "Thing",
                                                           "fields": [{"name": "n", "type": "int"}]})
    first = serializer.serialize({"n": 1})
    second = serializer.serialize({"n": 2})
    assert unframe(first) == (1, b"\x02") and unframe(second) == (1, b"\x04")
    assert registry.versions("things-value") == [1]


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda schema_id, payload: frame(schema_id, payload),
              st.sampled_from([1, 2, 3, 4, 5, 6, 7, 2**32 - 1]), st.binary(max_size=200)),
))
def test_deserializer_raises_only_invalid_event_on_arbitrary_bytes(raw):
    deserializer = AvroDeserializer(default_registry(), load_schema("onboarding_event", 2))
    try:
        record = deserializer.deserialize(raw)
    except InvalidEvent as err:
        assert err.reason in REASONS
    else:
        assert set(record) == {f["name"] for f in load_schema_json("onboarding_event", 2)["fields"]}



def test_v1_to_v2_takes_the_appended_fields_shortcut():
    v1, v2 = load_schema("onboarding_event", 1), load_schema("onboarding_event", 2)
    assert appended_defaults(v1, v2) == {"referrer": None}
    assert appended_defaults(v2, v1) is None  # v1 readers must drop referrer: full resolution


def test_the_shortcut_is_refused_for_symbols_the_reader_lacks_which_resolve_to_its_default(tmp_path):
    future = load_schema_json("onboarding_event", 1)
    future["fields"][1]["type"]["symbols"].append("workspace_created")
    assert appended_defaults(future, load_schema("onboarding_event", 2)) is None

    registry = FileSchemaRegistry(tmp_path / "registry.json", writable=True)
    registry.register(EVENTS_SUBJECT, load_schema_json("onboarding_event", 2))
    writer = AvroSerializer(registry, EVENTS_SUBJECT, future)
    v1_event = {k: v for k, v in EVENT.items() if k != "referrer"}
    deserializer = AvroDeserializer(registry, load_schema("onboarding_event", 2))
    assert deserializer.deserialize(writer.serialize({**v1_event, "event_type": "workspace_created"})) == {
        **EVENT, "event_type": "unknown"
    }
    assert deserializer.deserialize(writer.serialize(v1_event)) == EVENT


def test_the_shortcut_is_refused_for_reordered_fields_and_mutable_defaults():
    v1 = load_schema_json("onboarding_event", 1)
    reordered = {**v1, "fields": [v1["fields"][1], v1["fields"][0], *v1["fields"][2:]]}
    assert appended_defaults(v1, reordered) is None
    with_map = {**v1, "fields": v1["fields"] + [{"name": "tags", "type": {"type": "map", "values": "string"},
                                                   "default": {}}]}
    assert appended_defaults(v1, with_map) is None


text = st.text(max_size=12)
optional_text = st.none() | text


@settings(max_examples=150, deadline=None)
@given(event=st.fixed_dictionaries({
    "event_id": text,
    "event_type": st.sampled_from(load_schema_json("onboarding_event", 1)["fields"][1]["type"]["symbols"]),
    "user_id": optional_text,
    "anonymous_id": optional_text,
    "session_id": optional_text,
    "occurred_at": st.integers(-(2**62), 2**62),
    "received_at": st.integers(-(2**62), 2**62),
    "properties": st.dictionaries(text, text, max_size=4),
    "context": st.fixed_dictionaries({k: optional_text for k in
                                      ("device", "os", "app_version", "locale", "ip", "user_agent", "email")}),
    "consent": st.fixed_dictionaries({k: st.booleans() for k in ("analytics", "personalization", "marketing")}),
}))
def test_the_shortcut_gives_exactly_what_avro_resolution_gives(event):
    raw = AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", 1)).serialize(event)
    resolved = fastavro.schemaless_reader(
        io.BytesIO(unframe(raw)[1]),
        epoch_millis_schema(load_schema("onboarding_event", 1)),
        epoch_millis_schema(load_schema("onboarding_event", 2)),
    )
    shortcut = AvroDeserializer(default_registry(), load_schema("onboarding_event", 2)).deserialize(raw)
    assert shortcut == resolved == {**event, "referrer": None}
    assert list(shortcut) == list(resolved)
