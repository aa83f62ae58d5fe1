"""Pipeline metrics: one facade for the transforms, two places the numbers go.

Every transform reports through ``PipelineMetrics`` (``metrics.events_read(
topic, partition, n)``, ``metrics.redis_write_seconds(s)``, ...). Each call
updates both:

* a **Beam metric** (counter, distribution or gauge in namespace
  ``onboardflow.pipeline``): runners that collect Beam metrics see it, Prism in
  ``PipelineResult.metrics()`` and Flink in its web UI and, through Flink's
  Prometheus reporter (port 9249), as
  ``flink_taskmanager_job_task_operator_onboardflow_pipeline_<name>``. Beam
  counters are exact per committed bundle, but a Beam distribution is only
  count/sum/min/max, so no percentiles come this way;
* a **Prometheus metric** in one process-wide registry, served over HTTP by
  the worker process itself (``serve_worker_metrics``, started lazily from
  ``DoFn.setup`` through ``PipelineMetrics.setup()``). Histograms have
  buckets, so Grafana draws p50/p99 with ``histogram_quantile``; names follow
  the Prometheus conventions (``onboardflow_events_read_total``,
  ``onboardflow_redis_write_seconds``). These count attempts: a bundle the
  runner retries counts twice here and once in Beam's committed metrics.

``PIPELINE_METRICS`` is the catalogue of every Prometheus metric (name, type,
labels, help); the dashboards test derives the names it accepts from it. The
list of which mechanism applies on which runner, and why, is in
docs/observability.md.

Worker endpoints (``WorkerMetricsEndpoint``): each SDK worker process binds the
first free port of ``[metrics_port, metrics_port + metrics_port_attempts)``
(Prism in LOOPBACK mode runs the workers inside the launcher: one process, one
port; Flink's SDK harness, or Prism with PROCESS workers, runs several per
machine, each takes the next free port). Port 0 asks the OS for any free port.
When ``metrics_sd_dir`` is set, each process also writes a Prometheus
``file_sd`` target file there (``onboardflow-worker-<host>-<pid>.json``,
removed at exit) so Prometheus finds every worker whatever port it got.

``EventTimeProgress`` is the small Redis key behind the event-time lag: the
profile sink records the newest event time it has written, the lag exporter
(runners/cli/lag.py) reads it (contract: docs/redis-contract.md, "Pipeline
progress").

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

import atexit
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Optional, Union

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LOG = logging.getLogger(__name__)

#: Namespace of the Beam metrics the facade updates (distinct from the
#: transforms' own ``onboardflow`` counters so nothing is counted twice).
BEAM_NAMESPACE = "onboardflow.pipeline"

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

_SPECS = {spec.name[len(PREFIX):]: spec for spec in PIPELINE_METRICS}


def pipeline_sample_names() -> set[str]:
    """Every series name the worker endpoint can expose (for dashboards and alerts checks)."""
    names: set[str] = set()
    for spec in PIPELINE_METRICS:
        names |= spec.sample_names()
    return names


# --------------------------------------------------------------------------
# The process-wide Prometheus side
# --------------------------------------------------------------------------


class _Instruments:
    """The prometheus-client metrics of ``PIPELINE_METRICS`` on one registry."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.by_key: dict[str, Any] = {}
        for key, spec in _SPECS.items():
            if spec.kind == "counter":
                metric = Counter(spec.name, spec.help, spec.labels, registry=registry)
            elif spec.kind == "histogram":
                metric = Histogram(spec.name, spec.help, spec.labels, registry=registry, buckets=spec.buckets)
            else:
                metric = Gauge(spec.name, spec.help, spec.labels, registry=registry)
            self.by_key[key] = metric


_PROCESS_LOCK = threading.Lock()
_PROCESS_INSTRUMENTS: Optional[_Instruments] = None
_PROCESS_ENDPOINT: Optional["_ServedEndpoint"] = None


def worker_registry() -> CollectorRegistry:
    """The process-wide registry the worker endpoint serves (created on first use)."""
    return _process_instruments().registry


def _process_instruments() -> _Instruments:
    global _PROCESS_INSTRUMENTS
    if _PROCESS_INSTRUMENTS is None:
        with _PROCESS_LOCK:
            if _PROCESS_INSTRUMENTS is None:
                _PROCESS_INSTRUMENTS = _Instruments(CollectorRegistry())
    return _PROCESS_INSTRUMENTS


