"""PipelineMetrics: every call reaches both the engine's metrics (Beam here) and the worker's Prometheus registry."""
import json
import pickle
import socket
import urllib.request

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from prometheus_client import CollectorRegistry

from onboardflow.pipelines.beam.metrics import (
    CountDeadLetters,
    beam_pipeline_metrics,
    pipeline_metrics_from_options,
)
from onboardflow.transforms.metrics import BEAM_NAMESPACE, PipelineMetrics
from onboardflow.transforms.metrics_endpoint import (
    WorkerMetricsEndpoint,
    serve_worker_metrics,
    served_worker_port,
    start_on_first_free_port,
)
from onboardflow.transforms.prometheus import (
    END_TO_END_BUCKETS,
    PIPELINE_METRICS,
    WRITE_BUCKETS,
    pipeline_sample_names,
    worker_registry,
)


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def metrics(registry):
    return PipelineMetrics(registry=registry)


def test_counters_add_the_batch_count_under_prometheus_names_and_labels(metrics, registry):
    metrics.events_read("onboarding.events", 3, 5)
    metrics.events_read("onboarding.events", 3, 2)
    metrics.events_read("onboarding.events", 1)
    metrics.events_valid(4)
    metrics.dead_lettered("decode", "bad_magic_byte", 2)
    metrics.consent_filtered(3)
    metrics.late()
    metrics.duplicates(6)
    metrics.profiles_written(7)
    metrics.segment_changes(8)
    metrics.drift_alarm("adwin_propensity")
    metrics.redis_error("profile_write", 2)

    def value(name, **labels):
        return registry.get_sample_value(name, labels)

    assert value("onboardflow_events_read_total", topic="onboarding.events", partition="3") == 7
    assert value("onboardflow_events_read_total", topic="onboarding.events", partition="1") == 1
    assert value("onboardflow_events_valid_total") == 4
    assert value("onboardflow_events_dead_lettered_total", stage="decode", reason="bad_magic_byte") == 2
    assert value("onboardflow_events_consent_filtered_total") == 3
    assert value("onboardflow_events_late_total") == 1
    assert value("onboardflow_events_duplicate_total") == 6
    assert value("onboardflow_profiles_written_total") == 7
    assert value("onboardflow_segment_changes_total") == 8
    assert value("onboardflow_drift_alarms_total", detector="adwin_propensity") == 1
    assert value("onboardflow_redis_errors_total", operation="profile_write") == 2


def test_zero_or_negative_counts_change_nothing(metrics, registry):
    metrics.events_valid(1)
    metrics.profiles_written(0)
    metrics.profiles_written(-3)
    assert registry.get_sample_value("onboardflow_profiles_written_total") == 0


def test_latencies_land_in_histogram_buckets(metrics, registry):
    metrics.redis_write_seconds(0.003)
    metrics.redis_write_seconds(0.2)
    metrics.warehouse_write_seconds("events", 1.5)
    metrics.event_to_redis_seconds(42.0)

    def bucket(name, le, **labels):
        return registry.get_sample_value(f"{name}_bucket", {**labels, "le": le})

    assert bucket("onboardflow_redis_write_seconds", "0.0025") == 0
    assert bucket("onboardflow_redis_write_seconds", "0.005") == 1
    assert bucket("onboardflow_redis_write_seconds", "0.25") == 2
    assert registry.get_sample_value("onboardflow_redis_write_seconds_count") == 2
    assert registry.get_sample_value("onboardflow_redis_write_seconds_sum") == pytest.approx(0.203)
    assert bucket("onboardflow_warehouse_write_seconds", "1.0", table="events") == 0
    assert bucket("onboardflow_warehouse_write_seconds", "2.5", table="events") == 1
    assert bucket("onboardflow_event_to_redis_seconds", "30.0") == 0
    assert bucket("onboardflow_event_to_redis_seconds", "60.0") == 1


def test_event_to_redis_latency_from_a_clock_behind_the_event_counts_as_zero(metrics, registry):
    metrics.event_to_redis_seconds(-5.0)
    assert registry.get_sample_value("onboardflow_event_to_redis_seconds_bucket", {"le": "0.1"}) == 1
    assert registry.get_sample_value("onboardflow_event_to_redis_seconds_sum") == 0


def test_model_version_and_source_watermark_are_gauges_that_follow_the_last_value(metrics, registry):
    metrics.model_version("propensity", 3)
    metrics.model_version("propensity", 4)
    metrics.source_watermark("onboarding.events", 0, 1_700_000_000_500_000)
    assert registry.get_sample_value("onboardflow_model_version", {"kind": "propensity"}) == 4
    assert registry.get_sample_value(
        "onboardflow_source_watermark_timestamp_seconds", {"topic": "onboarding.events", "partition": "0"}
    ) == pytest.approx(1_700_000_000.5)


