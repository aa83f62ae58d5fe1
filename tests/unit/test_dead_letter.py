"""The in-pipeline dead-letter record shared by every stage after decoding."""
from onboardflow.transforms.dead_letter import pipeline_dead_letter


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
