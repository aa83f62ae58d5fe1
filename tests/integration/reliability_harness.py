"""Run the onboarding pipeline as an OS process, break it, and compare what it left behind.

Shared by tests/integration/test_reliability.py and tests/benchmarks/bench_reliability.py.

* ``make_input``: a seeded ``JourneyGenerator`` stream with RECENT event times
  (the timeline starts ``days_ago`` days before now) in which a fraction of
  the records carry no Kafka key, so one user's events sit on several
  partitions.
* ``Deployment``: one run's sinks: its own Redis prefix, warehouse schema and
  output topics (dead letters, segment changes, model events), on whichever
  Redis / PostgreSQL / Kafka it is given (shared or private instances).
* ``PipelineProcess``: ``onboardflow run ...`` as a subprocess in a process
  group of its own, so ``kill()`` (SIGKILL to the whole group) takes down the
  Python driver, its in-process SDK workers and the Prism job server at once,
  as a machine crash would.
* ``Outputs.read`` / ``compare``: everything a run leaves (profiles, segment
  sets, segment-change history on the topic and in the warehouse, warehouse
  rows, dead letters) and the differences between two runs, as counts and
  lists of problems: lost, doubled, or different.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psycopg
import redis
from kafka.admin import KafkaAdminClient, NewTopic
from psycopg import sql

from onboardflow.runners.sim.generator import GeneratedMessage, GeneratorConfig, JourneyGenerator
from onboardflow.schemas import default_registry, load_schema
from onboardflow.schemas.units import DAY_MS
from onboardflow.schemas.wire import AvroDeserializer
from onboardflow.tests.integration.outputs import read_topic, redis_dump
from onboardflow.transforms.profile_store.encoding import decode_profile

REPO = Path(__file__).resolve().parents[2]
ONBOARDFLOW = str(Path(sys.executable).with_name("onboardflow"))
SECRET = b"reliability-suite-pseudonym-key-32b"
PARTITIONS = 4
# The generator sends 1% of events up to 3 days late; a day more than that
# keeps every event on time in every run, so what a run keeps does not depend
# on how far the watermark got (as in test_pipeline_e2e.py).
LATENESS_HOURS = 3 * 24 + 24
RETENTION_MS = 7 * DAY_MS
# Wall-clock columns: when a row was written, not what it says.
WALL_CLOCK_COLUMNS = {"loaded_at", "written_at", "failed_at", "updated_at"}
ROW_KEYS = {
    "events": ("event_id", "occurred_at"),
    "late_events": ("event_id", "occurred_at"),
    "profile_snapshots": ("user_key", "version"),
    "segment_changes": ("user_key", "segment", "version", "change"),
    "dead_letters": ("source_topic", "source_partition", "source_offset", "stage", "payload_sha256"),
    "identity_aliases": ("anonymous_key", "user_key", "linked_at", "status"),
}


# --------------------------------------------------------------------------- input


def make_input(seed: int, users: int, *, days_ago: float = 14.0, horizon_days: float = 3.0,
               unkeyed_fraction: float = 0.15, now_ms: Optional[int] = None) -> list[GeneratedMessage]:
    """The seeded journey stream, starting ``days_ago`` days before now, some records without key."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    config = GeneratorConfig(
        seed=seed, users=users, start_ms=now_ms - int(days_ago * DAY_MS), horizon_days=horizon_days,
        signup_window_days=min(2.0, horizon_days), malformed_fraction=0.01, duplicate_fraction=0.01,
        late_fraction=0.01, personalization_consent_rate=0.85, analytics_consent_rate=0.7, cross_device_share=0.3)
    rng = random.Random(seed)
    return [m._replace(key=None) if rng.random() < unkeyed_fraction else m
            for m in JourneyGenerator(config).messages()]


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="onboardflow-reliability")
    try:
        admin.create_topics([NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics.items()])
    finally:
        admin.close()


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="onboardflow-reliability")
    except Exception:  # noqa: BLE001 - cleanup must not mask the test result
        return
    try:
        admin.delete_topics(topics)
    except Exception:  # noqa: BLE001
        pass
    finally:
        admin.close()


# --------------------------------------------------------------------------- one run's sinks