def test_a_partition_without_a_watermark_yet_is_not_reported(metrics, registry):
    metrics.source_watermark("onboarding.events", 1, MIN_TIMESTAMP.micros)
    assert registry.get_sample_value(
        "onboardflow_source_watermark_timestamp_seconds", {"topic": "onboarding.events", "partition": "1"}) is None


def test_without_prometheus_the_registry_is_never_touched(registry):
    metrics = PipelineMetrics(prometheus=False, registry=registry)
    metrics.profiles_written(3)
    metrics.redis_write_seconds(0.1)
    assert registry.get_sample_value("onboardflow_profiles_written_total") is None
    assert metrics.setup() is None


def test_buckets_are_sorted_and_cover_sub_millisecond_writes_to_a_day_of_backfill():
    assert list(WRITE_BUCKETS) == sorted(WRITE_BUCKETS) and WRITE_BUCKETS[0] <= 0.001
    assert list(END_TO_END_BUCKETS) == sorted(END_TO_END_BUCKETS) and END_TO_END_BUCKETS[-1] >= 86400


def test_every_metric_follows_prometheus_naming():
    for spec in PIPELINE_METRICS:
        assert spec.name.startswith("onboardflow_"), spec.name
        assert not spec.name.endswith("_total"), "prometheus-client adds _total to counters"
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
    names = pipeline_sample_names()
    assert {"onboardflow_events_read_total", "onboardflow_redis_write_seconds_bucket",
            "onboardflow_model_version"} <= names


def test_a_pickled_facade_keeps_its_settings_and_reports_to_the_process_registry(registry):
    endpoint = WorkerMetricsEndpoint(port=9400, attempts=4, address="127.0.0.1", sd_dir="/tmp/sd")
    metrics = PipelineMetrics(endpoint, registry=registry)
    metrics.profiles_written(1)  # builds caches that must not be pickled
    clone = pickle.loads(pickle.dumps(metrics))
    assert clone == metrics and clone.endpoint == endpoint
    before = worker_registry().get_sample_value("onboardflow_segment_changes_total")
    clone.segment_changes(5)
    assert worker_registry().get_sample_value("onboardflow_segment_changes_total") == before + 5
    assert registry.get_sample_value("onboardflow_segment_changes_total") == 0


def test_options_configure_the_worker_endpoint_or_leave_beam_metrics_only():
    opts = PipelineOptions(["--metrics_port=9400", "--metrics_port_attempts=4", "--metrics_sd_dir=/tmp/sd",
                            "--metrics_advertise_host=host.docker.internal"])
    assert pipeline_metrics_from_options(opts).endpoint == WorkerMetricsEndpoint(
        9400, 4, "0.0.0.0", "/tmp/sd", "host.docker.internal")
    assert pipeline_metrics_from_options(PipelineOptions([])).endpoint == WorkerMetricsEndpoint()
    beam_only = pipeline_metrics_from_options(PipelineOptions(["--metrics_port=-1"]))
    assert beam_only.endpoint is None and beam_only.prometheus is False


def test_a_busy_port_is_skipped_for_the_next_one_and_all_busy_is_an_error(registry):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = start_on_first_free_port([busy, 0], "127.0.0.1", registry)
        try:
            assert server.server_port not in (busy, 0)
        finally:
            server.shutdown()
        with pytest.raises(OSError):
            start_on_first_free_port([busy], "127.0.0.1", registry)


def test_worker_endpoint_is_served_once_per_process_and_registers_for_file_discovery(tmp_path):
    port = serve_worker_metrics(0, address="127.0.0.1", sd_dir=str(tmp_path))
    assert serve_worker_metrics(0, address="127.0.0.1") == port == served_worker_port()
    assert PipelineMetrics(WorkerMetricsEndpoint(0, address="127.0.0.1")).setup() == port
    PipelineMetrics().events_valid(2)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "onboardflow_events_valid_total" in body
    (target_file,) = tmp_path.glob("onboardflow-worker-*.json")
    target = json.loads(target_file.read_text())
    assert target[0]["targets"] == [f"127.0.0.1:{port}"]
    assert target[0]["labels"]["job"] == "onboardflow-worker"


