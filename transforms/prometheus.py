"""The Prometheus metrics of the project: their catalogue and the process-wide registry.

``PIPELINE_METRICS`` lists every metric a worker exposes (name, type, labels,
help, buckets); the dashboards test and the lag exporter derive the names they
accept from it. ``Instruments`` creates them on a prometheus-client registry;
``worker_registry()`` is the one registry per process that the worker endpoint
(transforms/metrics_endpoint.py) serves and ``PipelineMetrics``
(transforms/metrics.py) updates. Which mechanism applies on which runner:
docs/observability.md.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Prefix of every Prometheus metric the project exports.
PREFIX = "onboardflow_"

#: Seconds; one Redis pipeline or one PostgreSQL COPY of a flushed batch.
WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Seconds from an event's occurred_at to its profile being in Redis. Includes
#: the producer's own delay, and a backfill lands in the last buckets.
END_TO_END_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                      21600.0, 86400.0)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One Prometheus metric of the worker endpoint."""

    name: str  # without the _total suffix prometheus-client adds to counters
    kind: str  # counter | histogram | gauge
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def sample_names(self) -> set[str]:
        """The series names this metric produces in the exposition format."""
        if self.kind == "counter":
            return {f"{self.name}_total", f"{self.name}_created"}
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count", f"{self.name}_created"}
        return {self.name}


PIPELINE_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(PREFIX + "events_read", "counter",
               "Kafka records read by the source (decoded or not).", ("topic", "partition")),
    MetricSpec(PREFIX + "events_without_key", "counter",
               "Decoded events whose Kafka record had no key (their producer spreads a user over partitions).",
               ("topic", "partition")),
    MetricSpec(PREFIX + "events_valid", "counter",
               "Events that passed validation and consent and go on to profiles or analytics."),
    MetricSpec(PREFIX + "events_dead_lettered", "counter",
               "Records routed to a dead-letter output, by stage and reason.", ("stage", "reason")),
    MetricSpec(PREFIX + "events_consent_filtered", "counter",
               "Events dropped because the user consented to neither personalization nor analytics."),
    MetricSpec(PREFIX + "events_late", "counter",
               "Events behind the watermark by more than the allowed lateness (kept in the warehouse only)."),
    MetricSpec(PREFIX + "events_duplicate", "counter",
               "Events whose event_id was already folded into the profile (dropped)."),
    MetricSpec(PREFIX + "profiles_written", "counter",
               "Profile writes Redis applied (newer versions; stale replays not counted)."),
    MetricSpec(PREFIX + "segment_changes", "counter",
               "Segment entered/exited changes emitted by the rules."),
    MetricSpec(PREFIX + "drift_alarms", "counter",
               "Drift detections raised by an online model's detector.", ("detector",)),
    MetricSpec(PREFIX + "redis_errors", "counter",
               "Failed Redis calls (each retried attempt counts), by operation.", ("operation",)),
    MetricSpec(PREFIX + "warehouse_errors", "counter",
               "Failed warehouse batch writes (each retried attempt counts), by table.", ("table",)),
    MetricSpec(PREFIX + "redis_write_seconds", "histogram",
               "Wall time of one profile batch write to Redis, retries included.", (), WRITE_BUCKETS),
    MetricSpec(PREFIX + "warehouse_write_seconds", "histogram",
               "Wall time of one batch write to a warehouse table, retries included.", ("table",), WRITE_BUCKETS),
    MetricSpec(PREFIX + "event_to_redis_seconds", "histogram",
               "Wall clock at the Redis write minus the occurred_at of the newest event in the profile.",
               (), END_TO_END_BUCKETS),
    MetricSpec(PREFIX + "model_version", "gauge",
               "Version number of the online model currently used, by model kind.", ("kind",)),
    MetricSpec(PREFIX + "profiles_unscored", "gauge",
               "Profiles in the store without a cluster after the last re-score sweep (target 0)."),
    MetricSpec(PREFIX + "source_watermark_timestamp_seconds", "gauge",
               "The Kafka source's event-time watermark of one partition (epoch seconds).",
               ("topic", "partition")),
)

#: The specs by short name (without PREFIX), as the facade names them.
SPECS = {spec.name[len(PREFIX):]: spec for spec in PIPELINE_METRICS}


def sample_names(specs) -> set[str]:
    """Every series name a catalogue of ``MetricSpec`` can expose (for dashboards and alerts checks)."""
    names: set[str] = set()
    for spec in specs:
        names |= spec.sample_names()
    return names


def pipeline_sample_names() -> set[str]:
    """Every series name the worker endpoint can expose."""
    return sample_names(PIPELINE_METRICS)


class Instruments:
    """The prometheus-client metrics of ``PIPELINE_METRICS`` on one registry, by short name."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.by_key: dict[str, Any] = {}
        for key, spec in SPECS.items():
            if spec.kind == "counter":
                metric = Counter(spec.name, spec.help, spec.labels, registry=registry)
            elif spec.kind == "histogram":
                metric = Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
            else:
                metric = Gauge(spec.name, spec.help, spec.labels, registry=registry)
            self.by_key[key] = metric


_PROCESS_LOCK = threading.Lock()
_PROCESS_INSTRUMENTS: Optional[Instruments] = None


def worker_registry() -> CollectorRegistry:
    """The process-wide registry the worker endpoint serves (created on first use)."""
    return process_instruments().registry


def process_instruments() -> Instruments:
    """The instruments of ``worker_registry()``, created once per process."""
    global _PROCESS_INSTRUMENTS
    if _PROCESS_INSTRUMENTS is None:
        with _PROCESS_LOCK:
            if _PROCESS_INSTRUMENTS is None:
                _PROCESS_INSTRUMENTS = Instruments(CollectorRegistry())
    return _PROCESS_INSTRUMENTS