@dataclass
class Deployment:
    """The sinks of one run (prefix, schema, output topics) on given services."""

    name: str
    bootstrap: str
    events_topic: str
    redis_url: str
    dsn: str
    secret_file: str

    @property
    def prefix(self) -> str:
        return self.name

    @property
    def schema(self) -> str:
        return re.sub(r"[^a-z0-9_]", "_", self.name.lower())[:63]

    @property
    def topics(self) -> dict[str, int]:
        return {f"{self.name}.dlq": 1, f"{self.name}.segment-changes": 1, f"{self.name}.model-events": 1}

    @property
    def dlq_topic(self) -> str:
        return f"{self.name}.dlq"

    @property
    def changes_topic(self) -> str:
        return f"{self.name}.segment-changes"

    @property
    def model_events_topic(self) -> str:
        return f"{self.name}.model-events"

    def create(self) -> "Deployment":
        create_topics(self.bootstrap, self.topics)
        return self

    def argv(self, group: str, *extra: str) -> list[str]:
        """``onboardflow run`` flags: a bounded replay from the earliest offset into these sinks."""
        return [
            f"--kafka_bootstrap_servers={self.bootstrap}",
            f"--kafka_topics={self.events_topic}",
            "--kafka_start_position=earliest",
            "--kafka_bounded",
            f"--kafka_consumer_group={group}",
            f"--dead_letter_topic={self.dlq_topic}",
            f"--segment_changes_topic={self.changes_topic}",
            f"--model_events_topic={self.model_events_topic}",
            f"--redis_url={self.redis_url}",
            f"--redis_key_prefix={self.prefix}",
            f"--warehouse_dsn={self.dsn}",
            f"--warehouse_schema={self.schema}",
            f"--allowed_lateness_hours={LATENESS_HOURS}",
            f"--dedup_horizon_hours={LATENESS_HOURS}",
            f"--secret_file={self.secret_file}",
            "--metrics_port=0",
            "--metrics_bind_address=127.0.0.1",
            *extra,
        ]

    def cleanup(self) -> None:
        delete_topics(self.bootstrap, list(self.topics))
        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()
        except redis.RedisError:
            pass
        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))
        except psycopg.Error:
            pass


def write_secret(directory: Path) -> str:
    path = Path(directory) / "pseudonymization.key"
    path.write_bytes(SECRET)
    return str(path)


# --------------------------------------------------------------------------- the pipeline process


class PipelineProcess:
    """``onboardflow run ARGV`` in its own process group, output to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, metrics_dir: Optional[Path] = None):
        self.log_path = Path(log_path)
        extra = [f"--metrics_sd_dir={metrics_dir}"] if metrics_dir else []
        self.metrics_dir = metrics_dir
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()/kill()
        self.started = time.monotonic()
        self.proc = subprocess.Popen([ONBOARDFLOW, "run", *argv, *extra], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=str(REPO))
        self.pgid = self.proc.pid  # start_new_session: the leader's pid is the group id

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def running(self) -> bool:
        return self.proc.poll() is None

    def group_members(self) -> list[int]:
        """Pids of live processes still in the run's process group (Prism included)."""
        members = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and int(fields[2]) == self.pgid:
                members.append(int(entry))
        return members

    def kill(self) -> float:
        """SIGKILL to the whole process group; returns when none of it is left (seconds since start)."""
        at = self.elapsed()
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while self.group_members():
            assert time.monotonic() < deadline, f"process group {self.pgid} survived SIGKILL"
            time.sleep(0.1)
        self._log.close()
        return at

    def wait(self, timeout_s: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise AssertionError(f"the pipeline did not finish within {timeout_s} s; log: {self.log_path}") from exc
        self._log.close()
        return rc

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> dict[str, float]:
        """Sum of every ``onboardflow_*`` sample over this run's worker endpoints (name{labels} -> value)."""
        import urllib.request

        samples: dict[str, float] = {}
        if not self.metrics_dir or not Path(self.metrics_dir).is_dir():
            return samples
        for target_file in Path(self.metrics_dir).glob("*.json"):
            try:
                targets = json.loads(target_file.read_text())
                for group in targets:
                    for target in group["targets"]:
                        with urllib.request.urlopen(f"http://{target}/metrics", timeout=2) as response:
                            text = response.read().decode()
                        for line in text.splitlines():
                            if line.startswith("onboardflow_"):
                                name, _, value = line.rpartition(" ")
                                samples[name] = samples.get(name, 0.0) + float(value)
            except (OSError, ValueError, KeyError):
                continue  # a killed worker's stale file, or a scrape racing the exit
        return samples


def run_to_end(deployment: Deployment, group: str, log_path: Path, *extra: str, timeout_s: float = 600) -> float:
    """One uninterrupted bounded run; returns its wall time. Fails with the log's tail when it fails."""
    process = PipelineProcess(deployment.argv(group, *extra), log_path)
    rc = process.wait(timeout_s)
    assert rc == 0, f"pipeline exited {rc}:\n{process.log_text()[-4000:]}"
    return process.elapsed()


# --------------------------------------------------------------------------- reading what a run left


def warehouse_rows(dsn: str, schema: str) -> dict[str, list[dict]]:
    """Every row of the history tables as dicts (wall-clock columns left out)."""
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in ROW_KEYS:
            cursor = conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(schema, table)))
            names = [d.name for d in cursor.description]
            out[table] = [{n: v for n, v in zip(names, row) if n not in WALL_CLOCK_COLUMNS}
                          for row in cursor.fetchall()]
    return out


