"""Pure logic of the Kafka source and sink: watermark policy, start positions, restrictions.

Everything here runs without a broker or a runner: the watermark estimator
gets a fake clock, start positions are resolved from broker answers given as
plain numbers, and the restriction provider / tracker are exercised the way
the SDK harness calls them. The Kafka round trips live in
tests/integration/test_kafka_io.py.
"""
import pytest
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP, Duration, Timestamp

from onboardflow.pipelines.beam.kafka_sdf import (
    EventTimeWatermarkEstimator,
    EventTimeWatermarkEstimatorProvider,
    PartitionOffsetTracker,
)
from onboardflow.pipelines.beam.kafka_sink import WriteToKafka
from onboardflow.pipelines.beam.kafka_source import ReadFromKafka, _ReadBoundedPartitionsFn, _ReadUnboundedPartitionsFn
from onboardflow.pipelines.options import KafkaReadOptions, watermark_alignment
from onboardflow.transforms.kafka.offsets import StartPosition, resolve_start_offset
from onboardflow.transforms.kafka.records import (
    UNBOUNDED_STOP,
    EventTimeError,
    KafkaPartition,
    event_time_ms,
    record_time_ms,
)
from onboardflow.transforms.kafka.watermarks import PartitionWatermarks

NOW_S = 1_767_571_200.0  # a fixed wall clock: 2026-01-05T00:00:00Z


class FakeClock:
    def __init__(self, now_s=NOW_S):
        self.now_s = now_s

    def __call__(self):
        return self.now_s

    def advance(self, seconds):
        self.now_s += seconds


def at(seconds_before_now):
    """A Timestamp `seconds_before_now` before the fake clock's start."""
    return Timestamp(NOW_S - seconds_before_now)


def estimator(clock, state=None, out_of_orderness=60, idle=30):
    return EventTimeWatermarkEstimator(state, Duration(out_of_orderness), Duration(idle), clock)


# --------------------------------------------------------------------------
# Watermark estimator
# --------------------------------------------------------------------------


def test_watermark_starts_at_the_beginning_of_time_before_any_event():
    assert estimator(FakeClock()).current_watermark() == MIN_TIMESTAMP


def test_watermark_is_max_event_time_less_the_out_of_orderness():
    est = estimator(FakeClock(), out_of_orderness=60)
    est.observe_event_time(at(600))
    assert est.current_watermark() == at(660)
    est.observe_event_time(at(300))
    assert est.current_watermark() == at(360)


def test_watermark_never_goes_backwards_when_an_older_event_arrives():
    est = estimator(FakeClock())
    est.observe_event_time(at(100))
    before = est.current_watermark()
    est.observe_event_time(at(5000))
    assert est.current_watermark() == before


def test_watermark_ignores_output_timestamps_so_dead_letters_cannot_move_it():
    est = estimator(FakeClock())
    est.observe_event_time(at(600))
    est.observe_timestamp(at(0))  # a dead letter stamped with broker time
    assert est.current_watermark() == at(660)


def test_watermark_never_runs_ahead_of_the_wall_clock_on_future_event_times():
    est = estimator(FakeClock(), out_of_orderness=60)
    est.observe_event_time(Timestamp(NOW_S + 3600))  # a device clock an hour fast
    assert est.current_watermark() == at(60)


def test_watermark_holds_while_a_caught_up_partition_has_not_been_idle_long_enough():
    clock = FakeClock()
    est = estimator(clock, out_of_orderness=60, idle=30)
    est.observe_event_time(at(600))
    est.observe_caught_up()
    clock.advance(29)
    assert not est.is_idle()
    assert est.current_watermark() == at(660)


def test_idle_partition_watermark_follows_wall_clock_less_out_of_orderness():
    clock = FakeClock()
    est = estimator(clock, out_of_orderness=60, idle=30)
    est.observe_event_time(at(600))
    est.observe_caught_up()
    clock.advance(30)
    assert est.is_idle()
    assert est.current_watermark() == Timestamp(clock() - 60)
    clock.advance(10)
    assert est.current_watermark() == Timestamp(clock() - 60)


