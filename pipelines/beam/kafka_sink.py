"""``WriteToKafka``: the Beam shell of ``KafkaWriter`` (transforms/kafka/producer.py).

In: a PCollection of ``(key: bytes | None, value: bytes)``. Each bundle's
records are sent by a per-worker idempotent producer and flushed in
``finish_bundle``, so a bundle completes only once Kafka acknowledged all of
it; a record Kafka does not acknowledge fails the bundle and the runner
retries it (at least once). Out: dead-letter dicts of elements that are not
such a pair. Counters (namespace ``onboardflow.kafka_sink``):
``records_sent`` (acked), ``invalid_elements``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...transforms.kafka.producer import KafkaWriteError, KafkaWriter, sink_producer_config

SINK_NAMESPACE = "onboardflow.kafka_sink"


class _WriteToKafkaFn(beam.DoFn):
    """(key, value) -> Kafka; a bundle finishes only once Kafka acked every record."""

    def __init__(self, bootstrap_servers: str, topic: str, producer_config: Mapping[str, Any]):
        super().__init__()
        self._invalid = Metrics.counter(SINK_NAMESPACE, "invalid_elements")
        self._sent = Metrics.counter(SINK_NAMESPACE, "records_sent")
        self._writer = KafkaWriter(bootstrap_servers, topic, producer_config)

    def setup(self):
        self._writer.open()

    def start_bundle(self):
        self._writer.begin()

    def process(self, element):
        dead_letter = self._writer.write(element)
        if dead_letter is not None:
            self._invalid.inc()
            yield dead_letter

    def finish_bundle(self):
        try:
            acked = self._writer.flush()
        except KafkaWriteError as error:
            self._sent.inc(error.acked)
            raise
        if acked:
            self._sent.inc(acked)

    def teardown(self):
        self._writer.close()


class WriteToKafka(beam.PTransform):
    """Writes (key, value) pairs to one Kafka topic, at least once (see the module docstring).

    The producer batches with ``linger_ms``/``batch_size`` and retries with
    backoff for up to ``delivery_timeout_ms``; ``producer_config`` adds or
    overrides kafka-python settings.
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
        self._producer_config = sink_producer_config(
            linger_ms=linger_ms, batch_size=batch_size, retries=retries, retry_backoff_ms=retry_backoff_ms,
            delivery_timeout_ms=delivery_timeout_ms, compression_type=compression_type, extra=producer_config)

    def expand(self, pcoll):
        return pcoll | "SendToKafka" >> beam.ParDo(
            _WriteToKafkaFn(self._bootstrap_servers, self._topic, self._producer_config)
        )