class _ServedEndpoint(NamedTuple):
    port: int
    server: Any
    sd_file: Optional[str]


def _write_sd_file(sd_dir: str, host: Optional[str], address: str, port: int) -> str:
    # The name Prometheus reaches this process by: given, else the bound
    # address, else (bound to every interface) the machine's name.
    host = host or (socket.gethostname() if address in ("", "0.0.0.0", "::") else address)
    os.makedirs(sd_dir, exist_ok=True)
    path = os.path.join(sd_dir, f"onboardflow-worker-{socket.gethostname()}-{os.getpid()}.json")
    target = [{"targets": [f"{host}:{port}"], "labels": {"job": "onboardflow-worker", "pid": str(os.getpid())}}]
    # Prometheus watches the directory: write whole files only (rename is atomic).
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(target, handle)
    os.replace(tmp, path)
    return path


def _remove_sd_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def serve_worker_metrics(
    port: int = 9310,
    *,
    attempts: int = 16,
    address: str = "0.0.0.0",
    sd_dir: Optional[str] = None,
    advertise_host: Optional[str] = None,
) -> int:
    """Serve this process's pipeline metrics over HTTP, once; returns the bound port.

    Tries ``port``, ``port + 1``, ... (``attempts`` ports) and keeps the first
    that is free, so several worker processes on one machine each get one.
    ``port=0`` lets the OS choose. Later calls in the same process return the
    port already bound, whatever their arguments. Raises ``OSError`` when no
    port of the range is free.
    """
    global _PROCESS_ENDPOINT
    with _PROCESS_LOCK:
        if _PROCESS_ENDPOINT is not None:
            return _PROCESS_ENDPOINT.port
    registry = worker_registry()
    with _PROCESS_LOCK:
        if _PROCESS_ENDPOINT is not None:
            return _PROCESS_ENDPOINT.port
        candidates = [0] if port == 0 else range(port, port + max(attempts, 1))
        server = start_on_first_free_port(candidates, address, registry)
        bound = server.server_port
        sd_file = _write_sd_file(sd_dir, advertise_host, address, bound) if sd_dir else None
        if sd_file:
            atexit.register(_remove_sd_file, sd_file)
        _PROCESS_ENDPOINT = _ServedEndpoint(bound, server, sd_file)
        _LOG.info("serving pipeline metrics on %s:%d/metrics", address, bound)
        return bound


def start_on_first_free_port(ports: Iterable[int], address: str, registry: CollectorRegistry):
    """An HTTP server for ``registry`` on the first of ``ports`` that is free.

    Raises ``OSError`` when every port is taken.
    """
    last_error: Optional[OSError] = None
    tried = []
    for candidate in ports:
        tried.append(candidate)
        try:
            server, _thread = start_http_server(candidate, addr=address, registry=registry)
        except OSError as error:
            last_error = error
            continue
        return server
    raise OSError(f"no free port for worker metrics among {tried}") from last_error


def served_worker_port() -> Optional[int]:
    """The port this process serves its metrics on, or None when it does not."""
    endpoint = _PROCESS_ENDPOINT
    return endpoint.port if endpoint is not None else None


