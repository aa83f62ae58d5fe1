"""Crashes, outages and replays: nothing lost, nothing doubled (issue 13, items 4 and 6).

Every test runs ``onboardflow run --kafka_bounded --kafka_start_position=earliest``
as an OS process (tests/integration/reliability_harness.py) on a seeded
journey stream with RECENT event times (the timeline starts 14 days ago) in
which 15% of the records carry no Kafka key, so a user's events sit on
several partitions. What a disturbed run leaves behind is compared with an
uninterrupted run of the same input into its own Redis prefix, warehouse
schema and output topics (``reliability_harness.compare``):

* profiles field by field (``assert_same_profiles``) and segment sets;
* segment-change history, from the segment-changes topic and from
  ``segment_changes`` in the warehouse: folded per user, it must equal the
  user's memberships in Redis (a membership without its ``entered`` is lost,
  a change twice is doubled);
* warehouse rows by key: events, late events and dead letters equal the
  reference's; the newest profile snapshot per user equals the reference's and
  the profile in Redis (which intermediate versions a run stores depends on
  bundling, in any two runs);
* the dead-letter topic: one record per source topic/partition/offset;
* no output record stamped older than the topics' 7-day retention (Kafka
  deletes such records at its next retention check, minutes later).

The online models are off in the crash and outage runs
(``--disable_online_models``): what they learn depends on the order the
profile writes arrive in, which differs between any two runs (the e2e tests
pin a served model for that reason). The replay test runs with them on.

Counts (rounds, kill moments, outage lengths, records compared, lost,
doubled) are printed to the terminal, past pytest's capture. Longer rounds:
tests/benchmarks/bench_reliability.py.
"""
from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections import Counter

import psycopg
import pytest
import redis
from psycopg import sql

