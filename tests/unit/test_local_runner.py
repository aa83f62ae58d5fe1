"""The local runner helper, and the Beam features onboardflow relies on, on Prism.

The first tests pin runners/local.py itself. The rest each run one tiny
pipeline on Prism (through ``local_pipeline_options``) exercising one Beam
feature the pipelines depend on, so a Beam/Prism upgrade that breaks one shows
up here by name rather than as a hang in an end-to-end test. The findings are
written up in docs/local-runner.md. Workers are in-process (LOOPBACK), which
is why DoFns can leave marker files in ``tmp_path``.
"""
import os
import time
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import DebugOptions, PortableOptions, PrismRunnerOptions, StandardOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger, userstate, window
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.periodicsequence import PeriodicImpulse
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.utils.timestamp import Duration, Timestamp

from onboardflow.pipelines.beam.kafka_sdf import EventTimeWatermarkEstimatorProvider
from onboardflow.runners import local
from onboardflow.runners.local import local_pipeline_options, prism_location
from onboardflow.transforms.kafka.records import KafkaPartition
from onboardflow.transforms.kafka.watermarks import PartitionWatermarks


def batch():
    return beam.Pipeline(options=local_pipeline_options(streaming=False))


def streaming():
    return beam.Pipeline(options=local_pipeline_options(streaming=True))


# --------------------------------------------------------------------------
# runners/local.py
# --------------------------------------------------------------------------


def test_prism_location_defaults_to_the_repo_cache_binary():
    assert prism_location() == str(local.default_prism_path())
    assert os.access(prism_location(), os.X_OK)


def test_prism_location_takes_an_explicit_binary(tmp_path):
    binary = tmp_path / "prism"
    binary.write_bytes(b"#!/bin/sh\n")
    binary.chmod(0o755)
    assert prism_location(binary) == str(binary)


def test_missing_prism_binary_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="make prism"):
        prism_location(tmp_path / "no-such-prism")


def test_local_options_run_on_prism_with_in_process_workers():
    options = local_pipeline_options(streaming=True, job_name="pinned")
    assert options.view_as(StandardOptions).runner == "PrismRunner"
    assert options.view_as(StandardOptions).streaming is True
    assert options.view_as(PrismRunnerOptions).prism_location == prism_location()
    assert options.view_as(PortableOptions).environment_type == "LOOPBACK"
    assert options.get_all_options()["job_name"] == "pinned"


def test_local_options_let_callers_override_defaults():
    options = local_pipeline_options(streaming=False, environment_type="PROCESS")
    assert options.view_as(StandardOptions).streaming is False
    assert options.view_as(PortableOptions).environment_type == "PROCESS"


def test_a_pipeline_run_without_a_runner_gets_prism_and_in_process_workers():
    from onboardflow.runners.cli.run import pipeline_options

    options = pipeline_options(["--kafka_topics=t"])
    assert options.view_as(StandardOptions).runner == "PrismRunner"
    assert options.view_as(StandardOptions).streaming is True
    assert options.view_as(PortableOptions).environment_type == "LOOPBACK"
    assert local.PRISM_NO_DYNAMIC_SPLITS in options.view_as(DebugOptions).experiments
    assert pipeline_options(["--kafka_bounded"]).view_as(StandardOptions).streaming is False
    # The job service's streams must outlive a long backfill (Beam's default deadline is 300 s).
    assert options.view_as(PortableOptions).job_server_timeout == local.JOB_STREAM_TIMEOUT_S >= 86_400
    assert pipeline_options(["--job_server_timeout=60"]).view_as(PortableOptions).job_server_timeout == 60


