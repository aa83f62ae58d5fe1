"""Profile store encoding, validation and reads: pure, no Redis server (fakeredis for reads).

The Lua write path runs against the real Redis in
tests/integration/test_profile_store.py.
"""
import hashlib
import hmac
import json
import math

import apache_beam as beam
import fakeredis
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to, is_empty
from hypothesis import given, settings
from hypothesis import strategies as st

from onboardflow.pipelines.beam.profile_store import WriteProfilesToRedis
from onboardflow.transforms.profile_store.encoding import (
    TYPES_FIELD,
    ProfileEncodingError,
    decode_profile,
    encode_profile,
)
from onboardflow.transforms.profile_store.keys import ProfileKeys
from onboardflow.transforms.profile_store.store import ProfileStore

SECRET = b"unit-test-secret-0123456789abcdef"


def key_of(user_id: str) -> str:
    """The contract's key derivation, computed independently of the code under test."""
    return hmac.new(SECRET, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def profile(user_id="user-1", version=1_736_899_200_000, **fields):
    base = {"user_key": key_of(user_id), "version": version, "updated_at": version, "segments": ["activated"]}
    base.update(fields)
    return base


def as_hash(encoded):
    """The hash the upsert script would store (minus _write_id, which the script adds)."""
    return json.loads(encoded.fields)


def test_encoded_fields_are_plain_strings_and_decode_back_to_the_same_types():
    original = profile(
        engagement_score=0.7321,
        session_count=4,
        dormant=False,
        plan="pro",
        segment_label="7",  # a string that looks like a number stays a string
        cluster_id=7,
        feature_adoption={"invite": 1, "export": 3},
        recent_pages=["/pricing", "/docs"],
    )
    stored = as_hash(encode_profile(original))
    assert stored["engagement_score"] == "0.7321"
    assert stored["session_count"] == "4"
    assert stored["dormant"] == "false"
    assert stored["feature_adoption"] == '{"export":3,"invite":1}'
    assert stored["segments"] == '["activated"]'
    assert decode_profile(stored) == original


def test_none_fields_are_left_out_and_read_back_as_absent():
    stored = as_hash(encode_profile(profile(propensity=None, model_version=None, intent_score=0.5)))
    assert "propensity" not in stored and "model_version" not in stored
    assert "propensity" not in json.loads(stored[TYPES_FIELD])
    assert decode_profile(stored)["intent_score"] == 0.5


def test_special_floats_round_trip():
    stored = as_hash(encode_profile(profile(a=float("inf"), b=float("-inf"), c=float("nan"), d=1e-300)))
    decoded = decode_profile(stored)
    assert decoded["a"] == math.inf and decoded["b"] == -math.inf and math.isnan(decoded["c"])
    assert decoded["d"] == 1e-300


def test_missing_updated_at_is_filled_with_the_write_time():
    p = profile()
    del p["updated_at"]
    stored = as_hash(encode_profile(p, default_updated_at=123))
    assert stored["updated_at"] == "123"


def test_segments_are_deduplicated_in_order_and_sets_sorted():
    assert encode_profile(profile(segments=["b", "a", "b"])).segments == ("b", "a")
    assert encode_profile(profile(segments={"z", "m"})).segments == ("m", "z")
    assert encode_profile(profile(segments=None)).segments == ()


@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"user_key": "user-1"}, "invalid_user_key"),  # a raw id must never become a key
        ({"user_key": key_of("x").upper()}, "invalid_user_key"),
        ({"version": True}, "invalid_version"),
        ({"version": -1}, "invalid_version"),
        ({"version": 1.5}, "invalid_version"),
        ({"version": 2**53}, "invalid_version"),
        ({"segments": "activated"}, "invalid_segments"),
        ({"segments": ["ok", ""]}, "invalid_segments"),
        ({"segments": [3]}, "invalid_segments"),
        ({"_types": "{}"}, "reserved_field"),
        ({"_write_id": "x"}, "reserved_field"),
        ({"raw": b"bytes"}, "unencodable_field"),
        ({"scores": {"a": float("nan")}}, "unencodable_field"),
        ({"when": object()}, "unencodable_field"),
        ({"label": "broken \ud800 surrogate"}, "unencodable_field"),
    ],
)
def test_invalid_profiles_are_refused_with_a_reason(bad, reason):
    with pytest.raises(ProfileEncodingError) as err:
        encode_profile(profile(**bad))
    assert err.value.reason == reason


def test_refusal_detail_names_the_field_but_not_its_value():
    with pytest.raises(ProfileEncodingError) as err:
        encode_profile(profile(notes=b"alice@example.com"))
    assert "notes" in err.value.detail
    assert "alice" not in err.value.detail


