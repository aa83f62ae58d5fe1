"""The right to erasure end to end (issue 18, item 4): real Kafka, Redis, PostgreSQL, the pipeline on Prism.

A bounded run writes every user's profile, segments and warehouse rows; then

* ``onboardflow erase USER_ID`` removes one user from Redis (profile, every
  segment set) and the warehouse (events, snapshots, segment changes), writes
  one audit row with the pseudonym and never the raw id, and prints no raw id;
* a replay of the whole input from the earliest offset, in a new consumer
  group (fresh pipeline state that recomputes the erased user), brings
  nothing of the user back, and leaves every other user as it was;
* the same on the native Flink job: a replay through it clears the erased
  user's state at their first event and writes nothing of them;
* ``onboardflow erase --follow`` erases a second user from a request on the
  erasure topic, dead-letters a malformed request with its raw bytes and a
  reason, and, read again by another consumer group, erases and
  dead-letters nothing twice.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from kafka import KafkaProducer
from psycopg import sql

from onboardflow.runners.cli.produce import produce
from onboardflow.runners.flink_job import FlinkRest
from onboardflow.tests.conftest import local_flink_cluster
from onboardflow.tests.integration.outputs import read_topic
from onboardflow.tests.integration.reliability_harness import (
    SECRET,
    Deployment,
    Outputs,
    PipelineProcess,
    create_topics,
    decode,
    delete_topics,
    make_input,
    run_to_end,
    write_secret,
)
from onboardflow.transforms.anonymize import Pseudonymizer
from onboardflow.transforms.decode import OnboardingEventDecoder
from onboardflow.transforms.erasure import USER_TABLES
from onboardflow.transforms.kafka.records import KafkaRecord

pytestmark = pytest.mark.integration

SEED, USERS = 31, 12
REQUESTER = "dpo@example.com"


def _name(label: str) -> str:
    return f"t-erase-{label}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def messages():
    return make_input(SEED, USERS)


@pytest.fixture(scope="module")
def user_ids(messages) -> list[str]:
    """The raw account ids in the input, in order of first appearance."""
    decoder, seen = OnboardingEventDecoder(), {}
    for i, m in enumerate(messages):
        try:
            event = decoder.decode(KafkaRecord("in", 0, i, 0, m.key, m.value))
        except Exception:  # noqa: BLE001 - the input's malformed records
            continue
        if event.get("user_id"):
            seen.setdefault(event["user_id"], None)
    return list(seen)


@pytest.fixture
def deployment(kafka_bootstrap, redis_url, pg_dsn, messages, tmp_path):
    topic = f"{_name('in')}.events"
    create_topics(kafka_bootstrap, {topic: 3})
    stats = produce(messages, kafka_bootstrap, topic, progress=False)
    assert stats.ok and stats.total_sent == len(messages)
    d = Deployment(_name("d"), kafka_bootstrap, topic, redis_url, pg_dsn, write_secret(tmp_path)).create()
    yield d
    d.cleanup()
    delete_topics(kafka_bootstrap, [topic])


def _cli(d: Deployment, *words: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "onboardflow.runners.cli", "erase", *words, f"--redis-url={d.redis_url}",
         f"--key-prefix={d.prefix}", f"--warehouse-dsn={d.dsn}", f"--warehouse-schema={d.schema}",
         f"--secret-file={d.secret_file}", "--json"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"erase exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def _rows_of(d: Deployment, user_key: str) -> dict[str, int]:
    with psycopg.connect(d.dsn, autocommit=True) as conn:
        return {table: conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE user_key = %s").format(
            sql.Identifier(d.schema, table)), (user_key,)).fetchone()[0] for table in USER_TABLES}


def _audit(d: Deployment) -> list[dict]:
    with psycopg.connect(d.dsn, autocommit=True) as conn:
        cursor = conn.execute(sql.SQL("SELECT * FROM {} ORDER BY completed_at").format(
            sql.Identifier(d.schema, "erasure_audit")))
        names = [c.name for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]


def _present(d: Deployment, user_key: str) -> list[str]:
    """Where ``user_key`` still is: Redis keys and sets, warehouse tables."""
    client = redis.Redis.from_url(d.redis_url)
    try:
        where = [f"redis profile {d.prefix}:profile:{user_key}"] if client.exists(f"{d.prefix}:profile:{user_key}") \
            else []
        for key in client.scan_iter(match=f"{d.prefix}:segment:*", count=1000):
            if client.sismember(key, user_key):
                where.append(f"redis set {key.decode()}")
    finally:
        client.close()
    return where + [f"warehouse {table} ({n} rows)" for table, n in _rows_of(d, user_key).items() if n]


def _linked_devices(d: Deployment, user_key: str) -> list[str]:
    """The device pseudonyms identity stitching linked to ``user_key`` (the alias table)."""
    with psycopg.connect(d.dsn, autocommit=True) as conn:
        return sorted(row[0] for row in conn.execute(sql.SQL(
            "SELECT anonymous_key FROM {} WHERE user_key = %s").format(sql.Identifier(d.schema, "identity_aliases")),
            (user_key,)))


def _stitched_markers(d: Deployment, devices: list[str]) -> list[str]:
    client = redis.Redis.from_url(d.redis_url)
    try:
        return [device for device in devices if client.exists(f"{d.prefix}:stitched:{device}")]
    finally:
        client.close()


def _victims(d: Deployment, user_ids: list[str], n: int) -> list[tuple[str, str]]:
    """``n`` (raw id, pseudonym) of users the run left a profile, segments and warehouse rows for."""
    pseudonym = Pseudonymizer(SECRET).user_key
    out = Outputs.read(d)
    memberships = out.memberships()
    chosen = [(uid, pseudonym(uid)) for uid in user_ids
              if pseudonym(uid) in out.profiles and memberships.get(pseudonym(uid))
              and _rows_of(d, pseudonym(uid))["events"] and _rows_of(d, pseudonym(uid))["profile_snapshots"]]
    assert len(chosen) >= n, f"only {len(chosen)} users with a profile, segments and rows: make the input larger"
    return chosen[:n]


def test_erase_removes_a_user_everywhere_audits_it_and_a_replay_brings_nothing_back(deployment, user_ids, tmp_path):
    d = deployment
    run_to_end(d, f"{d.name}-first", tmp_path / "first.log")
    before = Outputs.read(d)
    (uid, key), = _victims(d, user_ids, 1)
    assert _present(d, key), "the victim has nothing to erase"
    devices = _linked_devices(d, key)
    assert devices and any(_rows_of(d, device)["events"] for device in devices), \
        "the victim has no stitched device with anonymous events"

    done = _cli(d, uid, f"--requested-by={REQUESTER}")
    report = json.loads(done.stdout)
    assert uid not in done.stdout + done.stderr, "the raw user id was printed"
    assert report["user_key"] == key and not report["already_audited"]
    assert report["removed"]["redis.profile"] == 1
    assert report["removed"]["redis.segment_memberships"] == len(before.memberships()[key])
    assert report["removed"]["warehouse.events"] > 0 and report["removed"]["warehouse.profile_snapshots"] > 0
    assert _present(d, key) == []
    assert report["removed"]["identity.devices"] == len(devices)
    assert [_present(d, device) for device in devices] == [[]] * len(devices)
    assert _linked_devices(d, key) == [] and not _stitched_markers(d, devices)

    audit = _audit(d)
    assert len(audit) == 1 and audit[0]["user_key"] == key and audit[0]["requested_by"] == REQUESTER
    assert audit[0]["source"] == "cli" and audit[0]["removed"] == report["removed"]
    assert uid not in json.dumps(audit, default=str), "the audit row holds the raw user id"

    # The same input again, from the earliest offset, in a new group: the pipeline's state is
    # rebuilt from scratch and recomputes the erased user's profile and rows; none may land.
    run_to_end(d, f"{d.name}-replay", tmp_path / "replay.log")
    assert _present(d, key) == [], "the replay brought the erased user back"
    assert [_present(d, device) for device in devices] == [[]] * len(devices), "the replay brought a device back"
    assert _linked_devices(d, key) == [] and not _stitched_markers(d, devices)
    after = Outputs.read(d)
    gone = {key, *devices}
    others = {k: v for k, v in before.profiles.items() if k not in gone}
    assert {k: v for k, v in after.profiles.items() if k not in gone} == others, "the replay changed other users"
    assert len(_audit(d)) == 1


@pytest.fixture(scope="module")
def flink():
    with local_flink_cluster():
        yield FlinkRest(os.environ.get("OBF_FLINK_REST_URL", "http://127.0.0.1:8081"))


@pytest.mark.flink
def test_a_replay_through_the_flink_job_clears_the_erased_users_state_and_writes_nothing_of_them(
        flink, deployment, user_ids, tmp_path):
    d = deployment
    run_to_end(d, f"{d.name}-first", tmp_path / "first.log")
    before = Outputs.read(d)
    (uid, key), = _victims(d, user_ids, 1)
    _cli(d, uid, f"--requested-by={REQUESTER}")
    replay = PipelineProcess(d.argv(f"{d.name}-flink", "--engine=flink", f"--flink_job_name={d.name}",
                                    "--disable_online_models"), tmp_path / "flink.log")
    assert replay.wait(600) == 0, replay.log_text()[-4000:]
    cleared = _cleared_in_taskmanager_log(d.name)
    assert cleared >= 1, "the Flink user stage never cleared the erased user's state"
    assert _present(d, key) == [], "the Flink replay brought the erased user back"
    after = Outputs.read(d)
    assert {k: v for k, v in after.profiles.items() if k != key} == \
        {k: v for k, v in before.profiles.items() if k != key}, "the Flink replay changed other users"


def _cleared_in_taskmanager_log(job_name: str) -> int:
    """How many erased users' states the job's user stage cleared, from its closing log line (the
    TaskManager's log; Flink's REST metrics of a finished job may miss the operator's last counts)."""
    pattern = re.compile(rf"user stage of job {re.escape(job_name)}, subtask \d+: (\d+) erased user state")
    logs = Path(os.environ.get("OBF_RUN_DIR", Path(__file__).resolve().parents[2] / ".run")) / "flink" / "log"
    return sum(int(m.group(1)) for path in logs.glob("*taskexecutor*.log*")
               for m in pattern.finditer(path.read_text(errors="replace")))


def test_erase_follow_consumes_requests_dead_letters_malformed_ones_and_does_nothing_twice(
        deployment, user_ids, kafka_bootstrap, tmp_path):
    d = deployment
    run_to_end(d, f"{d.name}-first", tmp_path / "first.log")
    (uid, key), = _victims(d, user_ids, 1)
    topic = f"{d.name}.erasures"
    create_topics(kafka_bootstrap, {topic: 1})
    try:
        malformed = b'{"user_id": 42}'
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        producer.send(topic, json.dumps({"user_id": uid, "requested_by": REQUESTER,
                                         "requested_at": "2026-12-01T10:00:00Z"}).encode()).get(timeout=30)
        producer.send(topic, malformed).get(timeout=30)
        producer.close()

        follow = ["--follow", f"--topic={topic}", f"--bootstrap={kafka_bootstrap}", "--idle-exit=5",
                  f"--dead-letter-topic={d.dlq_topic}"]
        done = _cli(d, *follow, f"--group={d.name}-erasure")
        assert uid not in done.stdout + done.stderr
        assert "1 erasure(s) carried out, 1 malformed request(s) dead-lettered" in done.stderr
        assert _present(d, key) == []
        audit = _audit(d)
        assert [(a["user_key"], a["source"]) for a in audit] == [(key, f"topic:{topic}:0:0")]
        assert audit[0]["requested_at"].isoformat().startswith("2026-12-01T10:00:00")

        def erasure_letters():
            letters = [decode("dead_letter", r.value) for r in read_topic(kafka_bootstrap, d.dlq_topic)]
            return [x for x in letters if x["stage"] == "erasure"]

        letters = erasure_letters()
        assert len(letters) == 1 and letters[0]["reason"] == "invalid_erasure_request"
        assert letters[0]["value"] == malformed and letters[0]["source_offset"] == 1

        # Another group reads both requests again: nothing erased or dead-lettered twice.
        again = _cli(d, *follow, f"--group={d.name}-erasure-again")
        assert json.loads(again.stdout.splitlines()[0])["already_audited"] is True
        assert len(_audit(d)) == 1 and len(erasure_letters()) == 1
    finally:
        delete_topics(kafka_bootstrap, [topic])
