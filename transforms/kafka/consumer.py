"""kafka-python consumers of a reader: settings, partition discovery, positioned consumers, commits.

* ``source_consumer_config(bootstrap, extra, **overrides)`` -> the settings every
  consumer of the source shares (no auto-commit, no topic auto-creation).
* ``resolve_partitions(...)`` -> one ``KafkaPartition`` per topic-partition,
  start offsets resolved now (``StartPosition``) and, bounded, the end offsets
  of now as stop offsets.
* ``PartitionConsumers``: the consumers of one reader instance, positioned
  on a partition at an offset.
* ``OffsetCommitter``: commits a group's next offsets, per partition.

Why per-partition consumers stream and a single one reads bounded ranges:
docs/decisions.md (``transforms/kafka``).
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Mapping, Optional, Sequence

from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from ..connections import kafka_config
from .offsets import StartPosition, resolve_start_offset
from .records import KafkaPartition

_LOG = logging.getLogger(__name__)


def source_consumer_config(bootstrap_servers: str, extra: Optional[Mapping[str, Any]] = None, **overrides: Any) -> dict:
    """kafka-python consumer settings of the source; ``extra`` (security, ...) then ``overrides`` win."""
    config = {
        **kafka_config(bootstrap_servers),
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
    the partition's end offset of now. The source calls it on a worker when
    the job starts; a launcher that must know the exact ranges a bounded run
    reads (the backfill horizon, transforms/backfill_horizon.py) calls it
    itself and hands the result to the source (``partitions=``). Raises
    ``ValueError`` for a topic that does not exist.
    """
    consumer = KafkaConsumer(
        **source_consumer_config(
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


class PartitionConsumers:
    """The KafkaConsumers of one reader instance, positioned for a partition.

    ``per_partition=True`` keeps one consumer per partition the instance
    reads: when the reader resumes a partition the consumer is already at the
    right offset, its prefetched records are still buffered and its long-poll
    fetch is in flight. ``per_partition=False`` keeps a single consumer and
    re-assigns/seeks it whenever the instance switches partitions, which throws
    prefetched records away and costs a position validation round trip, but
    runs one kafka-python I/O thread instead of one per partition. Streaming
    reads default to the first, bounded reads to the second (measurements:
    docs/decisions.md, ``transforms/kafka``).
    """

    def __init__(self, config: Mapping[str, Any], per_partition: bool):
        self._config = dict(config)
        self._per_partition = per_partition
        self._consumers: dict = {}
        # close() may run on another SDK-harness thread than a bundle that is
        # still creating a consumer (seen on cancel: "dictionary changed size").
        self._lock = threading.Lock()

    def at(self, tp: TopicPartition, offset: int) -> KafkaConsumer:
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

    def highwater(self, tp: TopicPartition) -> Optional[int]:
        """The partition's end offset as last fetched, None when not known here."""
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


class OffsetCommitter:
    """Commits a consumer group's next offsets (``{TopicPartition: offset}``).

    The pipeline assigns partitions itself and never joins the group; the
    committer's consumer is created on the first commit. ``commit`` raises
    what kafka-python raises (the caller counts and logs it: the next commit
    supersedes a failed one).
    """

    def __init__(self, bootstrap_servers: str, group: str, extra: Optional[Mapping[str, Any]] = None):
        self._config = source_consumer_config(bootstrap_servers, extra, group_id=group,
                                       client_id="onboardflow-kafka-committer")
        self._consumer: Optional[KafkaConsumer] = None

    def commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        if self._consumer is None:
            self._consumer = KafkaConsumer(**self._config)
        self._consumer.commit(offsets={tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - closing must not mask teardown
                _LOG.warning("closing the Kafka offset committer failed", exc_info=True)
