"""The PostgreSQL warehouse against the real local server (make services-up).

Every test works in its own PostgreSQL schema, dropped afterwards.
"""
import datetime as dt
import hashlib
import re
import shutil
import threading
import time
from pathlib import Path

import apache_beam as beam
import psycopg
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from psycopg import sql

from onboardflow import schemas
from onboardflow.pipelines.beam.warehouse import (
    WriteDeadLetterMetadata,
    WriteEventsToWarehouse,
    WriteLateEvents,
)
from onboardflow.runners.cli import warehouse as warehouse_cli
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.warehouse.accounts import read_accounts
from onboardflow.transforms.warehouse.migrations import (
    MIGRATIONS_DIR,
    MigrationError,
    apply_migrations,
    migration_status,
)
from onboardflow.transforms.warehouse.rows import DEAD_LETTERS, EVENTS, dead_letter_row, event_row
from onboardflow.transforms.warehouse.writer import WarehouseWriter

pytestmark = pytest.mark.integration

T0 = 1_736_899_200_000  # 2025-01-15T00:00:00Z
USER_KEY = "ab" * 32


def event(i, occurred_at=None, **overrides):
    e = {
        "event_id": f"evt-{i:05d}",
        "event_type": "feature_used",
        "user_key": USER_KEY,
        "identified": True,
        "session_id": f"s-{i % 3}",
        "occurred_at": T0 + i * 1000 if occurred_at is None else occurred_at,
        "received_at": T0 + i * 1000 + 50,
        "properties": {"feature": "export"},
        "context": {"device": None, "os": "macOS", "app_version": "2.3.1", "country": "DE",
                    "email_domain": "example.com", "ip_prefix": "203.0.113.0/24", "device_class": "desktop"},
        "consent": {"analytics": True, "personalization": True, "marketing": False},
        "referrer": "news.example.org",
    }
    e.update(overrides)
    return e


def schema_name(unique_name):
    return re.sub(r"[^a-z0-9_]", "_", unique_name.lower())[:63]


def drop_schema(dsn, schema):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def fresh_schema(pg_dsn, unique_name):
    """A schema name nobody uses yet; dropped after the test."""
    name = schema_name(unique_name)
    yield name
    drop_schema(pg_dsn, name)


@pytest.fixture
def schema(pg_dsn, fresh_schema):
    apply_migrations(pg_dsn, fresh_schema)
    return fresh_schema


def query(dsn, schema, text, params=()):
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(text, params).fetchall()


def count(dsn, schema, table):
    return query(dsn, schema, f"SELECT count(*) FROM {table}")[0][0]


# --------------------------------------------------------------------------- migrations


def test_migrations_create_the_tables_and_rerunning_them_is_a_no_op(pg_dsn, fresh_schema):
    applied = apply_migrations(pg_dsn, fresh_schema)
    shipped = sorted(p.stem for p in (Path(schemas.__file__).parent / "warehouse").glob("V*.sql"))
    assert shipped[:2] == ["V001__init", "V002__demo_accounts"]
    assert [m.label for m in applied] == shipped
    assert apply_migrations(pg_dsn, fresh_schema) == []
    tables = {r[0] for r in query(pg_dsn, fresh_schema,
                                  "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")}
    assert {"events", "events_default", "late_events", "profile_snapshots", "segment_changes", "dead_letters",
            "accounts", "schema_migrations"} <= tables
    assert "pipeline_runs" not in tables  # dropped by V006: nothing ever recorded a run
    recorded = query(pg_dsn, fresh_schema, "SELECT version, checksum FROM schema_migrations ORDER BY version")
    assert recorded == [(m.version, m.checksum) for m in applied]
    assert [s.state for s in migration_status(pg_dsn, fresh_schema)] == ["applied"] * len(shipped)


def test_an_applied_migration_that_changed_on_disk_is_an_error(pg_dsn, fresh_schema, tmp_path, capsys):
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    apply_migrations(pg_dsn, fresh_schema, migrations)
    edited = migrations / "V002__demo_accounts.sql"
    edited.write_text(edited.read_text() + "\n-- edited after the fact\n")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        apply_migrations(pg_dsn, fresh_schema, migrations)
    states = {s.name: s.state for s in migration_status(pg_dsn, fresh_schema, migrations)}
    assert states["demo_accounts"] == "checksum_mismatch"
    assert {name for name, state in states.items() if state != "applied"} == {"demo_accounts"}
    args = ["--warehouse-dsn", pg_dsn, "--warehouse-schema", fresh_schema, "--migrations-dir", str(migrations)]
    assert warehouse_cli.main(["status", *args]) == 1
    assert warehouse_cli.main(["migrate", *args]) == 2
    assert "changed after it was applied" in capsys.readouterr().err


def test_a_new_migration_sorting_before_an_applied_one_is_an_error(pg_dsn, fresh_schema, tmp_path):
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, migrations)
    apply_migrations(pg_dsn, fresh_schema, migrations)
    (migrations / "V000__forgotten.sql").write_text("CREATE TABLE forgotten (x int);")
    with pytest.raises(MigrationError, match="sorts before"):
        apply_migrations(pg_dsn, fresh_schema, migrations)


