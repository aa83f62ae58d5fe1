"""The backfill horizon's settings (transforms/backfill_horizon.py) and the fixed ranges of a bounded read.

The pre-scan itself reads Kafka: tests/integration/test_backfill.py runs it.
"""
import pytest

from onboardflow.pipelines.beam.kafka_source import ReadFromKafka
from onboardflow.transforms.backfill_horizon import backfill_horizon
from onboardflow.transforms.kafka.records import KafkaPartition
from onboardflow.transforms.normalize import event_time_ms

NOW = 1_790_000_000_000


def no_scan(*_):
    raise AssertionError("this setting must not scan Kafka")


def test_now_is_the_wall_clock_and_digits_are_taken_as_given_without_a_scan():
    assert backfill_horizon("now", "unused:9092", [], no_scan, now_ms=NOW) == NOW
    assert backfill_horizon(" 1700000000000 ", "unused:9092", [], no_scan, now_ms=NOW) == 1_700_000_000_000


def test_data_over_ranges_without_records_is_the_wall_clock():
    empty = [KafkaPartition("t", 0, 5, 5, (("t", 0),))]
    assert backfill_horizon("data", "unused:9092", empty, no_scan, now_ms=NOW) == NOW


@pytest.mark.parametrize("setting", ["", "latest", "-5", "1.5e12"])
def test_an_unknown_setting_is_refused(setting):
    with pytest.raises(ValueError, match="--backfill_horizon must be"):
        backfill_horizon(setting, "unused:9092", [], no_scan, now_ms=NOW)


def test_the_event_time_of_a_horizon_is_occurred_at_clamped_to_received_at_as_normalize_does():
    assert event_time_ms({"occurred_at": 10, "received_at": 20}) == 10
    assert event_time_ms({"occurred_at": 30, "received_at": 20}) == 20


def test_a_bounded_read_takes_only_ranges_with_stop_offsets_and_a_streaming_read_only_open_ones():
    bounded = [KafkaPartition("t", 0, 0, 10, (("t", 0),))]
    open_ended = [KafkaPartition("t", 0, 0, None, (("t", 0),))]
    ReadFromKafka("k:9092", "t", consumer_group="g", bounded=True, partitions=bounded)
    ReadFromKafka("k:9092", "t", consumer_group="g", partitions=open_ended)
    with pytest.raises(ValueError, match="need stop offsets"):
        ReadFromKafka("k:9092", "t", consumer_group="g", bounded=True, partitions=open_ended)
    with pytest.raises(ValueError, match="need stop offsets"):
        ReadFromKafka("k:9092", "t", consumer_group="g", partitions=bounded)