def test_partition_that_never_had_a_record_moves_on_once_idle():
    clock = FakeClock()
    est = estimator(clock, out_of_orderness=5, idle=2)
    est.observe_caught_up()
    assert est.current_watermark() == MIN_TIMESTAMP
    clock.advance(2)
    assert est.current_watermark() == Timestamp(clock() - 5)


def test_repeated_caught_up_polls_do_not_restart_the_idle_clock():
    clock = FakeClock()
    est = estimator(clock, idle=30)
    est.observe_caught_up()
    for _ in range(3):
        clock.advance(10)
        est.observe_caught_up()
    assert est.is_idle()


def test_new_records_end_idleness_but_the_watermark_stays_where_idleness_took_it():
    clock = FakeClock()
    est = estimator(clock, out_of_orderness=60, idle=30)
    est.observe_caught_up()
    clock.advance(30)
    idle_watermark = est.current_watermark()
    est.observe_event_time(at(3600))  # a producer that buffered events while offline
    assert not est.is_idle()
    clock.advance(100)
    assert est.current_watermark() == idle_watermark


def test_dead_letter_only_batches_still_end_idleness():
    clock = FakeClock()
    est = estimator(clock, idle=30)
    est.observe_caught_up()
    clock.advance(20)
    est.observe_records()
    clock.advance(20)
    assert not est.is_idle()


def test_watermark_and_idle_clock_survive_a_checkpoint_through_the_estimator_state():
    clock = FakeClock()
    provider = EventTimeWatermarkEstimatorProvider(Duration(60), Duration(30), clock)
    first = provider.create_watermark_estimator(
        provider.initial_estimator_state(KafkaPartition("t", 0, 0, None), None))
    first.observe_event_time(at(600))
    first.observe_caught_up()
    clock.advance(20)
    resumed = provider.create_watermark_estimator(first.get_estimator_state())
    assert resumed.current_watermark() == at(660)
    clock.advance(10)
    assert resumed.is_idle()
    assert resumed.current_watermark() == Timestamp(clock() - 60)


def test_restored_watermark_is_not_lowered_by_the_out_of_orderness_of_older_events():
    clock = FakeClock()
    first = estimator(clock)
    first.observe_event_time(at(0))
    state = first.get_estimator_state()
    resumed = estimator(clock, state=state)
    resumed.observe_event_time(at(900))
    assert resumed.current_watermark() == at(60)


def test_estimator_state_written_before_it_named_its_partition_still_restores():
    clock = FakeClock()
    resumed = estimator(clock, state=(at(660).micros, at(600).micros, None))
    assert resumed.current_watermark() == at(660)
    assert resumed.get_estimator_state() == (at(660).micros, at(600).micros, None)


# -- alignment across partitions (PartitionWatermarks) -----------------------

PEERS = (("t", 0), ("t", 1))


@pytest.fixture
def aligned():
    """An aligned provider for the read of PEERS; the process-wide entry is dropped afterwards."""
    reader = "test-read"
    clock = FakeClock()
    provider = EventTimeWatermarkEstimatorProvider(Duration(60), Duration(30), clock, aligned_with=reader)
    PartitionWatermarks.expect(reader, PEERS)
    yield clock, provider, reader
    PartitionWatermarks.forget(reader)


def partition_estimator(provider, partition):
    return provider.create_watermark_estimator(
        provider.initial_estimator_state(KafkaPartition("t", partition, 0, None, PEERS), None))


def test_aligned_partition_reports_the_slowest_peer_while_keeping_its_own_watermark(aligned):
    clock, provider, _ = aligned
    fast, slow = partition_estimator(provider, 0), partition_estimator(provider, 1)
    fast.observe_event_time(at(600))
    assert fast.current_watermark() == MIN_TIMESTAMP  # the slow partition has not reported yet
    slow.observe_event_time(at(86_400))  # a day behind: a backlog still being read
    assert slow.current_watermark() == at(86_460)
    assert fast.current_watermark() == at(86_460)
    assert fast.partition_watermark() == at(660)
    assert fast.get_estimator_state()[0] == at(660).micros  # the state keeps the partition's own