def test_a_local_job_rebuilds_its_state_from_the_earliest_offset_unless_told_otherwise():
    # Prism keeps no state between jobs: resuming from committed offsets would
    # write one-event profiles over full ones.
    from onboardflow.pipelines.options import KafkaReadOptions
    from onboardflow.runners.cli.run import pipeline_options

    assert pipeline_options(["--kafka_topics=t"]).view_as(KafkaReadOptions).kafka_start_position == "earliest"
    told = pipeline_options(["--kafka_topics=t", "--kafka_start_position=committed"])
    assert told.view_as(KafkaReadOptions).kafka_start_position == "committed"
    other = pipeline_options(["--runner=DataflowRunner", "--kafka_topics=t"])
    assert other.view_as(KafkaReadOptions).kafka_start_position == "committed"  # runners with durable state resume


def test_a_pipeline_runs_sdk_workers_in_a_worker_pool_when_the_caller_says_so():
    # PipelineOptions lets keyword arguments override flags; the local
    # defaults must not override what the caller asked for.
    from onboardflow.runners.cli.run import pipeline_options

    options = pipeline_options(["--environment_type=EXTERNAL", "--environment_config=localhost:50123",
                                "--prism_log_level=info", "--experiments=keep_me"])
    portable = options.view_as(PortableOptions)
    assert (portable.environment_type, portable.environment_config) == ("EXTERNAL", "localhost:50123")
    assert options.view_as(PrismRunnerOptions).prism_log_level == "info"
    assert options.view_as(StandardOptions).runner == "PrismRunner"
    assert set(options.view_as(DebugOptions).experiments) >= {"keep_me", local.PRISM_NO_DYNAMIC_SPLITS}


# --------------------------------------------------------------------------
# Splittable DoFns: unbounded + defer_remainder, custom watermark estimator
# --------------------------------------------------------------------------


class CountToProvider(RestrictionProvider):
    def initial_restriction(self, n):
        return OffsetRange(0, n)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, n, restriction):
        return restriction.size()


class OnePerResumeFn(beam.DoFn):
    """Emits one offset per invocation, then checkpoints: N outputs need N resumes."""

    @beam.DoFn.unbounded_per_element()
    def process(self, n, tracker=beam.DoFn.RestrictionParam(CountToProvider())):
        position = tracker.current_restriction().start
        if tracker.try_claim(position):
            yield position
            tracker.defer_remainder(Duration(micros=10_000))


def test_unbounded_sdf_is_resumed_after_each_defer_remainder():
    with streaming() as p:
        offsets = p | beam.Create([6]) | beam.ParDo(OnePerResumeFn())
        assert_that(offsets, equal_to(list(range(6))))


class LateAfterWatermarkFn(beam.DoFn):
    """Two on-time events in [0, 10), a checkpoint that moves the estimator's
    watermark to 20, then one event at 5 that is now behind the watermark."""

    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        n,
        tracker=beam.DoFn.RestrictionParam(CountToProvider()),
        watermark=beam.DoFn.WatermarkEstimatorParam(
            EventTimeWatermarkEstimatorProvider(max_out_of_orderness=Duration(0), idle_timeout=Duration(3600))),
    ):
        position = tracker.current_restriction().start
        if position == 0:
            for offset, ts in ((0, 1), (1, 2)):
                tracker.try_claim(offset)
                yield window.TimestampedValue("on-time", ts)
            watermark.observe_event_time(Timestamp(20))
            tracker.defer_remainder(Duration(micros=100_000))
        elif tracker.try_claim(position):
            yield window.TimestampedValue("late", 5)
            tracker.try_claim(n)


def test_custom_watermark_estimator_state_drives_the_watermark_at_checkpoints():
    with streaming() as p:
        counts = (
            p
            | beam.Create([3])
            | beam.ParDo(LateAfterWatermarkFn())
            | beam.WindowInto(window.FixedWindows(10), allowed_lateness=0)
            | beam.Map(lambda kind: (kind, 1))
            | beam.CombinePerKey(sum))
        # Had the runner ignored the estimator, "late" would be on time too.
        assert_that(counts, equal_to([("on-time", 2)]))


class PartitionRange(RestrictionProvider):
    """A KafkaPartition's restriction: offsets [0, stop_offset)."""

    def initial_restriction(self, partition):
        return OffsetRange(0, partition.stop_offset)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, partition, restriction):
        return restriction.size()


