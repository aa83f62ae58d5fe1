"""The backfill horizon's settings (transforms/backfill_horizon.py) and the fixed ranges of a bounded read.

The pre-scan runs here over a fake consumer; against a real broker in tests/integration/test_backfill.py.
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


class _FakeConsumer:
    """Stands in for kafka-python's KafkaConsumer over an in-memory log: {(topic, partition): [values]}."""

    logs: dict = {}
    configs: list = []

    def __init__(self, **config):
        _FakeConsumer.configs.append(config)
        self._tp, self._position = None, 0

    def assign(self, tps):
        (self._tp,) = tps

    def seek(self, tp, offset):
        self._position = offset

    def position(self, tp):
        return self._position

    def poll(self, timeout_ms):
        from types import SimpleNamespace

        log = self.logs[(self._tp.topic, self._tp.partition)]
        batch = [SimpleNamespace(topic=self._tp.topic, partition=self._tp.partition, offset=o, timestamp=0, key=None,
                                 value=log[o]) for o in range(self._position, min(self._position + 2, len(log)))]
        self._position += len(batch)
        return {self._tp: batch} if batch else {}

    def close(self, autocommit):
        pass


def test_data_horizon_is_the_newest_event_of_exactly_the_ranges_read_capped_at_the_wall_clock(monkeypatch):
    from onboardflow.transforms import backfill_horizon as module

    monkeypatch.setattr(module, "KafkaConsumer", _FakeConsumer)
    # Values are event times; None does not decode (a dead letter); the last record is past the stop offset.
    _FakeConsumer.logs = {("t", 0): [100, None, 300, 900], ("t", 1): [250, NOW + 5_000]}
    _FakeConsumer.configs = []

    def decode(record):
        if record.value is None:
            raise ValueError("bad magic byte")
        return {"occurred_at": record.value, "received_at": record.value}

    ranges = [KafkaPartition("t", 0, 0, 3, (("t", 0), ("t", 1))), KafkaPartition("t", 1, 0, 1, (("t", 0), ("t", 1)))]
    assert backfill_horizon("data", "k:9092", ranges, decode, now_ms=NOW) == 300
    future = [KafkaPartition("t", 1, 0, 2, (("t", 1),))]
    assert backfill_horizon("data", "k:9092", future, decode, now_ms=NOW) == NOW
    assert all(not c["enable_auto_commit"] and c["client_id"] == "onboardflow-backfill-horizon"
               for c in _FakeConsumer.configs)
