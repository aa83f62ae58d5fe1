"""The splittable-DoFn plumbing of the Kafka source: its watermark estimator and restriction tracker.

* ``EventTimeWatermarkEstimator`` (+ ``Provider``): Beam's view of a
  partition's ``PartitionWatermark`` (transforms/kafka/watermarks.py); the
  estimator state is the policy's state tuple.
* ``PartitionOffsetTracker``: one offset range per partition, split only to
  checkpoint.

Used by ``ReadFromKafka`` (pipelines/beam/kafka_source.py); why one
restriction per partition: docs/decisions.md (``transforms/kafka``).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

from apache_beam.io.iobase import RestrictionProgress, WatermarkEstimator
from apache_beam.io.restriction_trackers import OffsetRestrictionTracker
from apache_beam.transforms.core import WatermarkEstimatorProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from ...transforms.kafka.records import UNBOUNDED_STOP, KafkaPartition
from ...transforms.kafka.watermarks import PartitionWatermark


class EventTimeWatermarkEstimator(WatermarkEstimator):
    """Beam's view of a partition's ``PartitionWatermark`` (the policy, in transforms/kafka/watermarks.py).

    The reader reports what it sees (``observe_event_time`` once per polled
    batch, ``observe_records``, ``observe_caught_up`` when a poll finds nothing
    at the log end); the runner asks ``current_watermark()`` whenever the SDF
    checkpoints. ``observe_timestamp`` (which Beam calls for every output, dead
    letters included) is ignored: dead letters carry Kafka's broker time, which
    must not move an event-time watermark. ``clock`` returns epoch seconds.
    """

    def __init__(
        self,
        state: Optional[tuple],
        max_out_of_orderness: Duration,
        idle_timeout: Duration,
        clock: Callable[[], float] = time.time,
        aligned_with: Optional[str] = None,
    ):
        self._policy = PartitionWatermark(state, Duration.of(max_out_of_orderness).micros,
                                          Duration.of(idle_timeout).micros, clock, aligned_with)

    def observe_timestamp(self, timestamp: Timestamp) -> None:
        return None

    def observe_event_time(self, timestamp: Timestamp) -> None:
        """New records arrived; ``timestamp`` is the max event time among them."""
        self._policy.observe_event_time(Timestamp.of(timestamp).micros)

    def observe_records(self) -> None:
        """Records arrived (maybe all dead letters): the partition is not idle."""
        self._policy.observe_records()

    def observe_caught_up(self) -> None:
        """A poll found nothing at the log end; starts the idle clock once."""
        self._policy.observe_caught_up()

    def is_idle(self) -> bool:
        return self._policy.is_idle()

    def current_watermark(self) -> Timestamp:
        """The watermark reported to the runner (aligned across partitions when enabled)."""
        return Timestamp(micros=self._policy.current())

    def partition_watermark(self) -> Timestamp:
        """This partition's own watermark, never backwards."""
        return Timestamp(micros=self._policy.own())

    def get_estimator_state(self) -> tuple:
        return self._policy.state()


class EventTimeWatermarkEstimatorProvider(WatermarkEstimatorProvider):
    """Creates an ``EventTimeWatermarkEstimator`` per partition restriction."""

    def __init__(
        self,
        max_out_of_orderness: Duration,
        idle_timeout: Duration,
        clock: Callable[[], float] = time.time,
        aligned_with: Optional[str] = None,
    ):
        self._max_out_of_orderness = Duration.of(max_out_of_orderness)
        self._idle_timeout = Duration.of(idle_timeout)
        self._clock = clock
        self._aligned_with = aligned_with

    def initial_estimator_state(self, element, restriction):
        if isinstance(element, KafkaPartition):
            return (None, None, None, (element.topic, element.partition))
        return None  # any other element: a watermark of its own, never aligned

    def create_watermark_estimator(self, estimator_state):
        return EventTimeWatermarkEstimator(
            estimator_state, self._max_out_of_orderness, self._idle_timeout, self._clock, self._aligned_with
        )


class PartitionOffsetTracker(OffsetRestrictionTracker):
    """Offset tracker for one partition that only splits to checkpoint.

    Only ``fraction_of_remainder == 0`` (a checkpoint at the current position,
    ``defer_remainder``) is honoured: splitting a partition's range would read
    it from two places at once and lose its order, its watermark and monotonic
    commits. Parallelism comes from partitions.
    """

    def try_split(self, fraction_of_remainder):
        if fraction_of_remainder != 0:
            return None
        return super().try_split(0)

    def is_bounded(self):
        return self._range.stop != UNBOUNDED_STOP

    def current_progress(self) -> RestrictionProgress:
        if not self.is_bounded():
            done = 0 if self._current_position is None else self._current_position - self._range.start + 1
            return RestrictionProgress(completed=float(done), remaining=1.0)
        return super().current_progress()