def test_an_idle_partition_does_not_carry_the_read_past_a_peer_with_a_backlog(aligned):
    # The flake this fixes: Prism takes the stage watermark from the latest
    # bundle, and a bundle holding only the idle partition moved it to the
    # wall clock while the other partition still had events to read.
    clock, provider, _ = aligned
    idle, busy = partition_estimator(provider, 0), partition_estimator(provider, 1)
    busy.observe_event_time(at(86_400))
    busy.current_watermark()
    idle.observe_caught_up()
    clock.advance(30)
    assert idle.partition_watermark() == Timestamp(clock() - 60)
    assert idle.current_watermark() == at(86_460)
    busy.observe_caught_up()
    clock.advance(30)
    # Both idle: the read moves on, each partition as of its peers' last reports
    # (every partition reports at each of its checkpoints).
    assert busy.current_watermark() == Timestamp(clock() - 90)
    assert idle.current_watermark() == Timestamp(clock() - 60)
    assert busy.current_watermark() == Timestamp(clock() - 60)


def test_a_finished_bounded_partition_stops_holding_its_peers(aligned):
    clock, provider, reader = aligned
    done, reading = partition_estimator(provider, 0), partition_estimator(provider, 1)
    done.observe_event_time(at(86_400))
    done.current_watermark()
    reading.observe_event_time(at(600))
    assert reading.current_watermark() == at(86_460)
    PartitionWatermarks.finish(reader, ("t", 0))
    assert reading.current_watermark() == at(660)


def test_two_reads_in_one_process_are_aligned_separately(aligned):
    clock, provider, _ = aligned
    other = EventTimeWatermarkEstimatorProvider(Duration(60), Duration(30), clock, aligned_with="other-read")
    try:
        PartitionWatermarks.expect("other-read", PEERS[:1])
        mine, theirs = partition_estimator(provider, 0), partition_estimator(other, 0)
        mine.observe_event_time(at(86_400))
        mine.current_watermark()
        theirs.observe_event_time(at(600))
        assert theirs.current_watermark() == at(660)
    finally:
        PartitionWatermarks.forget("other-read")


def test_an_unaligned_estimator_reports_its_own_watermark():
    provider = EventTimeWatermarkEstimatorProvider(Duration(60), Duration(30), FakeClock())
    est = partition_estimator(provider, 0)
    est.observe_event_time(at(600))
    assert est.current_watermark() == at(660)


@pytest.mark.parametrize("argv,aligned", [
    ([], True),  # no runner: onboardflow runs it on Prism
    (["--runner=PrismRunner"], True),
    (["--runner=DirectRunner"], True),
    (["--runner=FlinkRunner"], False),
    (["--runner=PortableRunner"], False),
    (["--runner=FlinkRunner", "--kafka_watermark_alignment=process"], True),
    (["--runner=PrismRunner", "--kafka_watermark_alignment=off"], False),
])
def test_watermark_alignment_is_on_for_single_process_runners_unless_set(argv, aligned):
    assert watermark_alignment(PipelineOptions(argv)) is aligned


# --------------------------------------------------------------------------
# Start positions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("text,kind,millis", [
    ("committed", "committed", None),
    ("earliest", "earliest", None),
    (" LATEST ", "latest", None),
    ("timestamp:1700000000000", "timestamp", 1_700_000_000_000),
])
def test_start_position_parses_each_supported_form(text, kind, millis):
    position = StartPosition.parse(text)
    assert (position.kind, position.timestamp_ms) == (kind, millis)


@pytest.mark.parametrize("text", ["newest", "timestamp:", "timestamp:yesterday", "timestamp:-5", ""])
def test_start_position_rejects_unknown_or_malformed_text(text):
    with pytest.raises(ValueError):
        StartPosition.parse(text)


def test_start_position_prints_back_to_its_text_form():
    assert str(StartPosition.parse("timestamp:42")) == "timestamp:42"
    assert str(StartPosition.parse("earliest")) == "earliest"


