"""Consumer lag and event-time lag of the pipeline: `onboardflow lag` and `lag-exporter`.

Offsets: for every partition of the pipeline's topics, lag = log-end offset
minus the consumer group's committed offset (the next offset the pipeline
would read). A partition the group never committed counts from the log start
(lag = end - beginning), which is where ``--kafka_start_position=committed``
starts too; a committed offset that retention already deleted counts from the
log start as well. The pipeline commits offsets once a bundle's outputs are
durable (transforms/kafka/consumer.py), so lag 0 means "everything in the topic has
been processed", and lag grows while the pipeline is stopped.

Event time: now minus the newest event time written to Redis, read from the
``{prefix}:pipeline:progress`` hash the profile sink keeps
(``EventTimeProgress`` in transforms/metrics.py). It measures freshness, so
it also grows while no events arrive at all: alert on it together with the
offset lag (docker/prometheus/alerts.yml).

Watermark: on Flink, with ``--flink-rest-url``, now minus the lowest input
watermark of each vertex of the running job (Flink's REST API). Prism has no
such API; there the workers export each source partition's watermark
(``onboardflow_source_watermark_timestamp_seconds``, docs/observability.md).

    onboardflow lag [--bootstrap-servers 127.0.0.1:9092 --consumer-group onboardflow \\
        --topic onboarding.events --redis-url redis://127.0.0.1:6379/0 --key-prefix obf] \\
        [--flink-rest-url http://localhost:8081 --flink-job onboardflow] [--json]

(every bracketed default is the deployment's, runners/settings.py)

prints one table and exits (status 1 when Kafka cannot be read).

    onboardflow lag-exporter --port 9308 [--bootstrap-servers ... --consumer-group ... --topic ...]

serves the same numbers for Prometheus. Every scrape reads Kafka (and Redis)
afresh through a custom collector, so a scrape never returns stale numbers:
when Kafka cannot be read, ``onboardflow_lag_exporter_kafka_up`` is 0, the lag
series are absent, and the reason is logged; the exporter keeps running.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import threading
import time
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ...transforms.connections import redis_client
from ...transforms.metrics_endpoint import MetricsTls
from ...transforms.progress import EventTimeProgress, Progress
from ...transforms.prometheus import MetricSpec, sample_names

_LOG = logging.getLogger(__name__)

DEFAULT_PORT = 9308

#: The series the exporter serves (the dashboards test derives names from it).
LAG_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("onboardflow_consumer_lag_records", "gauge",
               "Log-end offset minus the group's committed offset (log start when none).",
               ("group", "topic", "partition")),
    MetricSpec("onboardflow_consumer_group_lag_records", "gauge",
               "Sum of the consumer lag over every partition of the group's topics.", ("group",)),
    MetricSpec("onboardflow_consumer_committed_offset", "gauge",
               "The group's committed offset (next offset to read); absent when never committed.",
               ("group", "topic", "partition")),
    MetricSpec("onboardflow_partition_log_end_offset", "gauge",
               "Offset the next record appended to the partition will get.", ("topic", "partition")),
    MetricSpec("onboardflow_event_time_lag_seconds", "gauge",
               "Now minus the newest event time written to Redis (profile versions)."),
    MetricSpec("onboardflow_last_written_event_timestamp_seconds", "gauge",
               "Newest event time (occurred_at) written to Redis, epoch seconds."),
    MetricSpec("onboardflow_lag_exporter_kafka_up", "gauge",
               "1 when the last scrape read every partition's offsets from Kafka, else 0."),
    MetricSpec("onboardflow_lag_exporter_redis_up", "gauge",
               "1 when the last scrape read the progress key from Redis, else 0 (absent without --redis-url)."),
    MetricSpec("onboardflow_watermark_lag_seconds", "gauge",
               "Flink only: now minus the lowest input watermark of a running job's vertex.", ("job", "vertex")),
    MetricSpec("onboardflow_lag_exporter_flink_up", "gauge",
               "1 when the last scrape read the watermarks from Flink's REST API, else 0 (absent without "
               "--flink-rest-url)."),
    MetricSpec("onboardflow_lag_exporter_scrape_duration_seconds", "gauge",
               "Time the last scrape spent reading Kafka and Redis."),
)


def lag_sample_names() -> set[str]:
    return sample_names(LAG_METRICS)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def partition_lag(log_start: int, log_end: int, committed: Optional[int]) -> int:
    """Records the group still has to read on one partition.

    ``committed`` None (never committed) or below the log start (retention
    deleted it) counts from the log start, where the pipeline would resume.
    """
    position = log_start if committed is None else min(max(committed, log_start), log_end)
    return max(log_end - position, 0)


class PartitionLag(NamedTuple):
    topic: str
    partition: int
    log_start: int
    log_end: int
    committed: Optional[int]
    lag: int


@dataclasses.dataclass
class LagReport:
    """One reading: offsets per partition, the event-time progress, what failed."""

    group: str
    partitions: list[PartitionLag]
    taken_at: float
    progress: Optional[Progress] = None
    watermarks: Optional[list["VertexWatermark"]] = None  # None: Flink not asked
    kafka_error: Optional[str] = None
    redis_error: Optional[str] = None
    flink_error: Optional[str] = None

    @property
    def total(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def event_time_lag_s(self) -> Optional[float]:
        if self.progress is None:
            return None
        return max(self.taken_at - self.progress.event_time_ms / 1000, 0.0)

    def as_dict(self) -> dict:
        return {
            "group": self.group,
            "taken_at": self.taken_at,
            "partitions": [p._asdict() for p in self.partitions],
            "total_lag": self.total if self.kafka_error is None else None,
            "event_time_ms": self.progress.event_time_ms if self.progress else None,
            "event_time_lag_s": self.event_time_lag_s,
            "watermarks": None if self.watermarks is None else [
                {**w._asdict(), "lag_s": w.lag_s(self.taken_at)} for w in self.watermarks],
            "kafka_error": self.kafka_error,
            "redis_error": self.redis_error,
            "flink_error": self.flink_error,
        }


class KafkaLagReader:
    """Reads log start/end offsets and a group's committed offsets for topics.

    Keeps one KafkaConsumer between readings (it never subscribes, so it never
    joins the group or triggers a rebalance); any failure closes it and the
    next reading connects afresh.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        group: str,
        topics: Sequence[str],
        *,
        timeout_ms: int = 3000,
        consumer_config: Optional[dict] = None,
    ):
        if not topics:
            raise ValueError("KafkaLagReader needs at least one topic")
        self.bootstrap_servers = bootstrap_servers
        self.group = group
        self.topics = list(topics)
        self._timeout_ms = timeout_ms
        self._consumer_config = dict(consumer_config or {})
        self._consumer = None

    def _client(self):
        if self._consumer is None:
            from kafka import KafkaConsumer

            from ...transforms.connections import kafka_config

            config = {
                **kafka_config(self.bootstrap_servers),
                "group_id": self.group,
                "enable_auto_commit": False,
                "client_id": "onboardflow-lag",
                "request_timeout_ms": self._timeout_ms,
                "bootstrap_timeout_ms": self._timeout_ms,
                # New partitions show up within a minute.
                "metadata_max_age_ms": 60_000,
            }
            config.update(self._consumer_config)
            self._consumer = KafkaConsumer(**config)
        return self._consumer

    def read(self) -> list[PartitionLag]:
        from kafka import TopicPartition

        try:
            consumer = self._client()
            partitions = []
            for topic in self.topics:
                ids = consumer.partitions_for_topic(topic)
                if not ids:
                    raise LookupError(f"topic {topic!r} does not exist or has no partitions")
                partitions.extend(TopicPartition(topic, p) for p in sorted(ids))
            beginning = consumer.beginning_offsets(partitions, timeout_ms=self._timeout_ms)
            end = consumer.end_offsets(partitions, timeout_ms=self._timeout_ms)
            rows = []
            for tp in partitions:
                committed = consumer.committed(tp, timeout_ms=self._timeout_ms)
                rows.append(PartitionLag(tp.topic, tp.partition, beginning[tp], end[tp], committed,
                                         partition_lag(beginning[tp], end[tp], committed)))
            return rows
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception:  # noqa: BLE001 - a broken client is dropped either way
                _LOG.debug("closing the lag consumer failed", exc_info=True)


