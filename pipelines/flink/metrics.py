"""Flink's side of the pipeline metrics: ``PipelineMetrics`` callbacks onto a function's metric group.

``flink_pipeline_metrics(runtime_context, settings)`` builds the facade a
function reports through (transforms/metrics.py): counters and gauges go to
the operator's Flink metric group under ``onboardflow`` (Flink's Prometheus
reporter, runners/flink/config.yaml.template, serves them as
``flink_taskmanager_job_task_operator_onboardflow_*``), and the Prometheus
instruments to the TaskManager process's own ``/metrics`` endpoint
(``--metrics_port``), the same series the Beam workers serve, so the Grafana
dashboard reads both engines (docs/observability.md). ``Counters`` does the
same for a stage's own named counters (``count(name, n)``).

Counts are summed in Python and added to Flink's counters at most once per
``PUSH_INTERVAL_S`` (and at ``push()``, which the stages call when they flush
and close): in thread mode each ``Counter.inc`` is a call into the JVM, and a
handful per event cost more than the event's own logic (docs/performance.md).
Flink's reporters poll every few seconds, so the lag does not show.
"""
from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Optional

from ...transforms.metrics import PipelineMetrics
from ...transforms.metrics_endpoint import MetricsTls, WorkerMetricsEndpoint

GROUP = "onboardflow"
#: Seconds between additions of the summed counts to Flink's counters.
PUSH_INTERVAL_S = 1.0


@lru_cache(maxsize=4096)
def _flink_name(namespace: str, name: str) -> str:
    text = f"{namespace}_{name}".replace(".", "_").lower()
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)


class Counters:
    """``count(name, n)`` onto Flink counters of one function's metric group, each looked up once,
    the counts summed here and pushed to Flink every ``push_interval_s`` (module docstring)."""

    def __init__(self, runtime_context: Any, namespace: str = "", push_interval_s: float = PUSH_INTERVAL_S):
        self._group = runtime_context.get_metrics_group().add_group(GROUP)
        self._namespace = namespace
        self._counters: dict[str, Any] = {}
        self._gauges: dict[str, int] = {}
        # Counts not yet added to Flink's counters, by name.
        self._unpushed: dict[str, int] = {}
        self._interval = float(push_interval_s)
        self._push_at = time.monotonic() + self._interval

    def register(self, *names: str) -> None:
        """Create these counters now, at 0: a job's counters exist from its start, not from their first event."""
        for name in names:
            self._counter(name)

    def _counter(self, name: str) -> Any:
        counter = self._counters.get(name)
        if counter is None:
            metric = _flink_name(self._namespace, name) if self._namespace else name
            counter = self._counters[name] = self._group.counter(metric)
        return counter

    def __call__(self, name: str, n: int = 1) -> None:
        unpushed = self._unpushed
        if name in unpushed:
            unpushed[name] += n
        else:
            self._counter(name)
            unpushed[name] = n
        if time.monotonic() >= self._push_at:
            self.push()

    def tick(self) -> None:
        """Push if the interval has passed (for a function that may count nothing for a while)."""
        if time.monotonic() >= self._push_at:
            self.push()

    def push(self) -> None:
        """Add the summed counts to Flink's counters now."""
        for name, n in self._unpushed.items():
            if n:
                self._counters[name].inc(int(n))
        self._unpushed = {}
        self._push_at = time.monotonic() + self._interval

    # The facade's (namespace, name, value) callbacks.
    def counter(self, namespace: str, name: str, value: int) -> None:
        self(_flink_name(namespace, name), value)

    def distribution(self, namespace: str, name: str, value: int) -> None:
        # Flink's Python API has no histogram a reporter could percentile: keep
        # the sum and the count (the Prometheus histograms carry the buckets).
        self(_flink_name(namespace, name) + "_sum", value)
        self(_flink_name(namespace, name) + "_count", 1)

    def gauge(self, namespace: str, name: str, value: int) -> None:
        """A gauge as a Flink *counter* moved by the difference, in this (the task's) thread.

        Not a Flink gauge: a Python gauge is a callable the TaskManager's metrics thread invokes when
        the JobManager or a reporter queries it, and in thread mode that is a call into the embedded
        interpreter from a thread that does not hold it: the TaskManager died of it (SIGSEGV in
        ``_PyEvalFramePushAndInit`` under ``MetricGauge.getValue``, docs/flink.md). Flink's
        Prometheus reporter exports counters as gauges anyway."""
        key = _flink_name(namespace, name)
        value = int(value)
        previous = self._gauges.get(key, 0)
        if value != previous:
            counter = self._counter(key)
            if value > previous:
                counter.inc(value - previous)
            else:
                counter.dec(previous - value)
        self._gauges[key] = value


def flink_pipeline_metrics(counters: Counters, settings: Any) -> PipelineMetrics:
    """The facade for one function: its Flink metric group plus the process's ``/metrics`` endpoint."""
    port: Optional[int] = settings.get("metrics_port")
    endpoint = None
    if port is not None and port >= 0:
        tls = MetricsTls.of(settings.get("metrics_tls_cert"), settings.get("metrics_tls_key"),
                            settings.get("metrics_tls_client_ca"))
        endpoint = WorkerMetricsEndpoint(port, settings.get("metrics_port_attempts", 16),
                                         settings.get("metrics_bind_address", "0.0.0.0"),
                                         settings.get("metrics_sd_dir"), settings.get("metrics_advertise_host"), tls)
    metrics = PipelineMetrics(endpoint, prometheus=endpoint is not None, counter=counters.counter,
                              distribution=counters.distribution, gauge=counters.gauge)
    metrics.setup()
    return metrics
