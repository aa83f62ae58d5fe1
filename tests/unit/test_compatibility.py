"""Schema evolution (schemas/compatibility.py): the levels, and every schema the repository ships
checked against its predecessors at its subject's configured level."""
import json
from pathlib import Path

import pytest

from onboardflow.schemas import SCHEMA_DIR, SUBJECTS, default_registry
from onboardflow.schemas.compatibility import (
    DEFAULT_LEVEL,
    LEVELS,
    InvalidLevel,
    UnreadableSchema,
    check_level,
    is_compatible,
    pair_problems,
    problems,
    versions_to_check,
)
from onboardflow.schemas.schema_registry import SchemaNotFound

REGISTRY = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "registry.json").read_text())
BY_ID = {entry["id"]: entry["schema"] for entry in REGISTRY["schemas"]}
THING = {"type": "record", "name": "Thing", "fields": [{"name": "n", "type": "int"}]}
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.avsc"))


def _file_name(path: Path) -> str:
    return path.name.split(".")[0]


@pytest.mark.parametrize("subject", sorted(REGISTRY["subjects"]))
def test_each_shipped_version_reads_every_earlier_version_of_its_subject(subject):
    versions = [BY_ID[i] for i in REGISTRY["subjects"][subject]]
    for n in range(1, len(versions)):
        assert problems(versions[n], versions[:n], "BACKWARD_TRANSITIVE") == [], (subject, n + 1)


@pytest.mark.parametrize("subject", sorted(REGISTRY["subjects"]))
def test_each_registered_version_follows_its_predecessors_at_the_subjects_configured_level(subject):
    level = default_registry().compatibility(subject)
    versions = [BY_ID[i] for i in REGISTRY["subjects"][subject]]
    for n in range(1, len(versions)):
        assert problems(versions[n], versions[:n], level) == [], (subject, n + 1, level)


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=[p.name for p in SCHEMA_FILES])
def test_each_schema_file_follows_its_predecessors_at_the_subjects_configured_level(path):
    # A new .avsc needs a subject (schemas/__init__.py SUBJECTS); an edited one
    # not registered yet must be registrable as the subject's next version.
    assert _file_name(path) in SUBJECTS, f"{path.name}: add its subject to schemas.SUBJECTS"
    subject = SUBJECTS[_file_name(path)]
    registry = default_registry()
    schema = json.loads(path.read_text())
    level = registry.compatibility(subject)
    try:
        schema_id = registry.lookup(subject, schema)
    except SchemaNotFound:
        assert registry.compatibility_problems(subject, schema) == [], (path.name, subject, level)
        return
    ids = registry.versions(subject)
    earlier = [registry.get_schema_json(i) for i in ids[: ids.index(schema_id)]]
    assert problems(schema, earlier, level) == [], (path.name, subject, level)


def test_every_shipped_subject_has_a_schema_file_and_a_known_level():
    registry = default_registry()
    assert registry.compatibility() == DEFAULT_LEVEL == "BACKWARD"
    # The event topic's producers (apps) and consumers (the Beam and Flink
    # pipelines) upgrade independently: every version must read, and be read by, every other.
    assert registry.compatibility("onboarding.events-value") == "FULL_TRANSITIVE"
    assert set(registry.subjects()) == set(SUBJECTS.values())
    assert {_file_name(p) for p in SCHEMA_FILES} == set(SUBJECTS)


def test_a_field_added_without_a_default_breaks_backward_but_not_forward():
    added = {**THING, "fields": THING["fields"] + [{"name": "m", "type": "int"}]}
    assert not is_compatible(added, [THING], "BACKWARD")
    assert is_compatible(added, [THING], "FORWARD")
    with_default = {**THING, "fields": THING["fields"] + [{"name": "m", "type": "int", "default": 0}]}
    assert is_compatible(with_default, [THING], "FULL")


