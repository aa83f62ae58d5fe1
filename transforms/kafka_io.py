"""Kafka I/O for Beam Python on kafka-python (no Java expansion service).

Beam's own ``apache_beam.io.kafka`` is a cross-language wrapper around Java's
KafkaIO and needs a Java expansion service at pipeline construction. This
module reads and writes Kafka from plain Python so the same pipeline runs on
Prism locally and on Flink's portable runner.

Reading (``ReadFromKafka``) is a splittable DoFn with one restriction per
topic-partition::

    Impulse -> DiscoverPartitions -> Reshuffle -> ReadPartitions (SDF)

* ``DiscoverPartitions`` runs on a worker once per pipeline run: it lists the
  partitions of each topic, resolves the start offset of each one (``committed``
  / ``earliest`` / ``latest`` / ``timestamp:<epoch ms>``) and, in bounded mode,
  takes the partition's end offset *now* as the stop offset. A launcher that
  resolved the ranges itself (``resolve_partitions``, e.g. to pre-scan a
  backfill's horizon) passes them as ``partitions=`` and exactly those are read.
* ``ReadPartitions`` polls kafka-python in batches (``poll(max_records=...)``)
  and claims each record's offset before emitting it. In streaming mode the
  restriction is ``[start, UNBOUNDED_STOP)``; the DoFn checkpoints itself
  (``defer_remainder``) when a partition is caught up or after
  ``max_read_seconds`` so watermarks and offset commits move on. In bounded mode
  the restriction ends at the end offset and simply finishes.
* With a ``decoder`` the events are decoded inside the SDF: this saves a stage
  and, more importantly, lets the element timestamp (and therefore the
  watermark) follow the event's own ``occurred_at`` rather than Kafka's broker
  time. Undecodable records go to the ``dead_letters`` output.
* The watermark is ``EventTimeWatermarkEstimator``: max event time seen on the
  partition minus ``max_out_of_orderness``, never backwards, and idle
  partitions advance with the wall clock (see the class docstring). On the
  local runners each partition reports the minimum over the read's partitions
  (``PartitionWatermarks``), because Prism does not take that minimum itself.
* Consumer-group offsets (the next offset to read, per partition) are
  committed from a bundle finalizer, i.e. only once the runner has persisted
  the bundle's outputs: on Prism right after the bundle, on Flink when the
  checkpoint holding them completes (so only with checkpointing enabled); see
  docs/local-runner.md. A ``bounded`` read ends with the group's offsets at
  the end offsets taken at start. Offsets are a progress marker for operators
  and for ``start_position="committed"`` restarts; inside a running job the
  runner's own checkpoints give at-least-once delivery.
* Partitions are discovered once, when the job starts; partitions added to a
  topic later are picked up by the next run.

Writing (``WriteToKafka``) sends ``(key, value)`` byte pairs with an idempotent
``acks="all"`` producer and flushes in ``finish_bundle``, so a bundle only
completes once Kafka acknowledged all of its records; any failed send fails
the bundle and the runner retries it (at-least-once).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io.iobase import RestrictionProgress, WatermarkEstimator
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.transforms.core import RestrictionProvider, WatermarkEstimatorProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Duration, Timestamp
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from .metrics import PipelineMetrics

_LOG = logging.getLogger(__name__)

#: Stop offset of a streaming restriction (Java KafkaIO uses Long.MAX_VALUE).
UNBOUNDED_STOP = sys.maxsize

#: Tag of the dead-letter output when ReadFromKafka decodes.
DEAD_LETTERS = "dead_letters"

_SOURCE_NAMESPACE = "onboardflow.kafka_source"
_SINK_NAMESPACE = "onboardflow.kafka_sink"

# Beam's representable timestamp range, in epoch milliseconds.
_MIN_EVENT_MS = MIN_TIMESTAMP.micros // 1000 + 1
_MAX_EVENT_MS = MAX_TIMESTAMP.micros // 1000 - 1


class KafkaRecord(NamedTuple):
    """One Kafka record as read from a topic-partition, value still undecoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: Optional[bytes]
    value: Optional[bytes]


class KafkaPartition(NamedTuple):
    """The SDF element: one topic-partition and where to read it.

    ``stop_offset`` is None for a streaming (unbounded) read, else the partition's
    end offset taken when the pipeline started (exclusive).
    """

    topic: str
    partition: int
    start_offset: int
    stop_offset: Optional[int]
    #: Every (topic, partition) the same read covers, this one included: what
    #: ``PartitionWatermarks`` aligns this partition's watermark with.
    peers: tuple = ()


# --------------------------------------------------------------------------
# Start position
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StartPosition:
    """Where a read starts on partitions: committed, earliest, latest or timestamp.

    Parse from text with ``StartPosition.parse("timestamp:1700000000000")``.
    """

    kind: str
    timestamp_ms: Optional[int] = None

    KINDS = ("committed", "earliest", "latest", "timestamp")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"start position must be one of {self.KINDS}, got {self.kind!r}")
        if (self.kind == "timestamp") != (self.timestamp_ms is not None):
            raise ValueError("a timestamp start position needs timestamp_ms, the others must not have it")
        if self.timestamp_ms is not None and self.timestamp_ms < 0:
            raise ValueError("timestamp start position must be a non-negative epoch millisecond value")

    @classmethod
    def parse(cls, text: Union[str, "StartPosition"]) -> "StartPosition":
        if isinstance(text, StartPosition):
            return text
        value = text.strip().lower()
        if value.startswith("timestamp:"):
            raw = value.split(":", 1)[1].strip()
            try:
                millis = int(raw)
            except ValueError:
                raise ValueError(f"timestamp start position needs epoch milliseconds, got {raw!r}") from None
            return cls("timestamp", millis)
        return cls(value)

    def __str__(self) -> str:
        return f"timestamp:{self.timestamp_ms}" if self.kind == "timestamp" else self.kind