class ProgressReader:
    """Reads ``EventTimeProgress`` from Redis (one HGETALL)."""

    def __init__(self, redis_url: str, key_prefix: str = "obf", timeout_s: float = 5.0):
        self.redis_url = redis_url
        self._progress = EventTimeProgress(key_prefix)
        self._timeout_s = timeout_s
        self._client = None

    def read(self) -> Optional[Progress]:
        if self._client is None:
            self._client = redis_client(self.redis_url, socket_timeout=self._timeout_s,
                                        socket_connect_timeout=self._timeout_s, client_name="onboardflow-lag")
        return self._progress.read(self._client)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


def _reason(error: BaseException, bootstrap: Optional[str] = None) -> str:
    # Types and broker-side messages only: no record content ever reaches here.
    from ...transforms.connections import kafka_refusal

    error = kafka_refusal(error, bootstrap=bootstrap) or error  # a refused login or certificate, named
    name, text = type(error).__name__, str(error).strip()
    if not text:
        return name
    return (text if text.startswith(name) else f"{name}: {text}")[:300]


def read_lag(
    kafka: KafkaLagReader,
    progress: Optional[ProgressReader] = None,
    clock: Callable[[], float] = time.time,
    flink: Optional["FlinkWatermarkReader"] = None,
) -> LagReport:
    """One reading of everything; failures are reported in the result, never raised."""
    report = LagReport(kafka.group, [], clock())
    try:
        report.partitions = kafka.read()
    except Exception as error:  # noqa: BLE001 - an unreachable Kafka is a reading, not a crash
        report.kafka_error = _reason(error, kafka.bootstrap_servers)
    if progress is not None:
        try:
            report.progress = progress.read()
        except Exception as error:  # noqa: BLE001 - same for Redis
            report.redis_error = _reason(error)
    if flink is not None:
        try:
            report.watermarks = flink.read()
        except Exception as error:  # noqa: BLE001 - and for Flink
            report.flink_error = _reason(error)
    report.taken_at = clock()
    return report