def test_non_string_field_names_are_refused():
    with pytest.raises(ProfileEncodingError) as err:
        encode_profile({**profile(), 7: "x"})
    assert err.value.reason == "invalid_field_name"


def test_non_mapping_profile_is_refused():
    with pytest.raises(ProfileEncodingError) as err:
        encode_profile(["not", "a", "profile"])
    assert err.value.reason == "not_a_mapping"


def test_fields_without_a_type_decode_as_strings():
    assert decode_profile({b"version": b"12", b"note": b"x"}) == {"version": "12", "note": "x"}


scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False), st.text(max_size=20),
)
json_value = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**53), 2**53),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(
                           lambda n: n not in ("_types", "_write_id", "user_key", "version", "updated_at", "segments")),
                       st.one_of(scalar, json_value.filter(lambda v: isinstance(v, (list, dict)))), max_size=8))
def test_any_encodable_profile_round_trips(features):
    original = {**profile(), **features}
    expected = {k: v for k, v in original.items() if v is not None}
    assert decode_profile(as_hash(encode_profile(original))) == expected


def test_key_prefix_must_not_contain_glob_or_separator_characters():
    assert ProfileKeys("obf").profile("k") == "obf:profile:k"
    assert ProfileKeys("t-1.x").segment("power_user") == "t-1.x:segment:power_user"
    for bad in ("", "a*", "a:b", "a?", "a[b]", "a b"):
        with pytest.raises(ValueError):
            ProfileKeys(bad)


def _fake_store():
    client = fakeredis.FakeRedis()
    return ProfileStore("redis://unused", SECRET, key_prefix="unit", client=client), client


def _store_hash(client, p):
    encoded = encode_profile(p)
    client.hset(f"unit:profile:{encoded.user_key}", mapping=as_hash(encoded))


def test_get_derives_the_hmac_key_from_the_raw_user_id():
    store, client = _fake_store()
    _store_hash(client, profile("user-42", engagement_score=0.5))
    got = store.get("user-42")
    assert got["user_key"] == key_of("user-42")
    assert got["engagement_score"] == 0.5
    assert store.get("user-43") is None


def test_get_many_returns_profiles_in_input_order_with_none_for_absent_users():
    store, client = _fake_store()
    _store_hash(client, profile("a", session_count=1))
    _store_hash(client, profile("c", session_count=3))
    got = store.get_many(["c", "b", "a"])
    assert [g and g["session_count"] for g in got] == [3, None, 1]


def test_raw_id_lookups_need_the_secret():
    store = ProfileStore("redis://unused", None, key_prefix="unit", client=fakeredis.FakeRedis())
    with pytest.raises(ValueError):
        store.get("user-1")


def test_invalid_profiles_go_to_the_dead_letter_output_without_touching_redis():
    # Nothing valid reaches the writer, so no Redis is needed (the URL is unreachable).
    bad = [profile(user_key="raw-user-id"), profile(version="12"), "not a profile"]
    with BeamTestPipeline() as p:
        out = p | beam.Create(bad) | WriteProfilesToRedis("redis://127.0.0.1:1/0", key_prefix="unit")
        assert_that(out[WriteProfilesToRedis.WRITTEN], is_empty(), label="NothingWritten")
        assert_that(
            out[WriteProfilesToRedis.DEAD_LETTER] | beam.Map(lambda d: (d["stage"], d["reason"], d["user_key"])),
            equal_to([
                ("profile_store", "invalid_user_key", None),
                ("profile_store", "invalid_version", key_of("user-1")),
                ("profile_store", "not_a_mapping", None),
            ]),
            label="DeadLetters",
        )


def test_a_profile_as_of_a_time_that_has_not_come_yet_is_dead_lettered_without_touching_redis():
    import time

    now_ms = time.time_ns() // 1_000_000
    ahead = profile("user-2", version=(now_ms + 3_600_000) * 1000)  # an hour ahead; tolerance 10 min
    with BeamTestPipeline() as p:
        out = p | beam.Create([ahead]) | WriteProfilesToRedis("redis://127.0.0.1:1/0", key_prefix="unit",
                                                               future_tolerance_s=600)
        assert_that(out[WriteProfilesToRedis.WRITTEN], is_empty(), label="NothingWritten")
        assert_that(out[WriteProfilesToRedis.DEAD_LETTER] | beam.Map(lambda d: (d["reason"], d["user_key"])),
                    equal_to([("version_in_future", key_of("user-2"))]), label="DeadLetters")