_DESERIALIZERS: dict[str, AvroDeserializer] = {}


def decode(schema_name: str, value: bytes) -> dict:
    if schema_name not in _DESERIALIZERS:
        _DESERIALIZERS[schema_name] = AvroDeserializer(default_registry(), load_schema(schema_name))
    return _DESERIALIZERS[schema_name].deserialize(value)


@dataclass
class Outputs:
    """What one deployment holds after its run(s)."""

    profiles: dict[str, dict]
    segments: dict[str, set]
    topic_changes: list[dict]
    dead_letter_records: list[dict]
    rows: dict[str, list[dict]]
    #: topic -> records whose Kafka timestamp is already past the retention
    expiring: dict[str, int] = field(default_factory=dict)
    #: visitor key -> the account it was retired into (the ``{prefix}:stitched:*`` markers)
    stitched: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, d: Deployment) -> "Outputs":
        profile_prefix, segment_prefix = f"{d.prefix}:profile:".encode(), f"{d.prefix}:segment:".encode()
        stitched_prefix = f"{d.prefix}:stitched:".encode()
        profiles, segments, stitched = {}, {}, {}
        for key, content in redis_dump(d.redis_url, d.prefix).items():
            if key.startswith(stitched_prefix) and isinstance(content, bytes):
                stitched[key[len(stitched_prefix):].decode()] = content.decode()
            if key.startswith(profile_prefix) and isinstance(content, dict):
                profile = decode_profile(content)
                profile.pop("updated_at", None)
                profiles[key[len(profile_prefix):].decode()] = profile
            elif key.startswith(segment_prefix) and isinstance(content, set):
                segments[key[len(segment_prefix):].decode()] = {m.decode() for m in content}
        change_records, letter_records = read_topic(d.bootstrap, d.changes_topic), read_topic(d.bootstrap, d.dlq_topic)
        changes = [decode("segment_change", r.value) for r in change_records]
        letters = [decode("dead_letter", r.value) for r in letter_records]
        # Kafka deletes a log segment once its newest record timestamp is older
        # than the retention (7 days: Kafka's default, and runners/services'
        # log.retention.hours=168), at its next check (every 5 min): records
        # stamped that old vanish from the topic minutes after they were sent.
        horizon = int(time.time() * 1000) - RETENTION_MS
        expiring = {d.changes_topic: sum(1 for r in change_records if r.timestamp < horizon),
                    d.dlq_topic: sum(1 for r in letter_records if r.timestamp < horizon)}
        return cls(profiles, segments, changes, letters, warehouse_rows(d.dsn, d.schema), expiring, stitched)

    # -- derived views -------------------------------------------------------------

    def memberships(self) -> dict[str, set]:
        """user_key -> the segments Redis says they are in (from the segment sets)."""
        out: dict[str, set] = defaultdict(set)
        for segment, members in self.segments.items():
            for user_key in members:
                out[user_key].add(segment)
        return {u: s for u, s in out.items() if s}

    def warehouse_changes(self) -> list[dict]:
        return self.rows["segment_changes"]

    def source_dead_letters(self) -> Counter:
        """(source topic, partition, offset) -> how many records the dead-letter topic holds for it."""
        return Counter((r["source_topic"], r["source_partition"], r["source_offset"]) for r in self.dead_letter_records)


