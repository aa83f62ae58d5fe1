"""The in-pipeline dead-letter record shared by every stage after decoding."""
from onboardflow.transforms.dead_letter import pipeline_dead_letter
from onboardflow.transforms.warehouse.rows import dead_letter_row


def test_an_event_dead_letter_carries_stage_reason_detail_event_id_and_payload():
    event = {"event_id": "e-1", "event_type": "login"}
    assert pipeline_dead_letter("anonymize", "bad_consent", "consent.analytics", event) == {
        "stage": "anonymize", "reason": "bad_consent", "detail": "consent.analytics",
        "event_id": "e-1", "payload": event}


def test_only_a_hex_pseudonym_is_copied_as_user_key_never_a_raw_id():
    key = "ab" * 32
    assert pipeline_dead_letter("profile_store", "r", "d", {"user_key": key}, key_field="user_key")["user_key"] == key
    raw = pipeline_dead_letter("profile_store", "r", "d", {"user_key": "alice@example.com"}, key_field="user_key")
    assert raw["user_key"] is None


def test_a_payload_that_is_not_a_mapping_still_becomes_a_dead_letter():
    letter = pipeline_dead_letter("segment", "not_a_mapping", "profile is a list", [1, 2])
    assert letter["event_id"] is None and letter["payload"] == [1, 2]


def test_a_kafka_timestamp_no_timestamp_column_holds_still_makes_a_dead_letter_row():
    # Found by the fuzzer (docs/security.md "Fuzzing"): a producer's CreateTime after year 9999
    # made the row raise, and the Flink job with it.
    for timestamp in (253_402_300_800_000, 2**63 - 1, -1):
        letter = {"source_topic": "onboarding.events", "source_partition": 0, "source_offset": 7,
                  "kafka_timestamp": timestamp, "key": None, "value": b"\x07junk", "reason": "not_framed",
                  "detail": "magic byte 7, expected 0", "stage": "decode", "failed_at": 1_717_000_000_000}
        row = dead_letter_row(letter)
        assert row[3] is None and row[5] == "not_framed" and row[9] == 5
