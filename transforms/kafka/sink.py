"""``KafkaSink``: ``(key, value)`` byte pairs -> one Kafka topic, at least once, as a ``BatchingSink``.

In: pairs ``(key: bytes | None, value: bytes)``; anything else is refused at
``prepare`` (dead letter, stage ``kafka_write``, reason
``not_a_bytes_key_value_pair``). A flush (``write``) sends the batch in order
through one idempotent ``acks="all"`` kafka-python producer and waits for
every ack. Out, per acked record: kafka-python's ``RecordMetadata`` (topic,
partition, offset). A record Kafka did not acknowledge fails the flush with
``KafkaWriteError``; when every failure was one kafka-python calls retriable
(timeouts, no leader, no broker to bootstrap from) the base sends the
unacknowledged records once more, else the error is raised at once and the
engine retries the input (a record is never dropped). Same key, same
partition (the default partitioner), in the order of the batch.

Counters: ``records_sent`` (acked), ``invalid_elements`` (dead letters),
``retries``. The Beam shell: pipelines/beam/kafka_sink.py.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from kafka import KafkaProducer
from kafka.errors import KafkaError

from ..connections import kafka_config
from ..sinks.base import BatchingSink, Count, RecordRejected, Rejected, SinkBatch, SinkRecord
from ..sinks.retry import RetryPolicy

STAGE = "kafka_write"
DEFAULT_FLUSH_SIZE = 10_000
#: kafka-python already retries within an attempt for ``delivery_timeout_ms``;
#: the sink sends what stayed unacknowledged once more, so an outage of about
#: twice that is ridden out before the bundle fails.
DEFAULT_RETRY = RetryPolicy(max_attempts=2, budget_s=0.0)
_LOG = logging.getLogger(__name__)


class KafkaWriteError(RuntimeError):
    """Kafka did not acknowledge records of a batch.

    ``errors``: the failures (one per record that failed, or the error that
    stopped sending); ``acked``: how many records of the attempt Kafka did acknowledge.
    """

    def __init__(self, message: str, errors: list, acked: int = 0):
        super().__init__(message)
        self.errors = errors
        self.acked = acked

    @property
    def retriable(self) -> bool:
        """True when sending again can help: every failure is one kafka-python calls retriable."""
        return all(getattr(error, "retriable", False) for error in self.errors)


def sink_producer_config(
    *,
    linger_ms: int = 20,
    batch_size: int = 64 * 1024,
    retries: int = 10,
    retry_backoff_ms: int = 200,
    delivery_timeout_ms: int = 120_000,
    compression_type: Optional[str] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict:
    """kafka-python producer settings of the sink: idempotent, acks from all replicas; ``extra`` wins."""
    config = {
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
    config.update(extra or {})
    return config


class KafkaSink(BatchingSink):
    """One producer for one topic, flushed every ``flush_size`` records; see the module docstring.

    The producer is created at the first write (a sink that sends nothing
    needs no broker) and closed by ``close``.
    """

    stage = STAGE
    dead_letter_counter = "invalid_elements"
    retry_counter = "retries"
    description = "Kafka sink write"
    log = _LOG

    def __init__(self, bootstrap_servers: str, topic: str, config: Mapping[str, Any],
                 flush_size: int = DEFAULT_FLUSH_SIZE, retry: Optional[RetryPolicy] = DEFAULT_RETRY,
                 count: Optional[Count] = None) -> None:
        super().__init__(flush_size, retry, count)
        self.topic = topic
        self._bootstrap_servers = bootstrap_servers
        self._config = dict(config)
        self._producer: Optional[KafkaProducer] = None

    def prepare(self, element: Any) -> tuple:
        if isinstance(element, tuple) and len(element) == 2:
            key, value = element
            if isinstance(value, (bytes, bytearray)) and (key is None or isinstance(key, (bytes, bytearray))):
                return element
        raise RecordRejected("not_a_bytes_key_value_pair", "element is not a (bytes | None, bytes) pair")

    def dead_letter(self, record: SinkRecord) -> dict:
        return {**super().dead_letter(record), "topic": self.topic}

    def is_transient(self, error: BaseException) -> bool:
        return isinstance(error, KafkaWriteError) and error.retriable

    def write(self, batch: SinkBatch) -> list[Rejected]:
        """Sends the batch in order, waits for every ack; raises ``KafkaWriteError`` when any failed."""
        futures, stopped = [], None
        try:
            producer = self._connect()
            for key, value in batch.values:
                futures.append(producer.send(self.topic, key=key, value=value))
        except KafkaError as error:
            # A record over max_request_size, or no metadata within max_block_ms:
            # the rest would wait just as long, so they stay for the next attempt.
            stopped = error
        if futures:
            self._producer.flush()
        failures, acked = [], 0
        for record, future in zip(batch, futures):
            if future.succeeded():
                record.result = future.value
                acked += 1
            else:
                failures.append(future.exception)
        self.count("records_sent", acked)
        if stopped is not None:
            failures.append(stopped)
        if failures:
            unsettled = len(batch) - acked
            raise KafkaWriteError(
                f"{unsettled} of {len(batch)} records to {self.topic!r} were not acknowledged: "
                f"{type(failures[0]).__name__}: {failures[0]}", failures, acked)
        return []

    def _connect(self) -> KafkaProducer:
        if self._producer is None:
            self._producer = KafkaProducer(**{**kafka_config(self._bootstrap_servers), **self._config})
        return self._producer

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close()