def unreached(
    report: LagReport,
    newest_event_ms: Optional[int] = None,
    sink_watermark_ms: Optional[int] = None,
    watermark_target_ms: Optional[int] = None,
) -> list[str]:
    """What the pipeline has not reached yet, in words; ``[]`` when it has everything asked.

    In: one ``read_lag`` reading; ``newest_event_ms``, the newest event time
    the profiles must show (``EventTimeProgress``; None: not asked); the
    sink watermark read from Redis (``SinkWatermark``) and the value it must
    reach (None: not asked). Reached means: Kafka and Redis were read, every
    partition's committed offset is at its end offset (an empty partition
    counts as read), the newest event written to Redis is at or past
    ``newest_event_ms``, and the sink watermark is at or past
    ``watermark_target_ms``. Offsets alone are not enough on Prism, where
    commits can run a few bundles ahead of Redis (docs/architecture.md).
    Out: one short reason per missing condition (no record content).

    >>> report = LagReport("g", [PartitionLag("t", 0, 0, 10, 10, 0), PartitionLag("t", 1, 0, 8, 5, 3)], 0.0,
    ...                    progress=Progress(1_000, 2_000))
    >>> unreached(report, newest_event_ms=1_000)
    ['t/1 committed 5 of 8']
    >>> unreached(report, 1_000, sink_watermark_ms=None, watermark_target_ms=5_000)
    ['t/1 committed 5 of 8', 'no sink watermark in Redis yet']
    """
    missing: list[str] = []
    if report.kafka_error is not None:
        missing.append(f"Kafka unreadable: {report.kafka_error}")
    for p in report.partitions:
        if p.lag:
            committed = "nothing" if p.committed is None else f"{p.committed:,}"
            missing.append(f"{p.topic}/{p.partition} committed {committed} of {p.log_end:,}")
    if report.redis_error is not None:
        missing.append(f"Redis unreadable: {report.redis_error}")
    elif newest_event_ms is not None:
        if report.progress is None:
            missing.append("no event written to Redis yet")
        elif report.progress.event_time_ms < newest_event_ms:
            missing.append(f"newest event in Redis {report.progress.event_time_ms} < {newest_event_ms} ms")
    if watermark_target_ms is not None:
        if sink_watermark_ms is None:
            missing.append("no sink watermark in Redis yet")
        elif sink_watermark_ms < watermark_target_ms:
            missing.append(f"sink watermark {sink_watermark_ms} < {watermark_target_ms} ms")
    return missing


