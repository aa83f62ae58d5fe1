"""Lag arithmetic, the table, and what the exporter serves when Kafka, Redis or Flink fail."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from onboardflow.runners.cli.lag import (
    LAG_METRICS,
    FlinkWatermarkReader,
    KafkaLagReader,
    LagCollector,
    LagReport,
    PartitionLag,
    VertexWatermark,
    format_table,
    lag_sample_names,
    partition_lag,
    read_lag,
)
from onboardflow.transforms.progress import Progress


def test_lag_is_end_minus_committed():
    assert partition_lag(log_start=0, log_end=100, committed=60) == 40
    assert partition_lag(log_start=0, log_end=100, committed=100) == 0


def test_a_partition_never_committed_counts_from_the_log_start():
    assert partition_lag(log_start=20, log_end=100, committed=None) == 80


def test_a_committed_offset_deleted_by_retention_counts_from_the_log_start():
    assert partition_lag(log_start=50, log_end=100, committed=10) == 50


def test_a_committed_offset_past_the_end_is_no_lag_not_negative():
    assert partition_lag(log_start=0, log_end=100, committed=120) == 0


def _report(**overrides):
    rows = [PartitionLag("onboarding.events", 0, 0, 100, 60, 40), PartitionLag("onboarding.events", 1, 0, 30, None, 30)]
    fields = dict(group="onboardflow", partitions=rows, taken_at=1_700_000_100.0,
                  progress=Progress(1_700_000_090_000, 1_700_000_095_000))
    fields.update(overrides)
    return LagReport(**fields)


def test_report_totals_partitions_and_measures_event_time_lag_from_redis_progress():
    report = _report()
    assert report.total == 70
    assert report.event_time_lag_s == pytest.approx(10.0)
    assert report.as_dict()["total_lag"] == 70


def test_table_lists_every_partition_with_the_total_and_event_time_lag():
    text = format_table(_report())
    lines = text.splitlines()
    assert lines[0].split() == ["topic", "partition", "log", "start", "log", "end", "committed", "lag"]
    assert lines[1].split() == ["onboarding.events", "0", "0", "100", "60", "40"]
    assert lines[2].split() == ["onboarding.events", "1", "0", "30", "-", "30"]
    assert "total lag: 70 records (group onboardflow)" in text
    assert "event-time lag: 10.0 s" in text


def test_table_says_why_when_kafka_is_unreadable():
    text = format_table(_report(partitions=[], kafka_error="KafkaTimeoutError: Unable to bootstrap"))
    assert "Kafka unreadable for group onboardflow: KafkaTimeoutError: Unable to bootstrap" in text
    assert "total lag" not in text


def _samples(report, redis_configured=True):
    families = list(LagCollector.families(report, 0.25, redis_configured))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_exporter_serves_lag_per_partition_the_group_total_and_event_time_lag():
    samples = _samples(_report())
    part0 = (("group", "onboardflow"), ("partition", "0"), ("topic", "onboarding.events"))
    part1 = (("group", "onboardflow"), ("partition", "1"), ("topic", "onboarding.events"))
    assert samples[("onboardflow_consumer_lag_records", part0)] == 40
    assert samples[("onboardflow_consumer_lag_records", part1)] == 30
    assert samples[("onboardflow_consumer_group_lag_records", (("group", "onboardflow"),))] == 70
    assert samples[("onboardflow_consumer_committed_offset", part0)] == 60
    assert ("onboardflow_consumer_committed_offset", part1) not in samples  # never committed
    assert samples[("onboardflow_partition_log_end_offset", (("partition", "1"), ("topic", "onboarding.events")))] == 30
    assert samples[("onboardflow_lag_exporter_kafka_up", ())] == 1
    assert samples[("onboardflow_lag_exporter_redis_up", ())] == 1
    assert samples[("onboardflow_event_time_lag_seconds", ())] == pytest.approx(10.0)
    assert samples[("onboardflow_last_written_event_timestamp_seconds", ())] == pytest.approx(1_700_000_090.0)
    assert samples[("onboardflow_lag_exporter_scrape_duration_seconds", ())] == 0.25


def test_exporter_serves_up_zero_and_no_lag_series_when_kafka_is_unreadable():
    samples = _samples(_report(partitions=[], kafka_error="NoBrokersAvailable", progress=None,
                               redis_error="ConnectionError"))
    assert samples[("onboardflow_lag_exporter_kafka_up", ())] == 0
    assert samples[("onboardflow_lag_exporter_redis_up", ())] == 0
    names = {name for name, _ in samples}
    assert not names & {"onboardflow_consumer_lag_records", "onboardflow_consumer_group_lag_records",
                        "onboardflow_event_time_lag_seconds"}


def test_exporter_without_redis_serves_no_event_time_series():
    names = {name for name, _ in _samples(_report(), redis_configured=False)}
    assert "onboardflow_lag_exporter_redis_up" not in names
    assert "onboardflow_event_time_lag_seconds" not in names


def test_every_served_series_is_in_the_catalogue():
    names = {name for name, _ in _samples(_report())}
    assert names <= lag_sample_names()
    assert all(spec.kind == "gauge" for spec in LAG_METRICS)


class _FailingReader:
    group = "onboardflow"
    bootstrap_servers = "127.0.0.1:9"

    def read(self):
        raise ConnectionRefusedError("[Errno 111] Connection refused")


def test_read_lag_reports_a_failure_instead_of_raising():
    report = read_lag(_FailingReader())
    assert report.kafka_error == "ConnectionRefusedError: [Errno 111] Connection refused"
    assert report.partitions == []


def test_a_scrape_with_no_broker_listening_answers_up_zero_without_crashing():
    # Port 9 (discard) on loopback: nothing listens, connections are refused.
    reader = KafkaLagReader("127.0.0.1:9", "onboardflow", ["onboarding.events"], timeout_ms=500)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LagCollector(reader))
    body = generate_latest(registry).decode()
    assert "onboardflow_lag_exporter_kafka_up 0.0" in body
    assert "onboardflow_consumer_lag_records" not in body


# --------------------------------------------------------------------------- Flink watermarks

NO_WATERMARK = "-9223372036854775808"  # what Flink 2.2 answers for a vertex without one (seen on a real cluster)

# Responses shaped like Flink's REST API (/jobs/overview, /jobs/<id>, .../watermarks).
FLINK = {
    "/jobs/overview": {"jobs": [
        {"jid": "j1", "name": "onboardflow-streaming", "state": "RUNNING"},
        {"jid": "j2", "name": "onboardflow-old", "state": "FINISHED"},
        {"jid": "j3", "name": "other-team-job", "state": "RUNNING"},
    ]},
    "/jobs/j1": {"vertices": [{"id": "v-src", "name": "Impulse"}, {"id": "v-read", "name": "ReadEvents"},
                              {"id": "v-prof", "name": "BuildProfiles -> WriteProfiles"}]},
    "/jobs/j3": {"vertices": [{"id": "v-x", "name": "x"}]},
    "/jobs/j1/vertices/v-src/watermarks": [{"id": "0.currentInputWatermark", "value": NO_WATERMARK}],
    "/jobs/j1/vertices/v-read/watermarks": [{"id": "0.currentInputWatermark", "value": "1700000090000"},
                                            {"id": "1.currentInputWatermark", "value": "1700000080000"}],
    "/jobs/j1/vertices/v-prof/watermarks": [{"id": "0.currentInputWatermark", "value": "1700000070000"},
                                            {"id": "1.currentInputWatermark", "value": NO_WATERMARK}],
    "/jobs/j3/vertices/v-x/watermarks": [{"id": "0.currentInputWatermark", "value": "1600000000000"}],
}


@pytest.fixture
def flink_rest():
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = FLINK.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(body if body is not None else {"errors": ["Not found"]}).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_flink_watermark_is_the_lowest_subtask_watermark_of_each_vertex_of_the_chosen_running_job(flink_rest):
    watermarks = FlinkWatermarkReader(flink_rest, job_name="onboardflow").read()
    # Impulse has none yet; a subtask without one does not hide the others'.
    assert watermarks == [
        VertexWatermark("onboardflow-streaming", "ReadEvents", 1_700_000_080_000),
        VertexWatermark("onboardflow-streaming", "BuildProfiles -> WriteProfiles", 1_700_000_070_000),
    ]


def test_watermark_lag_is_served_per_vertex_and_the_table_names_the_slowest(flink_rest):
    flink = FlinkWatermarkReader(flink_rest, job_name="onboardflow")
    report = _report(watermarks=flink.read())
    families = list(LagCollector.families(report, 0.1, redis_configured=True, flink_configured=True))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    job = ("job", "onboardflow-streaming")
    assert samples[("onboardflow_watermark_lag_seconds", (job, ("vertex", "ReadEvents")))] == pytest.approx(20.0)
    assert samples[("onboardflow_watermark_lag_seconds",
                    (job, ("vertex", "BuildProfiles -> WriteProfiles")))] == pytest.approx(30.0)
    assert samples[("onboardflow_lag_exporter_flink_up", ())] == 1
    assert "watermark lag: 30.0 s (job onboardflow-streaming, vertex BuildProfiles -> WriteProfiles)" in \
        format_table(report)


def test_an_unreachable_flink_is_flink_up_zero_and_the_kafka_lag_is_still_served():
    report = read_lag(_StaticReader(), flink=FlinkWatermarkReader("http://127.0.0.1:9", timeout_s=0.5))
    assert report.flink_error and report.kafka_error is None
    families = list(LagCollector.families(report, 0.1, redis_configured=False, flink_configured=True))
    samples = {s.name: s.value for f in families for s in f.samples}
    assert samples["onboardflow_lag_exporter_flink_up"] == 0
    assert "onboardflow_watermark_lag_seconds" not in samples
    assert samples["onboardflow_consumer_group_lag_records"] == 5
    assert "watermark lag: Flink unreadable" in format_table(report)


class _StaticReader:
    group = "onboardflow"

    def read(self):
        return [PartitionLag("onboarding.events", 0, 0, 5, None, 5)]
