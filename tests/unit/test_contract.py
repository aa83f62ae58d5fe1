"""The profile contract is defined once (schemas/contract.py); every other copy is generated or held equal here."""
import json
from pathlib import Path

from onboardflow.schemas import load_schema_json
from onboardflow.schemas.contract import (
    MODEL_FIELDS,
    PROFILE,
    PROFILE_FIELDS,
    STAGES,
    avsc_text,
    markdown_table,
    profile_avro_schema,
)

ROOT = Path(__file__).resolve().parents[2]


def test_fields_are_unique_typed_and_set_by_a_known_stage():
    assert len(PROFILE) == len(PROFILE_FIELDS)
    for field in PROFILE_FIELDS:
        assert field.type in {"str", "int", "float", "bool", "json"}, field
        assert field.stage in STAGES, field
        assert field.doc.endswith((".", ")")), field
    assert MODEL_FIELDS == ("cluster_id", "segment_label", "propensity", "model_version", "onboarding_track")


def test_the_committed_avro_schema_is_the_generated_one():
    assert (ROOT / "schemas" / "user_profile.avsc").read_text() == avsc_text()
    assert load_schema_json("user_profile") == profile_avro_schema()
    assert json.loads(avsc_text()) == profile_avro_schema()


def test_the_redis_contract_document_lists_exactly_the_contract_fields():
    text = (ROOT / "docs" / "redis-contract.md").read_text()
    begin = text.index("<!-- contract:profile-fields:begin")
    begin = text.index("\n", begin) + 1
    end = text.index("<!-- contract:profile-fields:end -->")
    assert text[begin:end] == markdown_table()