def assert_two_partitions_one_behind_give(expected, aligned_with=None):
    """Partition 0 sits far ahead in event time (watermark 100 s) and checkpoints
    every 50 ms; partition 1 reads an event at 1 s, rests for 2 s (a slow read),
    then reads one at 5 s. Only a runner that holds the stage's watermark at
    the minimum over both restrictions keeps the second one on time. Asserts
    the per-event counts of the window [0 s, 10 s) equal ``expected``."""
    provider = EventTimeWatermarkEstimatorProvider(
        max_out_of_orderness=Duration(0), idle_timeout=Duration(3600), aligned_with=aligned_with)

    class TwoPartitionsFn(beam.DoFn):
        @beam.DoFn.unbounded_per_element()
        def process(self, partition, tracker=beam.DoFn.RestrictionParam(PartitionRange()),
                    watermark=beam.DoFn.WatermarkEstimatorParam(provider)):
            if aligned_with is not None:
                PartitionWatermarks.expect(aligned_with, partition.peers)
            position = tracker.current_restriction().start
            if not tracker.try_claim(position):
                return
            if partition.partition == 0:
                watermark.observe_event_time(Timestamp(100))
                if position == partition.stop_offset - 1:
                    return
                tracker.defer_remainder(Duration(micros=50_000))
            elif position == 0:
                yield window.TimestampedValue("first", 1)
                watermark.observe_event_time(Timestamp(1))
                tracker.defer_remainder(Duration(2))
            else:
                yield window.TimestampedValue("second", 5)

    peers = (("t", 0), ("t", 1))
    partitions = [KafkaPartition("t", 0, 0, 20, peers), KafkaPartition("t", 1, 0, 2, peers)]
    with streaming() as p:
        counts = (
            p
            | beam.Create(partitions)
            | beam.ParDo(TwoPartitionsFn())
            | beam.WindowInto(window.FixedWindows(10), allowed_lateness=0)
            | beam.Map(lambda name: (name, 1))
            | beam.CombinePerKey(sum))
        assert_that(counts, equal_to(expected))


def test_prism_takes_an_sdf_watermark_from_the_latest_bundle_not_the_minimum_over_restrictions():
    """Prism 2.77 sets a stage's output watermark from the residuals of the last
    bundle (``estimatedOutput`` in prism/internal/engine/elementmanager.go): a
    bundle holding only partition 0 moves it to 100 s while partition 1 still
    has an event at 5 s to read, which is then late and dropped. When this
    starts failing, Prism fixed it: update docs/local-runner.md and
    PartitionWatermarks in transforms/kafka/watermarks.py."""
    assert_two_partitions_one_behind_give([("first", 1)])


def test_aligned_partition_watermarks_keep_a_slow_partition_on_time_on_prism():
    reader = "test-local-runner-aligned"
    try:
        assert_two_partitions_one_behind_give([("first", 1), ("second", 1)], aligned_with=reader)
    finally:
        PartitionWatermarks.forget(reader)


# --------------------------------------------------------------------------
# Bundle finalization
# --------------------------------------------------------------------------


class MarkOnFinalizeFn(beam.DoFn):
    def __init__(self, directory):
        self._directory = directory

    def process(self, element, finalizer=beam.DoFn.BundleFinalizerParam):
        marker = Path(self._directory) / f"finalized-{element}"
        finalizer.register(lambda: marker.write_text(element))
        yield element


class MarkOnFinalizeSdf(beam.DoFn):
    def __init__(self, directory):
        self._directory = directory

    def process(self, element, finalizer=beam.DoFn.BundleFinalizerParam,
                tracker=beam.DoFn.RestrictionParam(CountToProvider())):
        position = tracker.current_restriction().start
        while tracker.try_claim(position):
            position += 1
        marker = Path(self._directory) / f"sdf-finalized-{element}"
        finalizer.register(lambda: marker.write_text(str(position)))
        yield element


