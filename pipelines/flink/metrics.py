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
"""
from __future__ import annotations

from typing import Any, Optional

from ...transforms.metrics import PipelineMetrics
from ...transforms.metrics_endpoint import WorkerMetricsEndpoint

GROUP = "onboardflow"


def _flink_name(namespace: str, name: str) -> str:
    text = f"{namespace}_{name}".replace(".", "_").lower()
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)


class Counters:
    """``count(name, n)`` onto Flink counters of one function's metric group, each looked up once."""

    def __init__(self, runtime_context: Any, namespace: str = ""):
        self._group = runtime_context.get_metrics_group().add_group(GROUP)
        self._namespace = namespace
        self._counters: dict[str, Any] = {}
        self._gauges: dict[str, list] = {}

    def register(self, *names: str) -> None:
        """Create these counters now, at 0: a job's counters exist from its start, not from their first event."""
        for name in names:
            self(name, 0)

    def __call__(self, name: str, n: int = 1) -> None:
        counter = self._counters.get(name)
        if counter is None:
            metric = _flink_name(self._namespace, name) if self._namespace else name
            counter = self._counters[name] = self._group.counter(metric)
        counter.inc(int(n))

    # The facade's (namespace, name, value) callbacks.
    def counter(self, namespace: str, name: str, value: int) -> None:
        self(_flink_name(namespace, name), value)

    def distribution(self, namespace: str, name: str, value: int) -> None:
        # Flink's Python API has no histogram a reporter could percentile: keep
        # the sum and the count (the Prometheus histograms carry the buckets).
        self(_flink_name(namespace, name) + "_sum", value)
        self(_flink_name(namespace, name) + "_count", 1)

    def gauge(self, namespace: str, name: str, value: int) -> None:
        key = _flink_name(namespace, name)
        cell = self._gauges.get(key)
        if cell is None:
            cell = self._gauges[key] = [int(value)]
            self._group.gauge(key, lambda: cell[0])
        cell[0] = int(value)


def flink_pipeline_metrics(counters: Counters, settings: Any) -> PipelineMetrics:
    """The facade for one function: its Flink metric group plus the process's ``/metrics`` endpoint."""
    port: Optional[int] = settings.get("metrics_port")
    endpoint = None
    if port is not None and port >= 0:
        endpoint = WorkerMetricsEndpoint(port, settings.get("metrics_port_attempts", 16),
                                         settings.get("metrics_bind_address", "0.0.0.0"),
                                         settings.get("metrics_sd_dir"), settings.get("metrics_advertise_host"))
    metrics = PipelineMetrics(endpoint, prometheus=endpoint is not None, counter=counters.counter,
                              distribution=counters.distribution, gauge=counters.gauge)
    metrics.setup()
    return metrics
