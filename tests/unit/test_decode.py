"""OnboardingEventDecoder: valid events out, everything else dead-lettered."""
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onboardflow.schemas import DEAD_LETTER_SUBJECT, EVENTS_SUBJECT, default_registry, load_schema
from onboardflow.schemas.schema_registry import RegistryUnavailable
from onboardflow.schemas.units import DAY_MS
from onboardflow.schemas.wire import REASONS, AvroDeserializer, AvroSerializer, InvalidEvent, frame, unframe
from onboardflow.transforms.decode import OnboardingEventDecoder
from onboardflow.transforms.kafka.records import KafkaRecord

T0 = 1_717_000_000_000
PII = ("acct-1042", "anon-77", "ada@example.org", "203.0.113.7")

EVENT = {
    "event_id": "0b6f7a52-3c1d-4e8a-9f10-5d2c7b8e9a01",
    "event_type": "feature_used",
    "user_id": "acct-1042",
    "anonymous_id": "anon-77",
    "session_id": "s-1",
    "occurred_at": T0,
    "received_at": T0 + 120,
    "properties": {"feature": "dashboards"},
    "context": {"device": "Pixel 8", "os": "Android 14", "app_version": "3.2.0", "locale": "de-DE",
                "ip": "203.0.113.7", "user_agent": "Mozilla/5.0 (Linux; Android 14)", "email": "ada@example.org"},
    "consent": {"analytics": True, "personalization": True, "marketing": True},
    "referrer": "https://partner.example/",
}
V1_EVENT = {k: v for k, v in EVENT.items() if k != "referrer"}


def v2_value(**changes) -> bytes:
    return AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", 2)).serialize(
        {**EVENT, **changes}
    )


def v1_value(**changes) -> bytes:
    return AvroSerializer(default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", 1)).serialize(
        {**V1_EVENT, **changes}
    )


def record(value, offset=0, key=b"k") -> KafkaRecord:
    return KafkaRecord("onboarding.events", 1, offset, T0 + 500, key, value)


def test_decodes_v2_events_with_millis_timestamps():
    event = OnboardingEventDecoder().decode(record(v2_value()))
    assert event == EVENT
    assert type(event["occurred_at"]) is int and type(event["received_at"]) is int


def test_decodes_v1_events_into_the_v2_shape():
    assert OnboardingEventDecoder().decode(record(v1_value())) == {**V1_EVENT, "referrer": None}


@pytest.mark.parametrize(
    "value,reason",
    [
        (None, "not_framed"),
        (b"", "not_framed"),
        (b"hello world, not avro", "not_framed"),
        (b'{"event_id": "e-1"}', "not_framed"),
        (frame(77, b"\x00" * 30), "unknown_schema_id"),
        (frame(4, b"\x00" * 30), "incompatible_schema"),
        (v2_value()[:-7], "avro_decode_error"),
        (v2_value() + b"\x00", "avro_decode_error"),
        (frame(2, b"\xff" * 40), "avro_decode_error"),
        (v2_value(user_id=None, anonymous_id=None), "missing_identity"),
        (v2_value(user_id="", anonymous_id=""), "missing_identity"),
        (v2_value(occurred_at=0, received_at=0), "invalid_timestamp"),
        (v2_value(occurred_at=946_684_799_999), "invalid_timestamp"),
        (v2_value(received_at=-1), "invalid_timestamp"),
        (v2_value(occurred_at=T0 + DAY_MS + 1, received_at=T0), "invalid_timestamp"),
        (v2_value(occurred_at=5_000_000_000_000, received_at=5_000_000_000_000), "invalid_timestamp"),
        (v2_value(event_id=""), "invalid_field"),
        (v2_value(event_id="x" * 129), "invalid_field"),
    ],
    ids=[
        "tombstone", "empty", "text", "json", "unknown-id", "segment-change-schema", "truncated",
        "trailing-byte", "garbage-payload", "no-identity", "empty-identity", "epoch-zero",
        "before-2000", "received-negative", "too-far-in-future", "year-2128", "empty-event-id",
        "overlong-event-id",
    ],
)
def test_each_kind_of_bad_record_raises_its_reason_and_never_leaks_values(value, reason):
    with pytest.raises(InvalidEvent) as err:
        OnboardingEventDecoder().decode(record(value))
    assert err.value.reason == reason
    assert not any(secret in err.value.detail for secret in PII)


def test_future_skew_is_configurable_and_inclusive():
    at_limit = record(v2_value(occurred_at=T0 + DAY_MS, received_at=T0))
    assert OnboardingEventDecoder().decode(at_limit)["occurred_at"] == T0 + DAY_MS
    with pytest.raises(InvalidEvent, match="invalid_timestamp"):
        OnboardingEventDecoder(max_future_skew_ms=60_000).decode(at_limit)
    # Late arrival (occurred long before received) is normal for offline clients.
    assert OnboardingEventDecoder().decode(record(v2_value(occurred_at=T0 - 30 * DAY_MS)))


def test_one_identity_is_enough():
    decoder = OnboardingEventDecoder()
    assert decoder.decode(record(v2_value(user_id=None)))["anonymous_id"] == "anon-77"
    assert decoder.decode(record(v2_value(anonymous_id=None)))["user_id"] == "acct-1042"


def test_decoder_pickles_as_configuration_and_rebuilds_lazily():
    decoder = OnboardingEventDecoder(max_future_skew_ms=1234)
    decoder.decode(record(v2_value()))
    copy = pickle.loads(pickle.dumps(decoder))
    assert (copy.registry_url, copy.max_future_skew_ms) == (None, 1234)
    assert copy._deserializer is None
    assert copy.decode(record(v2_value())) == EVENT
    assert len(pickle.dumps(decoder)) < 300


