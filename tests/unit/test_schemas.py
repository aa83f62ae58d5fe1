"""The Avro contract: every record type round-trips, and the event schema evolves safely."""
import io
import json

import fastavro
import pytest

from onboardflow.schemas import (
    DEAD_LETTER_SUBJECT,
    DRIFT_EVENT_SUBJECT,
    EVENTS_SUBJECT,
    SCHEMA_DIR,
    SEGMENT_CHANGES_SUBJECT,
    SUBJECTS,
    USER_PROFILE_SUBJECT,
    default_registry,
    load_schema,
    load_schema_json,
    schema_path,
    schema_versions,
)
from onboardflow.schemas.wire import AvroDeserializer, AvroSerializer

T0 = 1_717_000_000_000  # 2024-05-29, epoch millis

V1_EVENT = {
    "event_id": "7f1c2a9e-1b7c-4a57-9d43-0c1f6f1b2a10",
    "event_type": "tutorial_step",
    "user_id": "acct-1042",
    "anonymous_id": "anon-9",
    "session_id": "sess-3",
    "occurred_at": T0,
    "received_at": T0 + 250,
    "properties": {"step": "2", "step_total": "5"},
    "context": {
        "device": "iPhone15,2",
        "os": "iOS 17.4",
        "app_version": "3.2.0",
        "locale": "en-GB",
        "ip": "203.0.113.7",
        "user_agent": "Mozilla/5.0 (iPhone)",
        "email": "ada@example.org",
    },
    "consent": {"analytics": True, "personalization": True, "marketing": False},
}
V2_EVENT = {**V1_EVENT, "event_type": "invite_sent", "referrer": "https://partner.example/launch"}

RECORDS = {
    ("onboarding_event", 1): V1_EVENT,
    ("onboarding_event", 2): V2_EVENT,
    # A profile as the pipeline writes it (every field of schemas/contract.py).
    ("user_profile", None): {
        "user_key": "uk_5b0e", "version": T0 * 1000 + 2, "as_of": T0, "updated_at": T0 + 1000,
        "engagement_score": 0.62, "intent_score": 0.18, "feature_usage_score": 25.0,
        "first_event_at": T0 - 5 * 86_400_000, "last_event_at": T0, "signup_at": T0 - 4 * 86_400_000,
        "recency_ms": 0, "events_total": 54, "events_7d": 14, "events_30d": 40,
        "active_days_7d": 3, "active_days_30d": 5,
        "event_counts": {"page_view": 9, "feature_used": 3}, "features_used": {"dashboards": 3, "invites": 1},
        "distinct_features": 2, "milestones": ["tutorial_completed"],
        "tutorial_steps_done": 5, "tutorial_step_total": 5, "onboarding_progress": 1.0,
        "days_since_signup": 4.0, "purchased_plan": "pro",
        "session_count": 6, "sessions_7d": 3, "sessions_30d": 6, "avg_session_duration_s": 412.5,
        "last_session_duration_s": 20.7, "avg_events_per_session": 9.0,
        "visits": 5, "median_visit_events": 8.0, "median_visit_duration_s": 300.0,
        "account_id": "acct-00014", "signup_plan": "trial", "email_domain": "example.org",
        "device_class": "mobile", "country": "GB", "os": "ios",
        "rfm_last_purchase_at": 1_767_571_200_000, "rfm_recency_days": 1.5, "rfm_frequency": 2,
        "rfm_monetary": 73.0, "rfm_amounts_ignored": 0, "rfm_r": 5, "rfm_f": 4, "rfm_m": 3,
        "rfm_reference": "rfm-000001",
        "plan": "trial", "account_tier": "smb", "industry": "software", "company_size": 40,
        "segments": ["activated", "trial"],
        "cluster_id": 2, "segment_label": "explorer", "propensity": 0.71,
        "model_version": "seg-000003+prop-000002", "onboarding_track": "guided",
        "experiments": {"checklist_first": "checklist"},
    },
    ("segment_change", None): {
        "user_key": "uk_5b0e",
        "segment": "activated",
        "change": "entered",
        "at": T0,
        "reason": "rule:activation_3_features",
        "version": T0,
    },
    ("dead_letter", None): {
        "source_topic": "onboarding.events",
        "source_partition": 3,
        "source_offset": 123_456,
        "kafka_timestamp": T0,
        "key": b"acct-1042",
        "value": b"\x00\x00\x00\x00\x02\xff\xfe",
        "reason": "avro_decode_error",
        "detail": "schema id 2: EOFError in a 2-byte payload",
        "stage": "decode",
        "failed_at": T0 + 5,
    },
    ("drift_event", None): {
        "drift_id": "d-1",
        "model_name": "propensity",
        "model_version": "v3",
        "detector": "ADWIN",
        "metric": "error:log_loss",
        "value": 0.41,
        "threshold": 0.3,
        "window_events": 52_000,
        "action": "reset",
        "detected_at": T0,
        "version": T0,
    },
}


