"""``ReadFromKafka``: Kafka topics -> records, or decoded events and dead letters, as a splittable DoFn.

Beam's own ``apache_beam.io.kafka`` needs a Java expansion service; this source
reads Kafka from plain Python (kafka-python, through transforms/kafka/) so the
same pipeline runs on Prism and on Flink's portable runner::

    Impulse -> DiscoverPartitions -> Reshuffle -> ReadPartitions (SDF)

* ``DiscoverPartitions`` lists the partitions once per run and resolves their
  offset ranges (``resolve_partitions``), unless the launcher passed them
  (``partitions=``, e.g. to pre-scan a backfill's horizon).
* ``ReadPartitions`` polls each partition in batches and claims each record's
  offset before emitting it. Streaming, the restriction is open-ended and the
  DoFn checkpoints when caught up or after ``max_read_seconds``, so watermarks
  and offset commits move on; bounded, it ends at the end offset.
* With a ``decoder`` events are decoded here, so the element timestamp (and
  the watermark) follow the event's ``occurred_at``; undecodable records go to
  the ``dead_letters`` output.
* The watermark is ``EventTimeWatermarkEstimator`` (pipelines/beam/kafka_sdf.py)
  over the core policy (``PartitionWatermark``), aligned across partitions on
  the local runners; ``PartitionOffsetTracker`` keeps one restriction per
  partition.
* Consumer-group offsets are committed from a bundle finalizer, i.e. once the
  runner persisted the bundle's outputs (on Flink: when the checkpoint holding
  them completes). They mark progress for operators and for
  ``start_position="committed"`` restarts; the runner's checkpoints give
  at-least-once delivery inside a running job (docs/local-runner.md).
* Partitions added to a topic later are read by the next run.

Counters: namespace ``onboardflow.kafka_source``; the per-partition Prometheus
metrics go through ``PipelineMetrics``. Reasoning and measurements:
docs/decisions.md (``transforms/kafka``).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp
from kafka import TopicPartition

from ...transforms.kafka.consumer import OffsetCommitter, PartitionConsumers, resolve_partitions, source_consumer_config
from ...transforms.kafka.offsets import StartPosition
from ...transforms.kafka.records import UNBOUNDED_STOP, KafkaPartition, KafkaRecord, event_time_ms, record_time_ms
from ...transforms.kafka.watermarks import PartitionWatermarks
from ...transforms.metrics import PipelineMetrics
from ..options import KafkaReadOptions, watermark_alignment
from .kafka_sdf import EventTimeWatermarkEstimatorProvider, PartitionOffsetTracker
from .metrics import beam_pipeline_metrics

_LOG = logging.getLogger(__name__)

#: Tag of the dead-letter output when ReadFromKafka decodes.
DEAD_LETTERS = "dead_letters"

SOURCE_NAMESPACE = "onboardflow.kafka_source"


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
        self._metrics = metrics or beam_pipeline_metrics(prometheus=False)
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
        self._records_read = Metrics.counter(SOURCE_NAMESPACE, "records_read")
        self._events = Metrics.counter(SOURCE_NAMESPACE, "events_decoded")
        self._dead_letters = Metrics.counter(SOURCE_NAMESPACE, "dead_letters")
        self._commits = Metrics.counter(SOURCE_NAMESPACE, "offset_commits")
        self._commit_failures = Metrics.counter(SOURCE_NAMESPACE, "offset_commit_failures")
        self._without_key = Metrics.counter(SOURCE_NAMESPACE, "events_without_key")

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
        self._consumers = PartitionConsumers(
            source_consumer_config(self._bootstrap_servers, self._consumer_config,
                                   max_poll_records=self._poll_batch_size),
            per_partition=self._consumer_per_partition,
        )
        self._committer = (OffsetCommitter(self._bootstrap_servers, self._group, self._consumer_config)
                           if self._group is not None else None)
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
            self._committer.close()
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
        if not offsets or self._committer is None:
            return
        try:
            self._committer.commit(offsets)
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
                    # The runner split the range here (a checkpoint): the
                    # residual owns this offset onwards, commits included.
                    finished = True
                    break
                read += 1
                next_offset = offset + 1
                record = KafkaRecord(rec.topic, rec.partition, offset, rec.timestamp, rec.key, rec.value)
                if decode is None:
                    event_ms = record_time_ms(rec.timestamp)
                    yield TimestampedValue(record, Timestamp(micros=event_ms * 1000))
                else:
                    try:
                        event = decode(record)
                        event_ms = event_time_ms(event)
                    except Exception as error:  # noqa: BLE001 - bad input is dead-lettered, never raised
                        event_ms = None
                        yield beam.pvalue.TaggedOutput(
                            DEAD_LETTERS,
                            TimestampedValue(
                                decoder.dead_letter(record, error, stage="decode"),
                                Timestamp(micros=record_time_ms(rec.timestamp) * 1000),
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
        watermark policy, see ``PartitionWatermark``.
      poll_batch_size: records per kafka-python poll.
      poll_timeout_ms: how long a poll waits for records, and how long a
        caught-up partition rests before it is polled again.
      max_read_seconds: longest stretch a partition is read before the SDF
        checkpoints, which is when its watermark and offsets move on and its
        records reach the next stages (the default's measurement:
        docs/decisions.md).
      consumer_per_partition: one KafkaConsumer per partition per DoFn instance,
        or a single one re-assigned between partitions. Default: per partition
        when streaming, single when bounded (``PartitionConsumers``).
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
        # The faster strategy for each mode (PartitionConsumers).
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