class MetricsOptions(PipelineOptions):
    """Where worker processes serve their Prometheus metrics (``--metrics_*``).

    Each SDK worker process binds the first free port of
    ``[--metrics_port, --metrics_port + --metrics_port_attempts)``; with
    ``--metrics_sd_dir`` it also registers itself there for Prometheus'
    ``file_sd_configs``. ``--metrics_port=-1`` records Beam metrics only: no
    endpoint and no Prometheus bookkeeping.
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        g = parser.add_argument_group("metrics")
        g.add_argument("--metrics_port", type=int, default=9310,
                       help="First port a worker process tries for /metrics; 0: any free port; -1: no endpoint "
                            "(Beam metrics only).")
        g.add_argument("--metrics_port_attempts", type=int, default=16,
                       help="How many consecutive ports are tried: the most worker processes per machine.")
        g.add_argument("--metrics_bind_address", default="0.0.0.0",
                       help="Interface the worker endpoints listen on (127.0.0.1 keeps them local).")
        g.add_argument("--metrics_sd_dir", default=None,
                       help="Directory where each worker writes a Prometheus file_sd target file "
                            "(shared with Prometheus; stale files of killed workers show as down targets).")
        g.add_argument("--metrics_advertise_host", default=None,
                       help="Host name written to the file_sd target (default: the bind address, or the "
                            "machine's name when bound to every interface).")


@dataclasses.dataclass(frozen=True)
class WorkerMetricsEndpoint:
    """Picklable settings of the per-process HTTP endpoint (see ``serve_worker_metrics``)."""

    port: int = 9310
    attempts: int = 16
    address: str = "0.0.0.0"
    sd_dir: Optional[str] = None
    advertise_host: Optional[str] = None

    def start(self) -> int:
        return serve_worker_metrics(self.port, attempts=self.attempts, address=self.address, sd_dir=self.sd_dir,
                                    advertise_host=self.advertise_host)


# --------------------------------------------------------------------------
# The facade
# --------------------------------------------------------------------------


def _beam_name(*parts: object) -> str:
    # Beam metric names become Flink metric names: keep them to [a-z0-9_].
    text = "_".join(str(p) for p in parts if p != "")
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text.lower())


class PipelineMetrics:
    """What the transforms report, to Beam metrics and to the worker's Prometheus registry.

    Construct it once at pipeline construction (``PipelineMetrics.from_options``)
    and pass it to the transforms; it pickles as its settings only. Call
    ``setup()`` from ``DoFn.setup`` so the worker process serves its endpoint.
    Counter methods take a count (call them once per batch, not per element,
    where a batch exists). Labels must come from code (stage, reason, table,
    topic), never from event content, to keep the number of series bounded.

    Args:
      endpoint: where to serve worker metrics; None serves nothing (the
        metrics are still recorded and, in LOOPBACK mode, visible to a test
        through ``worker_registry()``).
      prometheus: False records Beam metrics only (measured in
        tests/benchmarks/bench_metrics.py).
      registry: a private registry instead of the process-wide one (unit
        tests); not pickled: an unpickled facade uses the process-wide one.

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
    ):
        self.endpoint = endpoint
        self.prometheus = prometheus
        self._registry = registry
        self._reset_caches()

    @classmethod
    def from_options(cls, options: PipelineOptions) -> "PipelineMetrics":
        opts = options.view_as(MetricsOptions)
        if opts.metrics_port is None or opts.metrics_port < 0:
            # Nobody could scrape a registry without an endpoint: Beam metrics only.
            return cls(None, prometheus=False)
        return cls(WorkerMetricsEndpoint(opts.metrics_port, opts.metrics_port_attempts,
                                         opts.metrics_bind_address, opts.metrics_sd_dir,
                                         opts.metrics_advertise_host))

    def _reset_caches(self) -> None:
        self._instruments: Optional[_Instruments] = None
        self._children: dict = {}
        self._beam: dict = {}

    def __getstate__(self):
        return {"endpoint": self.endpoint, "prometheus": self.prometheus}

    def __setstate__(self, state):
        self.endpoint = state["endpoint"]
        self.prometheus = state["prometheus"]
        self._registry = None
        self._reset_caches()

    def __eq__(self, other):
        return (isinstance(other, PipelineMetrics) and self.endpoint == other.endpoint
                and self.prometheus == other.prometheus)

    def __hash__(self):
        return hash((self.endpoint, self.prometheus))

    def __repr__(self):
        return f"PipelineMetrics(endpoint={self.endpoint!r}, prometheus={self.prometheus!r})"

    # -- lifecycle ------------------------------------------------------------

    def setup(self) -> Optional[int]:
        """Start this process's endpoint if configured (idempotent); the served port.

        A busy port range is logged, not raised: metrics must never stop the
        pipeline. The Beam metrics are unaffected.
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
                self._instruments = (_Instruments(self._registry) if self._registry is not None
                                     else _process_instruments())
            metric = self._instruments.by_key[key]
            child = metric.labels(*labels) if labels else metric
            self._children[cache_key] = child
        return child

    def _beam_counter(self, name: str):
        counter = self._beam.get(name)
        if counter is None:
            counter = self._beam[name] = Metrics.counter(BEAM_NAMESPACE, name)
        return counter

    def _beam_distribution(self, name: str):
        dist = self._beam.get(name)
        if dist is None:
            dist = self._beam[name] = Metrics.distribution(BEAM_NAMESPACE, name)
        return dist

    def _beam_gauge(self, name: str):
        gauge = self._beam.get(name)
        if gauge is None:
            gauge = self._beam[name] = Metrics.gauge(BEAM_NAMESPACE, name)
        return gauge

    def _count(self, key: str, n: int, labels: tuple = (), beam_names: Iterable[str] = ()) -> None:
        if n <= 0:
            return
        self._beam_counter(key).inc(n)
        for name in beam_names:
            self._beam_counter(name).inc(n)
        if self.prometheus:
            self._child(key, labels).inc(n)

    def _observe(self, key: str, seconds: float, labels: tuple = (), beam_name: Optional[str] = None) -> None:
        # Beam distributions hold integers: milliseconds.
        self._beam_distribution(beam_name or key.replace("_seconds", "_ms")).update(int(seconds * 1000))
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
        self._beam_gauge(_beam_name("model_version", kind)).set(int(version))
        if self.prometheus:
            self._child("model_version", (kind,)).set(float(version))

    def profiles_unscored(self, n: int) -> None:
        """After a re-score sweep: profiles in the store the serving segmenter left without a cluster."""
        self._beam_gauge("profiles_unscored").set(int(n))
        if self.prometheus:
            self._child("profiles_unscored", ()).set(float(n))

    def source_watermark(self, topic: str, partition: int, watermark_micros: int) -> None:
        """The source's watermark of one partition, as Beam Timestamp micros.

        A partition without any watermark yet (Beam's MIN_TIMESTAMP, or
        anything before the epoch) is not reported. Beam-side this is left to
        the runner (Flink reports operator watermarks itself).
        """
        if self.prometheus and watermark_micros > 0:
            self._child("source_watermark_timestamp_seconds", (topic, str(partition))).set(
                watermark_micros / 1_000_000)


# --------------------------------------------------------------------------
# Event-time progress in Redis
# --------------------------------------------------------------------------

# Max-only update: a slower worker that flushes an older batch later must not
# move the progress back.
_PROGRESS_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[3]))
local incoming = tonumber(ARGV[1])
if current == nil or incoming > current then
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[1], ARGV[4], ARGV[2])
  return 1
end
return 0
"""
# ARGV: [1] value, [2] wall clock, [3] the field to raise, [4] the field for the wall clock.


