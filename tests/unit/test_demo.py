"""The demo decides "caught up" and "settled" from the pipeline's own progress (issue 13, item 5).

Pure checks: the waiting loop against scripted readings (the real readers
are exercised by tests/integration/test_demo.py), the probe's next stop,
the names a demo run owns, and the newest event a profile keeps.
"""
from collections import Counter
from pathlib import Path

import pytest

from onboardflow.runners.cli import demo
from onboardflow.runners.cli.lag import LagReport, PartitionLag, Progress, unreached
from onboardflow.runners.settings import Settings
from onboardflow.runners.sim.generator import DUPLICATE, VALID, GeneratorConfig, JourneyGenerator, v1_serializer
from onboardflow.transforms.progress import next_watermark_probe

T0 = 1_800_000_000.0  # the demo's clock at the pipeline's start, epoch seconds
LAG_S = 60.0


class ScriptedKafka:
    """``KafkaLagReader`` stand-in: one list of partitions per reading (the last one repeats)."""

    group = "g"

    def __init__(self, readings):
        self.readings = list(readings)

    def read(self):
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


class ScriptedProgress:
    def __init__(self, readings):
        self.readings = list(readings)

    def read(self):
        return self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]


class Clock:
    def __init__(self, start=T0):
        self.now = start

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def partitions(*committed, end=(100, 100)):
    return [PartitionLag("t", i, 0, e, c, max(e - (c or 0), 0)) for i, (c, e) in enumerate(zip(committed, end))]


def wait(kafka, progress, sink, newest_event_ms, clock, timeout_s=30.0, failed=lambda: None):
    return demo.await_settled(kafka, progress, sink, newest_event_ms, T0, timeout_s, LAG_S, failed=failed,
                              poll_s=1.0, report_every_s=1e9, clock=clock, sleep=clock.sleep)


def test_offsets_at_the_end_and_a_pause_in_writes_are_not_settled_while_the_watermark_lags():
    # The first `make demo` was fooled this way: every offset read and nothing
    # written for a while, but the timers due by now had not fired yet.
    clock = Clock()
    kafka = ScriptedKafka([partitions(100, 100)])
    progress = ScriptedProgress([Progress(5_000, 6_000)])
    state = wait(kafka, progress, lambda: 1_000, 5_000, clock, timeout_s=20.0)
    assert not state.ok
    assert state.caught_up_s == 0.0 and state.due_by_ms == int((T0 - LAG_S) * 1000)
    assert state.missing == [f"sink watermark 1000 < {state.due_by_ms} ms"]
    assert clock.now - T0 >= 20.0


def test_offsets_committed_ahead_of_redis_are_not_caught_up_until_the_newest_event_is_written():
    # On Prism the committed offsets can run ahead of the sink (docs/architecture.md).
    clock = Clock()
    kafka = ScriptedKafka([partitions(100, 100)])
    progress = ScriptedProgress([Progress(4_000, 1), Progress(4_000, 1), Progress(5_000, 2)])
    watermarks = iter([None, None, None, 10**13])
    state = wait(kafka, progress, lambda: next(watermarks), 5_000, clock)
    assert state.ok
    assert state.caught_up_s == 2.0 and state.settled_s == 3.0
    assert state.due_by_ms == int((T0 + 2.0 - LAG_S) * 1000)


def test_settled_needs_every_partition_at_its_end_the_newest_event_and_the_watermark_past_catch_up():
    clock = Clock()
    kafka = ScriptedKafka([partitions(40, 100), partitions(100, 90), partitions(100, 100)])
    progress = ScriptedProgress([Progress(5_000, 1)])
    caught_up_ms = int((T0 + 2.0 - LAG_S) * 1000)
    watermarks = iter([0, 0, 0, caught_up_ms - 1, caught_up_ms])
    state = wait(kafka, progress, lambda: next(watermarks), 5_000, clock)
    assert state.ok and state.missing == []
    assert (state.caught_up_s, state.settled_s) == (2.0, 4.0)
    assert state.sink_watermark_ms == state.due_by_ms == caught_up_ms
    assert [p.committed for p in state.partitions] == [100, 100]


def test_a_pipeline_that_stopped_is_reported_with_what_was_still_missing():
    clock = Clock()
    state = wait(ScriptedKafka([partitions(40, 100)]), ScriptedProgress([None]), lambda: None, 5_000, clock,
                 failed=lambda: "FAILED")
    assert not state.ok
    assert state.missing == ["the pipeline stopped: FAILED", "t/0 committed 40 of 100",
                             "no event written to Redis yet"]


def test_unreached_names_each_missing_condition_and_nothing_when_all_hold():
    behind = LagReport("g", partitions(None, 100), 0.0, progress=Progress(10, 0))
    assert unreached(behind, 10) == ["t/0 committed nothing of 100"]
    assert unreached(LagReport("g", [], 0.0, kafka_error="NoBrokersAvailable"), None) == [
        "Kafka unreadable: NoBrokersAvailable"]
    done = LagReport("g", partitions(100, 100), 0.0, progress=Progress(10, 0))
    assert unreached(done, 10, sink_watermark_ms=20, watermark_target_ms=20) == []
    assert unreached(done, 11) == ["newest event in Redis 10 < 11 ms"]
    # An empty partition that was never committed counts as read.
    assert unreached(LagReport("g", [PartitionLag("t", 0, 0, 0, None, 0)], 0.0), None) == []


