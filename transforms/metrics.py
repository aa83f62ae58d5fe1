"""``PipelineMetrics``: the one facade every stage reports through, engine-free.

In: per-batch calls such as ``metrics.events_read(topic, partition, n)`` or
``metrics.redis_write_seconds(s)``. Out, for each call:

* an **engine metric** through three injected plain callbacks,
  ``counter(namespace, name, n)``, ``distribution(namespace, name, ms)`` and
  ``gauge(namespace, name, value)`` (namespace ``onboardflow.pipeline``),
  no-ops by default. The Beam shell (pipelines/beam/metrics.py,
  ``beam_pipeline_metrics``) passes ones that update Beam metrics, which
  Prism reports in ``PipelineResult.metrics()`` and Flink in its web UI and
  Prometheus reporter. Exact per committed bundle, but no percentiles;
* a **Prometheus metric** (catalogue and registry: transforms/prometheus.py)
  in the process-wide registry, served by the worker's own HTTP endpoint
  (transforms/metrics_endpoint.py), started by ``setup()``. Histograms have
  buckets, so Grafana draws p50/p99. These count attempts: a bundle the
  runner retries counts twice here and once in the engine's committed metrics.

Which mechanism applies on which runner, and why: docs/observability.md.

Example (a DoFn)::

    class _WriteFn(beam.DoFn):
        def __init__(self, metrics: PipelineMetrics):
            self._metrics = metrics
        def setup(self):
            self._metrics.setup()          # serves /metrics once per process
        def process(self, element):
            ...
            self._metrics.profiles_written(1)
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Callable, Optional, Union

from prometheus_client import CollectorRegistry

from .metrics_endpoint import WorkerMetricsEndpoint
from .prometheus import Instruments, process_instruments

_LOG = logging.getLogger(__name__)

#: Namespace of the engine metrics the facade updates (distinct from the
#: stages' own ``onboardflow`` counters so nothing is counted twice).
BEAM_NAMESPACE = "onboardflow.pipeline"

#: ``(namespace, name, value)``: how the facade reaches an engine's metrics.
MetricCallback = Callable[[str, str, int], None]


def ignore_metric(namespace: str, name: str, value: int) -> None:
    """The default engine callback: records nothing."""
    return None


def _beam_name(*parts: object) -> str:
    # Engine metric names become Flink metric names: keep them to [a-z0-9_].
    text = "_".join(str(p) for p in parts if p != "")
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text.lower())


class PipelineMetrics:
    """What the stages report, to the engine's metrics and to the worker's Prometheus registry.

    Construct it once at pipeline construction (on Beam:
    ``pipeline_metrics_from_options`` in pipelines/beam/metrics.py) and pass it
    to the stages; it pickles as its settings and callbacks only (callbacks
    must be module-level functions). Call ``setup()`` once per worker so the
    process serves its endpoint. Counter methods take a count (call them once
    per batch, not per element, where a batch exists). Labels must come from
    code (stage, reason, table, topic), never from event content, to keep the
    number of series bounded.

    Args:
      endpoint: where to serve worker metrics; None serves nothing (the
        metrics are still recorded and, in LOOPBACK mode, visible to a test
        through ``worker_registry()``).
      prometheus: False records engine metrics only (measured in
        tests/benchmarks/bench_metrics.py).
      registry: a private registry instead of the process-wide one (unit
        tests); not pickled: an unpickled facade uses the process-wide one.
      counter, distribution, gauge: ``(namespace, name, value)`` callbacks to
        the engine's metrics (distributions get integer milliseconds).

    Example:

    >>> from prometheus_client import CollectorRegistry
    >>> registry = CollectorRegistry()
    >>> metrics = PipelineMetrics(registry=registry)
    >>> metrics.dead_lettered("decode", "bad_magic_byte", 2)
    >>> registry.get_sample_value("onboardflow_events_dead_lettered_total",
    ...                           {"stage": "decode", "reason": "bad_magic_byte"})
    2.0
    """

    def __init__(
        self,
        endpoint: Optional[WorkerMetricsEndpoint] = None,
        *,
        prometheus: bool = True,
        registry: Optional[CollectorRegistry] = None,
        counter: MetricCallback = ignore_metric,
        distribution: MetricCallback = ignore_metric,
        gauge: MetricCallback = ignore_metric,
    ):
        self.endpoint = endpoint
        self.prometheus = prometheus
        self._registry = registry
        self._counter, self._distribution, self._gauge = counter, distribution, gauge
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._instruments: Optional[Instruments] = None
        self._children: dict = {}

    def _callbacks(self) -> tuple:
        return self._counter, self._distribution, self._gauge

    def __getstate__(self):
        return {"endpoint": self.endpoint, "prometheus": self.prometheus, "callbacks": self._callbacks()}

    def __setstate__(self, state):
        self.endpoint = state["endpoint"]
        self.prometheus = state["prometheus"]
        self._counter, self._distribution, self._gauge = state["callbacks"]
        self._registry = None
        self._reset_caches()

    def __eq__(self, other):
        return (isinstance(other, PipelineMetrics) and self.endpoint == other.endpoint
                and self.prometheus == other.prometheus and self._callbacks() == other._callbacks())

    def __hash__(self):
        return hash((self.endpoint, self.prometheus, self._callbacks()))

    def __repr__(self):
        return f"PipelineMetrics(endpoint={self.endpoint!r}, prometheus={self.prometheus!r})"

    # -- lifecycle ------------------------------------------------------------

    def setup(self) -> Optional[int]:
        """Start this process's endpoint if configured (idempotent); the served port.

        A busy port range is logged, not raised: metrics must never stop the
        pipeline. The engine metrics are unaffected.
        """
        if self.endpoint is None or not self.prometheus:
            return None
        try:
            return self.endpoint.start()
        except OSError:
            _LOG.warning("worker metrics endpoint not started", exc_info=True)
            return None

    # -- plumbing ---------------------------------------------------------------

    def _child(self, key: str, labels: tuple):
        cache_key = (key, labels)
        child = self._children.get(cache_key)
        if child is None:
            if self._instruments is None:
                self._instruments = (Instruments(self._registry) if self._registry is not None
                                     else process_instruments())
            metric = self._instruments.by_key[key]
            child = metric.labels(*labels) if labels else metric
            self._children[cache_key] = child
        return child

    def _count(self, key: str, n: int, labels: tuple = (), beam_names: Iterable[str] = ()) -> None:
        if n <= 0:
            return
        self._counter(BEAM_NAMESPACE, key, n)
        for name in beam_names:
            self._counter(BEAM_NAMESPACE, name, n)
        if self.prometheus:
            self._child(key, labels).inc(n)

    def _observe(self, key: str, seconds: float, labels: tuple = (), beam_name: Optional[str] = None) -> None:
        # Engine distributions hold integers: milliseconds.
        self._distribution(BEAM_NAMESPACE, beam_name or key.replace("_seconds", "_ms"), int(seconds * 1000))
        if self.prometheus:
            self._child(key, labels).observe(seconds)

    # -- counters ---------------------------------------------------------------

    def events_read(self, topic: str, partition: int, n: int = 1) -> None:
        """``n`` Kafka records read from ``topic``/``partition`` (decoded or dead-lettered)."""
        self._count("events_read", n, (topic, str(partition)))

    def events_without_key(self, topic: str, partition: int, n: int = 1) -> None:
        """``n`` decoded events from ``topic``/``partition`` whose Kafka record had no key."""
        self._count("events_without_key", n, (topic, str(partition)))

    def events_valid(self, n: int = 1) -> None:
        """``n`` events passed validation and consent."""
        self._count("events_valid", n)

    def dead_lettered(self, stage: str, reason: str, n: int = 1) -> None:
        """``n`` records sent to a dead-letter output by ``stage`` for ``reason``."""
        self._count("events_dead_lettered", n, (stage, reason),
                    beam_names=(_beam_name("events_dead_lettered", stage, reason),))

    def consent_filtered(self, n: int = 1) -> None:
        self._count("events_consent_filtered", n)

    def late(self, n: int = 1) -> None:
        self._count("events_late", n)

    def duplicates(self, n: int = 1) -> None:
        self._count("events_duplicate", n)

    def profiles_written(self, n: int = 1) -> None:
        self._count("profiles_written", n)

    def segment_changes(self, n: int = 1) -> None:
        self._count("segment_changes", n)

    def drift_alarm(self, detector: str, n: int = 1) -> None:
        """A drift detector (e.g. ``"adwin_propensity"``) fired."""
        self._count("drift_alarms", n, (detector,), beam_names=(_beam_name("drift_alarms", detector),))

    def redis_error(self, operation: str, n: int = 1) -> None:
        """A Redis call failed (``operation``: ``"profile_write"``, ``"progress"``, ...)."""
        self._count("redis_errors", n, (operation,), beam_names=(_beam_name("redis_errors", operation),))

    def warehouse_error(self, table: str, n: int = 1) -> None:
        """A warehouse batch write to ``table`` failed and is retried (or given up)."""
        self._count("warehouse_errors", n, (table,), beam_names=(_beam_name("warehouse_errors", table),))

    # -- latencies ----------------------------------------------------------------

    def redis_write_seconds(self, seconds: float) -> None:
        self._observe("redis_write_seconds", seconds)

    def warehouse_write_seconds(self, table: str, seconds: float) -> None:
        self._observe("warehouse_write_seconds", seconds, (table,), _beam_name("warehouse_write_ms", table))

    def event_to_redis_seconds(self, seconds: float) -> None:
        """Wall clock at the Redis write minus the newest event's ``occurred_at``."""
        self._observe("event_to_redis_seconds", max(seconds, 0.0))

    # -- gauges -----------------------------------------------------------------

    def model_version(self, kind: str, version: Union[int, float]) -> None:
        """The online model of ``kind`` now in use has ``version`` (a number)."""
        self._gauge(BEAM_NAMESPACE, _beam_name("model_version", kind), int(version))
        if self.prometheus:
            self._child("model_version", (kind,)).set(float(version))

    def profiles_unscored(self, n: int) -> None:
        """After a re-score sweep: profiles in the store the serving segmenter left without a cluster."""
        self._gauge(BEAM_NAMESPACE, "profiles_unscored", int(n))
        if self.prometheus:
            self._child("profiles_unscored", ()).set(float(n))

    def source_watermark(self, topic: str, partition: int, watermark_micros: int) -> None:
        """The source's watermark of one partition, as Beam Timestamp micros.

        A partition without any watermark yet (Beam's MIN_TIMESTAMP, or
        anything before the epoch) is not reported. Engine-side this is left to
        the runner (Flink reports operator watermarks itself).
        """
        if self.prometheus and watermark_micros > 0:
            self._child("source_watermark_timestamp_seconds", (topic, str(partition))).set(
                watermark_micros / 1_000_000)