def test_a_failing_migration_leaves_nothing_behind(pg_dsn, fresh_schema, tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    shutil.copy(MIGRATIONS_DIR / "V001__init.sql", migrations)
    (migrations / "V002__broken.sql").write_text("CREATE TABLE half_done (x int);\nSELECT no_such_function();")
    with pytest.raises(psycopg.errors.UndefinedFunction):
        apply_migrations(pg_dsn, fresh_schema, migrations)
    assert query(pg_dsn, fresh_schema, "SELECT to_regclass('half_done')") == [(None,)]
    assert query(pg_dsn, fresh_schema, "SELECT version FROM schema_migrations") == [(1,)]


def test_concurrent_migrators_apply_each_migration_once(pg_dsn, fresh_schema):
    results, errors = [], []

    def migrate():
        try:
            results.append([m.version for m in apply_migrations(pg_dsn, fresh_schema)])
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    shipped = sorted(int(p.name[1:4]) for p in MIGRATIONS_DIR.glob("V*.sql"))
    assert sorted(v for r in results for v in r) == shipped


def test_migrate_and_status_commands(pg_dsn, fresh_schema, capsys):
    args = ["--warehouse-dsn", pg_dsn, "--warehouse-schema", fresh_schema]
    assert warehouse_cli.main(["status", *args]) == 1  # all pending
    assert warehouse_cli.main(["migrate", *args]) == 0
    assert "applied V001__init" in capsys.readouterr().out
    assert warehouse_cli.main(["migrate", *args]) == 0
    assert "up to date" in capsys.readouterr().out
    assert warehouse_cli.main(["status", *args]) == 0
    assert "onboardflow" not in capsys.readouterr().out.replace("onboardflow_", "")  # no DSN / password echoed


# --------------------------------------------------------------------------- COPY path


def test_writing_the_same_events_twice_stores_them_once(pg_dsn, schema):
    rows = [event_row(event(i)) for i in range(200)]
    writer = WarehouseWriter(pg_dsn, EVENTS, schema)
    try:
        first = writer.write(rows)
        second = writer.write(rows)
    finally:
        writer.close()
    assert (first.inserted, first.duplicates) == (200, 0)
    assert (second.inserted, second.duplicates) == (0, 200)
    assert count(pg_dsn, schema, "events") == 200
    stored = query(pg_dsn, schema,
                   "SELECT properties, country, referrer_host, consent_marketing, occurred_at FROM events "
                   "WHERE event_id = 'evt-00001'")
    assert stored == [({"feature": "export"}, "DE", "news.example.org", False,
                       dt.datetime(2025, 1, 15, 0, 0, 1, tzinfo=dt.timezone.utc))]


def test_day_partitions_are_created_for_the_days_a_batch_touches(pg_dsn, schema):
    far_future = int(dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc).timestamp() * 1000)
    events = [event(i, occurred_at=T0 + (i % 3) * DAY_MS + i) for i in range(30)]
    events += [event(100, occurred_at=far_future), event(101, occurred_at=0)]  # outside the horizon
    writer = WarehouseWriter(pg_dsn, EVENTS, schema)
    try:
        writer.write([event_row(e) for e in events])
    finally:
        writer.close()
    placed = dict(query(pg_dsn, schema,
                        "SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1"))
    assert placed == {"events_p20250115": 10, "events_p20250116": 10, "events_p20250117": 10, "events_default": 2}


def test_a_row_the_database_refuses_is_rejected_alone(pg_dsn, schema):
    rows = [event_row(event(i)) for i in range(5)]
    rows[2] = event_row(event(2, session_id="bad\x00session"))  # PostgreSQL text cannot hold NUL
    writer = WarehouseWriter(pg_dsn, EVENTS, schema)
    try:
        report = writer.write(rows)
    finally:
        writer.close()
    assert report.inserted == 4
    assert [index for index, _ in report.rejected] == [2]
    assert "bad" not in report.rejected[0][1]
    assert count(pg_dsn, schema, "events") == 4