def _write(schema, record) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    return out.getvalue()


@pytest.mark.parametrize("name,version", list(RECORDS), ids=[f"{n}-v{v}" for n, v in RECORDS])
def test_every_record_type_round_trips_through_the_wire_format_with_int_timestamps(name, version):
    registry = default_registry()
    schema = load_schema(name, version)
    record = RECORDS[(name, version)]
    raw = AvroSerializer(registry, SUBJECTS[name], schema).serialize(record)
    assert AvroDeserializer(registry, schema).deserialize(raw) == record


def test_profiles_with_unknown_model_fields_round_trip_as_nulls():
    profile = dict(RECORDS[("user_profile", None)])
    for field in ("cluster_id", "segment_label", "propensity", "model_version", "onboarding_track",
                  "days_since_signup", "signup_at"):
        profile[field] = None
    raw = AvroSerializer(default_registry(), USER_PROFILE_SUBJECT, load_schema("user_profile")).serialize(profile)
    assert AvroDeserializer(default_registry(), load_schema("user_profile")).deserialize(raw) == profile


def test_v1_event_decodes_into_v2_reader_with_null_referrer():
    registry = default_registry()
    raw = AvroSerializer(registry, EVENTS_SUBJECT, load_schema("onboarding_event", 1)).serialize(V1_EVENT)
    decoded = AvroDeserializer(registry, load_schema("onboarding_event", 2)).deserialize(raw)
    assert decoded == {**V1_EVENT, "referrer": None}


def test_v2_event_with_new_field_and_symbol_decodes_with_v2_reader():
    registry = default_registry()
    raw = AvroSerializer(registry, EVENTS_SUBJECT, load_schema("onboarding_event", 2)).serialize(V2_EVENT)
    decoded = AvroDeserializer(registry, load_schema("onboarding_event", 2)).deserialize(raw)
    assert decoded["event_type"] == "invite_sent"
    assert decoded["referrer"] == "https://partner.example/launch"
    assert decoded == V2_EVENT


def test_v2_event_with_new_symbol_read_by_v1_reader_resolves_to_the_enum_default():
    registry = default_registry()
    raw = AvroSerializer(registry, EVENTS_SUBJECT, load_schema("onboarding_event", 2)).serialize(V2_EVENT)
    decoded = AvroDeserializer(registry, load_schema("onboarding_event", 1)).deserialize(raw)
    v1_default = load_schema_json("onboarding_event", 1)["fields"][1]["type"]["default"]
    assert decoded["event_type"] == v1_default == "page_view"
    assert "referrer" not in decoded
    assert decoded == {**V1_EVENT, "event_type": "page_view"}


def test_symbols_from_a_future_version_resolve_to_unknown_in_the_v2_reader():
    v3 = load_schema_json("onboarding_event", 2)
    v3["fields"][1]["type"]["symbols"].append("workspace_created")
    event = {**V2_EVENT, "event_type": "workspace_created"}
    payload = _write(fastavro.parse_schema(v3), event)
    decoded = fastavro.schemaless_reader(
        io.BytesIO(payload), fastavro.parse_schema(v3), load_schema("onboarding_event", 2)
    )
    assert decoded["event_type"] == "unknown"