def test_decoder_reads_the_registry_it_is_pointed_at(tmp_path):
    # A registry where id 1 is a different schema: the decoder must use it.
    path = tmp_path / "registry.json"
    path.write_text('{"schemas": [], "subjects": {}}')
    with pytest.raises(InvalidEvent, match="unknown_schema_id"):
        OnboardingEventDecoder(registry_url=f"file://{path}").decode(record(v2_value()))


def test_dead_letter_keeps_the_raw_bytes_and_reason():
    decoder = OnboardingEventDecoder()
    bad = record(v2_value(user_id=None, anonymous_id=None), offset=42, key=b"acct-1042")
    with pytest.raises(InvalidEvent) as err:
        decoder.decode(bad)
    dl = decoder.dead_letter(bad, err.value)
    assert {k: v for k, v in dl.items() if k != "failed_at"} == {
        "source_topic": "onboarding.events",
        "source_partition": 1,
        "source_offset": 42,
        "kafka_timestamp": T0 + 500,
        "key": b"acct-1042",
        "value": bad.value,
        "reason": "missing_identity",
        "detail": err.value.detail,
        "stage": "decode",
    }
    assert type(dl["failed_at"]) is int and dl["failed_at"] > T0


def test_encoded_dead_letters_are_framed_with_the_dead_letter_schema_id():
    decoder = OnboardingEventDecoder()
    bad = record(b"\x07garbage")
    dl = decoder.dead_letter(bad, InvalidEvent("not_framed", "magic byte 7, expected 0"), stage="anonymize")
    raw = decoder.encode_dead_letter(dl)
    assert unframe(raw)[0] == default_registry().lookup(DEAD_LETTER_SUBJECT, load_schema("dead_letter")) == 3
    assert AvroDeserializer(default_registry(), load_schema("dead_letter")).deserialize(raw) == dl


def test_dead_letters_for_other_errors_name_the_error_class_but_never_its_message():
    decoder = OnboardingEventDecoder()
    bad = record(v2_value())
    outage = decoder.dead_letter(bad, RegistryUnavailable("GET schemas/ids/2: connection refused"))
    assert (outage["reason"], outage["detail"]) == ("registry_unavailable", "RegistryUnavailable")
    bug = decoder.dead_letter(bad, KeyError("ada@example.org"))
    assert (bug["reason"], bug["detail"]) == ("internal_error", "KeyError")
    assert bug["value"] == bad.value


@st.composite
def mutated_events(draw):
    """Valid v1/v2 values with bytes cut, flipped or inserted."""
    raw = bytearray(draw(st.sampled_from([v2_value(), v1_value(), v2_value(properties={})])))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["cut", "flip", "insert"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if action == "cut":
            raw = raw[:at]
        elif action == "flip" and raw:
            raw[at] = draw(st.integers(0, 255))
        else:
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


@settings(max_examples=400, deadline=None)
@given(value=st.one_of(
    st.none(),
    st.binary(max_size=300),
    st.builds(frame, st.sampled_from([1, 2, 3, 4, 5, 6, 99]), st.binary(max_size=300)),
    mutated_events(),
))
def test_decode_raises_nothing_but_invalid_event_on_arbitrary_bytes(value):
    try:
        event = OnboardingEventDecoder().decode(record(value))
    except InvalidEvent as err:
        assert err.reason in REASONS
    else:
        assert event["event_id"] and (event["user_id"] or event["anonymous_id"])


def _decode_or_dead_letter(decoder, records):
    """What the Kafka source does with each record: the event, or its dead letter."""
    events, dead_letters = [], []
    for rec in records:
        try:
            events.append(decoder.decode(rec))
        except InvalidEvent as error:
            dead_letters.append(decoder.dead_letter(rec, error))
    return events, dead_letters


def test_decoding_splits_events_from_dead_letters_with_reasons_and_raw_bytes():
    good_v2 = record(v2_value(event_id="e-1", occurred_at=T0 + 1, received_at=T0 + 5), offset=1)
    good_v1 = record(v1_value(event_id="e-2", occurred_at=T0 + 2, received_at=T0 + 5), offset=2)
    records = [
        good_v2,
        good_v1,
        record(b"", offset=3),
        record(None, offset=4),
        record(frame(77, b"\x00"), offset=5),
        record(v2_value(user_id=None, anonymous_id=None), offset=6),
        record(v2_value(occurred_at=1), offset=7),
        record(v2_value()[:-3], offset=8),
    ]
    events, dead_letters = _decode_or_dead_letter(OnboardingEventDecoder(), records)
    assert [(e["event_id"], e["occurred_at"]) for e in events] == [("e-1", T0 + 1), ("e-2", T0 + 2)]
    assert [(e["event_type"], e["referrer"]) for e in events] == [
        ("feature_used", "https://partner.example/"), ("feature_used", None)]
    assert [(dl["source_offset"], dl["reason"], dl["stage"]) for dl in dead_letters] == [
        (3, "not_framed", "decode"),
        (4, "not_framed", "decode"),
        (5, "unknown_schema_id", "decode"),
        (6, "missing_identity", "decode"),
        (7, "invalid_timestamp", "decode"),
        (8, "avro_decode_error", "decode"),
    ]
    assert [dl["value"] for dl in dead_letters] == [r.value for r in records[2:]]