# Flink reports "no watermark yet" as Long.MIN_VALUE.
_NO_WATERMARK = -(2 ** 63)


class VertexWatermark(NamedTuple):
    job: str
    vertex: str
    watermark_ms: int

    def lag_s(self, now: float) -> float:
        # A finished bounded vertex has Beam's end-of-time watermark: no lag.
        return max(now - self.watermark_ms / 1000, 0.0)


class FlinkWatermarkReader:
    """Lowest input watermark of every vertex of running Flink jobs, from the REST API.

    ``GET /jobs/overview`` -> running jobs whose name contains ``job_name``
    (all when empty); ``GET /jobs/{id}`` -> vertices; ``GET
    /jobs/{id}/vertices/{vertex}/watermarks`` -> one ``currentInputWatermark``
    per subtask (epoch ms). The vertex's watermark is the lowest of its
    subtasks'; vertices without one yet (sources, or nothing read) are left
    out. Prism has no such API: there the worker endpoints' source watermark
    gauges are the only watermark (docs/observability.md).
    """

    def __init__(self, rest_url: str, job_name: str = "", timeout_s: float = 3.0):
        self.rest_url = rest_url.rstrip("/")
        self.job_name = job_name
        self._timeout_s = timeout_s

    def _get(self, path: str):
        import urllib.request

        with urllib.request.urlopen(f"{self.rest_url}{path}", timeout=self._timeout_s) as response:
            return json.load(response)

    def read(self) -> list[VertexWatermark]:
        out = []
        for job in self._get("/jobs/overview").get("jobs", []):
            if job.get("state") != "RUNNING" or self.job_name not in job.get("name", ""):
                continue
            jid = job["jid"]
            for vertex in self._get(f"/jobs/{jid}").get("vertices", []):
                values = [int(m["value"]) for m in self._get(f"/jobs/{jid}/vertices/{vertex['id']}/watermarks")
                          if m.get("id", "").endswith("currentInputWatermark")]
                values = [v for v in values if v != _NO_WATERMARK]
                if values:
                    # Beam's vertex names list every fused transform: keep labels short.
                    out.append(VertexWatermark(job.get("name", jid), vertex.get("name", vertex["id"])[:100],
                                               min(values)))
        return out


# --------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------