def test_the_probe_follows_a_backlog_then_the_highest_watermark_an_idle_source_reaches():
    now, lag = 10_000_000, 60_000
    assert next_watermark_probe(1_000, newest_ms=5_000, now_ms=now, lag_ms=lag) == 5_000
    assert next_watermark_probe(5_000, newest_ms=5_000, now_ms=now, lag_ms=lag) == now - lag
    # A future-stamped update is capped like the idle watermark: it cannot park the probe.
    assert next_watermark_probe(5_000, newest_ms=now + 10**9, now_ms=now, lag_ms=lag) == now - lag
    # At the idle level already: one step on, no faster.
    assert next_watermark_probe(now - lag, newest_ms=None, now_ms=now, lag_ms=lag, min_step_ms=1000) == now - lag + 1000


def test_the_demo_fills_the_deployment_every_command_uses_unless_told_another():
    base = Settings.load({"OBF_RUN_DIR": "/tmp/obf-run", "OBF_REDIS_URL": "redis://r:1/0"})
    same = demo.demo_settings(base, "onboarding")
    assert same == base
    other = demo.demo_settings(base, "t-demo-1", bootstrap="k:9")
    assert (other.events_topic, other.dead_letter_topic, other.consumer_group, other.redis_key_prefix,
            other.warehouse_schema) == ("t-demo-1.events", "t-demo-1.events.dlq", "onboardflow-t-demo-1",
                                        "t-demo-1", "t_demo_1")
    # The services stay the deployment's, except what a flag gives.
    assert (other.redis_url, other.kafka_bootstrap) == ("redis://r:1/0", "k:9")
    assert other.key_file == Path("/tmp/obf-run/keys/t-demo-1.key")


def test_anchors_parse_from_epoch_ms_and_iso_times_in_utc():
    assert demo._anchor_ms("1790812800000") == 1_790_812_800_000
    assert demo._anchor_ms("2026-10-01T00:00:00Z") == 1_790_812_800_000
    assert demo._anchor_ms("2026-10-01T02:00:00+02:00") == 1_790_812_800_000
    assert demo._anchor_ms("2026-10-01 00:00") == 1_790_812_800_000
    with pytest.raises(SystemExit):
        demo._parse(["--deployment", "Demo Name"])


@pytest.mark.parametrize("max_messages", [None, 700])
def test_the_newest_event_a_profile_keeps_is_noted_from_the_produced_messages(max_messages):
    config = GeneratorConfig(seed=5, users=12, horizon_days=10, malformed_fraction=0.05, duplicate_fraction=0.05,
                             personalization_consent_rate=0.5)
    recorder = demo._NewestProfileEvent(v1_serializer())
    kinds = Counter()
    for message in JourneyGenerator(config, serializer=recorder).messages(max_messages=max_messages):
        recorder.note(message.kind)
        kinds[message.kind] += 1
    assert len(kinds) > 3  # valid, duplicate and malformed messages went by
    # Independently: the same stream's events, cut where the messages were cut.
    sent = kinds[VALID] + kinds[DUPLICATE]
    events = [e for _, e in JourneyGenerator(config).events()][:sent]
    kept = [e["occurred_at"] for e in events if e["consent"]["personalization"]]
    assert kept and recorder.newest_ms == max(kept)


def test_the_rfm_lines_name_the_reference_and_count_every_value_segment():
    from onboardflow.models.rfm_reference import RfmReference
    from onboardflow.runners.cli.rfm import Refreshed

    ref = RfmReference((1.0, 4.25, 9.0, 20.5), (1, 1, 2, 3), (19.0, 49.0, 73.0, 99.0), 40, 0, "rfm-000001")
    lines = demo.rfm_summary(Refreshed(150, ref, True), {"big_spender": 8, "high_intent_engaged": 5, "dormant": 9},
                             (96, 150))
    assert lines == [
        "   RFM reference          rfm-000001: 40 buyers; boundaries recency days 1.0, 4.2, 9.0, 20.5 | "
        "frequency 1, 1, 2, 3 | monetary 19.00, 49.00, 73.00, 99.00",
        "   RFM segment counts     high_intent_engaged 5, low_intent_sporadic 0, big_spender 8 (96 of 150 "
        "profiles scored; a profile is scored at its next update after the reference)"]
    assert demo.rfm_summary(None, {}, (0, 3))[0].endswith("none published (the backfill did not settle, or too "
                                                          "few buyers)")
    assert demo.rfm_summary(Refreshed(3, None, False), {}, (0, 3))[1].startswith(
        "   RFM segment counts     high_intent_engaged 0, low_intent_sporadic 0, big_spender 0")