class Progress(NamedTuple):
    event_time_ms: int
    written_at_ms: int


class EventTimeProgress:
    """The newest event time written to Redis: ``{prefix}:pipeline:progress``.

    A hash with ``event_time_ms`` (the largest ``last_event_at``, i.e. the
    newest ``occurred_at``, of any profile write Redis applied) and
    ``written_at_ms`` (wall clock of the write that set it). Updated by the
    profile sink once per flushed batch, max-only and atomically (a Lua
    script), so concurrent workers never move it back. Never expires.

    The lag exporter reads it: event-time lag = now - ``event_time_ms``. It is
    the freshness of the freshest profile, not a low watermark: one stuck
    partition shows in the offset lag, not here.
    """

    def __init__(self, key_prefix: str = "obf"):
        self.key = f"{key_prefix}:pipeline:progress"

    def record(self, client, event_time_ms: int, written_at_ms: int) -> bool:
        """Raise the recorded event time to ``event_time_ms``; True when it moved."""
        return bool(client.eval(_PROGRESS_LUA, 1, self.key, int(event_time_ms), int(written_at_ms),
                                "event_time_ms", "written_at_ms"))

    def read(self, client) -> Optional[Progress]:
        values: Mapping = client.hgetall(self.key)
        if not values:
            return None
        decoded = {(k.decode() if isinstance(k, bytes) else k): v for k, v in values.items()}
        try:
            return Progress(int(decoded["event_time_ms"]), int(decoded.get("written_at_ms", 0)))
        except (KeyError, ValueError):
            return None


# --------------------------------------------------------------------------
# Counting dead letters where they all meet
# --------------------------------------------------------------------------


class _CountDeadLettersFn(beam.DoFn):
    def __init__(self, metrics: PipelineMetrics):
        self._metrics = metrics

    def setup(self):
        self._metrics.setup()

    def start_bundle(self):
        self._counts: dict = {}

    def process(self, letter):
        stage = letter.get("stage") if isinstance(letter, Mapping) else None
        reason = letter.get("reason") if isinstance(letter, Mapping) else None
        key = (stage if isinstance(stage, str) and stage else "unknown",
               reason if isinstance(reason, str) and reason else "unknown")
        self._counts[key] = self._counts.get(key, 0) + 1
        yield letter

    def finish_bundle(self):
        for (stage, reason), n in self._counts.items():
            self._metrics.dead_lettered(stage, reason, n)
        self._counts = {}


