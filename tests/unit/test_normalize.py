"""NormalizeEvents rules and duplicate recognition (RecentEventIds)."""
import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from onboardflow.pipelines.beam.normalize import NormalizeEvents
from onboardflow.runners.local import local_pipeline_options
from onboardflow.transforms.normalize import RecentEventIds, normalize_event


def event(**over):
    base = {"event_id": "e1", "event_type": "login", "occurred_at": 1_000, "received_at": 2_000,
            "properties": {" Feature ": "Reports ", "Step": "2"},
            "context": {"os": "Mac OS X", "device": " Desktop", "locale": "en_us", "app_version": None}}
    base.update(over)
    return base


def test_labels_are_standardized_and_missing_values_get_documented_defaults():
    out, clamped = normalize_event(event())
    assert not clamped
    assert out["context"] == {"os": "macos", "device": "desktop", "locale": "en-US", "app_version": "unknown"}
    assert out["properties"] == {"feature": "reports", "step": "2"}
    empty, _ = normalize_event(event(context={}, properties=None))
    assert empty["context"] == {"os": "unknown", "device": "unknown", "locale": "und", "app_version": "unknown"}
    assert empty["properties"] == {}


def test_a_client_clock_ahead_of_the_collector_is_clamped_to_received_at():
    out, clamped = normalize_event(event(occurred_at=5_000, received_at=2_000))
    assert clamped and out["occurred_at"] == 2_000


def test_normalize_events_keeps_every_event():
    with TestPipeline(options=local_pipeline_options(streaming=False)) as p:
        out = (p | beam.Create([event(event_id=str(i)) for i in range(5)]) | NormalizeEvents()
               | beam.Map(lambda e: (e["event_id"], e["context"]["os"])))
        assert_that(out, equal_to([(str(i), "macos") for i in range(5)]))


def test_the_same_event_id_twice_is_a_duplicate_in_any_order():
    ids = RecentEventIds(horizon_ms=10)
    assert ids.add("a", 100) and ids.add("b", 5) and not ids.add("a", 1) and not ids.add("b", 100)


def test_ids_are_forgotten_only_behind_both_the_floor_and_the_horizon():
    ids = RecentEventIds(horizon_ms=1_000, prune_at=1)
    for i in range(100):
        ids.add(f"e{i}", i * 100)  # newest at 9,900
    ids.forget_before(5_000)  # floor 5,000; horizon keeps >= 8,900 anyway -> min is 5,000
    assert ids.add("e49", 4_900)  # forgotten (older than the floor): accepted again
    assert not ids.add("e50", 5_000)  # kept
    ids.forget_before(99_999)  # a racing watermark: the horizon still keeps the last 1,000 ms
    assert not ids.add("e95", 9_500)
