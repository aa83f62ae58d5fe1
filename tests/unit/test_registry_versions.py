"""Model registry, the pure parts: version ids, kinds, metric validation, the Redis key layout."""
import datetime as dt

import numpy as np
import pytest

from onboardflow.models.registry import (
    KINDS,
    ModelStore,
    ModelVersion,
    RegistryError,
    _json,
    parse_version,
    version_id,
)


def test_version_ids_carry_the_kind_prefix_and_six_digits():
    assert version_id("segmentation", 12) == "seg-000012"
    assert version_id("propensity", 3) == "prop-000003"
    assert ModelVersion("segmentation", 7, "0" * 64, dt.datetime.now(dt.timezone.utc)).id == "seg-000007"


@pytest.mark.parametrize("value, number", [(12, 12), ("12", 12), ("seg-000012", 12), (" seg-12 ", 12), ("007", 7)])
def test_versions_parse_from_numbers_and_ids(value, number):
    assert parse_version("segmentation", value) == number


@pytest.mark.parametrize("value, message", [
    ("prop-000001", "not a segmentation version"),
    ("seg-", "not a version"),
    ("latest", "not a version"),
    (0, "start at 1"),
    ("seg-000000", "not a version"),
])
def test_malformed_or_foreign_versions_are_refused(value, message):
    with pytest.raises(RegistryError, match=message):
        parse_version("segmentation", value)


def test_unknown_kinds_are_refused_with_the_known_ones_named():
    with pytest.raises(RegistryError, match="known: propensity, segmentation"):
        version_id("churn", 1)
    assert set(KINDS) == {"segmentation", "propensity"}


def test_metrics_are_stored_as_canonical_json_with_numpy_values_converted():
    text = _json({"silhouette": np.float64(0.5), "k": np.int64(3), "ks": (2, 3)}, "metrics")
    assert text == '{"k":3,"ks":[2,3],"silhouette":0.5}'


@pytest.mark.parametrize("value, message", [
    ({"silhouette": float("nan")}, "finite"),
    ({"silhouette": float("inf")}, "finite"),
    ({"model": object()}, "JSON-serializable"),
    ([1, 2], "must be a mapping"),
])
def test_metrics_that_json_cannot_hold_faithfully_are_refused(value, message):
    with pytest.raises(RegistryError, match=message):
        _json(value, "metrics")


def test_redis_keys_follow_the_documented_layout():
    import fakeredis

    store = ModelStore("redis://unused", key_prefix="obf", client=fakeredis.FakeRedis())
    assert store.current_key("segmentation") == "obf:model:segmentation:current"
    assert store.version_key("segmentation", 12) == "obf:model:segmentation:v:12"
    assert store.versions_key("propensity") == "obf:model:propensity:versions"
    with pytest.raises(RegistryError, match="key_prefix"):
        ModelStore("redis://unused", key_prefix="bad prefix", client=fakeredis.FakeRedis())