def resolve_start_offset(
    position: StartPosition,
    *,
    beginning: int,
    end: int,
    committed: Optional[int] = None,
    offset_for_time: Optional[int] = None,
) -> int:
    """The first offset to read on one partition, given what the broker reports.

    ``beginning``/``end`` are the partition's log start and end offsets,
    ``committed`` the group's committed offset (None when the group never
    committed), ``offset_for_time`` the answer of ``offsets_for_times`` (None
    when no record is at or after the timestamp). The result is always inside
    ``[beginning, end]``: a committed offset that retention already deleted
    restarts at the log start, as Kafka's ``auto.offset.reset=earliest`` would.
    """
    if position.kind == "earliest":
        offset = beginning
    elif position.kind == "latest":
        offset = end
    elif position.kind == "committed":
        offset = beginning if committed is None else committed
    else:  # timestamp: nothing at/after it means "start at the end".
        offset = end if offset_for_time is None else offset_for_time
    return min(max(offset, beginning), end)


# --------------------------------------------------------------------------
# Watermark
# --------------------------------------------------------------------------


class PartitionWatermarks:
    """Process-wide watermarks of the partitions one read covers, to align them.

    Beam holds an SDF's output watermark at the minimum over its outstanding
    restrictions, and Flink's runner does. Prism (Beam 2.77) does not: it sets
    the stage's output watermark from the residuals of the *latest* bundle
    only (``stage.estimatedOutput`` in prism/internal/engine/elementmanager.go,
    "aggregated here until it makes a difference"), and a bundle often holds a
    single partition. So the source watermark followed whichever partition was
    read last: when one partition went idle (wall clock) while another still
    had a backlog, every event left in the backlog was behind the watermark,
    lifecycle timers fired early and the profile stage saw those events as too
    late (measured: 2 of 3 streaming runs of the end-to-end equivalence test).

    With alignment each partition reports ``min`` over the watermarks of all
    its peers, so whatever bundle Prism reads the estimate from, it is the
    minimum over the read. This needs every partition of the read in one
    process, which holds for the local runners (Prism starts one SDK worker
    per environment); on a distributed runner a peer read by another worker
    would never report and hold the watermark back forever, so
    ``ReadFromKafka`` enables it only there (``--kafka_watermark_alignment``).

    Readers are keyed by an id drawn when the ``ReadFromKafka`` is built, so
    two pipelines in one process (tests, a bounded run then a streaming one)
    never mix. A partition that has not reported yet holds its peers at the
    minimum; a bounded partition that finished stops holding them.
    """

    _lock = threading.Lock()
    _readers: dict = {}

    @classmethod
    def expect(cls, reader: str, peers: Iterable) -> None:
        """Registers the partitions of ``reader``; the first call fixes the set."""
        with cls._lock:
            watermarks = cls._readers.setdefault(reader, {})
            for peer in peers:
                watermarks.setdefault(tuple(peer), MIN_TIMESTAMP.micros)

    @classmethod
    def report(cls, reader: str, partition: tuple, micros: int) -> int:
        """Records ``partition``'s own watermark; returns the minimum over the read."""
        with cls._lock:
            watermarks = cls._readers.setdefault(reader, {})
            if micros > watermarks.get(partition, MIN_TIMESTAMP.micros):
                watermarks[partition] = micros
            return min(watermarks.values(), default=micros)

    @classmethod
    def finish(cls, reader: str, partition: tuple) -> None:
        """A bounded partition read to its end no longer holds its peers back."""
        with cls._lock:
            cls._readers.setdefault(reader, {})[partition] = MAX_TIMESTAMP.micros

    @classmethod
    def forget(cls, reader: str) -> None:
        with cls._lock:
            cls._readers.pop(reader, None)


class EventTimeWatermarkEstimator(WatermarkEstimator):
    """Per-partition watermark: max event time less a bounded out-of-orderness.

    The reader reports what it sees (``observe_event_time`` once per polled
    batch, ``observe_caught_up`` when a poll finds nothing at the log end); the
    runner asks ``current_watermark()`` whenever the SDF checkpoints:

    * **Bounded out-of-orderness** (Flink's ``forBoundedOutOfOrderness``, Beam
      Java's ``CustomTimestampPolicyWithLimitedDelay``): watermark = max event
      time seen on this partition - ``max_out_of_orderness``. An event more
      than that much older than the newest event of its partition arrives
      behind the watermark and is late downstream.
    * **Never backwards**: the watermark is the max of every value it has had;
      it survives checkpoints in the estimator state.
    * **Event time never runs ahead of the wall clock**: the max event time is
      capped at the reader's clock, so one event stamped in the future (a skewed
      device clock) cannot push the watermark ahead and make every honest event
      late.
    * **Idle partitions move on**: once the partition has been caught up (no
      records at the log end) for ``idle_timeout``, the watermark advances to
      wall clock - ``max_out_of_orderness``. Without this, one quiet partition
      would hold back every event-time window of the pipeline forever. The
      trade-off: an event that shows up on a partition after it went idle and is
      older than wall clock - ``max_out_of_orderness`` (a producer that buffered
      events while offline, a late backfill) is late and may be dropped by
      windows with small allowed lateness. Raise ``idle_timeout`` and
      ``max_out_of_orderness`` for such producers, at the cost of latency.

    ``observe_timestamp`` (which Beam calls for every output, dead letters
    included) is deliberately ignored: dead letters are stamped with Kafka's
    broker time, which must not move an event-time watermark.

    * **Aligned across partitions** (when ``aligned_with`` names a reader): the
      watermark reported to the runner is the minimum over every partition of
      the read, see ``PartitionWatermarks``. The estimator state keeps the
      partition's own watermark.

    ``clock`` returns epoch seconds; tests inject a fake one.
    """

    def __init__(
        self,
        state: Optional[tuple],
        max_out_of_orderness: Duration,
        idle_timeout: Duration,
        clock: Callable[[], float] = time.time,
        aligned_with: Optional[str] = None,
    ):
        state = tuple(state or ())
        watermark_micros, max_event_micros, caught_up_since_micros = (state + (None,) * 3)[:3]
        # The (topic, partition) the estimator belongs to: set by
        # initial_estimator_state (states written before it have none).
        self._partition = state[3] if len(state) > 3 else None
        self._reader = aligned_with if self._partition is not None else None
        self._watermark = MIN_TIMESTAMP if watermark_micros is None else Timestamp(micros=watermark_micros)
        self._max_event_micros = max_event_micros
        self._caught_up_since_micros = caught_up_since_micros
        self._delay_micros = Duration.of(max_out_of_orderness).micros
        self._idle_micros = Duration.of(idle_timeout).micros
        self._clock = clock

    def _now_micros(self) -> int:
        return int(self._clock() * 1_000_000)

    def observe_timestamp(self, timestamp: Timestamp) -> None:
        # Beam calls this with every output's timestamp, dead letters included
        # (stamped with Kafka's clock, not event time). The watermark follows
        # decoded event time only, fed through observe_event_time.
        return None

    def observe_event_time(self, timestamp: Timestamp) -> None:
        """New records arrived; ``timestamp`` is the max event time among them."""
        micros = Timestamp.of(timestamp).micros
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

    def current_watermark(self) -> Timestamp:
        """The watermark reported to the runner (aligned across partitions when enabled)."""
        own = self.partition_watermark()
        if self._reader is None or own == MIN_TIMESTAMP:
            return own
        aligned = PartitionWatermarks.report(self._reader, self._partition, own.micros)
        return own if aligned >= own.micros else Timestamp(micros=aligned)

    def partition_watermark(self) -> Timestamp:
        """This partition's own watermark (max event time, idleness), never backwards."""
        now = self._now_micros()
        candidate = None
        if self._max_event_micros is not None:
            candidate = min(self._max_event_micros, now) - self._delay_micros
        if self.is_idle():
            idle_candidate = now - self._delay_micros
            candidate = idle_candidate if candidate is None else max(candidate, idle_candidate)
        if candidate is not None:
            candidate = max(candidate, MIN_TIMESTAMP.micros)
            if candidate > self._watermark.micros:
                self._watermark = Timestamp(micros=candidate)
        return self._watermark

    def get_estimator_state(self) -> tuple:
        watermark = self.partition_watermark()
        watermark_micros = None if watermark == MIN_TIMESTAMP else watermark.micros
        state = (watermark_micros, self._max_event_micros, self._caught_up_since_micros)
        return state if self._partition is None else state + (self._partition,)


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


