"""Grafana dashboard, Prometheus scrape config and alert rules name only metrics the code exports.

The exported names come from the catalogues in transforms/metrics.py
(``PIPELINE_METRICS``, worker endpoint) and runners/cli/lag.py (``LAG_METRICS``,
lag exporter), so renaming a metric in code without the dashboards fails here.
The rules' behaviour is pinned by ``promtool test rules`` (make check-alerts).
"""
import json
import re
from pathlib import Path

import pytest
import yaml

from onboardflow.runners.cli.lag import DEFAULT_PORT, lag_sample_names
from onboardflow.transforms.prometheus import pipeline_sample_names

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana/dashboards/onboardflow.json"

#: Series Prometheus itself makes, not our code.
PROMETHEUS_OWN = {"up"}

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset", "bool",
    "inf", "nan",
}


def exported() -> set[str]:
    return pipeline_sample_names() | lag_sample_names()


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels, grouping removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)                   # strings
    text = re.sub(r"\{[^}]*\}", "", text)                           # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                          # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\boffset\s+\d+[smhdwy]", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end():].lstrip()
        if following.startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function or aggregation, or a keyword
        names.add(word)
    return names


def test_metric_name_extraction_ignores_functions_labels_and_keywords():
    expr = ('histogram_quantile(0.99, sum by (le, table) (rate(onboardflow_warehouse_write_seconds_bucket'
            '{table="events"}[5m]))) > 0 and on() max(onboardflow_consumer_group_lag_records offset 5m) or vector(0)')
    assert metric_names(expr) == {"onboardflow_warehouse_write_seconds_bucket",
                                  "onboardflow_consumer_group_lag_records"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def test_every_dashboard_query_names_only_exported_metrics():
    known = exported() | PROMETHEUS_OWN
    for title, expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        assert names <= known, f"{title}: {sorted(names - known)} not exported by the code"


def test_dashboard_covers_lag_throughput_dead_letters_latency_models_and_drift():
    used = set().union(*(metric_names(expr) for _, expr in dashboard_exprs()))
    assert {
        "onboardflow_consumer_lag_records", "onboardflow_consumer_group_lag_records",
        "onboardflow_event_time_lag_seconds", "onboardflow_source_watermark_timestamp_seconds",
        "onboardflow_events_read_total", "onboardflow_events_valid_total", "onboardflow_profiles_written_total",
        "onboardflow_events_dead_lettered_total", "onboardflow_events_consent_filtered_total",
        "onboardflow_events_late_total", "onboardflow_events_duplicate_total",
        "onboardflow_event_to_redis_seconds_bucket", "onboardflow_redis_write_seconds_bucket",
        "onboardflow_warehouse_write_seconds_bucket", "onboardflow_model_version",
        "onboardflow_drift_alarms_total", "onboardflow_redis_errors_total",
    } <= used


def test_latency_panels_show_p50_and_p99_from_histogram_buckets():
    for title in ("Event to Redis (end to end)", "Redis batch write", "Warehouse batch write"):
        (panel,) = [p for p in panels() if p["title"] == title]
        exprs = [t["expr"] for t in panel["targets"]]
        assert any(e.startswith("histogram_quantile(0.5,") for e in exprs), title
        assert any(e.startswith("histogram_quantile(0.99,") for e in exprs), title
        assert all("_bucket[" in e and "by (le" in e for e in exprs), title


def test_dashboard_panels_have_unique_ids_and_use_the_provisioned_datasource():
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboards_provider_loads_the_directory_compose_mounts():
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/onboardflow.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in volumes


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((DOCKER / "prometheus/alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_every_alert_names_only_exported_metrics_and_has_a_severity_and_summary():
    known = exported() | PROMETHEUS_OWN
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names and names <= known, f"{rule['alert']}: {sorted(names - known)}"
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]


def test_alerts_cover_lag_growth_dead_letters_no_progress_drift_and_redis_errors():
    names = {rule["alert"] for rule in alert_rules()}
    assert {"OnboardflowConsumerLagGrowing", "OnboardflowDeadLetterRateHigh", "OnboardflowNoProgress",
            "OnboardflowDriftDetected", "OnboardflowRedisErrors"} <= names


def test_every_alert_has_a_promtool_case_fed_with_exported_series():
    tests = yaml.safe_load((DOCKER / "prometheus/alerts_test.yml").read_text())
    tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}
    for t in tests["tests"]:
        for series in t["input_series"]:
            name = series["series"].split("{")[0].strip("'\"")
            assert name in exported(), name


def test_prometheus_scrapes_the_lag_exporter_the_workers_and_flink_and_loads_the_rules():
    config = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["onboardflow-lag"]["static_configs"][0]["targets"] == [f"lag-exporter:{DEFAULT_PORT}"]
    assert jobs["onboardflow-worker"]["file_sd_configs"][0]["files"] == ["/etc/prometheus/targets/*.json"]
    assert all(t.endswith(":9249") for t in jobs["flink"]["static_configs"][0]["targets"])
    workers = json.loads((DOCKER / "prometheus/targets/workers.json").read_text())
    ports = {int(t.rsplit(":", 1)[1]) for group in workers for t in group["targets"]}
    assert ports and all(9310 <= p < 9310 + 16 for p in ports)


@pytest.mark.parametrize("service", ["prometheus", "grafana", "lag-exporter"])
def test_compose_runs_the_observability_services(service):
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert service in compose["services"]


def test_compose_prometheus_image_is_the_version_make_check_alerts_builds_promtool_at():
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^PROMETHEUS_VERSION \?= (\S+)", makefile, re.M).group(1)
    module = re.search(r"^PROMTOOL_MODULE_VERSION \?= (\S+)", makefile, re.M).group(1)
    major, minor, patch = version.split(".")
    assert module == f"v0.{int(major) * 100 + int(minor)}.{patch}"  # Prometheus 3.16.0 is module v0.316.0
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert compose["services"]["prometheus"]["image"] == f"prom/prometheus:v{version}"
