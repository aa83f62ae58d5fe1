"""Every schema the repository ships can read what its predecessors wrote (schemas/compatibility.py)."""
import json
from pathlib import Path

import pytest

from onboardflow.schemas.compatibility import LEVELS, is_compatible, problems

REGISTRY = json.loads((Path(__file__).resolve().parents[2] / "schemas" / "registry.json").read_text())
BY_ID = {entry["id"]: entry["schema"] for entry in REGISTRY["schemas"]}
THING = {"type": "record", "name": "Thing", "fields": [{"name": "n", "type": "int"}]}


@pytest.mark.parametrize("subject", sorted(REGISTRY["subjects"]))
def test_each_shipped_version_reads_every_earlier_version_of_its_subject(subject):
    versions = [BY_ID[i] for i in REGISTRY["subjects"][subject]]
    for n in range(1, len(versions)):
        assert problems(versions[n], versions[:n], "BACKWARD_TRANSITIVE") == [], (subject, n + 1)


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