# --------------------------------------------------------------------------
# Restriction
# --------------------------------------------------------------------------


class PartitionOffsetTracker(OffsetRestrictionTracker):
    """Offset tracker for one partition that only splits to checkpoint.

    Runners may ask for a split at any fraction of the remaining work (Prism
    does when a bundle looks slow). Splitting a partition's offset range would
    read one partition from two places at once: per-partition order, the
    partition's watermark and monotonically increasing commits would all be
    lost, and for a streaming range "half of the remainder" is an offset that
    may not exist for years. So only ``fraction_of_remainder == 0`` (a
    checkpoint at the current position, ``defer_remainder``) is honoured;
    parallelism comes from partitions.
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


# --------------------------------------------------------------------------
# Decoding contract
# --------------------------------------------------------------------------


class EventTimeError(ValueError):
    """A decoded event has no usable ``occurred_at`` (epoch milliseconds int)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _event_time_ms(event: Mapping[str, Any]) -> int:
    # type() first: isinstance against typing.Mapping costs more than the rest.
    occurred_at = event.get("occurred_at") if type(event) is dict or isinstance(event, Mapping) else None
    if isinstance(occurred_at, bool) or not isinstance(occurred_at, int):
        raise EventTimeError("occurred_at_missing_or_not_int")
    if not _MIN_EVENT_MS <= occurred_at <= _MAX_EVENT_MS:
        raise EventTimeError("occurred_at_out_of_range")
    return occurred_at


# --------------------------------------------------------------------------
# Consumers
# --------------------------------------------------------------------------


class _PartitionConsumers:
    """The KafkaConsumers of one DoFn instance, positioned for a partition.

    ``per_partition=True`` keeps one consumer per partition the instance
    reads: when the SDF resumes a partition after a checkpoint the consumer is
    already at the right offset, its prefetched records are still buffered
    and its long-poll fetch is in flight. ``per_partition=False`` keeps a
    single consumer and re-assigns/seeks it whenever the instance switches
    partitions, which throws prefetched records away and costs a position
    validation round trip, but runs one kafka-python I/O thread instead of one
    per partition (each kafka-python 3 consumer has its own).

    Measured (bench_kafka_source.py, 50k records on 4 partitions, Prism, shared
    2-core VM, several sessions): streaming, an idle partition costs ~0.1 s per
    resume per partition vs ~0.9 s shared (after a seek kafka-python does not
    know the high watermark until a long-poll fetch returns), so streaming
    reads default to per-partition consumers. Bounded read+decode was 4-27%
    faster with the single consumer in every session (the idle consumers' I/O
    threads compete for the GIL with decoding), so bounded reads default to
    it; bounded read-only was 40-50% faster per partition.
    """

    def __init__(self, config: Mapping[str, Any], per_partition: bool):
        self._config = dict(config)
        self._per_partition = per_partition
        self._consumers: dict = {}
        # teardown may run on another SDK-harness thread than a bundle that is
        # still creating a consumer (seen on cancel: "dictionary changed size").
        self._lock = threading.Lock()

    def at(self, tp, offset: int):
        """A consumer assigned to ``tp`` whose next record is ``offset``."""
        key = tp if self._per_partition else None
        with self._lock:
            consumer = self._consumers.get(key)
            if consumer is None:
                consumer = self._consumers[key] = KafkaConsumer(**self._config)
        if consumer.assignment() != {tp}:
            consumer.assign([tp])
            consumer.seek(tp, offset)
        elif consumer.position(tp) != offset:
            consumer.seek(tp, offset)
        return consumer

    def highwater(self, tp) -> Optional[int]:
        consumer = self._consumers.get(tp if self._per_partition else None)
        if consumer is None or consumer.assignment() != {tp}:
            return None
        return consumer.highwater(tp)

    def close(self) -> None:
        with self._lock:
            consumers, self._consumers = list(self._consumers.values()), {}
        for consumer in consumers:
            try:
                consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - closing must not mask teardown
                _LOG.warning("closing a Kafka consumer failed", exc_info=True)


