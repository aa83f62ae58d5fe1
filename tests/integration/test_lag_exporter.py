"""The lag exporter against the real broker and Redis, scraped over HTTP like Prometheus does.

* Offsets: N records produced per partition, a plain consumer commits the
  group up to K; the exporter's /metrics then says N - K per partition and
  their sum; committing everything brings it to 0; producing more makes it
  grow again. A partition the group never committed counts from its start.
* Event time: the progress key the profile sink keeps in Redis
  (``EventTimeProgress``) only moves forward, and the exporter turns it into
  now - newest event time.
* The pipeline: a bounded run of the onboarding pipeline on Prism takes the lag
  of its group from "everything" to 0, and events produced while it is not
  running show up as lag again until the next run catches up.
"""
from __future__ import annotations

import time
import urllib.request
from typing import Optional

import pytest
import redis
from apache_beam.runners.runner import PipelineState
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from prometheus_client.parser import text_string_to_metric_families

from onboardflow.runners.cli.lag import KafkaLagReader, LagCollector, ProgressReader, serve_lag_exporter
from onboardflow.transforms.progress import EventTimeProgress

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict:
    """/metrics as {(name, frozenset(labels)): value}."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def lag_by_partition(samples: dict, group: str, topic: str) -> dict[int, float]:
    return {
        int(dict(labels)["partition"]): value
        for (name, labels), value in samples.items()
        if name == "onboardflow_consumer_lag_records" and dict(labels).get("group") == group
        and dict(labels).get("topic") == topic
    }


def total_lag(samples: dict, group: str) -> Optional[float]:
    return samples.get(("onboardflow_consumer_group_lag_records", frozenset({("group", group)})))


def produce_per_partition(bootstrap: str, topic: str, counts: dict[int, int]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for partition, n in counts.items():
            for i in range(n):
                producer.send(topic, value=f"record-{i}".encode(), partition=partition)
        producer.flush()
    finally:
        producer.close()


def commit(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    # A plain consumer commits without joining the group, as the pipeline does.
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    finally:
        consumer.close(autocommit=False)


@pytest.fixture
def exporter(kafka_bootstrap, redis_url):
    """Factory: start an exporter on a free port for (group, topics[, redis prefix]); stopped after."""
    servers, readers = [], []

    def start(group: str, topics: list[str], redis_prefix: Optional[str] = None) -> int:
        kafka = KafkaLagReader(kafka_bootstrap, group, topics)
        progress = ProgressReader(redis_url, redis_prefix) if redis_prefix else None
        readers.extend(r for r in (kafka, progress) if r is not None)
        server = serve_lag_exporter(LagCollector(kafka, progress), port=0, address="127.0.0.1")
        servers.append(server)
        return server.server_port

    yield start
    for server in servers:
        server.shutdown()
    for reader in readers:
        reader.close()


def test_lag_per_partition_is_produced_minus_committed_and_follows_commits_and_new_records(
        kafka_bootstrap, kafka_topic, unique_name, exporter):
    topic = kafka_topic(partitions=3)
    group = f"{unique_name}-group"
    produced = {0: 10, 1: 7, 2: 5}
    produce_per_partition(kafka_bootstrap, topic, produced)
    commit(kafka_bootstrap, group, topic, {0: 4, 1: 7})  # partition 2: never committed
    port = exporter(group, [topic])

    samples = scrape(port)
    assert samples[("onboardflow_lag_exporter_kafka_up", frozenset())] == 1
    assert lag_by_partition(samples, group, topic) == {0: 6, 1: 0, 2: 5}
    assert total_lag(samples, group) == 11
    committed = {int(dict(labels)["partition"]): value for (name, labels), value in samples.items()
                 if name == "onboardflow_consumer_committed_offset" and dict(labels)["topic"] == topic}
    assert committed == {0: 4, 1: 7}

    commit(kafka_bootstrap, group, topic, produced)
    samples = scrape(port)
    assert lag_by_partition(samples, group, topic) == {0: 0, 1: 0, 2: 0}
    assert total_lag(samples, group) == 0

    produce_per_partition(kafka_bootstrap, topic, {1: 3, 2: 8})
    samples = scrape(port)
    assert lag_by_partition(samples, group, topic) == {0: 0, 1: 3, 2: 8}
    assert total_lag(samples, group) == 11


def test_a_topic_that_does_not_exist_is_reported_as_kafka_down_not_a_crash(unique_name, exporter):
    port = exporter(f"{unique_name}-group", [f"{unique_name}.missing"])
    samples = scrape(port)
    assert samples[("onboardflow_lag_exporter_kafka_up", frozenset())] == 0
    assert not any(name == "onboardflow_consumer_lag_records" for name, _ in samples)
    # The exporter still answers the next scrape.
    assert scrape(port)[("onboardflow_lag_exporter_kafka_up", frozenset())] == 0


def test_event_time_progress_only_moves_forward(redis_url, redis_key_prefix):
    progress = EventTimeProgress(redis_key_prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        assert progress.read(client) is None
        assert progress.record(client, 1_700_000_000_000, 1_700_000_005_000) is True
        assert progress.record(client, 1_699_999_000_000, 1_700_000_009_000) is False  # an older batch, later
        assert progress.record(client, 1_700_000_001_000, 1_700_000_010_000) is True
        assert tuple(progress.read(client)) == (1_700_000_001_000, 1_700_000_010_000)
        assert client.ttl(progress.key) == -1  # never expires
    finally:
        client.close()


def test_exporter_serves_now_minus_the_newest_event_time_written_to_redis(
        kafka_bootstrap, kafka_topic, unique_name, redis_url, redis_key_prefix, exporter):
    topic = kafka_topic(partitions=1)
    event_time_ms = int(time.time() * 1000) - 120_000
    client = redis.Redis.from_url(redis_url)
    try:
        EventTimeProgress(redis_key_prefix).record(client, event_time_ms, event_time_ms + 1000)
    finally:
        client.close()
    port = exporter(f"{unique_name}-group", [topic], redis_prefix=redis_key_prefix)

    before = time.time()
    samples = scrape(port)
    after = time.time()
    assert samples[("onboardflow_lag_exporter_redis_up", frozenset())] == 1
    assert samples[("onboardflow_last_written_event_timestamp_seconds", frozenset())] == event_time_ms / 1000
    lag = samples[("onboardflow_event_time_lag_seconds", frozenset())]
    assert before - event_time_ms / 1000 <= lag <= after - event_time_ms / 1000


# --------------------------------------------------------------------------- with the pipeline


def _pipeline_args(bootstrap, topic, group, dlq, changes, redis_url, prefix, dsn, schema) -> list[str]:
    return [
        f"--kafka_bootstrap_servers={bootstrap}",
        f"--kafka_topics={topic}",
        f"--kafka_consumer_group={group}",  # locally the start position is earliest: each run re-reads all
        f"--dead_letter_topic={dlq}",
        f"--segment_changes_topic={changes}",
        f"--redis_url={redis_url}",
        f"--redis_key_prefix={prefix}",
        f"--warehouse_dsn={dsn}",
        f"--warehouse_schema={schema}",
        "--kafka_bounded",
        "--metrics_port=-1",
    ]


@pytest.mark.e2e
def test_pipeline_lag_drops_to_zero_after_a_run_and_grows_while_it_is_stopped(
        kafka_bootstrap, kafka_topic, unique_name, redis_url, redis_key_prefix, pg_dsn, warehouse_schema,
        exporter):
    from onboardflow.runners.cli.produce import produce
    from onboardflow.runners.cli.run import run
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.transforms.anonymize import SecretKey

    topic = kafka_topic(partitions=2)
    dlq = kafka_topic(partitions=1, suffix="dlq")
    changes = kafka_topic(partitions=1, suffix="segment-changes")
    group = f"{unique_name}-pipeline"
    secret = SecretKey(b"lag-test-pseudonymization-key-32")
    args = _pipeline_args(kafka_bootstrap, topic, group, dlq, changes, redis_url, redis_key_prefix, pg_dsn,
                          warehouse_schema)
    first = list(JourneyGenerator(GeneratorConfig(seed=7, users=20, horizon_days=2.0)).messages())
    assert produce(first, kafka_bootstrap, topic, progress=False).ok
    port = exporter(group, [topic])

    assert total_lag(scrape(port), group) == len(first)  # nothing committed yet: all of it

    assert run(args, secret=secret).state == PipelineState.DONE
    samples = scrape(port)
    assert lag_by_partition(samples, group, topic) == {0: 0, 1: 0}
    assert total_lag(samples, group) == 0

    # The pipeline is stopped; events keep arriving.
    more = list(JourneyGenerator(GeneratorConfig(seed=8, users=5, horizon_days=1.0)).messages())
    assert produce(more, kafka_bootstrap, topic, progress=False).ok
    assert total_lag(scrape(port), group) == len(more)

    assert run(args, secret=secret).state == PipelineState.DONE
    assert total_lag(scrape(port), group) == 0


# ------------------------------------------------ the worker endpoint after a pipeline run
#
# Used once the transforms report through PipelineMetrics (see the wiring list
# in docs/observability.md): run the pipeline in-process (LOOPBACK) with
# "--metrics_port=0", "--metrics_bind_address=127.0.0.1", scrape
# served_worker_port() before and after the run, and call this with the two
# scrapes, the produced messages and the generator's events.


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and labels.items() <= dict(sample_labels).items())


def assert_worker_metrics_match_the_input(before: dict, after: dict, messages: list, events: list,
                                          redis_url: str, prefix: str) -> None:
    """The worker endpoint counted what the input holds, and every histogram saw observations.

    ``messages``: the GeneratedMessages produced; ``events``: the generator's
    ``(kind, event)`` pairs. Counters are compared as deltas, since the
    process-wide registry outlives one run.
    """
    from collections import Counter

    from onboardflow.runners.sim.generator import DUPLICATE, MALFORMATION_REASONS

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    def route(event: dict) -> str:
        consent = event["consent"]
        return "personalization" if consent["personalization"] else (
            "analytics_only" if consent["analytics"] else "filtered")

    malformed = Counter(MALFORMATION_REASONS[m.kind] for m in messages if m.kind in MALFORMATION_REASONS)
    routes = Counter(route(event) for _, event in events)
    duplicates = Counter(route(event) for kind, event in events if kind == DUPLICATE)

    assert delta("onboardflow_events_read_total") == len(messages)
    for reason, n in malformed.items():
        assert delta("onboardflow_events_dead_lettered_total", reason=reason) == n, reason
    assert delta("onboardflow_events_dead_lettered_total") == sum(malformed.values())
    assert delta("onboardflow_events_valid_total") == routes["personalization"] + routes["analytics_only"]
    assert delta("onboardflow_events_consent_filtered_total") == routes["filtered"]
    assert delta("onboardflow_events_duplicate_total") == duplicates["personalization"]
    assert delta("onboardflow_profiles_written_total") > 0
    for histogram in ("onboardflow_redis_write_seconds_count", "onboardflow_event_to_redis_seconds_count"):
        assert delta(histogram) > 0, histogram
    assert delta("onboardflow_warehouse_write_seconds_count", table="events") > 0

    # The progress key holds the newest event time among the consenting users' events.
    client = redis.Redis.from_url(redis_url)
    try:
        progress = EventTimeProgress(prefix).read(client)
    finally:
        client.close()
    newest = max(event["occurred_at"] for _, event in events if route(event) == "personalization")
    assert progress is not None and progress.event_time_ms == newest


@pytest.mark.e2e
def test_worker_endpoint_counts_what_a_pipeline_run_read_dropped_and_wrote(
        kafka_bootstrap, kafka_topic, unique_name, redis_url, redis_key_prefix, pg_dsn, warehouse_schema):
    from onboardflow.runners.cli.produce import produce
    from onboardflow.runners.cli.run import run
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.transforms.anonymize import SecretKey
    from onboardflow.transforms.metrics_endpoint import serve_worker_metrics

    topic = kafka_topic(partitions=2)
    dlq = kafka_topic(partitions=1, suffix="dlq")
    changes = kafka_topic(partitions=1, suffix="segment-changes")
    generator = JourneyGenerator(GeneratorConfig(seed=11, users=40, horizon_days=3.0, malformed_fraction=0.03,
                                                 duplicate_fraction=0.03, personalization_consent_rate=0.7,
                                                 analytics_consent_rate=0.5))
    messages = list(generator.messages())
    events = list(generator.events())
    assert produce(messages, kafka_bootstrap, topic, progress=False).ok
    # LOOPBACK: the workers run in this process, so this is their endpoint too.
    port = serve_worker_metrics(0, address="127.0.0.1")
    args = _pipeline_args(kafka_bootstrap, topic, f"{unique_name}-metrics", dlq, changes, redis_url,
                          redis_key_prefix, pg_dsn, warehouse_schema)
    args = [a for a in args if not a.startswith("--metrics_port")] + [
        "--metrics_port=0", "--metrics_bind_address=127.0.0.1",
        # No event is too late: every generated one counts (see test_pipeline_e2e.py).
        "--allowed_lateness_hours=96", "--dedup_horizon_hours=96"]

    before = scrape(port)
    assert run(args, secret=SecretKey(b"lag-test-pseudonymization-key-32")).state == PipelineState.DONE
    after = scrape(port)
    assert_worker_metrics_match_the_input(before, after, messages, events, redis_url, redis_key_prefix)


def _wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.mark.e2e
def test_streaming_run_scraped_while_running_counts_the_input_and_lag_rises_while_paused(
        kafka_bootstrap, kafka_topic, unique_name, redis_url, redis_key_prefix, pg_dsn, warehouse_schema,
        exporter):
    from onboardflow.runners.cli.produce import produce
    from onboardflow.runners.cli.run import run
    from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator
    from onboardflow.transforms.anonymize import SecretKey
    from onboardflow.transforms.metrics_endpoint import serve_worker_metrics

    topic = kafka_topic(partitions=2)
    dlq = kafka_topic(partitions=1, suffix="dlq")
    changes = kafka_topic(partitions=1, suffix="segment-changes")
    group = f"{unique_name}-streaming"
    generator = JourneyGenerator(GeneratorConfig(seed=12, users=30, horizon_days=3.0, malformed_fraction=0.03,
                                                 duplicate_fraction=0.03, personalization_consent_rate=0.7,
                                                 analytics_consent_rate=0.5))
    messages, events = list(generator.messages()), list(generator.events())
    assert produce(messages, kafka_bootstrap, topic, progress=False).ok
    worker_port = serve_worker_metrics(0, address="127.0.0.1")  # LOOPBACK: the workers' endpoint
    lag_port = exporter(group, [topic])
    args = [a for a in _pipeline_args(kafka_bootstrap, topic, group, dlq, changes, redis_url, redis_key_prefix,
                                      pg_dsn, warehouse_schema)
            if a not in ("--kafka_bounded", "--metrics_port=-1")]
    args += ["--streaming", "--metrics_port=0", "--metrics_bind_address=127.0.0.1",
             "--allowed_lateness_hours=96", "--dedup_horizon_hours=96"]
    secret = SecretKey(b"lag-test-pseudonymization-key-32")
    newest = max(e["occurred_at"] for _, e in events if e["consent"]["personalization"])

    def settled():
        # Everything read, committed, and the newest consenting event written to Redis.
        client = redis.Redis.from_url(redis_url)
        try:
            progress = EventTimeProgress(redis_key_prefix).read(client)
        finally:
            client.close()
        return (total_lag(scrape(lag_port), group) == 0 and progress is not None
                and progress.event_time_ms == newest)

    before = scrape(worker_port)
    result = run(args, secret=secret, wait=False)
    try:
        _wait_for(settled, 180, "the streaming run to catch up")
        # Scraped while the job is still running (it never ends by itself).
        assert result.state == PipelineState.RUNNING
        assert_worker_metrics_match_the_input(before, scrape(worker_port), messages, events, redis_url,
                                              redis_key_prefix)
    finally:
        result.cancel()
    _wait_for(lambda: PipelineState.is_terminal(result.state), 60, "the job to stop")

    # Paused: events keep arriving and the lag grows by exactly them.
    more = list(JourneyGenerator(GeneratorConfig(seed=13, users=5, horizon_days=1.0)).messages())
    assert produce(more, kafka_bootstrap, topic, progress=False).ok
    assert total_lag(scrape(lag_port), group) == len(more)

    result = run(args, secret=secret, wait=False)
    try:
        _wait_for(lambda: total_lag(scrape(lag_port), group) == 0, 180, "the resumed run to catch up")
    finally:
        result.cancel()
