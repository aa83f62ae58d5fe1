"""The records of schemas/records.py are the .avsc records: same fields, in order, of the same types."""
import typing

import pytest

from onboardflow.schemas import load_schema_json
from onboardflow.schemas.records import DriftEvent, Event, ProfileUpdate, SegmentChange

_PRIMITIVE = {str: "string", int: "long", float: "double", bool: "boolean"}


def _avro_of(annotation):
    """The Avro type a Python annotation of schemas/records.py stands for, with names left out."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _PRIMITIVE:
        return _PRIMITIVE[annotation]
    if origin is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return ["null", _avro_of(inner)]
    if origin is typing.Literal:
        return {"type": "enum", "symbols": list(args)}
    if origin is dict:
        assert args[0] is str
        return {"type": "map", "values": _avro_of(args[1])}
    if typing.is_typeddict(annotation):
        return {"type": "record", "fields": _fields_of(annotation)}
    raise AssertionError(f"no Avro type for {annotation!r}")


def _fields_of(record):
    return [(name, _avro_of(t)) for name, t in typing.get_type_hints(record).items()]


def _plain(avro):
    """An .avsc type with what Python does not say (names, docs, defaults, logical types) left out."""
    if isinstance(avro, list):
        return [_plain(a) for a in avro]
    if isinstance(avro, dict):
        kind = avro["type"]
        if kind == "enum":
            return {"type": "enum", "symbols": avro["symbols"]}
        if kind == "map":
            return {"type": "map", "values": _plain(avro["values"])}
        if kind == "record":
            return {"type": "record", "fields": [(f["name"], _plain(f["type"])) for f in avro["fields"]]}
        return _plain(kind)  # a logical type: its base type
    return avro


@pytest.mark.parametrize("record, schema", [
    (Event, ("onboarding_event", 2)),
    (SegmentChange, ("segment_change",)),
    (DriftEvent, ("drift_event",)),
])
def test_a_record_is_its_avro_schema(record, schema):
    avsc = load_schema_json(*schema)
    assert record.__name__ == avsc["name"].replace("OnboardingEvent", "Event")
    assert _fields_of(record) == [(f["name"], _plain(f["type"])) for f in avsc["fields"]]


def test_the_in_pipeline_profile_update_is_previous_then_current():
    assert ProfileUpdate._fields == ("previous", "current")
    assert ProfileUpdate(None, {"user_key": "k"}).previous is None