def _consumer_config(
    bootstrap_servers: str, extra: Optional[Mapping[str, Any]], **overrides: Any
) -> dict:
    config = {
        "bootstrap_servers": bootstrap_servers,
        "enable_auto_commit": False,
        "allow_auto_create_topics": False,
        "auto_offset_reset": "earliest",
        "client_id": "onboardflow-kafka-source",
        # After every seek kafka-python validates the position with the leader
        # and poll() sleeps retry_backoff_ms meanwhile: 100 ms by default, paid
        # per partition when a read starts.
        "retry_backoff_ms": 25,
        # Fewer fetch round trips per partition; kafka-python only fetches a
        # partition again once its buffered records are consumed.
        "max_partition_fetch_bytes": 4 * 1024 * 1024,
    }
    config.update(extra or {})
    config.update(overrides)
    return config


# --------------------------------------------------------------------------
# DoFns of ReadFromKafka
# --------------------------------------------------------------------------


def resolve_partitions(
    bootstrap_servers: str,
    topics: Sequence[str],
    consumer_group: Optional[str],
    start_position: StartPosition,
    bounded: bool,
    consumer_config: Optional[Mapping[str, Any]] = None,
) -> list[KafkaPartition]:
    """One KafkaPartition per topic-partition of ``topics``, offsets resolved now.

    The start offset follows ``start_position``; a ``bounded`` read stops at
    the partition's end offset of now. ``ReadFromKafka`` calls it on a worker
    when the job starts; a launcher that must know the exact ranges a bounded
    run reads (the backfill horizon, transforms/backfill_horizon.py) calls it
    itself and hands the result to ``ReadFromKafka(partitions=...)``.
    """
    consumer = KafkaConsumer(
        **_consumer_config(
            bootstrap_servers,
            consumer_config,
            group_id=consumer_group,
            client_id="onboardflow-kafka-discovery",
        )
    )
    try:
        partitions = []
        for topic in topics:
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                # A misconfigured topic is a deployment error, not bad input.
                raise ValueError(f"Kafka topic {topic!r} does not exist or has no partitions")
            partitions.extend(TopicPartition(topic, p) for p in sorted(ids))
        beginning = consumer.beginning_offsets(partitions)
        end = consumer.end_offsets(partitions)
        by_time = {}
        if start_position.kind == "timestamp":
            found = consumer.offsets_for_times({tp: start_position.timestamp_ms for tp in partitions})
            by_time = {tp: (hit.offset if hit is not None else None) for tp, hit in found.items()}
        peers = tuple((tp.topic, tp.partition) for tp in partitions)
        resolved = []
        for tp in partitions:
            committed = consumer.committed(tp) if start_position.kind == "committed" else None
            start = resolve_start_offset(
                start_position,
                beginning=beginning[tp],
                end=end[tp],
                committed=committed,
                offset_for_time=by_time.get(tp),
            )
            resolved.append(KafkaPartition(tp.topic, tp.partition, start, end[tp] if bounded else None, peers))
        return resolved
    finally:
        consumer.close(autocommit=False)


class _DiscoverPartitionsFn(beam.DoFn):
    """Impulse -> one KafkaPartition per topic-partition (resolved now, or the ones given)."""

    def __init__(self, bootstrap_servers, topics, consumer_group, start_position, bounded, consumer_config,
                 partitions=None):
        super().__init__()
        self._bootstrap_servers = bootstrap_servers
        self._topics = list(topics)
        self._group = consumer_group
        self._start = start_position
        self._bounded = bounded
        self._consumer_config = consumer_config
        self._partitions = None if partitions is None else tuple(partitions)

    def process(self, _impulse) -> Iterable[KafkaPartition]:
        if self._partitions is not None:
            yield from self._partitions
            return
        yield from resolve_partitions(self._bootstrap_servers, self._topics, self._group, self._start,
                                      self._bounded, self._consumer_config)