def test_promotions_are_allowed_one_way_and_narrowing_is_refused():
    wider = {**THING, "fields": [{"name": "n", "type": "long"}]}
    assert is_compatible(wider, [THING], "BACKWARD")  # int data reads as long
    assert not is_compatible(THING, [wider], "BACKWARD")  # long data does not fit an int
    assert any("long" in p for p in problems(THING, [wider]))


def test_transitive_levels_check_every_earlier_version():
    v2 = {**THING, "fields": [{"name": "n", "type": "long"}]}
    v3 = {**THING, "fields": [{"name": "n", "type": "long"}, {"name": "m", "type": "int", "default": 0}]}
    assert is_compatible(v3, [THING, v2], "BACKWARD_TRANSITIVE")
    assert not is_compatible(THING, [v3, v2], "BACKWARD")
    assert is_compatible(THING, [v3, v2], "NONE")
    with pytest.raises(ValueError):
        problems(THING, [THING], "SIDEWAYS")
    assert "BACKWARD" in LEVELS


def test_levels_are_read_case_insensitively_and_unknown_ones_refused():
    assert check_level("full_transitive") == "FULL_TRANSITIVE"
    assert check_level(" backward ") == "BACKWARD"
    for bad in ("SIDEWAYS", "", None, 3, "BACKWARDS"):
        with pytest.raises(InvalidLevel, match="one of NONE, BACKWARD"):
            check_level(bad)
    assert LEVELS == ("NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE",
                      "FULL", "FULL_TRANSITIVE")


@pytest.mark.parametrize("level, checked", [
    ("NONE", []), ("BACKWARD", [3]), ("FORWARD", [3]), ("FULL", [3]),
    ("BACKWARD_TRANSITIVE", [1, 2, 3]), ("FORWARD_TRANSITIVE", [1, 2, 3]), ("FULL_TRANSITIVE", [1, 2, 3]),
])
def test_transitive_levels_check_every_earlier_version_and_the_others_only_the_latest(level, checked):
    assert versions_to_check(level, 3) == checked
    assert versions_to_check(level, 0) == []


def test_a_removed_field_without_default_breaks_forward_but_not_backward():
    two = {**THING, "fields": THING["fields"] + [{"name": "m", "type": "int"}]}
    assert is_compatible(THING, [two], "BACKWARD")  # the new reader ignores m
    found = problems(THING, [two], "FORWARD")
    assert len(found) == 1
    assert found[0].startswith("version 1: the old schema cannot read new data: READER_FIELD_MISSING_DEFAULT_VALUE")
    assert "m: in the reader without a default" in found[0] and "/fields/1" in found[0]
    assert problems(THING, [two], "FULL") == found


def test_a_type_change_is_named_with_its_location_in_each_direction_full_checks():
    renamed = {**THING, "fields": [{"name": "n", "type": "string"}]}
    found = pair_problems(renamed, THING, "FULL")
    assert found == [
        "the new schema cannot read old data: TYPE_MISMATCH: reader type: string not compatible with writer type: int"
        " (at /fields/0/type)",
        "the old schema cannot read new data: TYPE_MISMATCH: reader type: int not compatible with writer type: string"
        " (at /fields/0/type)",
    ]


def test_removing_an_enum_symbol_breaks_backward_and_adding_one_breaks_forward_without_a_default():
    ab = {"type": "record", "name": "R", "fields": [
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}}]}
    a = {**ab, "fields": [{"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A"]}}]}
    assert not is_compatible(a, [ab], "BACKWARD")  # old B data has no symbol in the new reader
    assert is_compatible(ab, [a], "BACKWARD")
    assert not is_compatible(ab, [a], "FORWARD")
    assert any("MISSING_ENUM_SYMBOLS" in p for p in problems(a, [ab]))


def test_schemas_avro_cannot_parse_are_unreadable_not_incompatible():
    with pytest.raises(UnreadableSchema):
        problems({"type": "record", "name": "X", "fields": [{"name": "a", "type": "nope"}]}, [THING])
    with pytest.raises(UnreadableSchema):
        problems("{not json", [THING])