def test_bundle_finalizers_run_for_splittable_dofns_and_for_dofns_at_the_head_of_a_stage(tmp_path):
    with batch() as p:
        words = p | beam.Create(["a", "b", "c"]) | beam.Reshuffle()
        words | "Plain" >> beam.ParDo(MarkOnFinalizeFn(str(tmp_path)))
        p | "Sizes" >> beam.Create([2, 5]) | "Splittable" >> beam.ParDo(MarkOnFinalizeSdf(str(tmp_path)))
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "finalized-a", "finalized-b", "finalized-c", "sdf-finalized-2", "sdf-finalized-5"]
    assert (tmp_path / "sdf-finalized-5").read_text() == "5"


def test_prism_never_finalizes_a_dofn_fused_behind_other_transforms_of_its_stage(tmp_path):
    """Prism 2.77 decides per stage, from the transforms that consume the stage's
    input only, whether to send FinalizeBundle; a finalizing DoFn fused after
    another transform has its callbacks silently dropped. When this starts
    failing, Prism fixed it: update docs/local-runner.md."""
    with batch() as p:
        p | beam.Create(["a", "b"]) | beam.Map(str.upper) | beam.ParDo(MarkOnFinalizeFn(str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# State and timers
# --------------------------------------------------------------------------


class SumAtWindowEndFn(beam.DoFn):
    BUFFER = userstate.BagStateSpec("buffer", beam.coders.VarIntCoder())
    FLUSH = userstate.TimerSpec("flush", TimeDomain.WATERMARK)

    def process(self, kv, w=beam.DoFn.WindowParam,
                buffer=beam.DoFn.StateParam(BUFFER), flush=beam.DoFn.TimerParam(FLUSH)):
        buffer.add(kv[1])
        flush.set(w.max_timestamp())

    @userstate.on_timer(FLUSH)
    def on_flush(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER)):
        yield key, sum(buffer.read())
        buffer.clear()


def test_bag_state_with_event_time_timers_fires_once_per_key_and_window():
    with batch() as p:
        sums = (
            p
            | beam.Create([("a", 1, 1), ("a", 2, 3), ("b", 5, 4), ("a", 10, 12)])
            | beam.Map(lambda t: window.TimestampedValue((t[0], t[1]), t[2]))
            | beam.WindowInto(window.FixedWindows(10))
            | beam.ParDo(SumAtWindowEndFn()))
        assert_that(sums, equal_to([("a", 3), ("b", 5), ("a", 10)]))


class CountUntilProcessingTimeFn(beam.DoFn):
    COUNT = userstate.CombiningValueStateSpec("count", combine_fn=sum)
    EMIT = userstate.TimerSpec("emit", TimeDomain.REAL_TIME)

    def process(self, kv, count=beam.DoFn.StateParam(COUNT), emit=beam.DoFn.TimerParam(EMIT)):
        if count.read() == 0:
            emit.set(Timestamp.now() + Duration(seconds=10))
        count.add(1)

    @userstate.on_timer(EMIT)
    def on_emit(self, key=beam.DoFn.KeyParam, count=beam.DoFn.StateParam(COUNT)):
        yield key, count.read()
        count.clear()


def test_processing_time_timers_fire_when_processing_time_advances():
    # Prism runs the next TestStream event before the timers a processing-time
    # advance made due, unless a watermark advance comes in between.
    stream = (TestStream()
              .add_elements([("k", 1), ("k", 2)])
              .advance_watermark_to(10)
              .advance_processing_time(30)
              .advance_watermark_to(20)
              .add_elements([("k", 3)])
              .advance_watermark_to_infinity())
    with streaming() as p:
        counts = (p
                  | stream
                  # State needs a KV coder to find the key; TestStream's default coder is opaque.
                  | beam.Map(lambda kv: kv).with_output_types(tuple[str, int])
                  | beam.ParDo(CountUntilProcessingTimeFn()))
        # The first timer fires when processing time jumps, not at the end of
        # the stream (which flushes the second one).
        assert_that(counts, equal_to([("k", 2), ("k", 1)]))


# --------------------------------------------------------------------------
# TestStream, triggers and allowed lateness
# --------------------------------------------------------------------------


def test_teststream_late_data_within_allowed_lateness_fires_a_late_pane_and_beyond_it_is_dropped():
    stream = (TestStream()
              .add_elements([window.TimestampedValue(("k", 1), 1), window.TimestampedValue(("k", 1), 2)])
              .advance_watermark_to(15)
              .add_elements([window.TimestampedValue(("k", 1), 3)])   # late, within 30 s of lateness
              .advance_watermark_to(100)
              .add_elements([window.TimestampedValue(("k", 1), 4)])   # beyond the allowed lateness
              .advance_watermark_to_infinity())
    with streaming() as p:
        panes = (
            p
            | stream
            | beam.WindowInto(window.FixedWindows(10),
                              trigger=trigger.AfterWatermark(late=trigger.AfterCount(1)),
                              accumulation_mode=trigger.AccumulationMode.DISCARDING,
                              allowed_lateness=30)
            | beam.CombinePerKey(sum)
            | beam.Map(lambda kv, pane=beam.DoFn.PaneInfoParam: (kv[1], pane.timing)))
        assert_that(panes, equal_to([(2, beam.utils.windowed_value.PaneInfoTiming.ON_TIME),
                                     (1, beam.utils.windowed_value.PaneInfoTiming.LATE)]))


def test_early_firings_emit_speculative_panes_before_the_watermark():
    stream = (TestStream()
              .add_elements([window.TimestampedValue(("k", 1), 1)])
              .add_elements([window.TimestampedValue(("k", 1), 2)])
              .advance_watermark_to_infinity())
    with streaming() as p:
        panes = (
            p
            | stream
            | beam.WindowInto(window.FixedWindows(10),
                              trigger=trigger.AfterWatermark(early=trigger.AfterCount(1)),
                              accumulation_mode=trigger.AccumulationMode.ACCUMULATING)
            | beam.CombinePerKey(sum)
            | beam.Map(lambda kv, pane=beam.DoFn.PaneInfoParam: (kv[1], pane.timing)))
        early, on_time = (beam.utils.windowed_value.PaneInfoTiming.EARLY,
                          beam.utils.windowed_value.PaneInfoTiming.ON_TIME)
        assert_that(panes, equal_to([(1, early), (2, early), (2, on_time)]))


# --------------------------------------------------------------------------
# Merging windows
# --------------------------------------------------------------------------


def test_session_windows_merge_events_closer_than_the_gap():
    with batch() as p:
        sessions = (
            p
            | beam.Create([("u", 0), ("u", 5), ("u", 12), ("u", 40), ("v", 3)])
            | beam.Map(lambda kv: window.TimestampedValue((kv[0], 1), kv[1]))
            | beam.WindowInto(window.Sessions(10))
            | beam.CombinePerKey(sum)
            | beam.Map(lambda kv, w=beam.DoFn.WindowParam: (kv[0], kv[1], int(w.start), int(w.end))))
        assert_that(sessions, equal_to([("u", 3, 0, 22), ("u", 1, 40, 50), ("v", 1, 3, 13)]))


# --------------------------------------------------------------------------
# Side inputs
# --------------------------------------------------------------------------


def test_static_side_inputs_are_visible_to_every_element():
    with batch() as p:
        plans = p | "Plans" >> beam.Create([("u1", "pro"), ("u2", "free")])
        joined = (p | "Users" >> beam.Create(["u1", "u2", "u3"])
                  | beam.Map(lambda u, plans: (u, plans.get(u, "unknown")), plans=beam.pvalue.AsDict(plans)))
        assert_that(joined, equal_to([("u1", "pro"), ("u2", "free"), ("u3", "unknown")]))


def test_periodic_impulse_side_input_refreshes_per_window():
    start = Timestamp(int(time.time()) + 2)
    with streaming() as p:
        versions = p | "Versions" >> PeriodicImpulse(
            start, start + 3, fire_interval=1, apply_windowing=True, data=["v0", "v1", "v2"])
        lookups = (
            p
            | "Lookups" >> PeriodicImpulse(start, start + 3, fire_interval=1, apply_windowing=True,
                                           data=[0, 1, 2])
            | beam.Map(lambda i, current: (i, list(current)), current=beam.pvalue.AsList(versions)))
        assert_that(lookups, equal_to([(0, ["v0"]), (1, ["v1"]), (2, ["v2"])]))


def test_global_window_side_input_with_repeated_processing_time_trigger_is_rejected():
    with pytest.raises(Exception, match="Unbounded GlobalWindow Triggered SideInput"):
        with streaming() as p:
            refresh = (p
                       | "Refresh" >> PeriodicImpulse(fire_interval=1)
                       | beam.WindowInto(window.GlobalWindows(),
                                         trigger=trigger.Repeatedly(trigger.AfterProcessingTime(1)),
                                         accumulation_mode=trigger.AccumulationMode.DISCARDING))
            (p
             | "Main" >> PeriodicImpulse(fire_interval=1)
             | beam.Map(lambda x, latest: x, latest=beam.pvalue.AsSingleton(refresh, default_value=None)))


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


class CountAndMeasureFn(beam.DoFn):
    def __init__(self):
        self._seen = Metrics.counter("pinned", "elements")
        self._sizes = Metrics.distribution("pinned", "sizes")

    def process(self, element):
        self._seen.inc()
        self._sizes.update(len(element))
        yield element


def test_counters_and_distributions_are_queryable_from_the_pipeline_result():
    p = batch()
    p | beam.Create(["a", "bb", "cccc"]) | beam.ParDo(CountAndMeasureFn())
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace("pinned"))
    (counter,) = metrics["counters"]
    (distribution,) = metrics["distributions"]
    assert counter.committed == 3
    assert (distribution.committed.count, distribution.committed.sum,
            distribution.committed.min, distribution.committed.max) == (3, 7, 1, 4)


