"""Writes ``(key, value)`` byte pairs to one Kafka topic, at least once.

In: pairs ``(key: bytes | None, value: bytes)``. ``KafkaWriter.write`` sends a
pair through an idempotent ``acks="all"`` kafka-python producer, or returns a
dead-letter dict for anything else; ``flush()`` waits for every ack and raises
``KafkaWriteError`` when one failed, so the caller retries the whole batch.
Out: records in Kafka; ``on_sent(n)`` counts acked records.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping, Optional

from kafka import KafkaProducer


class KafkaWriteError(RuntimeError):
    """Kafka did not acknowledge a record; the batch fails so the runner retries it.

    ``acked``: how many records of the batch Kafka did acknowledge.
    """

    def __init__(self, message: str, acked: int = 0):
        super().__init__(message)
        self.acked = acked


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


class KafkaWriter:
    """One producer for one topic; a batch ends with ``flush()`` once Kafka acked all of it.

    ``open()`` creates the producer (once per worker); ``begin()`` starts a
    batch; ``write(element)`` sends it or returns its dead letter (stage
    ``kafka_write``, reason ``not_a_bytes_key_value_pair``); ``flush()``
    returns how many records were acked, or raises ``KafkaWriteError`` when
    any failed. A batch with nothing sent needs no producer. Pickles as its
    settings only (an engine ships it to workers before ``open()``).
    """

    def __init__(self, bootstrap_servers: str, topic: str, config: Mapping[str, Any]):
        self.topic = topic
        self._bootstrap_servers = bootstrap_servers
        self._config = dict(config)
        self._producer: Optional[KafkaProducer] = None
        self._lock = threading.Lock()
        self.begin()

    def __getstate__(self):
        return {"topic": self.topic, "bootstrap_servers": self._bootstrap_servers, "config": self._config}

    def __setstate__(self, state):
        self.__init__(state["bootstrap_servers"], state["topic"], state["config"])

    def open(self) -> None:
        if self._producer is None:
            self._producer = KafkaProducer(bootstrap_servers=self._bootstrap_servers, **self._config)

    def begin(self) -> None:
        self._submitted = 0
        self._failures: list = []

    def _on_send_error(self, error: BaseException) -> None:
        # Runs on the producer's I/O thread.
        with self._lock:
            self._failures.append(error)

    def write(self, element: Any) -> Optional[dict]:
        """Sends a ``(key, value)`` pair; anything else comes back as a dead letter."""
        key, value = element if isinstance(element, tuple) and len(element) == 2 else (None, None)
        if not isinstance(value, (bytes, bytearray)) or not (key is None or isinstance(key, (bytes, bytearray))):
            return {"stage": "kafka_write", "reason": "not_a_bytes_key_value_pair", "topic": self.topic,
                    "element": element}
        self.open()
        self._producer.send(self.topic, key=key, value=value).add_errback(self._on_send_error)
        self._submitted += 1
        return None

    def flush(self) -> int:
        """Waits for every record of the batch; the number acked (raises when any failed)."""
        submitted = self._submitted
        if not submitted:
            return 0
        self._producer.flush()
        with self._lock:
            failures = list(self._failures)
        self.begin()
        acked = submitted - len(failures)
        if failures:
            raise KafkaWriteError(
                f"{len(failures)} of {submitted} records to {self.topic!r} were not acknowledged: "
                f"{type(failures[0]).__name__}: {failures[0]}", acked)
        return acked

    def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close()