class LagCollector(Collector):
    """Prometheus collector that reads Kafka (and Redis) on every scrape.

    Scrapes are serialized: two Prometheus servers scraping at once each get
    a fresh reading, one after the other, instead of two sets of clients.
    """

    def __init__(self, kafka: KafkaLagReader, progress: Optional[ProgressReader] = None,
                 clock: Callable[[], float] = time.time, flink: Optional[FlinkWatermarkReader] = None):
        self._kafka = kafka
        self._progress = progress
        self._clock = clock
        self._flink = flink
        self._lock = threading.Lock()
        self._last_kafka_error: Optional[str] = None
        self._last_redis_error: Optional[str] = None
        self._last_flink_error: Optional[str] = None

    def describe(self):
        # Without describe() prometheus-client would call collect() (Kafka I/O)
        # at registration time.
        return []

    def _log_change(self, what: str, previous: Optional[str], current: Optional[str]) -> None:
        # Log every failing scrape at warning, but the recovery only once.
        if current is not None:
            _LOG.warning("lag exporter: cannot read %s: %s", what, current)
        elif previous is not None:
            _LOG.info("lag exporter: %s readable again", what)

    def collect(self) -> Iterable:
        with self._lock:
            started = time.monotonic()
            report = read_lag(self._kafka, self._progress, self._clock, self._flink)
            duration = time.monotonic() - started
        self._log_change("Kafka", self._last_kafka_error, report.kafka_error)
        self._last_kafka_error = report.kafka_error
        if self._progress is not None:
            self._log_change("Redis", self._last_redis_error, report.redis_error)
            self._last_redis_error = report.redis_error
        if self._flink is not None:
            self._log_change("Flink", self._last_flink_error, report.flink_error)
            self._last_flink_error = report.flink_error
        yield from self.families(report, duration, redis_configured=self._progress is not None,
                                 flink_configured=self._flink is not None)

    @staticmethod
    def families(report: LagReport, duration: float, redis_configured: bool,
                 flink_configured: bool = False) -> Iterable:
        specs = {s.name: s for s in LAG_METRICS}

        def family(name: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, specs[name].help, labels=list(labels))

        up = family("onboardflow_lag_exporter_kafka_up")
        up.add_metric([], 0.0 if report.kafka_error else 1.0)
        yield up
        if report.kafka_error is None:
            lag = family("onboardflow_consumer_lag_records", ("group", "topic", "partition"))
            committed = family("onboardflow_consumer_committed_offset", ("group", "topic", "partition"))
            log_end = family("onboardflow_partition_log_end_offset", ("topic", "partition"))
            for p in report.partitions:
                labels = [report.group, p.topic, str(p.partition)]
                lag.add_metric(labels, float(p.lag))
                if p.committed is not None:
                    committed.add_metric(labels, float(p.committed))
                log_end.add_metric([p.topic, str(p.partition)], float(p.log_end))
            total = family("onboardflow_consumer_group_lag_records", ("group",))
            total.add_metric([report.group], float(report.total))
            yield from (lag, total, committed, log_end)
        if redis_configured:
            redis_up = family("onboardflow_lag_exporter_redis_up")
            redis_up.add_metric([], 0.0 if report.redis_error else 1.0)
            yield redis_up
            if report.progress is not None:
                newest = family("onboardflow_last_written_event_timestamp_seconds")
                newest.add_metric([], report.progress.event_time_ms / 1000)
                event_lag = family("onboardflow_event_time_lag_seconds")
                event_lag.add_metric([], report.event_time_lag_s)
                yield from (newest, event_lag)
        if flink_configured:
            flink_up = family("onboardflow_lag_exporter_flink_up")
            flink_up.add_metric([], 0.0 if report.flink_error else 1.0)
            yield flink_up
            if report.flink_error is None:
                watermark_lag = family("onboardflow_watermark_lag_seconds", ("job", "vertex"))
                for w in report.watermarks or ():
                    watermark_lag.add_metric([w.job, w.vertex], w.lag_s(report.taken_at))
                yield watermark_lag
        took = family("onboardflow_lag_exporter_scrape_duration_seconds")
        took.add_metric([], duration)
        yield took


