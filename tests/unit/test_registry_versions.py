"""Model registry, the pure parts: version ids, kinds, metric validation, the Redis key layout, retention."""
import datetime as dt

import numpy as np
import pytest

from onboardflow.models.model_registry import (
    KINDS,
    ModelStore,
    ModelVersion,
    RegistryError,
    check_retention,
    parse_version,
    prunable_versions,
    retention_cutoff,
    version_id,
)
from onboardflow.models.model_registry.versions import _json
from onboardflow.runners.cli.models import version_ranges

T0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)


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
    with pytest.raises(RegistryError, match="known: propensity, rfm, segmentation"):
        version_id("churn", 1)
    assert set(KINDS) == {"segmentation", "propensity", "rfm"}


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


# --------------------------------------------------------------------------- retention


def _hourly(numbers):
    """Versions published one an hour from T0: number -> created_at."""
    return {n: T0 + dt.timedelta(hours=n) for n in numbers}


def test_prune_keeps_the_newest_n_and_takes_the_rest_oldest_first():
    assert prunable_versions(_hourly(range(1, 11)), newest=10, protected=(), keep_last=3) == [1, 2, 3, 4, 5, 6, 7]


def test_prune_never_takes_a_protected_version_however_old():
    # protected: the served (or pinned) version and the versions recent pointer moves named
    assert prunable_versions(_hourly(range(1, 11)), newest=10, protected={2, 5}, keep_last=3) == [1, 3, 4, 6, 7]


def test_newest_n_counts_versions_already_pruned():
    # 1-6 are already pruned: keep_last=5 keeps 6-10, it does not reach back to keep 4 and 5 instead
    assert prunable_versions(_hourly(range(7, 11)), newest=10, protected=(), keep_last=5) == []
    assert prunable_versions(_hourly([3, 8, 9, 10]), newest=10, protected=(), keep_last=2) == [3, 8]


def test_keep_days_keeps_versions_created_at_or_after_the_cutoff():
    cutoff = T0 + dt.timedelta(hours=4)
    assert prunable_versions(_hourly(range(1, 11)), newest=10, protected=(), keep_last=1, cutoff=cutoff) == [1, 2, 3]


def test_a_second_prune_over_what_the_first_kept_takes_nothing():
    kept = _hourly(range(1, 21))
    first = prunable_versions(kept, newest=20, protected={4}, keep_last=5)
    left = {n: t for n, t in kept.items() if n not in first}
    assert sorted(left) == [4, 16, 17, 18, 19, 20]
    assert prunable_versions(left, newest=20, protected={4}, keep_last=5) == []


def test_retention_cutoff_counts_back_keep_days_and_is_none_without_it():
    assert retention_cutoff(T0, None) is None
    assert retention_cutoff(T0, 1.5) == T0 - dt.timedelta(hours=36)
    assert retention_cutoff(T0, 0) == T0
    # more days than the calendar holds: every version is recent
    assert retention_cutoff(T0, 1e12) == dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize("keep_last, keep_days, message", [
    (0, None, "keep_last"), (-3, None, "keep_last"), (2.5, None, "keep_last"), (True, None, "keep_last"),
    (3, -1, "keep_days"), (3, float("nan"), "keep_days"), (3, float("inf"), "keep_days"), (3, "7", "keep_days"),
])
def test_retention_that_would_keep_nothing_or_has_no_span_is_refused(keep_last, keep_days, message):
    with pytest.raises(RegistryError, match=message):
        check_retention(keep_last, keep_days)
    if keep_days is None:
        with pytest.raises(RegistryError, match=message):
            prunable_versions(_hourly([1]), newest=1, protected=(), keep_last=keep_last)


def test_pruned_versions_say_so_and_have_no_payload():
    pruned = ModelVersion("segmentation", 3, "0" * 64, T0, pruned_at=T0 + dt.timedelta(days=2))
    assert pruned.pruned and pruned.payload is None and pruned.payload_size is None
    assert not ModelVersion("segmentation", 4, "0" * 64, T0, payload=b"x", payload_size=1).pruned


def test_pruned_version_lists_are_printed_as_ranges():
    assert version_ranges("segmentation", [7, 1, 2, 3, 4, 9, 10]) == \
        "seg-000001..seg-000004, seg-000007, seg-000009..seg-000010"
    assert version_ranges("propensity", [5]) == "prop-000005"