from onboardflow.runners.cli.produce import produce
from onboardflow.tests.integration.private_services import PrivateServices
from onboardflow.tests.integration.reliability_harness import (
    RETENTION_MS,
    Deployment,
    Outputs,
    PipelineProcess,
    compare,
    create_topics,
    delete_topics,
    make_input,
    read_topic,
    redis_dump,
    run_to_end,
    write_secret,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SEED = 1313
USERS = 200
KILL_ROUNDS = 3
OUTAGE_S = 30.0
NO_MODELS = "--disable_online_models"


@pytest.fixture(scope="module")
def messages():
    return make_input(SEED, USERS)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    return write_secret(tmp_path_factory.mktemp("secret"))


def _name(label: str) -> str:
    return f"t-rel-{label}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def shared_topic(kafka_bootstrap, messages):
    """The input, produced to a fresh 4-partition topic on the shared broker."""
    topic = f"{_name('in')}.events"
    create_topics(kafka_bootstrap, {topic: 4})
    stats = produce(messages, kafka_bootstrap, topic, progress=False)
    assert stats.ok and stats.total_sent == len(messages)
    yield topic
    delete_topics(kafka_bootstrap, [topic])


@pytest.fixture
def deployments(request):
    """Factory of Deployments, each cleaned up (topics, Redis keys, schema) after the test."""
    made = []

    def make(label, bootstrap, topic, redis_url, dsn, secret):
        d = Deployment(_name(label), bootstrap, topic, redis_url, dsn, secret).create()
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def say(capsys):
    """Print to the terminal even when pytest captures output: the counts belong in every CI log."""
    def emit(text: str) -> None:
        with capsys.disabled():
            print(text, flush=True)
    return emit


def _check(comparison, title: str, say) -> None:
    say(f"\n{title}\n{comparison.summary()}")
    assert comparison.problems == {}, f"{title}:\n{comparison.summary()}"
    assert sum(comparison.lost.values()) == 0 and sum(comparison.doubled.values()) == 0


# --------------------------------------------------------------------------- kill -9


def test_kill_9_of_the_process_group_at_random_moments_then_a_replay_from_earliest_loses_and_doubles_nothing(
        kafka_bootstrap, redis_url, pg_dsn, shared_topic, secret_file, deployments, messages, tmp_path,
        assert_same_profiles, say):
    """KILL_ROUNDS seeded kill -9s of the whole process group (driver, SDK workers, Prism) of a
    bounded run, each followed by the next restart; the last restart runs to its end (the documented
    recovery: a bounded replay from earliest into the same sinks). Then everything equals an
    uninterrupted run's outputs."""
    reference = deployments("ref", kafka_bootstrap, shared_topic, redis_url, pg_dsn, secret_file)
    crashed = deployments("kill", kafka_bootstrap, shared_topic, redis_url, pg_dsn, secret_file)
    uninterrupted_s = run_to_end(reference, reference.name, tmp_path / "reference.log", NO_MODELS)

    rng = random.Random(SEED)
    kills, ended_early = [], 0
    for round_ in range(2 * KILL_ROUNDS):
        if len(kills) == KILL_ROUNDS:
            break
        # Anywhere from Prism's start-up to the last writes. A run over sinks
        # a killed run already filled can end sooner than the reference: such
        # a round is a complete run, not a kill, and another round follows.
        moment = rng.uniform(0.15, 0.85) * uninterrupted_s
        process = PipelineProcess(crashed.argv(crashed.name, NO_MODELS), tmp_path / f"round-{round_}.log")
        while process.elapsed() < moment and process.running():
            time.sleep(0.05)
        if not process.running():
            assert process.wait() == 0, f"round {round_} failed:\n{process.log_text()[-3000:]}"
            ended_early += 1
            continue
        at = process.kill()
        with redis.Redis.from_url(redis_url) as client:
            profiles = sum(1 for _ in client.scan_iter(f"{crashed.prefix}:profile:*", 1000))
        kills.append((round(at, 1), profiles))
    assert len(kills) == KILL_ROUNDS, f"only {len(kills)} of {2 * KILL_ROUNDS} rounds were killed before their end"
    recovery_s = run_to_end(crashed, crashed.name, tmp_path / "recovery.log", NO_MODELS)

    comparison = compare(Outputs.read(crashed), Outputs.read(reference), assert_same_profiles)
    say(f"\nkill -9: {len(messages)} input records, uninterrupted run {uninterrupted_s:.1f} s, "
        f"{KILL_ROUNDS} rounds killed at (s, profiles in Redis then) {kills}, {ended_early} rounds ended before "
        f"their moment, recovery run {recovery_s:.1f} s")
    assert any(profiles > 0 for _, profiles in kills), "no kill hit the pipeline while it was writing"
    _check(comparison, "kill -9 rounds vs an uninterrupted run", say)


# --------------------------------------------------------------------------- replay twice


def _warehouse_snapshot(dsn: str, schema: str) -> dict[str, list[str]]:
    """Every row of every table of ``schema`` as text, sorted (partitions through their parent)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tables = [name for (name,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition", [schema]).fetchall()]
        return {table: sorted(row for (row,) in conn.execute(
            sql.SQL("SELECT t::text FROM {} AS t").format(sql.Identifier(schema, table))).fetchall())
            for table in tables}


def _topic_snapshot(bootstrap: str, topic: str) -> list[tuple]:
    return [(r.partition, r.offset, r.timestamp, r.key, r.value, tuple(r.headers or ()))
            for r in read_topic(bootstrap, topic)]


# Fields docs/redis-contract.md ("Pipeline progress") defines by the wall
# clock: the sink-watermark probe caps each watermark it records at now - lag,
# so a replay started later records a later one, with the time it did.
WALL_CLOCK_PROGRESS_FIELDS = (b"sink_watermark_ms", b"sink_watermark_at_ms")


def _redis_snapshot(d: Deployment) -> dict:
    dump = redis_dump(d.redis_url, d.prefix)
    progress = f"{d.prefix}:pipeline:progress".encode()
    if isinstance(dump.get(progress), dict):
        dump[progress] = {k: v for k, v in dump[progress].items() if k not in WALL_CLOCK_PROGRESS_FIELDS}
    return dump


def _changed(before: dict, after: dict) -> list[str]:
    """Keys whose content differs; for hashes, which fields."""
    changed = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(f.decode() for f in a.keys() | b.keys() if a.get(f) != b.get(f))
            changed.append(f"{key.decode()} fields {fields}")
        else:
            changed.append(key.decode())
    return changed


def _snapshot(d: Deployment) -> dict:
    return {
        "redis": _redis_snapshot(d),
        "warehouse": _warehouse_snapshot(d.dsn, d.schema),
        "topics": {t: _topic_snapshot(d.bootstrap, t) for t in d.topics},
    }


def test_replaying_twice_leaves_redis_the_warehouse_and_every_output_topic_byte_for_byte_unchanged(
        kafka_bootstrap, redis_url, pg_dsn, shared_topic, secret_file, deployments, tmp_path, say):
    """A bounded run, then two bounded replays from earliest (new consumer groups, same sinks).

    Compared byte for byte: every Redis key under the prefix with its whole
    content (hash fields, set members, stream entries; TTLs are not compared:
    the dump holds content only), every row of every table in the warehouse
    schema as text (wall-clock columns included: a replay writes no row, so
    ``loaded_at``/``written_at``/``failed_at`` stay too), and every record of
    the dead-letter, segment-changes and model-events topics (partition,
    offset, timestamp, key, value, headers), none of them stamped older than
    the topic's retention (the broker would delete it within minutes). Online models on. Excluded: the two fields
    of ``{prefix}:pipeline:progress`` that docs/redis-contract.md defines by
    the wall clock, ``sink_watermark_ms`` and ``sink_watermark_at_ms`` (a
    probe records how far event time got through the sink, capped at the
    wall clock); its ``event_time_ms`` and ``written_at_ms`` (the newest
    applied write) are compared like everything else.
    """
    d = deployments("replay", kafka_bootstrap, shared_topic, redis_url, pg_dsn, secret_file)
    run_to_end(d, f"{d.name}-first", tmp_path / "first.log")
    first = _snapshot(d)
    assert first["warehouse"]["events"] and first["warehouse"]["segment_changes"]
    assert all(first["topics"][t] for t in (d.dlq_topic, d.changes_topic)), "the run published nothing"
    # A record stamped older than the topic's retention is deleted by the broker
    # at its next retention check (every 5 min): "unchanged" would then hold
    # only by luck of timing.
    horizon = int(time.time() * 1000) - RETENTION_MS
    expiring = {t: sum(1 for r in records if r[2] < horizon) for t, records in first["topics"].items()}
    assert not any(expiring.values()), f"records stamped past the 7-day retention, by topic: {expiring}"
    for n in (1, 2):
        run_to_end(d, f"{d.name}-replay{n}", tmp_path / f"replay{n}.log")
        again = _snapshot(d)
        changed_keys = _changed(first["redis"], again["redis"])
        changed_tables = sorted(t for t in first["warehouse"].keys() | again["warehouse"].keys()
                                if first["warehouse"].get(t) != again["warehouse"].get(t))
        changed_topics = {t: (len(first["topics"][t]), len(again["topics"][t])) for t in d.topics
                          if first["topics"][t] != again["topics"][t]}
        say(f"\nreplay {n}: {len(first['redis'])} Redis keys, "
              f"{sum(map(len, first['warehouse'].values()))} warehouse rows in {len(first['warehouse'])} tables, "
              f"{ {t: len(r) for t, r in first['topics'].items()} } topic records; changed: Redis "
              f"{changed_keys[:10]}, tables {changed_tables}, topics (records before, after) {changed_topics}")
        assert (changed_keys, changed_tables, changed_topics) == ([], [], {})


# --------------------------------------------------------------------------- outages


@pytest.fixture(scope="module")
def private_stack():
    """Redis, PostgreSQL and a Kafka broker of this module's own (never the shared ones)."""
    with PrivateServices(with_kafka=True) as services:
        yield services


@pytest.fixture(scope="module")
def private_input(private_stack, messages, secret_file, tmp_path_factory):
    """The input on the private broker, and the outputs of an uninterrupted run of it there."""
    topic = f"{_name('in')}.events"
    create_topics(private_stack.bootstrap, {topic: 4})
    stats = produce(messages, private_stack.bootstrap, topic, progress=False)
    assert stats.ok and stats.total_sent == len(messages)
    reference = Deployment(_name("ref"), private_stack.bootstrap, topic, private_stack.redis_url,
                           private_stack.dsn, secret_file).create()
    wall_s = run_to_end(reference, reference.name, tmp_path_factory.mktemp("ref") / "reference.log", NO_MODELS)
    yield topic, Outputs.read(reference), wall_s
    reference.cleanup()


class Scraper(threading.Thread):
    """Scrapes a running pipeline's worker metrics every second; keeps the largest value of each sample."""

    def __init__(self, process: PipelineProcess):
        super().__init__(daemon=True)
        self.process, self.peak = process, Counter()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set() and self.process.running():
            for name, value in self.process.scrape().items():
                self.peak[name] = max(self.peak[name], value)
            self._halt.wait(1.0)

    def stop(self):
        self._halt.set()
        self.join(timeout=10)

    def total(self, prefix: str) -> float:
        return sum(v for k, v in self.peak.items() if k.startswith(prefix))


# fault -> (service, seconds down (0: a restart), log line that reports it)
FAULTS = {
    "redis_stopped_30s": ("redis", OUTAGE_S, re.compile(r"Redis profile write failed|Redis unavailable")),
    "postgres_stopped_30s": ("postgres", OUTAGE_S, re.compile(r"warehouse write to \w+ failed|"
                                                               r"(warehouse|database|PostgreSQL).*(retry|failed)",
                                                               re.IGNORECASE)),
    "kafka_broker_restarted": ("kafka", 0.0, re.compile(r"(kafka\.\S+|BrokerConnection).*"
                                                        r"(Connection refused|closed|disconnect|Broker not available|"
                                                        r"NodeNotReady|KafkaConnectionError)", re.IGNORECASE)),
}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_service_outage_mid_run_is_retried_reported_and_loses_and_doubles_nothing(
        fault, private_stack, private_input, secret_file, tmp_path, assert_same_profiles, say):
    """``fault`` on the private instance once the run has written its first profiles.

    The pipeline must keep retrying with backoff (not fail), say so in its
    log (and, for Redis and PostgreSQL, in ``onboardflow_redis_errors_total`` /
    ``onboardflow_warehouse_errors_total``), exit 0, and
    leave the same outputs as the uninterrupted reference run.
    """
    service, down_s, reported = FAULTS[fault]
    topic, expected, reference_s = private_input
    s = private_stack
    d = Deployment(_name(fault[:8]), s.bootstrap, topic, s.redis_url, s.dsn, secret_file).create()
    try:
        process = PipelineProcess(d.argv(d.name, NO_MODELS), tmp_path / "run.log", metrics_dir=tmp_path / "sd")
        scraper = Scraper(process)
        scraper.start()
        client = redis.Redis.from_url(s.redis_url)
        while not any(True for _ in client.scan_iter(f"{d.prefix}:profile:*", 100)):
            assert process.running(), f"the run ended before writing a profile:\n{process.log_text()[-3000:]}"
            assert process.elapsed() < 300, "no profile written after 300 s"
            time.sleep(0.05)
        client.close()
        fault_at = process.elapsed()
        outage_s = s.restart(service, down_s)
        still_running = process.running()
        rc = process.wait(600)
        scraper.stop()
        log = process.log_text()
        reports = [line for line in log.splitlines() if reported.search(line)]
        redis_errors = scraper.total("onboardflow_redis_errors_total")
        warehouse_errors = scraper.total("onboardflow_warehouse_errors_total")
        say(f"\n{fault}: fault at {fault_at:.1f} s into the run, {service} down {outage_s:.1f} s, "
              f"run took {process.elapsed():.1f} s (uninterrupted {reference_s:.1f} s), exit {rc}, "
              f"{len(reports)} log lines report it, redis_errors_total peak {redis_errors:.0f}, "
              f"warehouse_errors_total peak {warehouse_errors:.0f}")
        assert rc == 0, f"the pipeline failed after the {service} outage ({outage_s:.1f} s):\n{log[-4000:]}"
        assert still_running, f"the run ended during the {service} outage: it was not mid-run"
        assert reports, f"nothing in the log reports the {service} outage"
        if service == "redis":
            assert redis_errors > 0, f"onboardflow_redis_errors_total stayed 0: {dict(scraper.peak)}"
        if service == "postgres":
            assert warehouse_errors > 0, f"onboardflow_warehouse_errors_total stayed 0: {dict(scraper.peak)}"
        _check(compare(Outputs.read(d), expected, assert_same_profiles), f"{fault} vs an uninterrupted run", say)
    finally:
        d.cleanup()
