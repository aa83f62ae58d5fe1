"""``/v1/status``: the serving model versions and the pipeline's lag, read without ever failing the request.

In: the deployment's Redis (the model registry's serving pointers,
``ModelStore.pointer``; the event-time progress) and Kafka (the consumer
group's offsets). Out: plain dicts for the route. The readers are the
project's own (models/model_registry/store.py, runners/cli/lag.py: the same
numbers as `onboardflow models list` and `onboardflow lag`); they are
blocking, so they run in worker threads with a deadline. An outage becomes a
field (``models_error``, ``kafka_error``, ``redis_error``), never a 5xx.

One lag reading at a time, shared by concurrent requests and reused for
``cache_s``: an operator page polling it, or a slow Kafka, cannot pile up
threads and consumers.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Optional

from ...models.model_registry import KINDS, ModelStore, version_id
from ...transforms.connections import redis_client
from ..cli.lag import KafkaLagReader, ProgressReader, read_lag


class ModelVersions:
    """The serving version of each model kind, from the registry's Redis copy."""

    def __init__(self, redis_url: str, key_prefix: str, timeout_s: float) -> None:
        self._client = redis_client(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._store = ModelStore(redis_url, key_prefix, client=self._client)

    def read(self) -> dict[str, Optional[dict[str, Any]]]:
        out: dict[str, Optional[dict[str, Any]]] = {}
        for kind in sorted(KINDS):
            pointer = self._store.pointer(kind)
            out[kind] = None if pointer is None else {
                "version_id": version_id(kind, pointer.version), "version": pointer.version,
                "generation": pointer.generation, "pinned": pointer.pinned,
                "updated_at": pointer.updated_at.isoformat()}
        return out

    def close(self) -> None:
        self._client.close()


class LagStatus:
    """Consumer lag and event-time lag (``read_lag``), one reading in flight, cached for ``cache_s``."""

    def __init__(self, bootstrap: str, group: str, topics: tuple[str, ...], redis_url: str, key_prefix: str,
                 timeout_s: float, cache_s: float = 2.0) -> None:
        self.group = group
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._kafka = KafkaLagReader(bootstrap, group, list(topics), timeout_ms=int(timeout_s * 1000))
        self._progress = ProgressReader(redis_url, key_prefix, timeout_s=timeout_s)
        self._thread_lock = threading.Lock()
        self._inflight: Optional[asyncio.Future] = None
        self._last: Optional[tuple[float, dict]] = None

    def _read(self) -> dict:
        with self._thread_lock:
            report = read_lag(self._kafka, self._progress)
        return {"group": report.group, "total_lag": None if report.kafka_error else report.total,
                "partitions": len(report.partitions), "event_time_lag_s": report.event_time_lag_s,
                "kafka_error": report.kafka_error, "redis_error": report.redis_error, "taken_at": report.taken_at}

    async def read(self) -> dict:
        if self._last is not None and time.monotonic() - self._last[0] < self._cache_s:
            return self._last[1]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self._read))
            self._inflight.add_done_callback(self._done)
        try:
            # shield: a request that gives up leaves the reading to finish for the next one.
            return await asyncio.wait_for(asyncio.shield(self._inflight), self._timeout_s + 1.0)
        except asyncio.TimeoutError:
            return {"group": self.group, "total_lag": None, "partitions": 0, "event_time_lag_s": None,
                    "kafka_error": f"no answer within {self._timeout_s + 1.0:.1f} s", "redis_error": None,
                    "taken_at": time.time()}

    def _done(self, future: asyncio.Future) -> None:
        self._inflight = None
        if not future.cancelled() and future.exception() is None:
            self._last = (time.monotonic(), future.result())

    def close(self) -> None:
        with self._thread_lock:
            self._kafka.close()
            self._progress.close()