class CountDeadLetters(beam.PTransform):
    """Counts dead letters by ``stage`` and ``reason``; passes every one through unchanged.

    In: dead-letter dicts of any stage (the source's ``DeadLetter`` records and
    the in-pipeline ``pipeline_dead_letter`` dicts both carry ``stage`` and
    ``reason``). Out: the same elements. Nothing is dropped; an element without
    a usable stage or reason is counted under ``"unknown"``. Counts are added
    once per bundle per (stage, reason).
    """

    def __init__(self, metrics: PipelineMetrics):
        super().__init__()
        self._metrics = metrics

    def expand(self, letters):
        return letters | "CountByStageAndReason" >> beam.ParDo(_CountDeadLettersFn(self._metrics))


# --------------------------------------------------------------------------
# The sink's event-time watermark in Redis
# --------------------------------------------------------------------------


class SinkWatermark:
    """How far event time has got *through* the profile sink: fields of ``{prefix}:pipeline:progress``.

    ``sink_watermark_ms`` = W means: every profile update stamped before W (an
    event's, or a lifecycle timer's: refreshes, time marks, dormancy) has been
    through ``WriteProfilesToRedis``, so every timer due before W has fired
    and its write is in Redis. ``sink_watermark_at_ms``: wall clock when it
    was recorded. Max-only and atomic like ``EventTimeProgress``, in the same
    hash; never expires. Written by ``PublishSinkWatermark``; read by the demo
    (runners/cli/demo.py) to decide "settled" from the pipeline's own progress.
    """

    def __init__(self, key_prefix: str = "obf"):
        self.key = f"{key_prefix}:pipeline:progress"

    def record(self, client, watermark_ms: int, written_at_ms: int) -> bool:
        """Raise the recorded watermark to ``watermark_ms``; True when it moved."""
        return bool(client.eval(_PROGRESS_LUA, 1, self.key, int(watermark_ms), int(written_at_ms),
                                "sink_watermark_ms", "sink_watermark_at_ms"))

    def read(self, client) -> Optional[int]:
        """The recorded watermark (epoch ms), or None before the first record."""
        value = client.hget(self.key, "sink_watermark_ms")
        try:
            return None if value is None else int(value)
        except ValueError:
            return None


def next_watermark_probe(fired_at_ms: int, newest_ms: Optional[int], now_ms: int, lag_ms: int,
                         min_step_ms: int = 1000) -> int:
    """Event time to set the probe's next timer to, after it fired at ``fired_at_ms``.

    While updates newer than the last firing keep coming (a backlog), the
    next stop is the newest one seen, so progress is recorded as the backlog
    drains. Once none is newer, it is the highest watermark the source can
    reach now (wall clock − ``lag_ms``, the max out-of-orderness): idle
    partitions move the watermark there, so the timers due by then fire and
    the probe records it. An update stamped in the future (a skewed device
    clock) is capped the same way, so it cannot park the probe. Always at
    least ``min_step_ms`` after the last firing (at most one record per step).

    >>> next_watermark_probe(1_000, newest_ms=50_000, now_ms=900_000, lag_ms=60_000)
    50000
    >>> next_watermark_probe(50_000, newest_ms=50_000, now_ms=900_000, lag_ms=60_000)
    840000
    >>> next_watermark_probe(840_000, newest_ms=50_000, now_ms=840_500, lag_ms=60_000)
    841000
    """
    reachable = now_ms - lag_ms
    target = min(newest_ms, reachable) if newest_ms is not None and newest_ms > fired_at_ms else reachable
    return max(target, fired_at_ms + min_step_ms)