def resolve(text, **broker):
    answers = dict(beginning=100, end=500)
    answers.update(broker)
    return resolve_start_offset(StartPosition.parse(text), **answers)


def test_committed_start_resumes_at_the_groups_committed_offset():
    assert resolve("committed", committed=250) == 250


def test_committed_start_falls_back_to_earliest_when_the_group_never_committed():
    assert resolve("committed", committed=None) == 100


def test_committed_offset_deleted_by_retention_restarts_at_the_log_start():
    assert resolve("committed", committed=40) == 100


def test_committed_offset_beyond_the_log_end_is_clamped_to_the_end():
    assert resolve("committed", committed=900) == 500


def test_earliest_and_latest_start_at_the_log_start_and_end():
    assert resolve("earliest", committed=250) == 100
    assert resolve("latest", committed=250) == 500


def test_timestamp_start_uses_the_offset_kafka_found_for_that_time():
    assert resolve("timestamp:1700000000000", offset_for_time=321) == 321


def test_timestamp_start_after_the_last_record_starts_at_the_end():
    assert resolve("timestamp:1700000000000", offset_for_time=None) == 500


# --------------------------------------------------------------------------
# Restrictions
# --------------------------------------------------------------------------


def read_fn(cls=_ReadBoundedPartitionsFn):
    return cls(
        bootstrap_servers="unused:9092",
        consumer_group="g",
        decoder=None,
        max_out_of_orderness=Duration(60),
        idle_timeout=Duration(30),
        poll_batch_size=500,
        poll_timeout_ms=100,
        max_read_seconds=1.0,
        consumer_per_partition=True,
        consumer_config=None,
    )


def test_bounded_partition_restriction_spans_start_to_end_offset():
    fn = read_fn()
    assert fn.initial_restriction(KafkaPartition("t", 0, 10, 250)) == OffsetRange(10, 250)


def test_streaming_partition_restriction_is_open_ended():
    fn = read_fn(_ReadUnboundedPartitionsFn)
    restriction = fn.initial_restriction(KafkaPartition("t", 0, 10, None))
    assert restriction == OffsetRange(10, UNBOUNDED_STOP)
    assert not fn.create_tracker(restriction).is_bounded()


def test_partition_already_read_to_its_end_gets_an_empty_restriction():
    fn = read_fn()
    assert fn.initial_restriction(KafkaPartition("t", 0, 250, 250)).size() == 0


def test_initial_split_keeps_one_restriction_per_partition():
    fn = read_fn()
    element = KafkaPartition("t", 3, 0, 1_000_000)
    restriction = fn.initial_restriction(element)
    assert list(fn.split(element, restriction)) == [restriction]


def test_bounded_restriction_size_is_its_offset_count():
    fn = read_fn()
    element = KafkaPartition("t", 0, 10, 250)
    assert fn.restriction_size(element, fn.initial_restriction(element)) == 240.0


def test_streaming_restriction_with_unknown_backlog_still_reports_pending_work():
    fn = read_fn(_ReadUnboundedPartitionsFn)
    element = KafkaPartition("t", 0, 10, None)
    assert fn.restriction_size(element, fn.initial_restriction(element)) == 1.0


def test_tracker_refuses_dynamic_splits_inside_a_partition():
    tracker = PartitionOffsetTracker(OffsetRange(0, 1000))
    assert tracker.try_claim(10)
    assert tracker.try_split(0.5) is None
    assert tracker.current_restriction() == OffsetRange(0, 1000)


def test_tracker_checkpoints_right_after_the_last_claimed_offset():
    tracker = PartitionOffsetTracker(OffsetRange(0, UNBOUNDED_STOP))
    assert tracker.try_claim(0) and tracker.try_claim(1)
    primary, residual = tracker.try_split(0)
    assert primary == OffsetRange(0, 2)
    assert residual == OffsetRange(2, UNBOUNDED_STOP)
    tracker.check_done()