def serve_lag_exporter(collector: LagCollector, port: int = DEFAULT_PORT, address: str = "0.0.0.0",
                       tls: Optional[MetricsTls] = None):
    """Serve ``collector`` on ``address:port``/metrics (HTTPS only with ``tls``); returns the server (port 0: any)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=address, registry=registry,
                                        **(tls.server_options() if tls is not None else {}))
    return server


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def format_table(report: LagReport) -> str:
    if report.kafka_error is not None:
        lines = [f"Kafka unreadable for group {report.group}: {report.kafka_error}"]
    else:
        header = ("topic", "partition", "log start", "log end", "committed", "lag")
        rows = [(p.topic, str(p.partition), str(p.log_start), str(p.log_end),
                 "-" if p.committed is None else str(p.committed), str(p.lag)) for p in report.partitions]
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*header)] + [fmt.format(*r) for r in rows]
        lines.append(f"total lag: {report.total} records (group {report.group})")
    if report.redis_error is not None:
        lines.append(f"event-time lag: Redis unreadable: {report.redis_error}")
    elif report.progress is not None:
        newest = dt.datetime.fromtimestamp(report.progress.event_time_ms / 1000, dt.timezone.utc)
        lines.append(f"event-time lag: {report.event_time_lag_s:.1f} s "
                     f"(newest event written to Redis: {newest:%Y-%m-%dT%H:%M:%S}Z)")
    if report.flink_error is not None:
        lines.append(f"watermark lag: Flink unreadable: {report.flink_error}")
    elif report.watermarks:
        slowest = max(report.watermarks, key=lambda w: w.lag_s(report.taken_at))
        lines.append(f"watermark lag: {slowest.lag_s(report.taken_at):.1f} s "
                     f"(job {slowest.job}, vertex {slowest.vertex})")
    elif report.watermarks is not None:
        lines.append("watermark lag: no running Flink job reports a watermark yet")
    return "\n".join(lines)


def _parser(prog: str, exporter: bool) -> argparse.ArgumentParser:
    from ..settings import settings

    deployment = settings()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap-servers", default=deployment.kafka_bootstrap,
                        help="Kafka bootstrap servers (host:port,...; default: the deployment's, %(default)s).")
    parser.add_argument("--consumer-group", default=deployment.consumer_group,
                        help="The pipeline's consumer group (its --kafka_consumer_group; default: %(default)s).")
    parser.add_argument("--topic", action="append", default=None,
                        help="Topic the pipeline reads; repeat or comma-separate "
                             f"(default: the deployment's, {deployment.events_topic}).")
    parser.add_argument("--redis-url", default=deployment.redis_url,
                        help="Redis profile store, for the event-time lag (default: %(default)s; "
                             "'' leaves it out).")
    parser.add_argument("--key-prefix", default=deployment.redis_key_prefix,
                        help="The pipeline's --redis_key_prefix (default: %(default)s).")
    parser.add_argument("--flink-rest-url", default=None,
                        help="Flink's REST API (e.g. http://localhost:8081), for the watermark lag of running "
                             "jobs; not available on Prism.")
    parser.add_argument("--flink-job", default="",
                        help="Only Flink jobs whose name contains this (default: every running job).")
    parser.add_argument("--timeout-ms", type=int, default=3000,
                        help="Per Kafka request; keep it below Prometheus' scrape_timeout.")
    if exporter:
        parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port of /metrics.")
        parser.add_argument("--address", default="0.0.0.0", help="Interface to listen on.")
        parser.add_argument("--tls-cert", default=None,
                            help="PEM certificate: serve /metrics over HTTPS only (with --tls-key).")
        parser.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert.")
        parser.add_argument("--tls-client-ca", default=None,
                            help="PEM CA bundle: answer only scrapers with a certificate it signed (mutual TLS).")
    else:
        parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    return parser


def _readers(args) -> tuple[KafkaLagReader, Optional[ProgressReader], Optional[FlinkWatermarkReader]]:
    from ..settings import settings

    specs = args.topic or [settings().events_topic]
    topics = [t.strip() for spec in specs for t in spec.split(",") if t.strip()]
    kafka = KafkaLagReader(args.bootstrap_servers, args.consumer_group, topics, timeout_ms=args.timeout_ms)
    progress = ProgressReader(args.redis_url, args.key_prefix) if args.redis_url else None
    flink = (FlinkWatermarkReader(args.flink_rest_url, args.flink_job, args.timeout_ms / 1000)
             if args.flink_rest_url else None)
    return kafka, progress, flink


def main(argv: Optional[list[str]] = None) -> int:
    """`onboardflow lag`: print the lag table once."""
    args = _parser("onboardflow lag", exporter=False).parse_args(argv)
    kafka, progress, flink = _readers(args)
    try:
        report = read_lag(kafka, progress, flink=flink)
    finally:
        kafka.close()
        if progress is not None:
            progress.close()
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_table(report))
    return 1 if report.kafka_error else 0


def exporter_main(argv: Optional[list[str]] = None) -> int:
    """`onboardflow lag-exporter`: serve the lag for Prometheus until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _parser("onboardflow lag-exporter", exporter=True)
    args = parser.parse_args(argv)
    try:
        tls = MetricsTls.of(args.tls_cert, args.tls_key, args.tls_client_ca, flag="--tls")
    except ValueError as error:
        parser.error(str(error).replace("_", "-"))
    kafka, progress, flink = _readers(args)
    server = serve_lag_exporter(LagCollector(kafka, progress, flink=flink), args.port, args.address, tls)
    _LOG.info("lag exporter for group %s on topics %s: %s://%s:%d/metrics", args.consumer_group,
              ",".join(kafka.topics), "https" if tls else "http", args.address, server.server_port)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        kafka.close()
        if progress is not None:
            progress.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