class _ReadPartitionsFn(beam.DoFn, RestrictionProvider, EventTimeWatermarkEstimatorProvider):
    """SDF: KafkaPartition -> its records (or decoded events + dead letters).

    The DoFn is its own restriction and watermark-estimator provider so both
    can use the DoFn's configuration and, for sizing, its live consumers.
    Subclasses fix boundedness (``unbounded_per_element`` is a decorator).
    """

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        consumer_group: Optional[str],
        decoder: Any,
        max_out_of_orderness: Duration,
        idle_timeout: Duration,
        poll_batch_size: int,
        poll_timeout_ms: int,
        max_read_seconds: float,
        consumer_per_partition: bool,
        consumer_config: Optional[Mapping[str, Any]],
        metrics: Optional[PipelineMetrics] = None,
        aligned_with: Optional[str] = None,
    ):
        beam.DoFn.__init__(self)
        self._metrics = metrics or PipelineMetrics(prometheus=False)
        EventTimeWatermarkEstimatorProvider.__init__(
            self, max_out_of_orderness, idle_timeout, aligned_with=aligned_with
        )
        self._bootstrap_servers = bootstrap_servers
        self._group = consumer_group
        self._decoder = decoder
        self._poll_batch_size = poll_batch_size
        self._poll_timeout_ms = poll_timeout_ms
        self._max_read_seconds = max_read_seconds
        self._idle_resume_delay = Duration(micros=poll_timeout_ms * 1000)
        self._consumer_per_partition = consumer_per_partition
        self._consumer_config = consumer_config
        self._records_read = Metrics.counter(_SOURCE_NAMESPACE, "records_read")
        self._events = Metrics.counter(_SOURCE_NAMESPACE, "events_decoded")
        self._dead_letters = Metrics.counter(_SOURCE_NAMESPACE, "dead_letters")
        self._commits = Metrics.counter(_SOURCE_NAMESPACE, "offset_commits")
        self._commit_failures = Metrics.counter(_SOURCE_NAMESPACE, "offset_commit_failures")
        self._without_key = Metrics.counter(_SOURCE_NAMESPACE, "events_without_key")

    # -- restriction provider -------------------------------------------------

    def initial_restriction(self, element: KafkaPartition) -> OffsetRange:
        stop = UNBOUNDED_STOP if element.stop_offset is None else element.stop_offset
        return OffsetRange(element.start_offset, max(stop, element.start_offset))

    def create_tracker(self, restriction: OffsetRange) -> PartitionOffsetTracker:
        return PartitionOffsetTracker(restriction)

    def split(self, element, restriction):
        # One restriction per partition: see PartitionOffsetTracker for why.
        yield restriction

    def restriction_size(self, element: KafkaPartition, restriction: OffsetRange) -> float:
        if restriction.stop != UNBOUNDED_STOP:
            return float(restriction.size())
        highwater = None
        consumers = getattr(self, "_consumers", None)
        if consumers is not None:
                highwater = consumers.highwater(TopicPartition(element.topic, element.partition))
        # Backlog when known; an unknown backlog still is work, never "done".
        return float(max(highwater - restriction.start, 1)) if highwater is not None else 1.0

    # -- lifecycle ------------------------------------------------------------

    def setup(self):
        self._metrics.setup()
        self._consumers = _PartitionConsumers(
            _consumer_config(
                self._bootstrap_servers,
                self._consumer_config,
                max_poll_records=self._poll_batch_size,
            ),
            per_partition=self._consumer_per_partition,
        )
        self._committer = None
        self._closing = False
        self._warned_keyless: set = set()

    def start_bundle(self):
        # Offsets to commit once this bundle's outputs are durable.
        self._bundle_offsets: dict = {}
        self._finalizer_registered = False

    def teardown(self):
        self._closing = True
        if getattr(self, "_consumers", None) is not None:
            self._consumers.close()
        if getattr(self, "_committer", None) is not None:
            try:
                self._committer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - closing must not mask teardown
                _LOG.warning("closing the Kafka offset committer failed", exc_info=True)
            self._committer = None

    # -- offset commits -------------------------------------------------------

    def _register_commit(self, finalizer) -> None:
        # One callback per bundle; every partition read in the bundle adds its
        # offset to the same dict. Registered even when nothing will be
        # committed: Prism sends FinalizeBundle to every bundle of a stage whose
        # DoFn asks for finalization, and the Python SDK logs an error for a
        # bundle that registered no callback.
        if not self._finalizer_registered:
            offsets = self._bundle_offsets
            finalizer.register(lambda: self._commit(offsets))
            self._finalizer_registered = True

    def _commit(self, offsets: Mapping) -> None:
        if not offsets or self._group is None:
            return
        try:
            if self._committer is None:
                self._committer = KafkaConsumer(
                    **_consumer_config(
                        self._bootstrap_servers,
                        self._consumer_config,
                        group_id=self._group,
                        client_id="onboardflow-kafka-committer",
                    )
                )
            self._committer.commit(
                offsets={tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()}
            )
            self._commits.inc()
        except Exception:  # noqa: BLE001 - next bundle's commit supersedes this one
            self._commit_failures.inc()
            _LOG.warning("committing Kafka offsets for group %s failed", self._group, exc_info=True)

    # -- reading ----------------------------------------------------------------

    def _read(self, partition: KafkaPartition, tracker, watermark, finalizer):
        tp = TopicPartition(partition.topic, partition.partition)
        restriction = tracker.current_restriction()
        start, stop = restriction.start, restriction.stop
        bounded = stop != UNBOUNDED_STOP
        self._register_commit(finalizer)
        if self._aligned_with is not None:
            PartitionWatermarks.expect(self._aligned_with, partition.peers)
        if start >= stop:
            # Nothing to read (empty partition, or committed at its end offset).
            self._bundle_offsets[tp] = stop
            self._finished(tp)
            return
        consumer = self._consumers.at(tp, start)
        decoder = self._decoder
        decode = decoder.decode if decoder is not None else None
        try_claim = tracker.try_claim
        last_offset = stop - 1
        next_offset = start
        deadline = time.monotonic() + self._max_read_seconds
        while True:
            try:
                batch = consumer.poll(timeout_ms=self._poll_timeout_ms, max_records=self._poll_batch_size).get(tp)
                if not batch:
                    position, highwater = consumer.position(tp), consumer.highwater(tp)
            except Exception:
                if not self._closing:
                    raise
                # The job is being cancelled and teardown closed the consumer
                # under this bundle; hand the rest back instead of failing.
                tracker.defer_remainder()
                break
            if not batch:
                if position >= stop:
                    # Bounded end reached across a gap (compaction, transaction
                    # markers): claiming `stop` fails and closes the range.
                    try_claim(stop)
                    next_offset = stop
                    break
                if bounded or highwater is None or position < highwater:
                    # Records exist but the fetch has not returned them yet.
                    if time.monotonic() < deadline:
                        continue
                else:
                    watermark.observe_caught_up()
                # The consumer keeps its long-poll fetch in flight meanwhile, so
                # new records are usually buffered by the time this resumes.
                tracker.defer_remainder(self._idle_resume_delay)
                break
            finished = False
            max_event_ms = None
            read = events = keyless = 0
            for rec in batch:
                offset = rec.offset
                if not try_claim(offset):
                    finished = True
                    next_offset = stop
                    break
                read += 1
                next_offset = offset + 1
                record = KafkaRecord(rec.topic, rec.partition, offset, rec.timestamp, rec.key, rec.value)
                if decode is None:
                    event_ms = rec.timestamp
                    yield TimestampedValue(record, Timestamp(micros=event_ms * 1000))
                else:
                    try:
                        event = decode(record)
                        event_ms = _event_time_ms(event)
                    except Exception as error:  # noqa: BLE001 - bad input is dead-lettered, never raised
                        event_ms = None
                        yield beam.pvalue.TaggedOutput(
                            DEAD_LETTERS,
                            TimestampedValue(
                                decoder.dead_letter(record, error, stage="decode"),
                                Timestamp(micros=rec.timestamp * 1000),
                            ),
                        )
                    else:
                        events += 1
                        if not rec.key:
                            keyless += 1
                        yield TimestampedValue(event, Timestamp(micros=event_ms * 1000))
                if event_ms is not None and (max_event_ms is None or event_ms > max_event_ms):
                    max_event_ms = event_ms
                if offset >= last_offset:
                    finished = True
                    break
            self._records_read.inc(read)
            self._metrics.events_read(tp.topic, tp.partition, read)
            if decode is not None:
                self._events.inc(events)
                self._dead_letters.inc(read - events)
                if keyless:
                    self._keyless(tp, keyless)
            if max_event_ms is not None:
                watermark.observe_event_time(Timestamp(micros=max_event_ms * 1000))
            else:
                watermark.observe_records()
            if finished:
                break
            if time.monotonic() >= deadline:
                # Checkpoint so the watermark and committed offsets move on.
                tracker.defer_remainder()
                break
        if next_offset > start:
            self._bundle_offsets[tp] = next_offset
        if bounded and next_offset >= stop:
            self._finished(tp)
        self._metrics.source_watermark(tp.topic, tp.partition, watermark.partition_watermark().micros)

    def _keyless(self, tp, n: int) -> None:
        self._without_key.inc(n)
        self._metrics.events_without_key(tp.topic, tp.partition, n)
        if tp not in self._warned_keyless:
            self._warned_keyless.add(tp)
            _LOG.warning("%s/%d: events without a Kafka key (%d in this batch; counted as events_without_key): "
                         "their producer spreads a user's events over partitions", tp.topic, tp.partition, n)

    def _finished(self, tp) -> None:
        if self._aligned_with is not None:
            PartitionWatermarks.finish(self._aligned_with, (tp.topic, tp.partition))