def test_tracker_checkpoint_before_any_claim_hands_back_the_whole_range():
    tracker = PartitionOffsetTracker(OffsetRange(7, UNBOUNDED_STOP))
    primary, residual = tracker.try_split(0)
    assert primary.size() == 0 and residual == OffsetRange(7, UNBOUNDED_STOP)
    tracker.check_done()


def test_claiming_the_stop_offset_closes_a_bounded_range_with_gaps():
    tracker = PartitionOffsetTracker(OffsetRange(0, 10))
    assert tracker.try_claim(5)
    assert not tracker.try_claim(10)  # offsets 6..9 were compacted away
    tracker.check_done()


def test_drain_truncates_a_streaming_restriction_but_keeps_a_bounded_one():
    streaming = read_fn(_ReadUnboundedPartitionsFn)
    assert streaming.truncate(None, OffsetRange(5, UNBOUNDED_STOP)) is None
    assert read_fn().truncate(None, OffsetRange(5, 50)) == OffsetRange(5, 50)


# --------------------------------------------------------------------------
# Event time of decoded events
# --------------------------------------------------------------------------


def test_event_time_is_the_events_occurred_at_millis():
    assert event_time_ms({"occurred_at": 1_700_000_000_123}) == 1_700_000_000_123


@pytest.mark.parametrize("event,reason", [
    ({}, "occurred_at_missing_or_not_int"),
    ({"occurred_at": "2026-01-05T00:00:00Z"}, "occurred_at_missing_or_not_int"),
    ({"occurred_at": 1.7e12}, "occurred_at_missing_or_not_int"),
    ({"occurred_at": True}, "occurred_at_missing_or_not_int"),
    ({"occurred_at": 10 ** 18}, "occurred_at_out_of_range"),
    (["not", "a", "dict"], "occurred_at_missing_or_not_int"),
])
def test_events_without_a_usable_occurred_at_are_rejected_with_a_reason(event, reason):
    with pytest.raises(EventTimeError) as raised:
        event_time_ms(event)
    assert raised.value.reason == reason


@pytest.mark.parametrize("create_time", [2**56 - 1, 2**63 - 1, -(2**63), 253_402_300_800_000])
def test_a_producers_create_time_far_outside_beams_range_still_makes_an_element_timestamp(create_time):
    # Found with the fuzzer's input (docs/security.md "Fuzzing"): the dead letter of such a
    # record overflowed its element timestamp when encoded, failing the bundle on every retry.
    from apache_beam.coders import coders
    from apache_beam.utils.windowed_value import WindowedValue

    ms = record_time_ms(create_time)
    coder = coders.WindowedValueCoder(coders.BytesCoder(), coders.GlobalWindowCoder())
    value = WindowedValue(b"x", Timestamp(micros=ms * 1000), [GlobalWindow()])
    assert coder.decode(coder.encode(value)).timestamp == value.timestamp
    assert record_time_ms(1_717_000_000_000) == 1_717_000_000_000 and record_time_ms(None) == -1


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def test_read_options_have_documented_defaults():
    options = PipelineOptions([]).view_as(KafkaReadOptions)
    assert options.kafka_start_position == "committed"
    assert options.kafka_max_out_of_orderness == 60.0
    assert options.kafka_idle_timeout == 30.0
    assert options.kafka_poll_batch_size == 500
    assert options.kafka_bounded is False


def test_read_options_parse_from_flags():
    options = PipelineOptions([
        "--kafka_topics=a,b", "--kafka_bounded", "--kafka_start_position=earliest",
        "--kafka_max_out_of_orderness=5", "--kafka_idle_timeout=2.5", "--kafka_poll_batch_size=50",
    ]).view_as(KafkaReadOptions)
    assert options.kafka_topics == "a,b"
    assert options.kafka_bounded is True
    assert options.kafka_start_position == "earliest"
    assert (options.kafka_max_out_of_orderness, options.kafka_idle_timeout) == (5.0, 2.5)
    assert options.kafka_poll_batch_size == 50


def test_committed_start_without_a_consumer_group_is_refused():
    with pytest.raises(ValueError, match="consumer_group"):
        ReadFromKafka("localhost:9092", "t", start_position="committed")


