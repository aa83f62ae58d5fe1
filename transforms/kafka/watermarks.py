"""The event-time watermark of one Kafka partition, and its alignment across a read.

In: what the reader sees on a partition (the newest event time of each polled
batch, records that were all dead letters, polls that found nothing at the log
end) and a clock. Out: the partition's watermark in epoch microseconds, and
the one to report to the engine (the minimum over the read's partitions when
aligned). Times are Beam ``Timestamp`` micros, so an engine shell converts
with no loss. The policy and its trade-offs: ``PartitionWatermark``; why
alignment exists: ``PartitionWatermarks`` and docs/decisions.md
(``transforms/kafka``).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Optional

from .records import MAX_TIMESTAMP_MICROS, MIN_TIMESTAMP_MICROS


class PartitionWatermarks:
    """Process-wide watermarks of the partitions one read covers, to align them.

    With alignment each partition reports ``min`` over the watermarks of all
    its peers, so whatever bundle the runner takes the estimate from, it is the
    minimum over the read (Prism takes an SDF's output watermark from its latest
    bundle only). This needs every partition of the read in one process, which
    holds for the local runners; on a distributed runner a peer read by another
    worker would never report and hold the watermark back forever, so the source
    enables it only there (``--kafka_watermark_alignment``).

    Readers are keyed by an id drawn when the read is built, so two pipelines
    in one process (tests, a bounded run then a streaming one) never mix. A
    partition that has not reported yet holds its peers at the minimum; a
    bounded partition that finished stops holding them.
    """

    _lock = threading.Lock()
    _readers: dict = {}

    @classmethod
    def expect(cls, reader: str, peers: Iterable) -> None:
        """Registers the partitions of ``reader``; the first call fixes the set."""
        with cls._lock:
            watermarks = cls._readers.setdefault(reader, {})
            for peer in peers:
                watermarks.setdefault(tuple(peer), MIN_TIMESTAMP_MICROS)

    @classmethod
    def report(cls, reader: str, partition: tuple, micros: int) -> int:
        """Records ``partition``'s own watermark; returns the minimum over the read."""
        with cls._lock:
            watermarks = cls._readers.setdefault(reader, {})
            if micros > watermarks.get(partition, MIN_TIMESTAMP_MICROS):
                watermarks[partition] = micros
            return min(watermarks.values(), default=micros)

    @classmethod
    def finish(cls, reader: str, partition: tuple) -> None:
        """A bounded partition read to its end no longer holds its peers back."""
        with cls._lock:
            cls._readers.setdefault(reader, {})[partition] = MAX_TIMESTAMP_MICROS

    @classmethod
    def forget(cls, reader: str) -> None:
        with cls._lock:
            cls._readers.pop(reader, None)


class PartitionWatermark:
    """Per-partition watermark: max event time less a bounded out-of-orderness.

    * **Bounded out-of-orderness** (Flink's ``forBoundedOutOfOrderness``):
      watermark = max event time seen on this partition - ``max_out_of_orderness``.
      An event more than that much older than the newest event of its
      partition arrives behind the watermark and is late downstream.
    * **Never backwards**: the watermark is the max of every value it has had;
      it survives checkpoints through ``state()``.
    * **Event time never runs ahead of the wall clock**: the max event time is
      capped at ``clock()``, so one event stamped in the future (a skewed
      device clock) cannot make every honest event late.
    * **Idle partitions move on**: once the partition has been caught up (no
      records at the log end) for ``idle_timeout``, the watermark advances to
      wall clock - ``max_out_of_orderness``, so one quiet partition cannot hold
      back every event-time window. The trade-off: an event that shows up on a
      partition after it went idle and is older than that is late. Raise both
      settings for producers that buffer events offline, at the cost of latency.
    * **Aligned across partitions** (when ``aligned_with`` names a reader and
      the state names the partition): ``current()`` is the minimum over every
      partition of the read (``PartitionWatermarks``); ``state()`` keeps the
      partition's own.

    ``state``: ``(watermark, max event time, caught up since[, (topic, partition)])``
    in micros (None when unknown), as ``state()`` returns it. Durations are in
    micros; ``clock`` returns epoch seconds (tests inject a fake one).
    """

    def __init__(
        self,
        state: Optional[tuple],
        max_out_of_orderness_micros: int,
        idle_timeout_micros: int,
        clock: Callable[[], float] = time.time,
        aligned_with: Optional[str] = None,
    ):
        state = tuple(state or ())
        watermark_micros, max_event_micros, caught_up_since_micros = (state + (None,) * 3)[:3]
        # The (topic, partition) the watermark belongs to (states written before
        # partitions were recorded have none, and are never aligned).
        self._partition = state[3] if len(state) > 3 else None
        self._reader = aligned_with if self._partition is not None else None
        self._watermark = MIN_TIMESTAMP_MICROS if watermark_micros is None else watermark_micros
        self._max_event_micros = max_event_micros
        self._caught_up_since_micros = caught_up_since_micros
        self._delay_micros = int(max_out_of_orderness_micros)
        self._idle_micros = int(idle_timeout_micros)
        self._clock = clock

    def _now_micros(self) -> int:
        return int(self._clock() * 1_000_000)

    def observe_event_time(self, micros: int) -> None:
        """New records arrived; ``micros`` is the max event time among them."""
        if self._max_event_micros is None or micros > self._max_event_micros:
            self._max_event_micros = micros
        self._caught_up_since_micros = None

    def observe_records(self) -> None:
        """Records arrived (maybe all dead letters): the partition is not idle."""
        self._caught_up_since_micros = None

    def observe_caught_up(self) -> None:
        """A poll found nothing at the log end; starts the idle clock once."""
        if self._caught_up_since_micros is None:
            self._caught_up_since_micros = self._now_micros()

    def is_idle(self) -> bool:
        return (
            self._caught_up_since_micros is not None
            and self._now_micros() - self._caught_up_since_micros >= self._idle_micros
        )

    def current(self) -> int:
        """The watermark to report to the engine (aligned across partitions when enabled)."""
        own = self.own()
        if self._reader is None or own == MIN_TIMESTAMP_MICROS:
            return own
        return min(own, PartitionWatermarks.report(self._reader, self._partition, own))

    def own(self) -> int:
        """This partition's own watermark (max event time, idleness), never backwards."""
        now = self._now_micros()
        candidate = None
        if self._max_event_micros is not None:
            candidate = min(self._max_event_micros, now) - self._delay_micros
        if self.is_idle():
            idle_candidate = now - self._delay_micros
            candidate = idle_candidate if candidate is None else max(candidate, idle_candidate)
        if candidate is not None:
            candidate = max(candidate, MIN_TIMESTAMP_MICROS)
            if candidate > self._watermark:
                self._watermark = candidate
        return self._watermark

    def state(self) -> tuple:
        """What survives a checkpoint (see the class docstring)."""
        watermark = self.own()
        watermark_micros = None if watermark == MIN_TIMESTAMP_MICROS else watermark
        state = (watermark_micros, self._max_event_micros, self._caught_up_since_micros)
        return state if self._partition is None else state + (self._partition,)