class _NewestInBundleFn(beam.DoFn):
    """One ``("sink", timestamp_ms)`` per bundle: its newest element timestamp (saves a per-element shuffle)."""

    def start_bundle(self):
        self._newest = None

    def process(self, element, timestamp=beam.DoFn.TimestampParam):
        micros = timestamp.micros
        if self._newest is None or micros > self._newest:
            self._newest = micros

    def finish_bundle(self):
        if self._newest is not None:
            newest, self._newest = self._newest, None
            yield WindowedValue(("sink", newest // 1000), Timestamp(micros=newest), (GlobalWindow(),))


class _WatermarkProbeFn(beam.DoFn):
    """A single-key event-time timer that records in Redis each watermark it sees pass."""

    NEWEST = ReadModifyWriteStateSpec("newest_ms", VarIntCoder())
    NEXT = ReadModifyWriteStateSpec("next_ms", VarIntCoder())
    TICK = TimerSpec("tick", TimeDomain.WATERMARK)

    def __init__(self, redis_url: str, key_prefix: str, lag_ms: int, min_step_ms: int,
                 cap_ms: Optional[int] = None):
        self._redis_url = redis_url
        self._cap_ms = cap_ms
        self._watermark = SinkWatermark(key_prefix)
        self._lag_ms = lag_ms
        self._min_step_ms = min_step_ms
        self._client = None
        self._recorded = Metrics.counter(BEAM_NAMESPACE, "sink_watermark_recorded")
        self._failed = Metrics.counter(BEAM_NAMESPACE, "sink_watermark_record_failed")

    def setup(self):
        import redis

        self._client = redis.Redis.from_url(self._redis_url, socket_timeout=5, socket_connect_timeout=5)

    def process(self, element, newest=beam.DoFn.StateParam(NEWEST), pending=beam.DoFn.StateParam(NEXT),
                tick=beam.DoFn.TimerParam(TICK)):
        _, at_ms = element
        seen = newest.read()
        if seen is None or at_ms > seen:
            newest.write(at_ms)
        if pending.read() is None:
            # Capped like every later stop: a future-stamped update must not park the probe.
            first = min(at_ms, int(time.time() * 1000) - self._lag_ms)
            if self._cap_ms is not None:
                first = min(first, self._cap_ms)
            tick.set(_ms_timestamp(first))
            pending.write(first)

    @on_timer(TICK)
    def on_tick(self, fired=beam.DoFn.TimestampParam, newest=beam.DoFn.StateParam(NEWEST),
                pending=beam.DoFn.StateParam(NEXT), tick=beam.DoFn.TimerParam(TICK)):
        fired_ms = fired.micros // 1000
        if self._cap_ms is not None:
            # A bounded run's profiles end at its horizon: so does its watermark,
            # and a replay of the same input records nothing new.
            fired_ms = min(fired_ms, self._cap_ms)
        now_ms = int(time.time() * 1000)
        try:
            self._watermark.record(self._client, fired_ms, now_ms)
            self._recorded.inc()
        except Exception:  # noqa: BLE001 - a progress marker never fails the pipeline; the next tick retries
            self._failed.inc()
            _LOG.warning("could not record the sink watermark in Redis", exc_info=True)
        if fired_ms > now_ms - self._lag_ms + 5 * self._min_step_ms or fired_ms == self._cap_ms:
            # Beyond any watermark the source can reach now (a few steps of clock
            # skew allowed): only the end of a bounded input (watermark at +inf)
            # gets here, where ticking on would never end. The next update re-arms it.
            pending.clear()
            return
        at = next_watermark_probe(fired_ms, newest.read(), now_ms, self._lag_ms, self._min_step_ms)
        if self._cap_ms is not None:
            at = min(at, self._cap_ms)
        tick.set(_ms_timestamp(at))
        pending.write(at)

    def teardown(self):
        if self._client is not None:
            self._client.close()


def _ms_timestamp(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


class PublishSinkWatermark(beam.PTransform):
    """Records the event-time watermark downstream of the profile sink in Redis (``SinkWatermark``).

    In: the sink's write results (any element; only their timestamps matter).
    Out: nothing. Each bundle is reduced to its newest timestamp, then one
    keyed timer follows the watermark (``next_watermark_probe``) and records
    every firing, max-only. Because a stateful stage holds its output
    watermark at its earliest pending timer, the recorded value W proves that
    every profile timer due before W fired and its write reached Redis. While
    the job is idle it costs one small Redis script per ``min_step_ms``.
    ``lag_ms``: the source's max out-of-orderness (how far the watermark
    trails the wall clock when idle). ``cap_ms``: a bounded run's horizon
    (transforms/backfill_horizon.py); the recorded watermark stops there.
    """

    def __init__(self, redis_url: str, key_prefix: str, lag_ms: int = 60_000, min_step_ms: int = 1000,
                 cap_ms: Optional[int] = None):
        super().__init__()
        self._fn = _WatermarkProbeFn(redis_url, key_prefix, int(lag_ms), int(min_step_ms), cap_ms)

    def expand(self, written):
        return (written
                | "NewestInBundle" >> beam.ParDo(_NewestInBundleFn())
                | "FollowWatermark" >> beam.ParDo(self._fn))