# --------------------------------------------------------------------------- stopping a streaming job


class _StoppingJob:
    """A PipelineResult stand-in: reaches ``final`` some polls after cancel(), noisily."""

    def __init__(self, final, polls_to_stop=3):
        self.final, self.polls_left, self.cancelled = final, polls_to_stop, False
        self._state = "RUNNING"

    def cancel(self):
        import logging
        import sys

        self.cancelled = True
        print("Traceback ... Channel closed prematurely", file=sys.stderr)
        logging.getLogger("apache_beam.runners.worker.sdk_worker").error("Error processing instruction")

    @property
    def state(self):
        if self.cancelled and self._state == "RUNNING":
            self.polls_left -= 1
            if self.polls_left <= 0:
                self._state = self.final
        return self._state


def test_stop_streaming_job_cancels_waits_for_the_end_and_silences_only_the_teardown(capsys, caplog):
    import logging

    from apache_beam.runners.runner import PipelineState

    beam_logger = logging.getLogger("apache_beam")
    level = beam_logger.level
    job = _StoppingJob(PipelineState.CANCELLED)
    with caplog.at_level(logging.INFO):
        assert local.stop_streaming_job(job, timeout_s=10, grace_s=0.1) == PipelineState.CANCELLED
        assert job.cancelled
        assert capsys.readouterr().err == ""
        assert [r for r in caplog.records if "Error processing" in r.getMessage()] == []
        # Afterwards stderr and the loggers are as they were.
        print("after", file=__import__("sys").stderr)
        assert capsys.readouterr().err == "after\n"
    assert beam_logger.level == level


def test_stop_streaming_job_reports_a_job_that_does_not_stop_and_can_stay_loud(capsys):
    job = _StoppingJob("CANCELLED", polls_to_stop=10**9)
    assert local.stop_streaming_job(job, timeout_s=0.5, quiet=False) is None
    assert "Channel closed prematurely" in capsys.readouterr().err