def fold(changes: list[dict]) -> tuple[dict[str, set], list[str]]:
    """Replay a segment-change history per (user, segment) in version order.

    Returns the memberships it ends with and the inconsistencies met on the
    way (an ``exited`` without a prior ``entered``, an ``entered`` twice).
    """
    ordered = sorted(changes, key=lambda c: (c["user_key"], c["segment"], c["version"], c["change"] == "entered"))
    state: dict[tuple, bool] = {}
    problems = []
    for c in ordered:
        key = (c["user_key"], c["segment"])
        inside = state.get(key, False)
        if c["change"] == "entered":
            if inside:
                problems.append(f"{c['user_key'][-8:]}/{c['segment']}: entered twice (v{c['version']})")
            state[key] = True
        else:
            if not inside:
                problems.append(f"{c['user_key'][-8:]}/{c['segment']}: exited without entering (v{c['version']})")
            state[key] = False
    memberships: dict[str, set] = defaultdict(set)
    for (user_key, segment), inside in state.items():
        if inside:
            memberships[user_key].add(segment)
    return dict(memberships), problems


def change_key(c: dict) -> tuple:
    at = c["at"]
    at_ms = int(at.timestamp() * 1000) if hasattr(at, "timestamp") else int(at)
    return (c["user_key"], c["segment"], c["change"], at_ms, c["version"])


def _row_key(table: str, row: dict) -> tuple:
    return tuple(str(row[k]) for k in ROW_KEYS[table])


def membership_diff(expected: dict[str, set], actual: dict[str, set]) -> list[str]:
    diff = []
    for user_key in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(user_key, set()), actual.get(user_key, set())
        if want != got:
            diff.append(f"{user_key[-8:]}: missing {sorted(want - got)} extra {sorted(got - want)}")
    return diff


@dataclass
class Comparison:
    """A run's outputs against the reference: counts compared, records lost and doubled, problems."""

    compared: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)
    doubled: Counter = field(default_factory=Counter)
    problems: dict[str, list[str]] = field(default_factory=dict)

    def add(self, what: str, problems: list[str]) -> None:
        if problems:
            self.problems[what] = problems

    def summary(self) -> str:
        lines = [f"  records compared: {sum(self.compared.values())} ({dict(self.compared)})",
                 f"  lost: {sum(self.lost.values())} {dict(+self.lost)}",
                 f"  doubled: {sum(self.doubled.values())} {dict(+self.doubled)}"]
        for what, problems in self.problems.items():
            lines.append(f"  {what}: {len(problems)} problem(s), e.g. {problems[:5]}")
        return "\n".join(lines)


