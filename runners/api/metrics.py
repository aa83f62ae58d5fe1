"""The personalization API's Prometheus metrics (``/metrics``): requests, latency, fallbacks, exposures.

``API_METRICS`` is the catalogue (names, labels, buckets), in the same
``MetricSpec`` form as the pipeline's (transforms/prometheus.py) so dashboards
can be checked against it. ``route`` is the route template
(``/v1/profiles/{user_id}``), never a path: no user id reaches a label, and
the series stay few. Each app has its own registry (``ApiMetrics``). With
several worker processes (`onboardflow serve --workers N`) the values live in
prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by
`serve` before the workers start) and ``/metrics``, whichever worker answers
it, sums every worker's.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ...transforms.prometheus import MetricSpec, sample_names

#: Seconds; the SLA is 200 ms end to end and a Redis read takes well under a millisecond.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)

API_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("onboardflow_api_requests", "counter", "HTTP requests answered, by route template and status.",
               ("method", "route", "status")),
    MetricSpec("onboardflow_api_request_duration_seconds", "histogram",
               "Time from a request's arrival to its response's end, by route template and status.",
               ("method", "route", "status"), LATENCY_BUCKETS),
    MetricSpec("onboardflow_api_decision_fallbacks", "counter",
               "Decisions answered with the fallback, by reason (unknown_user, stale_profile, "
               "store_unavailable, secret_unavailable).", ("reason",)),
    MetricSpec("onboardflow_api_exposures_written", "counter",
               "Experiment exposures new to the warehouse (first serving of a variant to a user).", ()),
    MetricSpec("onboardflow_api_exposures_dropped", "counter",
               "Experiment exposures not written, by reason (queue_full, warehouse_unavailable, rejected); "
               "the user's next decision records them again.", ("reason",)),
)

#: The ``route`` label of a request no route matched (a 404 of an unknown path).
UNMATCHED = "unmatched"


def api_sample_names() -> set[str]:
    return sample_names(API_METRICS)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        requests, duration, fallbacks, written, dropped = API_METRICS
        self._requests = Counter(requests.name, requests.help, requests.labels, registry=self.registry)
        self._duration = Histogram(duration.name, duration.help, duration.labels, registry=self.registry,
                                   buckets=duration.buckets)
        self._fallbacks = Counter(fallbacks.name, fallbacks.help, fallbacks.labels, registry=self.registry)
        self._written = Counter(written.name, written.help, written.labels, registry=self.registry)
        self._dropped = Counter(dropped.name, dropped.help, dropped.labels, registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self._requests.labels(method, route, str(status)).inc()
        self._duration.labels(method, route, str(status)).observe(seconds)

    def fallback(self, reason: str) -> None:
        self._fallbacks.labels(reason).inc()

    def exposures_written(self, rows: int) -> None:
        self._written.inc(rows)

    def exposures_dropped(self, reason: str, rows: int) -> None:
        self._dropped.labels(reason).inc(rows)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            every_worker = CollectorRegistry()
            multiprocess.MultiProcessCollector(every_worker)
            return generate_latest(every_worker)
        return generate_latest(self.registry)
