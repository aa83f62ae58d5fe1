"""The Beam side of the pipeline metrics: engine callbacks for ``PipelineMetrics``, and two metric transforms.

* ``beam_counter`` / ``beam_distribution`` / ``beam_gauge``: the
  ``(namespace, name, value)`` callbacks that put the facade's numbers into
  Beam metrics (module-level, so a facade holding them pickles);
  ``beam_pipeline_metrics(...)`` builds a facade with them, and
  ``pipeline_metrics_from_options(options)`` one configured by
  ``--metrics_*`` (pipelines/options.py).
* ``CountDeadLetters``: dead letters in, the same out, counted by stage and
  reason.
* ``PublishSinkWatermark``: the profile sink's write results in, nothing out;
  records the event-time watermark behind the sink in Redis (``SinkWatermark``,
  transforms/progress.py).

The facade itself is engine-free: transforms/metrics.py; docs/observability.md.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Optional

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from ...transforms.connections import redis_client
from ...transforms.metrics import BEAM_NAMESPACE, PipelineMetrics
from ...transforms.metrics_endpoint import MetricsTls, WorkerMetricsEndpoint
from ...transforms.progress import SinkWatermark, next_watermark_probe
from ..options import MetricsOptions

_LOG = logging.getLogger(__name__)

# Beam's metric objects look the bundle's metrics container up at each update,
# so one object per name serves every bundle and thread of the process:
# {namespace: {name: metric}} per kind (nested, so the hot path builds no key).
_COUNTERS: dict = {}
_DISTRIBUTIONS: dict = {}
_GAUGES: dict = {}


def beam_counter(namespace: str, name: str, value: int) -> None:
    """Adds ``value`` to the Beam counter ``namespace``/``name``."""
    try:
        metric = _COUNTERS[namespace][name]
    except KeyError:
        metric = _COUNTERS.setdefault(namespace, {})[name] = Metrics.counter(namespace, name)
    metric.inc(value)


def beam_distribution(namespace: str, name: str, value: int) -> None:
    """Adds ``value`` (an integer) to the Beam distribution ``namespace``/``name``."""
    try:
        metric = _DISTRIBUTIONS[namespace][name]
    except KeyError:
        metric = _DISTRIBUTIONS.setdefault(namespace, {})[name] = Metrics.distribution(namespace, name)
    metric.update(value)


def beam_gauge(namespace: str, name: str, value: int) -> None:
    """Sets the Beam gauge ``namespace``/``name`` to ``value``."""
    try:
        metric = _GAUGES[namespace][name]
    except KeyError:
        metric = _GAUGES.setdefault(namespace, {})[name] = Metrics.gauge(namespace, name)
    metric.set(value)


def beam_pipeline_metrics(endpoint: Optional[WorkerMetricsEndpoint] = None, **kwargs) -> PipelineMetrics:
    """A ``PipelineMetrics`` that reports to Beam metrics (``kwargs``: ``prometheus``, ``registry``)."""
    return PipelineMetrics(endpoint, counter=beam_counter, distribution=beam_distribution, gauge=beam_gauge,
                           **kwargs)


def pipeline_metrics_from_options(options: PipelineOptions) -> PipelineMetrics:
    """The facade ``--metrics_*`` asks for: Beam metrics, plus the worker endpoint unless ``--metrics_port=-1``."""
    opts = options.view_as(MetricsOptions)
    if opts.metrics_port is None or opts.metrics_port < 0:
        # Nobody could scrape a registry without an endpoint: Beam metrics only.
        return beam_pipeline_metrics(None, prometheus=False)
    tls = MetricsTls.of(opts.metrics_tls_cert, opts.metrics_tls_key, opts.metrics_tls_client_ca)
    return beam_pipeline_metrics(WorkerMetricsEndpoint(opts.metrics_port, opts.metrics_port_attempts,
                                                       opts.metrics_bind_address, opts.metrics_sd_dir,
                                                       opts.metrics_advertise_host, tls))


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
        self._client = redis_client(self._redis_url, socket_timeout=5, socket_connect_timeout=5)

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
