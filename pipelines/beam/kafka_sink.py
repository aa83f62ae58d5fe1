"""``WriteToKafka``: ``(key, value)`` pairs -> one Kafka topic, through ``KafkaSink`` and the sink driver.

In: a PCollection of ``(key: bytes | None, value: bytes)``. The sink
(transforms/kafka/sink.py) sends every ``flush_size`` records and at the end
of each bundle and waits for Kafka's acks, so a bundle completes (and the
source commits its offsets) only once Kafka acknowledged all of it; a record
Kafka does not acknowledge fails the bundle and the runner retries it (at
least once). Out: dead letters ``{"stage": "kafka_write", "reason":
"not_a_bytes_key_value_pair", "detail", "event_id", "payload", "topic"}`` of
elements that are not such a pair. Counters (namespace
``onboardflow.kafka_sink``): ``records_sent`` (acked), ``invalid_elements``,
``retries``.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

from ...transforms.kafka.sink import DEFAULT_FLUSH_SIZE, KafkaSink, sink_producer_config
from .sinks import DEAD_LETTER, WriteToSink

SINK_NAMESPACE = "onboardflow.kafka_sink"


class WriteToKafka(WriteToSink):
    """Writes (key, value) pairs to one Kafka topic, at least once (see the module docstring).

    The producer batches with ``linger_ms``/``batch_size`` (bytes) and retries
    with backoff for up to ``delivery_timeout_ms``; ``producer_config`` adds or
    overrides kafka-python settings. ``flush_size``: records sent before the
    sink waits for their acks (besides the end of each bundle).
    """

    DEAD_LETTER = DEAD_LETTER

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
        flush_size: int = DEFAULT_FLUSH_SIZE,
        label: Optional[str] = None,
    ):
        if flush_size < 1:
            raise ValueError("flush_size must be >= 1")
        config = sink_producer_config(
            linger_ms=linger_ms, batch_size=batch_size, retries=retries, retry_backoff_ms=retry_backoff_ms,
            delivery_timeout_ms=delivery_timeout_ms, compression_type=compression_type, extra=producer_config)
        super().__init__(functools.partial(KafkaSink, bootstrap_servers, topic, config, flush_size),
                         step="SendToKafka", label=label, namespace=SINK_NAMESPACE)

    def expand(self, pairs):
        return super().expand(pairs)[DEAD_LETTER]