def compare(actual: Outputs, expected: Outputs, assert_same_profiles) -> Comparison:
    """Everything ``actual`` holds against ``expected`` (an uninterrupted run of the same input).

    Invariants checked on ``actual`` alone: the fold of each user's
    segment-change history, from the topic and from the warehouse, equals the
    user's segment memberships in Redis; no change record and no dead letter
    (by source topic/partition/offset) is there twice; the newest snapshot per
    user is the profile in Redis; no output record is stamped older than the
    topic retention. Against ``expected``: profiles (``assert_same_profiles``),
    segment sets, the newest snapshot per user, warehouse rows by key (events,
    late events, dead letters), the dead-letter topic's source offsets.
    Returns the counts and problems; asserts nothing itself.
    """
    c = Comparison()
    try:
        assert_same_profiles(actual.profiles, expected.profiles)
    except AssertionError as exc:
        c.add("profiles", [str(exc)[:2000]])
    c.compared["profiles"] = len(expected.profiles)
    c.lost["profiles"] = len(expected.profiles.keys() - actual.profiles.keys())
    c.add("segment sets", membership_diff(expected.memberships(), actual.memberships()))
    c.compared["segment memberships"] = sum(len(s) for s in expected.memberships().values())

    # Which intermediate versions a run applies (hence snapshots it stores and
    # changes it reports) depends on how events were bundled: two
    # uninterrupted runs of the same input differ there. So the history is
    # checked against the run's own Redis: folded, it must end in the
    # memberships Redis holds (a membership without its change is lost, a
    # change repeated is doubled), and its newest snapshot per user must be
    # the profile Redis holds, whose version equals the reference's.
    redis_memberships = actual.memberships()
    for source, changes in (("topic", actual.topic_changes), ("warehouse", actual.warehouse_changes())):
        folded, problems = fold(changes)
        missing = membership_diff(redis_memberships, folded)
        c.add(f"segment history ({source}) vs Redis", missing)
        c.add(f"segment history ({source}) consistency", problems)
        keys = Counter(change_key(x) for x in changes)
        c.lost[f"segment_changes ({source})"] = sum(
            len(redis_memberships.get(u, set()) ^ folded.get(u, set()))
            for u in redis_memberships.keys() | folded.keys())
        c.doubled[f"segment_changes ({source})"] = sum(n - 1 for n in keys.values()) + sum(
            1 for p in problems if "twice" in p)
        c.compared[f"segment_changes ({source})"] = len(changes)

    # Retired visitors (identity stitching): the same markers; whether a visitor's profile was
    # written before its device linked depends on timing as intermediate versions do, so their
    # history is checked above (folded, it ends outside every segment) but not held to the reference.
    c.compared["stitched visitors"] = len(expected.stitched)
    c.lost["stitched visitors"] = len(expected.stitched.keys() - actual.stitched.keys())
    c.add("stitched visitors", [f"{v[-8:]}: {actual.stitched.get(v, '')[-8:]} != {u[-8:]}"
                                for v, u in sorted(expected.stitched.items()) if actual.stitched.get(v) != u]
          + [f"{v[-8:]}: extra" for v in sorted(actual.stitched.keys() - expected.stitched.keys())])
    retired = expected.stitched.keys() | actual.stitched.keys()
    newest = {}
    for row in actual.rows["profile_snapshots"]:
        newest[row["user_key"]] = max(newest.get(row["user_key"], row["version"]), row["version"])
    want_newest = {}
    for row in expected.rows["profile_snapshots"]:
        want_newest[row["user_key"]] = max(want_newest.get(row["user_key"], row["version"]), row["version"])
    for visitor in retired:
        newest.pop(visitor, None)
        want_newest.pop(visitor, None)
    in_redis = {u: p.get("version") for u, p in actual.profiles.items()}
    c.compared["warehouse.profile_snapshots (newest per user)"] = len(want_newest)
    c.lost["warehouse.profile_snapshots (newest per user)"] = sum(
        1 for u, v in want_newest.items() if newest.get(u) != v)
    c.add("warehouse.profile_snapshots newest vs reference",
          [f"{u[-8:]}: {newest.get(u)} != {v}" for u, v in sorted(want_newest.items()) if newest.get(u) != v])
    c.add("warehouse.profile_snapshots newest vs Redis",
          [f"{u[-8:]}: {newest.get(u)} != {v}" for u, v in sorted(in_redis.items()) if newest.get(u) != v])
    snapshot_keys = Counter(_row_key("profile_snapshots", r) for r in actual.rows["profile_snapshots"])
    c.doubled["warehouse.profile_snapshots"] = sum(n - 1 for n in snapshot_keys.values())  # a primary key: 0

    for table in ("events", "late_events", "dead_letters", "identity_aliases"):
        want = Counter(_row_key(table, r) for r in expected.rows[table])
        got = Counter(_row_key(table, r) for r in actual.rows[table])
        c.compared[f"warehouse.{table}"] = sum(want.values())
        c.lost[f"warehouse.{table}"] = sum((want - got).values())
        c.doubled[f"warehouse.{table}"] = sum(n - 1 for n in got.values())  # a primary key: always 0
        if want != got:
            c.add(f"warehouse.{table}",
                  [f"{sum((want - got).values())} missing, {sum((got - want).values())} extra rows"])

    expiring = {topic: n for topic, n in actual.expiring.items() if n}
    c.add("records stamped older than the topic retention (the broker deletes them within minutes)",
          [f"{topic}: {n}" for topic, n in expiring.items()])
    letters = actual.source_dead_letters()
    c.compared["dead-letter topic"] = sum(expected.source_dead_letters().values())
    c.doubled["dead-letter topic"] = sum(n - 1 for n in letters.values())
    c.lost["dead-letter topic"] = len(expected.source_dead_letters().keys() - letters.keys())
    if c.doubled["dead-letter topic"]:
        c.add("dead-letter topic", [f"{c.doubled['dead-letter topic']} records repeat a source offset"])
    for what in ("profiles", "dead-letter topic"):
        if c.lost[what]:
            c.add(f"{what} lost", [f"{c.lost[what]} lost"])
    for what, n in c.doubled.items():
        if n and what not in c.problems:
            c.add(f"{what} doubled", [f"{n} doubled"])
    return c