def test_v2_keeps_every_v1_field_and_symbol_in_place():
    v1, v2 = load_schema_json("onboarding_event", 1), load_schema_json("onboarding_event", 2)
    assert (v1["namespace"], v1["name"]) == (v2["namespace"], v2["name"])
    assert [f["name"] for f in v2["fields"]][: len(v1["fields"])] == [f["name"] for f in v1["fields"]]
    v1_symbols = v1["fields"][1]["type"]["symbols"]
    v2_symbols = v2["fields"][1]["type"]["symbols"]
    # Appending keeps the enum indexes v1 producers write meaningful to v2 readers.
    assert v2_symbols[: len(v1_symbols)] == v1_symbols
    added = [f for f in v2["fields"] if f["name"] not in {g["name"] for g in v1["fields"]}]
    assert [(f["name"], f["type"], f["default"]) for f in added] == [("referrer", ["null", "string"], None)]


def test_v1_wire_form_is_the_original_skeleton_schema():
    # The enum default and docs were added after v1 shipped; Avro's parsing
    # canonical form ignores both, so v1 bytes already on the topic still match.
    original_symbols = ["signup", "login", "page_view", "click", "form_submit", "tutorial_step",
                        "feature_used", "support_message", "purchase", "logout"]
    v1 = load_schema_json("onboarding_event", 1)
    assert [f["name"] for f in v1["fields"]] == [
        "event_id", "event_type", "user_id", "anonymous_id", "session_id", "occurred_at",
        "received_at", "properties", "context", "consent",
    ]
    assert v1["fields"][1]["type"]["symbols"] == original_symbols
    stripped = json.loads(json.dumps(v1))
    del stripped["fields"][1]["type"]["default"]
    assert fastavro.schema.fingerprint(
        fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(stripped)), "CRC-64-AVRO"
    ) == fastavro.schema.fingerprint(
        fastavro.schema.to_parsing_canonical_form(load_schema("onboarding_event", 1)), "CRC-64-AVRO"
    )


@pytest.mark.parametrize(
    "name,version,subject,schema_id",
    [
        ("onboarding_event", 1, EVENTS_SUBJECT, 1),
        ("onboarding_event", 2, EVENTS_SUBJECT, 2),
        ("dead_letter", None, DEAD_LETTER_SUBJECT, 3),
        ("segment_change", None, SEGMENT_CHANGES_SUBJECT, 4),
        ("user_profile", None, USER_PROFILE_SUBJECT, 9),
        ("drift_event", None, DRIFT_EVENT_SUBJECT, 6),
    ],
)
def test_shipped_schema_files_match_what_the_shipped_registry_holds(name, version, subject, schema_id):
    # Editing an .avsc without registering the new version would make the file
    # and the id on the wire disagree; this pins them together.
    assert default_registry().lookup(subject, load_schema(name, version)) == schema_id


def test_schema_paths_resolve_versions_and_latest():
    assert schema_versions("onboarding_event") == [1, 2]
    assert schema_path("onboarding_event") == SCHEMA_DIR / "onboarding_event.v2.avsc"
    assert schema_path("onboarding_event", 1) == SCHEMA_DIR / "onboarding_event.v1.avsc"
    assert schema_path("dead_letter") == SCHEMA_DIR / "dead_letter.avsc"
    with pytest.raises(FileNotFoundError):
        schema_path("onboarding_event", 9)


def test_load_schema_is_parsed_once_and_shared():
    first = load_schema("onboarding_event", 2)
    assert first is load_schema("onboarding_event", 2)
    assert first["__fastavro_parsed"] is True
    assert first["name"] == "dev.onboardflow.events.OnboardingEvent"
    assert load_schema_json("onboarding_event", 2) is not load_schema_json("onboarding_event", 2)
