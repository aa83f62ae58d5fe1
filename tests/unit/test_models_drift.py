"""models/drift.py: ADWIN on the segment mix and the propensity error, as DriftEvent records."""
import io
import random

import fastavro
import pytest
from fastavro.validation import validate

from onboardflow.models.drift import PropensityErrorDrift, SegmentMixDrift
from onboardflow.schemas import load_schema

T0 = 1_767_571_200_000


def _mix_stream(n, weights, rng):
    return rng.choices(range(len(weights)), weights=weights, k=n)


def _run_mix(ids, detector=None):
    detector = detector or SegmentMixDrift(model_version="v7")
    events = []
    for i, cid in enumerate(ids):
        events += detector.update(cid, T0 + i * 1000)
    return events


def test_segment_mix_stays_quiet_on_a_stationary_stream():
    rng = random.Random(11)
    assert _run_mix(_mix_stream(6000, [0.4, 0.3, 0.2, 0.1], rng)) == []


def test_segment_mix_fires_soon_after_an_injected_shift():
    rng = random.Random(11)
    before = _mix_stream(3000, [0.4, 0.3, 0.2, 0.1], rng)
    after = _mix_stream(3000, [0.1, 0.2, 0.3, 0.4], rng)   # the population changes at index 3000
    events = _run_mix(before + after)
    assert events, "no drift detected"
    first = min(e["detected_at"] for e in events)
    assert T0 + 3000 * 1000 < first <= T0 + 3600 * 1000
    assert {e["metric"] for e in events} <= {f"segment_share:{c}" for c in range(4)}
    assert any(e["metric"] == "segment_share:0" for e in events)


def test_unassigned_ids_are_ignored():
    assert SegmentMixDrift().update(-1, T0) == []


def test_error_drift_fires_when_the_model_starts_failing_and_not_before():
    rng = random.Random(5)
    detector = PropensityErrorDrift(model_version="v2")
    events = []
    for i in range(4000):
        y = rng.random() < 0.3
        good = 0.8 if y else 0.1          # a calibrated, sharp model ...
        bad = 0.2 if y else 0.7           # ... then a wrong one from index 2000
        events += [(i, e) for e in detector.update(int(y), good if i < 2000 else bad, T0 + i)]
    assert events and all(i >= 2000 for i, _ in events)
    assert events[0][0] < 2300
    assert events[0][1]["metric"] == "error:log_loss"
    assert events[0][1]["value"] > 0.25  # the mean log loss has risen (about 0.14 before the change)


def test_events_validate_against_the_drift_event_schema_and_ids_are_replay_stable():
    rng = random.Random(11)
    ids = _mix_stream(2000, [0.5, 0.5], rng) + _mix_stream(2000, [0.05, 0.95], rng)
    events = _run_mix(ids)
    assert events
    schema = load_schema("drift_event")
    for event in events:
        assert validate(event, schema, raise_errors=True)
        assert event["detector"] == "ADWIN" and event["model_name"] == "clustering"
        assert event["model_version"] == "v7" and event["action"] == "none"
        assert event["version"] == event["detected_at"] and event["window_events"] > 0
    out = io.BytesIO()
    fastavro.writer(out, schema, events)
    assert _run_mix(ids) == events  # same stream, same drift ids


def test_unknown_action_is_refused():
    with pytest.raises(ValueError):
        SegmentMixDrift(action="panic")