def test_streaming_reads_default_to_a_consumer_per_partition_and_bounded_reads_to_one_per_dofn():
    assert ReadFromKafka("b:9092", "t", start_position="earliest")._consumer_per_partition is True
    assert ReadFromKafka("b:9092", "t", start_position="earliest", bounded=True)._consumer_per_partition is False
    assert ReadFromKafka("b:9092", "t", start_position="earliest", bounded=True,
                         consumer_per_partition=True)._consumer_per_partition is True


def test_read_from_options_refuses_a_malformed_start_position():
    options = PipelineOptions(["--kafka_start_position=timestamp:soon"])
    with pytest.raises(ValueError, match="epoch milliseconds"):
        ReadFromKafka.from_options(options)


@pytest.mark.parametrize(
    "element", ["just a string", ("key", "str value"), (b"k", None), (1, b"v"), (b"a", b"b", b"c")]
)
def test_sink_dead_letters_elements_that_are_not_bytes_key_value_pairs(element):
    fn = WriteToKafka("unused:9092", "out").fn
    fn.setup()  # no producer yet: the sink makes it at its first send
    fn.start_bundle()
    (output,) = list(fn.process(element, at(10), GlobalWindow()))
    assert output.tag == "dead_letter"
    dead_letter = output.value.value
    assert (dead_letter["stage"], dead_letter["reason"]) == ("kafka_write", "not_a_bytes_key_value_pair")
    assert dead_letter["payload"] == element and dead_letter["topic"] == "out"
    assert output.value.timestamp == at(10)
    assert list(fn.finish_bundle()) == []  # nothing was sent: no producer needed, nothing to flush
    fn.teardown()


# --------------------------------------------------------------------------
# The engine-free core (transforms/kafka/)
# --------------------------------------------------------------------------


def test_core_timestamp_range_is_beams_so_event_times_convert_without_loss():
    from apache_beam.utils.timestamp import MAX_TIMESTAMP

    from onboardflow.transforms.kafka.records import MAX_TIMESTAMP_MICROS, MIN_TIMESTAMP_MICROS

    assert (MIN_TIMESTAMP_MICROS, MAX_TIMESTAMP_MICROS) == (MIN_TIMESTAMP.micros, MAX_TIMESTAMP.micros)


def test_core_watermark_policy_in_micros_matches_what_the_beam_estimator_reports():
    from onboardflow.transforms.kafka.watermarks import PartitionWatermark

    clock = FakeClock()
    policy = PartitionWatermark(None, 60_000_000, 30_000_000, clock)
    policy.observe_event_time(at(600).micros)
    assert policy.current() == at(660).micros
    policy.observe_caught_up()
    clock.advance(30)
    assert policy.current() == Timestamp(clock() - 60).micros
    resumed = PartitionWatermark(policy.state(), 60_000_000, 30_000_000, clock)
    assert resumed.current() == policy.current() and resumed.is_idle()


def test_kafka_core_imports_without_beam():
    import subprocess
    import sys

    code = ("import sys; sys.modules['apache_beam'] = None\n"
            "import onboardflow.transforms.kafka.records, onboardflow.transforms.kafka.offsets\n"
            "import onboardflow.transforms.kafka.watermarks, onboardflow.transforms.kafka.consumer\n"
            "import onboardflow.transforms.kafka.sink, onboardflow.transforms.dead_letter\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sink_factory_pickles_and_an_empty_flush_needs_no_producer():
    import pickle

    from onboardflow.transforms.kafka.sink import sink_producer_config

    config = sink_producer_config(linger_ms=5, extra={"client_id": "test"})
    assert config["acks"] == "all" and config["enable_idempotence"] and config["client_id"] == "test"
    counts = {}
    make_sink = pickle.loads(pickle.dumps(WriteToKafka("unused:9092", "out", producer_config=config).fn._make_sink))
    sink = make_sink(count=lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n))
    (refused,) = sink.add(("k", b"v"))
    assert refused.rejection[0] == "not_a_bytes_key_value_pair" and sink.dead_letter(refused)["payload"] == ("k", b"v")
    assert sink.flush() == [] and counts == {"invalid_elements": 1}
    sink.close()