def test_backend_terminated_mid_write_is_retried_and_rows_land_once(pg_dsn, schema):
    writer = WarehouseWriter(pg_dsn, EVENTS, schema, backoff_base_s=0.01)
    writer.write([event_row(event(0))])  # connects and creates the day partition
    pid = writer.backend_pid
    rows = [event_row(event(i)) for i in range(1, 101)]
    outcome = {}
    with psycopg.connect(pg_dsn) as locker, psycopg.connect(pg_dsn, autocommit=True) as admin:
        # Hold the table so the writer's INSERT waits inside its transaction.
        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(schema, "events")))
        thread = threading.Thread(target=lambda: outcome.setdefault("report", writer.write(rows)))
        thread.start()
        deadline = time.monotonic() + 10
        waiting = False
        while not waiting and time.monotonic() < deadline:
            waiting = admin.execute(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone() == (True,)
            time.sleep(0.01)
        assert waiting, "the writer never waited on the lock"
        assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        locker.rollback()
    thread.join(60)
    writer.close()
    assert outcome["report"].inserted == 100
    assert writer.retries >= 1
    assert count(pg_dsn, schema, "events") == 101


def test_dead_letter_raw_bytes_are_never_stored(pg_dsn, schema):
    value = b"\x00\x00\x00\x00\x01" + b'{"user_id":"user-123","email":"alice@example.com"}'
    kafka_letter = {
        "source_topic": "onboarding.events", "source_partition": 2, "source_offset": 41,
        "kafka_timestamp": T0, "key": b"user-123", "value": value, "reason": "avro_decode_error",
        "detail": "schema id 1: truncated record", "stage": "decode", "failed_at": T0 + 5,
    }
    stage_letter = {"stage": "anonymize", "reason": "missing_identity", "event_id": "evt-1",
                    "payload": {"event_id": "evt-1", "context": {"email": "bob@example.com"}}}
    writer = WarehouseWriter(pg_dsn, DEAD_LETTERS, schema)
    try:
        assert writer.write([dead_letter_row(kafka_letter), dead_letter_row(stage_letter)]).inserted == 2
        assert writer.write([dead_letter_row(kafka_letter)]).inserted == 0  # replay
    finally:
        writer.close()
    everything = " ".join(r[0] for r in query(pg_dsn, schema, "SELECT row_to_json(d)::text FROM dead_letters d"))
    for secret in ("user-123", "alice", "bob@example.com"):
        assert secret not in everything
    rows = query(pg_dsn, schema,
                 "SELECT source_topic, source_partition, source_offset, payload_size, payload_sha256 "
                 "FROM dead_letters WHERE stage = 'decode'")
    assert rows == [("onboarding.events", 2, 41, len(value), hashlib.sha256(value).hexdigest())]
    assert query(pg_dsn, schema, "SELECT source_topic, source_partition, event_id FROM dead_letters "
                                 "WHERE stage = 'anonymize'") == [("", -1, "evt-1")]


# --------------------------------------------------------------------------- Beam


def _counters(result):
    """Counters of the onboardflow namespace, summed over the steps that report them."""
    totals = {}
    for c in result.metrics().query(MetricsFilter())["counters"]:
        if c.key.metric.namespace == "onboardflow":
            totals[c.key.metric.name] = totals.get(c.key.metric.name, 0) + c.committed
    return totals


def _sink_pipeline(dsn, schema):
    events = [event(i, occurred_at=T0 + (i % 2) * DAY_MS + i) for i in range(40)]
    events += [event(900, event_id=None), event(901, session_id="nul\x00"),
               {k: v for k, v in event(902).items() if k != "occurred_at"}]
    letters = [{"source_topic": "onboarding.events", "source_partition": 0, "source_offset": o, "kafka_timestamp": T0,
                "key": b"k", "value": b"raw-bytes", "reason": "not_framed", "detail": "", "stage": "decode",
                "failed_at": T0} for o in range(4)]
    p = BeamTestPipeline()
    dead = (
        p | "Events" >> beam.Create(events) | WriteEventsToWarehouse(dsn, schema, batch_size=16),
        p | "Late" >> beam.Create(events[:3]) | WriteLateEvents(dsn, schema),
        p | "Letters" >> beam.Create(letters) | WriteDeadLetterMetadata(dsn, schema),
    ) | beam.Flatten()
    assert_that(
        dead | beam.Map(lambda d: (d["stage"], d["reason"])),
        equal_to([
            ("warehouse.events", "missing_event_id"),
            ("warehouse.events", "missing_occurred_at"),
            ("warehouse.events", "database_rejected"),
        ]),
    )
    result = p.run()
    result.wait_until_finish()
    return _counters(result)


def test_warehouse_sinks_in_a_pipeline_are_idempotent_under_replay(pg_dsn, schema):
    first = _sink_pipeline(pg_dsn, schema)
    assert first["rows_written_events"] == 40
    assert first["rows_written_late_events"] == 3
    assert first["rows_written_dead_letters"] == 4
    assert first["warehouse_dead_letter"] == 3
    tables = ("events", "late_events", "dead_letters")
    counts = {t: count(pg_dsn, schema, t) for t in tables}
    assert counts == {"events": 40, "late_events": 3, "dead_letters": 4}

    replay = _sink_pipeline(pg_dsn, schema)
    assert replay.get("rows_written_events", 0) == 0
    assert replay["rows_duplicate_events"] == 40
    assert {t: count(pg_dsn, schema, t) for t in tables} == counts


# --------------------------------------------------------------------------- reference data


def test_read_accounts_returns_the_demo_seed_with_deliberate_gaps(pg_dsn, schema):
    accounts = read_accounts(pg_dsn, schema)
    assert len(accounts) == 594
    assert "acct-00097" not in accounts and "acct-00582" not in accounts
    acct = accounts["acct-00042"]
    assert set(acct) == {"plan", "account_tier", "industry", "company_size", "updated_at"}
    assert acct["plan"] in {"free", "starter", "pro", "team", "enterprise"}
    assert isinstance(acct["company_size"], int) and isinstance(acct["updated_at"], int)