class _ReadBoundedPartitionsFn(_ReadPartitionsFn):
    def process(
        self,
        partition: KafkaPartition,
        # Beam passes the finalizer positionally and the tracker/estimator by
        # keyword, so the finalizer must come first.
        finalizer=beam.DoFn.BundleFinalizerParam,
        tracker=beam.DoFn.RestrictionParam(),
        watermark=beam.DoFn.WatermarkEstimatorParam(),
    ):
        yield from self._read(partition, tracker, watermark, finalizer)


class _ReadUnboundedPartitionsFn(_ReadPartitionsFn):
    @beam.DoFn.unbounded_per_element()
    def process(
        self,
        partition: KafkaPartition,
        # Beam passes the finalizer positionally and the tracker/estimator by
        # keyword, so the finalizer must come first.
        finalizer=beam.DoFn.BundleFinalizerParam,
        tracker=beam.DoFn.RestrictionParam(),
        watermark=beam.DoFn.WatermarkEstimatorParam(),
    ):
        yield from self._read(partition, tracker, watermark, finalizer)


# --------------------------------------------------------------------------
# Options and transforms
# --------------------------------------------------------------------------


class KafkaReadOptions(PipelineOptions):
    """Where and how ReadFromKafka reads (``--kafka_*`` flags).

    The watermark of each partition is the largest event time seen on it minus
    ``--kafka_max_out_of_orderness``; a partition without new records for
    ``--kafka_idle_timeout`` stops holding the watermark back. Build the source
    with ``ReadFromKafka.from_options(options, decoder=...)``.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--kafka_bootstrap_servers",
            default="127.0.0.1:9092",
            help="Comma-separated host:port list of Kafka brokers to bootstrap from.",
        )
        parser.add_argument(
            "--kafka_topics",
            default="onboarding.events",
            help="Comma-separated topics to read; every partition of each is read.",
        )
        parser.add_argument(
            "--kafka_consumer_group",
            default="onboardflow",
            help=(
                "Consumer group whose offsets are committed once a bundle's outputs are "
                "durable, and read back by --kafka_start_position=committed. The pipeline "
                "assigns partitions itself and never joins the group, so do not share it "
                "with subscribing consumers."
            ),
        )
        parser.add_argument(
            "--kafka_start_position",
            default="committed",
            help=(
                "Where each partition starts: 'committed' (the group's committed offset, "
                "else the earliest), 'earliest', 'latest', or 'timestamp:<epoch ms>' (first "
                "record at or after that time, else the end)."
            ),
        )
        parser.add_argument(
            "--kafka_max_out_of_orderness",
            type=float,
            default=60.0,
            help=(
                "Seconds. The watermark trails the largest event time seen on a partition by "
                "this much; events older than that when they arrive are late. Larger values "
                "tolerate more disorder but delay every event-time result by as much."
            ),
        )
        parser.add_argument(
            "--kafka_idle_timeout",
            type=float,
            default=30.0,
            help=(
                "Seconds. A partition with no new records for this long is idle: its watermark "
                "follows the wall clock (minus the out-of-orderness) so it stops holding back "
                "windows. Events that arrive on it later and older than that are late."
            ),
        )
        parser.add_argument(
            "--kafka_watermark_alignment",
            choices=WATERMARK_ALIGNMENTS,
            default="auto",
            help=(
                "'process': every partition reports the minimum watermark over all partitions of "
                "the read, kept per SDK process (needed on Prism, which takes an SDF's watermark "
                "from its latest bundle only; see PartitionWatermarks). 'off': each partition "
                "reports its own (distributed runners, e.g. Flink, hold the minimum themselves). "
                "'auto': 'process' on the local runners (Prism, Direct), else 'off'."
            ),
        )
        parser.add_argument(
            "--kafka_poll_batch_size",
            type=int,
            default=500,
            help="Max records per kafka-python poll (max_poll_records).",
        )
        parser.add_argument(
            "--kafka_max_read_seconds",
            type=float,
            default=0.25,
            help=(
                "Longest stretch a partition is read in one bundle before the source checkpoints: "
                "records reach the next stages only when their bundle ends, so this bounds the "
                "latency a steady input adds at the source."
            ),
        )
        parser.add_argument(
            "--kafka_bounded",
            action="store_true",
            default=False,
            help=(
                "Batch / replay mode: stop every partition at its end offset taken when the "
                "pipeline starts, instead of reading forever."
            ),
        )


#: Values of ``--kafka_watermark_alignment``.
WATERMARK_ALIGNMENTS = ("auto", "process", "off")

#: Runners that execute every SDK worker of a job in one process (lower-cased,
#: without a "runner" suffix): Prism starts one worker per environment.
_SINGLE_PROCESS_RUNNERS = {"", "prism", "direct", "switchingdirect", "bundlebaseddirect"}


def watermark_alignment(options: PipelineOptions) -> bool:
    """Whether ``--kafka_watermark_alignment`` (and, for ``auto``, the runner) asks for alignment."""
    mode = options.view_as(KafkaReadOptions).kafka_watermark_alignment
    if mode != "auto":
        return mode == "process"
    runner = options.view_as(StandardOptions).runner
    name = runner if isinstance(runner, str) else type(runner).__name__ if runner is not None else ""
    name = name.lower().rsplit(".", 1)[-1]
    return (name[: -len("runner")] if name.endswith("runner") else name) in _SINGLE_PROCESS_RUNNERS


class ReadFromKafka(beam.PTransform):
    """Reads topics' partitions as a splittable DoFn: Kafka -> records or events.

    In: the pipeline root. Out, without a ``decoder``: a PCollection of
    ``KafkaRecord`` timestamped with the Kafka record timestamp. With a
    ``decoder`` (``decode(record) -> dict`` raising an error with ``.reason`` on
    bad input, ``dead_letter(record, error, stage) -> dict``): a tagged result
    whose main output (``result.events``) holds the decoded
    events timestamped with their ``occurred_at`` (epoch ms), and
    ``result.dead_letters`` the dead-letter dicts of undecodable records (or
    events without a usable ``occurred_at``), timestamped with the Kafka record
    timestamp. Nothing is dropped; counters live in namespace
    ``onboardflow.kafka_source``.

    Args:
      bootstrap_servers: ``host:port[,host:port]`` of the brokers.
      topics: a topic or a list of topics; every partition of each is read.
      consumer_group: group whose offsets are committed after each bundle's
        outputs are persisted (none committed without one).
      start_position: ``committed`` (default; earliest if never committed),
        ``earliest``, ``latest`` or ``timestamp:<epoch ms>``.
      bounded / stop_at_end_offsets: read up to the end offsets taken at start
        and finish (batch, replay); otherwise read forever (streaming).
      decoder: see above; without one, KafkaRecords come out.
      max_out_of_orderness, idle_timeout: seconds (or Durations) of the
        watermark policy, see ``EventTimeWatermarkEstimator``.
      poll_batch_size: records per kafka-python poll.
      poll_timeout_ms: how long a poll waits for records, and how long a
        caught-up partition rests before it is polled again.
      max_read_seconds: longest stretch a partition is read before the SDF
        checkpoints, which is when its watermark and offsets move on and its
        records reach the next stages. Measured at 500 events/s on Prism
        (tests/benchmarks/bench_pipeline.py): 1.0 s gave produce->Redis p50
        3.9 s / p99 11.3 s, 0.25 s p50 2.4 s / p99 3.4 s, with the same
        time to drain a 50k backlog.
      consumer_per_partition: one KafkaConsumer per partition per DoFn instance,
        or a single one re-assigned between partitions. Default: per partition
        when streaming, single when bounded (measured in ``_PartitionConsumers``).
      consumer_config: extra kafka-python consumer settings (security, ...).
      align_watermarks: report each partition's watermark as the minimum over
        all partitions of the read (``PartitionWatermarks``); only for runners
        that read every partition in one process. ``from_options`` decides it
        from ``--kafka_watermark_alignment`` and the runner.
      partitions: the offset ranges to read, already resolved
        (``resolve_partitions``), instead of resolving them when the job
        starts: for a launcher that scanned exactly these ranges first.

    Records without a Kafka key are read like any other: the pipeline keys
    by the event's own user, never by the Kafka key. Decoded events from such
    records are counted (``events_without_key``, and a warning once per
    partition and worker), because their producer spreads one user's events
    over several partitions.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Union[str, Sequence[str]],
        *,
        consumer_group: Optional[str] = None,
        start_position: Union[str, StartPosition] = "committed",
        bounded: bool = False,
        stop_at_end_offsets: Optional[bool] = None,
        decoder: Any = None,
        max_out_of_orderness: Union[float, Duration] = 60,
        idle_timeout: Union[float, Duration] = 30,
        poll_batch_size: int = 500,
        poll_timeout_ms: int = 100,
        max_read_seconds: float = 0.25,
        consumer_per_partition: Optional[bool] = None,
        consumer_config: Optional[Mapping[str, Any]] = None,
        metrics: Optional[PipelineMetrics] = None,
        align_watermarks: bool = False,
        partitions: Optional[Sequence[KafkaPartition]] = None,
    ):
        super().__init__()
        self._metrics = metrics
        self._partitions = None if partitions is None else tuple(partitions)
        if self._partitions is not None and (
                bool(bounded if stop_at_end_offsets is None else stop_at_end_offsets)
                != all(p.stop_offset is not None for p in self._partitions)):
            raise ValueError("partitions given to a bounded read need stop offsets, to a streaming read none")
        # One id per read, so the alignment of two pipelines in one process never mixes.
        self._aligned_with = f"read-{uuid.uuid4().hex}" if align_watermarks else None
        self._topics = [topics] if isinstance(topics, str) else list(topics)
        if not self._topics:
            raise ValueError("ReadFromKafka needs at least one topic")
        self._start = StartPosition.parse(start_position)
        if self._start.kind == "committed" and not consumer_group:
            raise ValueError("start_position='committed' needs a consumer_group")
        if poll_batch_size < 1 or poll_timeout_ms < 1 or max_read_seconds <= 0:
            raise ValueError("poll_batch_size, poll_timeout_ms and max_read_seconds must be positive")
        self._bootstrap_servers = bootstrap_servers
        self._group = consumer_group or None
        self._bounded = bool(bounded if stop_at_end_offsets is None else stop_at_end_offsets)
        self._decoder = decoder
        self._max_out_of_orderness = Duration.of(max_out_of_orderness)
        self._idle_timeout = Duration.of(idle_timeout)
        self._poll_batch_size = poll_batch_size
        self._poll_timeout_ms = poll_timeout_ms
        self._max_read_seconds = max_read_seconds
        # The faster strategy for each mode, as measured in _PartitionConsumers.
        self._consumer_per_partition = (
            not self._bounded if consumer_per_partition is None else consumer_per_partition
        )
        self._consumer_config = dict(consumer_config or {})

    @classmethod
    def from_options(cls, options: PipelineOptions, decoder: Any = None, **overrides: Any) -> "ReadFromKafka":
        kafka = options.view_as(KafkaReadOptions)
        kwargs = dict(
            bootstrap_servers=kafka.kafka_bootstrap_servers,
            topics=[t.strip() for t in kafka.kafka_topics.split(",") if t.strip()],
            consumer_group=kafka.kafka_consumer_group,
            start_position=kafka.kafka_start_position,
            bounded=kafka.kafka_bounded,
            decoder=decoder,
            max_out_of_orderness=kafka.kafka_max_out_of_orderness,
            idle_timeout=kafka.kafka_idle_timeout,
            poll_batch_size=kafka.kafka_poll_batch_size,
            max_read_seconds=kafka.kafka_max_read_seconds,
            align_watermarks=watermark_alignment(options),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def expand(self, pbegin):
        partitions = (
            pbegin
            | "Impulse" >> beam.Impulse()
            | "DiscoverPartitions"
            >> beam.ParDo(
                _DiscoverPartitionsFn(
                    self._bootstrap_servers,
                    self._topics,
                    self._group,
                    self._start,
                    self._bounded,
                    self._consumer_config,
                    self._partitions,
                )
            )
            # Spread partitions over workers; discovery ran on just one.
            | "DistributePartitions" >> beam.Reshuffle()
        )
        fn_class = _ReadBoundedPartitionsFn if self._bounded else _ReadUnboundedPartitionsFn
        read = beam.ParDo(
            fn_class(
                bootstrap_servers=self._bootstrap_servers,
                consumer_group=self._group,
                decoder=self._decoder,
                max_out_of_orderness=self._max_out_of_orderness,
                idle_timeout=self._idle_timeout,
                poll_batch_size=self._poll_batch_size,
                poll_timeout_ms=self._poll_timeout_ms,
                max_read_seconds=self._max_read_seconds,
                consumer_per_partition=self._consumer_per_partition,
                consumer_config=self._consumer_config,
                metrics=self._metrics,
                aligned_with=self._aligned_with,
            )
        )
        if self._decoder is None:
            return partitions | "ReadPartitions" >> read.with_output_types(KafkaRecord)
        return partitions | "ReadAndDecodePartitions" >> read.with_outputs(DEAD_LETTERS, main="events")


# --------------------------------------------------------------------------
# Sink
# --------------------------------------------------------------------------


class KafkaWriteError(RuntimeError):
    """Kafka did not acknowledge a record; the bundle fails so the runner retries it."""


class _WriteToKafkaFn(beam.DoFn):
    """(key, value) -> Kafka; a bundle finishes only once Kafka acked every record."""

    def __init__(self, bootstrap_servers: str, topic: str, producer_config: Mapping[str, Any]):
        super().__init__()
        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        self._producer_config = dict(producer_config)
        self._sent = Metrics.counter(_SINK_NAMESPACE, "records_sent")
        self._invalid = Metrics.counter(_SINK_NAMESPACE, "invalid_elements")

    def setup(self):
        self._producer = KafkaProducer(bootstrap_servers=self._bootstrap_servers, **self._producer_config)
        self._lock = threading.Lock()

    def start_bundle(self):
        self._submitted = 0
        self._failures: list = []

    def _on_send_error(self, error: BaseException) -> None:
        # Runs on the producer's I/O thread.
        with self._lock:
            self._failures.append(error)

    def process(self, element):
        key, value = element if isinstance(element, tuple) and len(element) == 2 else (None, None)
        if not isinstance(value, (bytes, bytearray)) or not (key is None or isinstance(key, (bytes, bytearray))):
            self._invalid.inc()
            yield {"stage": "kafka_write", "reason": "not_a_bytes_key_value_pair", "topic": self._topic,
                   "element": element}
            return
        self._producer.send(self._topic, key=key, value=value).add_errback(self._on_send_error)
        self._submitted += 1

    def finish_bundle(self):
        if not self._submitted:
            return
        self._producer.flush()
        with self._lock:
            failures = list(self._failures)
        self._sent.inc(self._submitted - len(failures))
        if failures:
            raise KafkaWriteError(
                f"{len(failures)} of {self._submitted} records to {self._topic!r} were not acknowledged: "
                f"{type(failures[0]).__name__}: {failures[0]}"
            )

    def teardown(self):
        producer = getattr(self, "_producer", None)
        if producer is not None:
            producer.close()
            self._producer = None


class WriteToKafka(beam.PTransform):
    """Writes (key, value) pairs to one Kafka topic, at least once.

    In: a PCollection of ``(key: bytes | None, value: bytes)``. Each bundle's
    records are sent by a per-worker idempotent ``KafkaProducer`` (acks="all",
    batched with ``linger_ms``/``batch_size``, retried with backoff for up to
    ``delivery_timeout_ms``) and flushed in ``finish_bundle``; a record Kafka
    does not acknowledge fails the bundle so the runner retries it. Out: a
    PCollection of dead-letter dicts for elements that are not such a pair
    (counted as ``invalid_elements``); ``records_sent`` counts acked records.
    Both counters are in namespace ``onboardflow.kafka_sink``.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        linger_ms: int = 20,
        batch_size: int = 64 * 1024,
        retries: int = 10,
        retry_backoff_ms: int = 200,
        delivery_timeout_ms: int = 120_000,
        compression_type: Optional[str] = None,
        producer_config: Optional[Mapping[str, Any]] = None,
    ):
        super().__init__()
        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        self._producer_config = {
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": linger_ms,
            "batch_size": batch_size,
            "retries": retries,
            "retry_backoff_ms": retry_backoff_ms,
            "delivery_timeout_ms": delivery_timeout_ms,
            "compression_type": compression_type,
            "client_id": "onboardflow-kafka-sink",
        }
        self._producer_config.update(producer_config or {})

    def expand(self, pcoll):
        return pcoll | "SendToKafka" >> beam.ParDo(
            _WriteToKafkaFn(self._bootstrap_servers, self._topic, self._producer_config)
        )