class FakeFuture:
    def __init__(self, value=None, exception=None):
        self.value, self.exception = value, exception

    def succeeded(self):
        return self.exception is None


class FakeProducer:
    """Acks every send except the values in ``refuse`` (value -> error); ``raise_on``: send raises."""

    def __init__(self, refuse=None, raise_on=None):
        self.refuse, self.raise_on = dict(refuse or {}), dict(raise_on or {})
        self.sent, self.flushes = [], 0

    def send(self, topic, key=None, value=None):
        if value in self.raise_on:
            raise self.raise_on.pop(value)
        self.sent.append((key, value))
        error = self.refuse.pop(value, None)
        return FakeFuture(exception=error) if error else FakeFuture(value=(topic, len(self.sent) - 1))

    def flush(self):
        self.flushes += 1


def kafka_sink(producer, flush_size=10, **kwargs):
    from onboardflow.transforms.kafka.sink import KafkaSink
    from onboardflow.transforms.sinks.retry import RetryPolicy

    counts = {}
    sink = KafkaSink("unused:9092", "out", {}, flush_size,
                     count=lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n),
                     retry=RetryPolicy(max_attempts=2, budget_s=0, jitter=False, base_s=0), **kwargs)
    sink._producer = producer
    return sink, counts


def test_kafka_sink_sends_in_order_at_the_flush_size_and_reports_where_each_record_landed():
    producer = FakeProducer()
    sink, counts = kafka_sink(producer, flush_size=3)
    assert sink.add((b"a", b"1")) == [] and sink.add((None, b"2")) == [] and producer.sent == []
    settled = sink.add((b"a", b"3"))
    assert producer.sent == [(b"a", b"1"), (None, b"2"), (b"a", b"3")] and producer.flushes == 1
    assert [r.result for r in settled] == [("out", 0), ("out", 1), ("out", 2)]
    assert counts == {"records_sent": 3}


def test_kafka_sink_sends_only_the_unacknowledged_records_again_after_a_retriable_failure():
    from kafka.errors import KafkaTimeoutError

    producer = FakeProducer(refuse={b"2": KafkaTimeoutError("expired")})
    sink, counts = kafka_sink(producer)
    for value in (b"1", b"2", b"3"):
        sink.add((b"k", value))
    settled = sink.flush()
    assert producer.sent == [(b"k", b"1"), (b"k", b"2"), (b"k", b"3"), (b"k", b"2")]
    assert all(r.result is not None and r.rejection is None for r in settled)
    assert counts == {"records_sent": 3, "retries": 1}


def test_kafka_sink_fails_at_once_when_kafka_refuses_a_record_for_good():
    from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

    from onboardflow.transforms.kafka.sink import KafkaWriteError

    producer = FakeProducer(refuse={b"2": MessageSizeTooLargeError("too large"), b"3": KafkaTimeoutError("x")})
    sink, counts = kafka_sink(producer)
    for value in (b"1", b"2", b"3"):
        sink.add((b"k", value))
    with pytest.raises(KafkaWriteError, match="2 of 3 records to 'out' were not acknowledged") as failed:
        sink.flush()
    assert failed.value.acked == 1 and not failed.value.retriable
    assert len(producer.sent) == 3 and counts == {"records_sent": 1}


def test_kafka_sink_stops_sending_when_a_send_raises_and_sends_the_rest_on_the_retry():
    from kafka.errors import KafkaTimeoutError

    producer = FakeProducer(raise_on={b"2": KafkaTimeoutError("no metadata within max_block_ms")})
    sink, counts = kafka_sink(producer)
    for value in (b"1", b"2", b"3"):
        sink.add((None, value))
    sink.flush()
    assert producer.sent == [(None, b"1"), (None, b"2"), (None, b"3")] and producer.flushes == 2
    assert counts == {"records_sent": 3, "retries": 1}