class _ReportingFn(beam.DoFn):
    def __init__(self, metrics):
        self._metrics = metrics

    def setup(self):
        self._metrics.setup()

    def process(self, element):
        self._metrics.events_read("t", element % 2, 1)
        self._metrics.dead_lettered("decode", "bad_magic_byte", 1)
        self._metrics.redis_write_seconds(0.004)
        self._metrics.model_version("propensity", 7)
        yield element


def test_beam_metrics_are_reported_to_the_runner_under_the_pipeline_namespace():
    p = beam.Pipeline(runner=FnApiRunner())
    _ = p | beam.Create(range(6)) | beam.ParDo(_ReportingFn(beam_pipeline_metrics()))
    result = p.run()
    result.wait_until_finish()
    query = result.metrics().query(MetricsFilter().with_namespace(BEAM_NAMESPACE))
    counters = {r.key.metric.name: r.committed for r in query["counters"]}
    assert counters["events_read"] == 6
    assert counters["events_dead_lettered"] == 6
    assert counters["events_dead_lettered_decode_bad_magic_byte"] == 6
    (redis_ms,) = [r.committed for r in query["distributions"] if r.key.metric.name == "redis_write_ms"]
    assert (redis_ms.count, redis_ms.sum, redis_ms.max) == (6, 24, 4)
    (version,) = [r.committed for r in query["gauges"] if r.key.metric.name == "model_version_propensity"]
    assert version.value == 7


def test_dead_letters_are_counted_by_stage_and_reason_and_all_passed_through():
    letters = [
        {"stage": "decode", "reason": "t_bad_magic_byte", "source_offset": 1},
        {"stage": "decode", "reason": "t_bad_magic_byte", "source_offset": 2},
        {"stage": "t_profile_store", "reason": "redis_rejected", "user_key": None},
        {"reason": "t_no_stage"},
        "t-not-a-mapping",
    ]
    registry = worker_registry()

    def count(stage, reason):
        return registry.get_sample_value("onboardflow_events_dead_lettered_total",
                                         {"stage": stage, "reason": reason}) or 0

    before = {k: count(*k) for k in [("decode", "t_bad_magic_byte"), ("t_profile_store", "redis_rejected"),
                                       ("unknown", "t_no_stage"), ("unknown", "unknown")]}
    p = beam.Pipeline(runner=FnApiRunner())
    out = p | beam.Create(letters) | CountDeadLetters(beam_pipeline_metrics())
    assert_that(out, equal_to(letters))
    p.run().wait_until_finish()
    assert {k: count(*k) - v for k, v in before.items()} == {
        ("decode", "t_bad_magic_byte"): 2, ("t_profile_store", "redis_rejected"): 1,
        ("unknown", "t_no_stage"): 1, ("unknown", "unknown"): 1,
    }


def _recorded(kind):
    def record(namespace, name, value):
        _RECORDED.append((kind, namespace, name, value))
    return record


_RECORDED: list = []


def test_the_facade_reaches_the_engine_only_through_its_callbacks(registry):
    _RECORDED.clear()
    PipelineMetrics(registry=registry).events_valid(3)  # default: no engine, Prometheus only
    assert _RECORDED == [] and registry.get_sample_value("onboardflow_events_valid_total") == 3
    metrics = PipelineMetrics(prometheus=False, counter=_recorded("counter"),
                              distribution=_recorded("distribution"), gauge=_recorded("gauge"))
    metrics.dead_lettered("decode", "bad magic", 2)
    metrics.warehouse_write_seconds("events", 0.0125)
    metrics.model_version("segmenter", 4)
    metrics.profiles_written(0)
    assert _RECORDED == [
        ("counter", BEAM_NAMESPACE, "events_dead_lettered", 2),
        ("counter", BEAM_NAMESPACE, "events_dead_lettered_decode_bad_magic", 2),
        ("distribution", BEAM_NAMESPACE, "warehouse_write_ms_events", 12),
        ("gauge", BEAM_NAMESPACE, "model_version_segmenter", 4),
    ]


def test_a_pickled_beam_facade_keeps_reporting_to_beam():
    metrics = beam_pipeline_metrics(prometheus=False)
    clone = pickle.loads(pickle.dumps(metrics))
    assert clone == metrics and clone != PipelineMetrics(prometheus=False)


def test_metrics_core_imports_without_beam():
    import subprocess
    import sys

    code = ("import sys; sys.modules['apache_beam'] = None\n"
            "import onboardflow.transforms.metrics, onboardflow.transforms.metrics_endpoint\n"
            "import onboardflow.transforms.prometheus, onboardflow.transforms.progress\n")
    subprocess.run([sys.executable, "-c", code], check=True)
