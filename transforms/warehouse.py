"""The PostgreSQL warehouse: history of events, profiles, segment changes, dead letters.

Redis holds the latest profile per user for online reads; the warehouse keeps
everything that happened, for analytics, audits and model training. Four sinks
write to it, all through one DoFn (``_WarehouseWriteFn``) parameterized by a
``TableSpec`` that says how an element becomes a row:

* ``WriteEventsToWarehouse`` -> ``events``: anonymized events, partitioned by
  UTC day of event time. Day partitions are created on demand for the days a
  batch touches (2000-01-01 up to a week ahead; other days land in the
  default partition, so nothing is ever rejected for its date).
* ``WriteLateEvents`` -> ``late_events``: events too late for profiles.
* ``WriteProfileSnapshots`` -> ``profile_snapshots``: every profile version.
* ``WriteSegmentChanges`` -> ``segment_changes``.
* ``WriteDeadLetterMetadata`` -> ``dead_letters``: where a bad record came
  from, why it failed, and the size and SHA-256 of its payload. Never the raw
  bytes: they may hold PII and stay in the dead-letter topic.

Writes are idempotent, so bundle retries and Kafka replays never duplicate a
row: each flush COPYs its rows into a temporary staging table and runs
``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` on the table's natural key, in
one transaction. COPY is the fast path into PostgreSQL; the staging table is
what makes COPY idempotent. A batch the database refuses for its data (a NUL
character in a string, a violated constraint) is retried row by row inside
savepoints, and only the offending rows are dead-lettered. Lost connections,
server restarts and terminated backends are retried with capped exponential
backoff and a fresh connection; after the retry budget the error is raised so
the runner retries the bundle.

The DDL lives in versioned migrations (``schemas/warehouse/V001__init.sql``,
...), applied in order by ``apply_migrations``, each in its own transaction,
recorded with its SHA-256 in ``schema_migrations``. Re-running is a no-op; an
applied migration whose file changed is an error, as is a new migration that
sorts before one already applied. Everything lives in one PostgreSQL schema
(``warehouse`` by default), so tests use a private schema each.

``read_accounts`` loads the account reference table for the enrichment side
input; ``upsert_accounts`` loads it from elsewhere (a CRM export, the demo
generator).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import numbers
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import apache_beam as beam
import psycopg
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue
from psycopg import sql

from .dead_letter import pipeline_dead_letter
from .metrics import PipelineMetrics

METRICS_NAMESPACE = "onboardflow"
DEFAULT_SCHEMA = "warehouse"
DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAX_ATTEMPTS = 8
#: Connection-level errors are retried for at least this long (and at least
#: ``max_attempts`` times) before the write fails its bundle. On Prism a failed
#: bundle fails the whole job, so the budget must outlast a PostgreSQL restart
#: or failover (tests/integration/test_reliability.py stops it for 30 s);
#: longer rides out longer outages, at the cost of a job that stalls rather
#: than fails while the database is away.
DEFAULT_RETRY_BUDGET_S = 120.0
_LOG = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "schemas" / "warehouse"

_MIGRATION_FILE_RE = re.compile(r"^V(\d+)__([A-Za-z0-9_]+)\.sql$")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_FIRST_PARTITION_DAY = dt.date(2000, 1, 1)
_PARTITION_DAYS_AHEAD = 7
_MAX_DETAIL = 1000


def _check_schema(schema: str) -> str:
    if not isinstance(schema, str) or not _SCHEMA_RE.match(schema):
        raise ValueError("schema must be a lower-case SQL identifier (letters, digits, '_')")
    return schema


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- migrations


class MigrationError(RuntimeError):
    """The migrations on disk and those applied to the database disagree."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    checksum: str  # SHA-256 of the file's bytes

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def label(self) -> str:
        return f"V{self.version:03d}__{self.name}"


@dataclass(frozen=True)
class MigrationState:
    version: int
    name: str
    state: str  # applied | pending | checksum_mismatch | missing_file
    applied_at: Optional[dt.datetime] = None


def discover_migrations(migrations_dir: Optional[Path] = None) -> list[Migration]:
    """``V<number>__<name>.sql`` files, ordered by number; duplicate numbers are an error."""
    directory = Path(migrations_dir or MIGRATIONS_DIR)
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE_RE.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named V<number>__<name>.sql")
        version = int(match.group(1))
        if version in found:
            raise MigrationError(f"two migrations with version {version}: {found[version].path.name}, {path.name}")
        found[version] = Migration(version, match.group(2), path, hashlib.sha256(path.read_bytes()).hexdigest())
    return [found[v] for v in sorted(found)]


def _lock_id(schema: str) -> int:
    digest = hashlib.sha256(f"onboardflow.migrations.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


_CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS {}.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def _applied(conn: psycopg.Connection, schema: str) -> dict[int, tuple[str, str, dt.datetime]]:
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", [f'"{schema}".schema_migrations']
    ).fetchone()[0]
    if not exists:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT version, name, checksum, applied_at FROM {}.schema_migrations").format(sql.Identifier(schema))
    ).fetchall()
    return {version: (name, checksum, applied_at) for version, name, checksum, applied_at in rows}


def _verify(migrations: list[Migration], applied: Mapping[int, tuple]) -> list[Migration]:
    """The pending migrations, after checking the applied ones are unchanged."""
    on_disk = {m.version: m for m in migrations}
    for version, (name, checksum, _) in sorted(applied.items()):
        migration = on_disk.get(version)
        if migration is None:
            raise MigrationError(f"applied migration V{version:03d}__{name} has no file in the migrations directory")
        if migration.checksum != checksum:
            raise MigrationError(
                f"{migration.label} was changed after it was applied (checksum {checksum[:12]} in the "
                f"database, {migration.checksum[:12]} on disk): add a new migration instead"
            )
    latest = max(applied, default=0)
    pending = [m for m in migrations if m.version not in applied]
    for m in pending:
        if m.version < latest:
            raise MigrationError(f"{m.label} sorts before V{latest:03d}, which is already applied")
    return pending


def apply_migrations(
    dsn: str, schema: str = DEFAULT_SCHEMA, migrations_dir: Optional[Path] = None
) -> list[Migration]:
    """Apply pending migrations to ``schema`` in order; return those applied now.

    Each migration runs in its own transaction with ``search_path`` set to
    ``schema`` and is recorded in ``schema_migrations``. Concurrent callers
    serialize on an advisory lock, so two workers starting at once apply each
    migration once. Raises ``MigrationError`` when an applied migration changed
    on disk or vanished, or a new one sorts before an applied one.
    """
    _check_schema(schema)
    migrations = discover_migrations(migrations_dir)
    ident = sql.Identifier(schema)
    with psycopg.connect(dsn, autocommit=True, application_name="onboardflow-migrate") as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", [_lock_id(schema)])
        try:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            conn.execute(sql.SQL(_CREATE_MIGRATIONS_TABLE).format(ident))
            pending = _verify(migrations, _applied(conn, schema))
            for migration in pending:
                with conn.transaction():
                    conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
                    conn.execute(migration.sql)
                    conn.execute(
                        sql.SQL("INSERT INTO {}.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)")
                        .format(ident),
                        [migration.version, migration.name, migration.checksum],
                    )
            return pending
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [_lock_id(schema)])


def migration_status(
    dsn: str, schema: str = DEFAULT_SCHEMA, migrations_dir: Optional[Path] = None
) -> list[MigrationState]:
    """Every migration on disk or in the database, with its state; changes nothing."""
    _check_schema(schema)
    migrations = {m.version: m for m in discover_migrations(migrations_dir)}
    with psycopg.connect(dsn, autocommit=True, application_name="onboardflow-migrate") as conn:
        applied = _applied(conn, schema)
    states = []
    for version in sorted(set(migrations) | set(applied)):
        m, a = migrations.get(version), applied.get(version)
        if a is None:
            states.append(MigrationState(version, m.name, "pending"))
        elif m is None:
            states.append(MigrationState(version, a[0], "missing_file", a[2]))
        elif m.checksum != a[1]:
            states.append(MigrationState(version, m.name, "checksum_mismatch", a[2]))
        else:
            states.append(MigrationState(version, m.name, "applied", a[2]))
    return states


# --------------------------------------------------------------------------- rows


class RowError(ValueError):
    """An element that cannot become a row; ``reason`` is a short dead-letter code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _ts(ms: Any, name: str, *, required: bool = True) -> Optional[dt.datetime]:
    if ms is None:
        if required:
            raise RowError(f"missing_{name}", f"{name} is required")
        return None
    # `type(...) is int` first: the ABC check costs a measured share of a sink's CPU.
    if type(ms) is not int and (not isinstance(ms, numbers.Integral) or isinstance(ms, bool)):
        raise RowError("invalid_field", f"{name} must be epoch milliseconds (int)")
    try:
        return _EPOCH + dt.timedelta(milliseconds=int(ms))
    except OverflowError:
        raise RowError("invalid_field", f"{name} is out of range") from None


def _int(value: Any, name: str) -> int:
    if type(value) is int:
        return value
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise RowError("invalid_field", f"{name} must be an int")
    return int(value)


def _text(value: Any, name: str, *, required: bool = False) -> Optional[str]:
    if value is None or value == "":
        if required:
            raise RowError(f"missing_{name}", f"{name} is required")
        return None if value is None else value
    if not isinstance(value, str):
        raise RowError("invalid_field", f"{name} must be a string")
    return value


def _flag(value: Any, name: str) -> Optional[bool]:
    if value is None or isinstance(value, bool):
        return value
    raise RowError("invalid_field", f"{name} must be a boolean")


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(type(value).__name__)


def _json(value: Any, name: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise RowError("invalid_field", f"{name} is not JSON-serializable ({type(exc).__name__})") from None


def _mapping(element: Any) -> Mapping[str, Any]:
    if not isinstance(element, Mapping):
        raise RowError("not_a_mapping", f"element is a {type(element).__name__}")
    return element


_CONTEXT_FIELDS = ("device", "os", "app_version", "locale", "country", "email_domain", "ip_prefix", "device_class")
_CONSENT_FLAGS = ("analytics", "personalization", "marketing")


def event_row(element: Any) -> tuple:
    """An anonymized event (``transforms.anonymize`` shape, or its flat variant) as an ``events`` row.

    Context fields are read from ``context`` or, failing that, the top level;
    consent from ``consent`` or flat ``consent_<flag>`` fields. Fields not in
    the table are not stored: a new column is a migration, which keeps new
    (possibly sensitive) fields out of the warehouse by default.
    """
    event = _mapping(element)
    context = event.get("context") or {}
    consent = event.get("consent") or {}
    if not isinstance(context, Mapping) or not isinstance(consent, Mapping):
        raise RowError("invalid_field", "context and consent must be mappings")
    properties = event.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, Mapping):
        raise RowError("invalid_field", "properties must be a mapping")
    referrer = event.get("referrer_host", event.get("referrer"))
    return (
        _text(event.get("event_id"), "event_id", required=True),
        _ts(event.get("occurred_at"), "occurred_at"),
        _ts(event.get("received_at"), "received_at", required=False),
        _text(event.get("event_type"), "event_type", required=True),
        _text(event.get("user_key"), "user_key"),
        _flag(event.get("identified"), "identified"),
        _text(event.get("session_id"), "session_id"),
        _json(properties, "properties"),
        *(_text(context.get(name, event.get(name)), name) for name in _CONTEXT_FIELDS),
        _text(referrer, "referrer_host"),
        *(_flag(consent.get(flag, event.get(f"consent_{flag}")), f"consent_{flag}") for flag in _CONSENT_FLAGS),
    )


def profile_snapshot_row(element: Any) -> tuple:
    """A profile dict as a ``profile_snapshots`` row (the whole profile as jsonb)."""
    profile = _mapping(element)
    return (
        _text(profile.get("user_key"), "user_key", required=True),
        _int(profile.get("version"), "version"),
        _json(dict(profile), "snapshot"),
        _ts(_now_ms(), "written_at"),
    )


def segment_change_row(element: Any) -> tuple:
    change = _mapping(element)
    direction = change.get("change")
    if direction not in ("entered", "exited"):
        raise RowError("invalid_field", "change must be 'entered' or 'exited'")
    return (
        _text(change.get("user_key"), "user_key", required=True),
        _text(change.get("segment"), "segment", required=True),
        direction,
        _ts(change.get("at"), "at"),
        _text(change.get("reason"), "reason") or "",
        _int(change.get("version"), "version"),
    )


def drift_event_row(element: Any) -> tuple:
    """A ``DriftEvent`` dict (schemas/drift_event.avsc) as a ``drift_events`` row."""
    event = _mapping(element)
    value, threshold = event.get("value"), event.get("threshold")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RowError("invalid_field", "value must be a number")
    if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool)):
        raise RowError("invalid_field", "threshold must be a number or null")
    return (
        _text(event.get("drift_id"), "drift_id", required=True),
        _text(event.get("model_name"), "model_name", required=True),
        _text(event.get("model_version"), "model_version", required=True),
        _text(event.get("detector"), "detector", required=True),
        _text(event.get("metric"), "metric", required=True),
        float(value),
        None if threshold is None else float(threshold),
        _int(event.get("window_events", 0), "window_events"),
        _text(event.get("action"), "action") or "none",
        _ts(event.get("detected_at"), "detected_at"),
    )


def _payload_bytes(letter: Mapping[str, Any]) -> Optional[bytes]:
    if "value" in letter:  # a Kafka record (schemas/dead_letter.avsc)
        value = letter["value"]
    else:  # an in-pipeline dead letter: {"stage", "reason", "event_id", "payload"}
        value = letter.get("payload")
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    # Canonical JSON so the same payload always hashes the same; repr for the odd
    # non-JSON value (bytes inside a dict): the hash only has to be stable.
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=repr).encode("utf-8")


def _clean_text(value: Any, default: str) -> str:
    if not isinstance(value, str) or not value:
        return default
    # The last-resort sink should not itself reject a letter for a NUL byte.
    return value.replace("\x00", "")[:_MAX_DETAIL]


def _coordinate(value: Any, default: int) -> int:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else default


def dead_letter_row(element: Any) -> tuple:
    """Metadata of a dead letter, either shape: Kafka record or in-pipeline stage letter.

    The payload (``value`` or ``payload``) is reduced to its size and SHA-256;
    the raw key is not kept at all (it is typically the raw user id, and an
    unsalted hash of it would be reversible by guessing).
    """
    letter = _mapping(element)
    payload = _payload_bytes(letter)
    kafka_ts = _coordinate(letter.get("kafka_timestamp"), -1)
    failed_at = letter.get("failed_at")
    event_id = letter.get("event_id")
    return (
        _clean_text(letter.get("source_topic"), ""),
        _coordinate(letter.get("source_partition"), -1),
        _coordinate(letter.get("source_offset"), -1),
        _ts(kafka_ts, "kafka_timestamp") if kafka_ts >= 0 else None,  # -1: the broker had none
        _clean_text(letter.get("stage"), "unknown"),
        _clean_text(letter.get("reason"), "unknown"),
        _clean_text(letter.get("detail"), ""),
        _clean_text(event_id, "") or None,
        _ts(failed_at if isinstance(failed_at, int) and not isinstance(failed_at, bool) else _now_ms(), "failed_at"),
        None if payload is None else len(payload),
        hashlib.sha256(payload or b"").hexdigest(),
    )


@dataclass(frozen=True)
class TableSpec:
    """How elements become rows of one warehouse table."""

    table: str
    columns: tuple[str, ...]
    to_row: Callable[[Any], tuple]  # raises RowError
    day_partition_column: Optional[str] = None

    @property
    def stage(self) -> str:
        return f"warehouse.{self.table}"


EVENTS = TableSpec(
    "events",
    (
        "event_id", "occurred_at", "received_at", "event_type", "user_key", "identified", "session_id",
        "properties", *_CONTEXT_FIELDS, "referrer_host", *(f"consent_{f}" for f in _CONSENT_FLAGS),
    ),
    event_row,
    day_partition_column="occurred_at",
)
PROFILE_SNAPSHOTS = TableSpec(
    "profile_snapshots", ("user_key", "version", "snapshot", "written_at"), profile_snapshot_row
)
LATE_EVENTS = TableSpec("late_events", EVENTS.columns, event_row)
SEGMENT_CHANGES = TableSpec(
    "segment_changes", ("user_key", "segment", "change", "at", "reason", "version"), segment_change_row
)
DRIFT_EVENTS = TableSpec(
    "drift_events",
    ("drift_id", "model_name", "model_version", "detector", "metric", "value", "threshold", "window_events",
     "action", "detected_at"),
    drift_event_row,
)
DEAD_LETTERS = TableSpec(
    "dead_letters",
    (
        "source_topic", "source_partition", "source_offset", "kafka_timestamp", "stage", "reason", "detail",
        "event_id", "failed_at", "payload_size", "payload_sha256",
    ),
    dead_letter_row,
)


# --------------------------------------------------------------------------- writer


class WriteReport(NamedTuple):
    inserted: int  # rows new to the table
    duplicates: int  # rows already there (replays, retries)
    rejected: list[tuple[int, str]]  # (index in the batch, error without data values)


def _error_text(exc: psycopg.Error) -> str:
    if exc.sqlstate:
        # The primary message names columns and constraints; DETAIL and CONTEXT
        # may quote row values, so they are left out.
        return f"{exc.sqlstate} {exc.diag.message_primary or type(exc).__name__}"[:_MAX_DETAIL]
    # Refused by psycopg before it reached the server (e.g. a NUL character):
    # these messages describe the problem, not the value.
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:_MAX_DETAIL]


class WarehouseWriter:
    """Idempotent COPY-based batch writes to one table, with reconnecting retries (no Beam).

    ``write`` runs one transaction per batch: COPY into a temporary staging
    table, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``. The
    connection is opened on first use and replaced after any connection-level
    error (``OperationalError``: server restart, ``pg_terminate_backend``,
    network loss, serialization failures); ``max_attempts`` attempts in all,
    with capped exponential backoff and full jitter, then the error is raised.
    """

    def __init__(
        self,
        dsn: str,
        spec: TableSpec,
        schema: str = DEFAULT_SCHEMA,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 5.0,
        connect_timeout_s: int = 10,
        on_retry: Optional[Callable[[str], None]] = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.spec = spec
        # Called with the table name on every failed attempt, as it happens
        # (e.g. PipelineMetrics.warehouse_error): an outage shows while it lasts.
        self._on_retry = on_retry
        self.schema = _check_schema(schema)
        self._dsn = dsn
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._connect_timeout_s = connect_timeout_s
        self._conn: Optional[psycopg.Connection] = None
        self._partitions: set[dt.date] = set()  # days known to have a partition (or to stay in default)
        self.retries = 0
        self._retries_counter = Metrics.counter(METRICS_NAMESPACE, "warehouse_retries")
        self._target = sql.Identifier(self.schema, spec.table)
        self._staging = sql.Identifier(f"_obf_stage_{spec.table}")
        cols = sql.SQL(", ").join(map(sql.Identifier, spec.columns))
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(self._staging, cols)
        self._insert_sql = sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} ON CONFLICT DO NOTHING").format(
            self._target, cols, cols, self._staging
        )
        self._partition_index = spec.columns.index(spec.day_partition_column) if spec.day_partition_column else None

    @property
    def application_name(self) -> str:
        # Visible in pg_stat_activity: which sink holds which backend.
        return f"onboardflow-warehouse-{self.spec.table}"

    @property
    def backend_pid(self) -> Optional[int]:
        return self._conn.info.backend_pid if self._conn is not None and not self._conn.closed else None

    def connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(
                self._dsn, autocommit=True, application_name=self.application_name,
                connect_timeout=self._connect_timeout_s,
            )
            try:
                conn.execute(sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                ).format(self._staging, self._target))
                if self._partition_index is not None:
                    self._load_partitions(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    #: seconds a failing write keeps retrying (see DEFAULT_RETRY_BUDGET_S)
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    _failing_since: float = 0.0

    def _backoff(self, attempt: int, error: BaseException) -> None:
        """Sleep before retry number ``attempt`` (1-based), or raise ``error`` when out of budget.

        Out of budget: ``max_attempts`` attempts made *and* ``retry_budget_s``
        seconds since this write first failed. Each retry is logged with the
        error's first line (psycopg's connection messages name the server,
        never row values).
        """
        now = time.monotonic()
        if attempt == 1:
            self._failing_since = now
        failing_s = now - self._failing_since
        text = (str(error).strip().splitlines() or [""])[0][:200]
        if self._on_retry is not None:
            self._on_retry(self.spec.table)
        if attempt >= self._max_attempts and failing_s >= self.retry_budget_s:
            _LOG.error("warehouse write to %s gave up after %d attempts over %.1f s: %s: %s",
                       self.spec.table, attempt, failing_s, type(error).__name__, text)
            raise error
        self.retries += 1
        self._retries_counter.inc()
        delay = random.uniform(0, min(self._backoff_cap_s, self._backoff_base_s * (2 ** (attempt - 1))))
        _LOG.warning("warehouse write to %s failed (attempt %d, failing for %.1f s): %s: %s; retrying in %.2f s",
                     self.spec.table, attempt, failing_s, type(error).__name__, text, delay)
        time.sleep(delay)

    def write(self, rows: Sequence[tuple]) -> WriteReport:
        if not rows:
            return WriteReport(0, 0, [])
        attempt = 0
        while True:
            attempt += 1
            try:
                conn = self.connect()
                if self._partition_index is not None:
                    self._ensure_partitions(conn, rows)
                return self._write_once(conn, rows)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                # The transaction either committed (the retry then inserts
                # nothing: ON CONFLICT) or rolled back with the connection.
                self.close()
                self._backoff(attempt, exc)

    def _copy_insert(self, cur: psycopg.Cursor, rows: Iterable[tuple]) -> int:
        with cur.copy(self._copy_sql) as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(self._insert_sql)
        return cur.rowcount

    def _write_once(self, conn: psycopg.Connection, rows: Sequence[tuple]) -> WriteReport:
        with conn.transaction(), conn.cursor() as cur:
            try:
                with conn.transaction():  # a savepoint: a refused batch leaves the outer transaction usable
                    inserted = self._copy_insert(cur, rows)
                return WriteReport(inserted, len(rows) - inserted, [])
            except (psycopg.DataError, psycopg.IntegrityError):
                pass
            # Some row is refused for its data: find it (them) one row at a time.
            inserted, rejected = 0, []
            for index, row in enumerate(rows):
                try:
                    with conn.transaction():
                        inserted += self._copy_insert(cur, [row])
                        cur.execute(sql.SQL("DELETE FROM {}").format(self._staging))
                except (psycopg.DataError, psycopg.IntegrityError) as exc:
                    rejected.append((index, _error_text(exc)))
            return WriteReport(inserted, len(rows) - inserted - len(rejected), rejected)

    # -- day partitions ------------------------------------------------------

    def _partition_name(self, day: dt.date) -> str:
        return f"{self.spec.table}_p{day:%Y%m%d}"

    def _load_partitions(self, conn: psycopg.Connection) -> None:
        names = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass",
            [f'"{self.schema}"."{self.spec.table}"'],
        ).fetchall()
        prefix = f"{self.spec.table}_p"
        for (name,) in names:
            if name.startswith(prefix):
                try:
                    self._partitions.add(dt.datetime.strptime(name[len(prefix):], "%Y%m%d").date())
                except ValueError:
                    continue

    def _ensure_partitions(self, conn: psycopg.Connection, rows: Sequence[tuple]) -> None:
        last_day = dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=_PARTITION_DAYS_AHEAD)
        days = {row[self._partition_index].astimezone(dt.timezone.utc).date() for row in rows}
        for day in sorted(days - self._partitions):
            if not _FIRST_PARTITION_DAY <= day <= last_day:
                continue  # stays in the default partition: a bogus date must not create thousands of tables
            self._create_partition(conn, day)
            self._partitions.add(day)

    def _create_partition(self, conn: psycopg.Connection, day: dt.date) -> None:
        start = dt.datetime.combine(day, dt.time(), dt.timezone.utc)
        end = start + dt.timedelta(days=1)
        ddl = sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
            sql.Identifier(self.schema, self._partition_name(day)), self._target,
            sql.Literal(start.isoformat()), sql.Literal(end.isoformat()),
        )
        try:
            # Its own short transaction: it locks the parent table exclusively.
            with conn.transaction():
                conn.execute(ddl)
        except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
            pass  # another worker created it between our check and our CREATE
        except (psycopg.errors.CheckViolation, psycopg.errors.InvalidObjectDefinition):
            # The default partition already holds rows of that day, or another
            # partition covers it: the rows keep going where they go today.
            pass


# --------------------------------------------------------------------------- Beam


class _Held(NamedTuple):
    row: tuple
    element: Any
    timestamp: Any
    window: Any


def _dead_letter(spec: TableSpec, reason: str, detail: str, element: Any) -> dict:
    return pipeline_dead_letter(spec.stage, reason, detail, element)


class _WarehouseWriteFn(beam.DoFn):
    """Rows buffered per bundle, flushed through a ``WarehouseWriter`` per batch."""

    def __init__(self, dsn: str, schema: str, spec: TableSpec, batch_size: int, max_attempts: int,
                 metrics: Optional[PipelineMetrics] = None) -> None:
        self._metrics = metrics or PipelineMetrics(prometheus=False)
        self._dsn = dsn
        self._schema = schema
        self._spec = spec
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._writer: Optional[WarehouseWriter] = None
        self._held: list[_Held] = []
        self._written = Metrics.counter(METRICS_NAMESPACE, f"rows_written_{spec.table}")
        self._duplicates = Metrics.counter(METRICS_NAMESPACE, f"rows_duplicate_{spec.table}")
        self._dead_letters = Metrics.counter(METRICS_NAMESPACE, "warehouse_dead_letter")

    def setup(self) -> None:
        self._metrics.setup()
        self._writer = WarehouseWriter(self._dsn, self._spec, self._schema, max_attempts=self._max_attempts,
                                       on_retry=self._metrics.warehouse_error)
        try:
            self._writer.connect()
        except psycopg.OperationalError:
            pass  # the first write retries the connection with backoff

    def start_bundle(self) -> None:
        self._held = []

    def process(self, element, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        try:
            row = self._spec.to_row(element)
        except RowError as exc:
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(_WriteToWarehouse.DEAD_LETTER,
                                           _dead_letter(self._spec, exc.reason, exc.detail, element))
            return
        self._held.append(_Held(row, element, timestamp, window))
        if len(self._held) >= self._batch_size:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self):
        if not self._held:
            return
        held, self._held = self._held, []
        started = time.perf_counter()
        report = self._writer.write([h.row for h in held])
        self._metrics.warehouse_write_seconds(self._spec.table, time.perf_counter() - started)
        self._written.inc(report.inserted)
        self._duplicates.inc(report.duplicates)
        for index, error in report.rejected:
            h = held[index]
            self._dead_letters.inc()
            letter = _dead_letter(self._spec, "database_rejected", error, h.element)
            yield beam.pvalue.TaggedOutput(_WriteToWarehouse.DEAD_LETTER,
                                           WindowedValue(letter, h.timestamp, (h.window,)))

    def teardown(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _WriteToWarehouse(beam.PTransform):
    """Common body of the warehouse sinks; subclasses only name their ``TableSpec``."""

    SPEC: TableSpec
    DEAD_LETTER = "dead_letter"

    def __init__(
        self,
        dsn: str,
        schema: str = DEFAULT_SCHEMA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        label: Optional[str] = None,
        metrics: Optional[PipelineMetrics] = None,
    ) -> None:
        super().__init__(label)
        _check_schema(schema)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._fn = _WarehouseWriteFn(dsn, schema, self.SPEC, batch_size, max_attempts, metrics)

    def expand(self, elements):
        outputs = elements | f"CopyInto_{self.SPEC.table}" >> beam.ParDo(self._fn).with_outputs(
            self.DEAD_LETTER, main="written"
        )
        return outputs[self.DEAD_LETTER]


class WriteEventsToWarehouse(_WriteToWarehouse):
    """Anonymized events -> ``events`` (day partitions created on demand).

    In: anonymized event dicts (``transforms.anonymize`` shape). Out: dead
    letters ``{"stage": "warehouse.events", "reason", "detail", "event_id",
    "payload"}`` for events without event_id / event_type / occurred_at, with
    mistyped fields, or refused by the database. Replays insert nothing new
    (key: event_id, occurred_at). Counters ``rows_written_events``,
    ``rows_duplicate_events``.
    """

    SPEC = EVENTS


class WriteLateEvents(_WriteToWarehouse):
    """Anonymized events that came too late for profiles -> ``late_events``.

    Same row mapping, key and dead letters as ``WriteEventsToWarehouse`` (stage
    ``warehouse.late_events``); the table is not partitioned. Counters
    ``rows_written_late_events``, ``rows_duplicate_late_events``.
    """

    SPEC = LATE_EVENTS


class WriteProfileSnapshots(_WriteToWarehouse):
    """Profile dicts -> ``profile_snapshots`` (one row per user_key and version).

    Out: dead letters for profiles without user_key / int version or that are
    not JSON-serializable (NaN, odd types). Counters
    ``rows_written_profile_snapshots``, ``rows_duplicate_profile_snapshots``.
    """

    SPEC = PROFILE_SNAPSHOTS


class WriteSegmentChanges(_WriteToWarehouse):
    """Segment change dicts -> ``segment_changes`` (key: user_key, segment, version, change).

    Out: dead letters for changes with a missing field or a change other than
    entered / exited. Counters ``rows_written_segment_changes``,
    ``rows_duplicate_segment_changes``.
    """

    SPEC = SEGMENT_CHANGES


class WriteDriftEvents(_WriteToWarehouse):
    """Drift event dicts -> ``drift_events`` (key: drift_id, so replays add nothing).

    Out: dead letters for events with a missing or mistyped field. Counters
    ``rows_written_drift_events``, ``rows_duplicate_drift_events``.
    """

    SPEC = DRIFT_EVENTS


class WriteDeadLetterMetadata(_WriteToWarehouse):
    """Dead letters (Kafka-record or in-pipeline shape) -> ``dead_letters``, metadata only.

    The raw key and value are never stored: the value becomes payload_size and
    payload_sha256. Missing metadata gets defaults (topic '', partition and
    offset -1, stage and reason 'unknown') rather than a rejection. Out:
    letters that are not mappings or that the database refuses. Counters
    ``rows_written_dead_letters``, ``rows_duplicate_dead_letters``.
    """

    SPEC = DEAD_LETTERS


# --------------------------------------------------------------------------- reference data and runs


def read_accounts(dsn: str, schema: str = DEFAULT_SCHEMA) -> dict[str, dict[str, Any]]:
    """The account reference table for the enrichment side input.

    ``{account_id: {"plan", "account_tier", "industry", "company_size", "updated_at"}}``;
    ``account_tier`` is the table's ``tier`` under the profile's field name,
    ``updated_at`` is epoch milliseconds.
    """
    query = sql.SQL(
        "SELECT account_id, plan, tier, industry, company_size, updated_at FROM {}"
    ).format(sql.Identifier(_check_schema(schema), "accounts"))
    with psycopg.connect(dsn, autocommit=True, application_name="onboardflow-accounts") as conn:
        rows = conn.execute(query).fetchall()
    return {
        account_id: {
            "plan": plan,
            "account_tier": tier,
            "industry": industry,
            "company_size": company_size,
            "updated_at": (updated_at - _EPOCH) // dt.timedelta(milliseconds=1),
        }
        for account_id, plan, tier, industry, company_size, updated_at in rows
    }


def upsert_accounts(dsn: str, accounts: Iterable[Mapping[str, Any]], schema: str = DEFAULT_SCHEMA) -> int:
    """Insert or update account rows (``account_id``, ``plan``, ``tier`` or ``account_tier``,
    ``industry``, ``company_size``); returns the number of rows written."""
    rows = [
        (a["account_id"], a["plan"], a.get("tier") or a.get("account_tier") or "unknown",
         a.get("industry"), a.get("company_size"))
        for a in accounts
    ]
    if not rows:
        return 0
    query = sql.SQL(
        "INSERT INTO {} (account_id, plan, tier, industry, company_size, updated_at) "
        "VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (account_id) DO UPDATE SET "
        "plan = EXCLUDED.plan, tier = EXCLUDED.tier, industry = EXCLUDED.industry, "
        "company_size = EXCLUDED.company_size, updated_at = EXCLUDED.updated_at"
    ).format(sql.Identifier(_check_schema(schema), "accounts"))
    with psycopg.connect(dsn, application_name="onboardflow-accounts") as conn:
        with conn.cursor() as cur:
            cur.executemany(query, rows)
    return len(rows)


def record_run_started(
    dsn: str, run_id: str, pipeline: str, runner: str, options: Optional[Mapping[str, Any]] = None,
    schema: str = DEFAULT_SCHEMA,
) -> None:
    """Register a pipeline run (idempotent on run_id). ``options`` must hold no secrets."""
    query = sql.SQL(
        "INSERT INTO {} (run_id, pipeline, runner, options) VALUES (%s, %s, %s, %s::jsonb) "
        "ON CONFLICT (run_id) DO NOTHING"
    ).format(sql.Identifier(_check_schema(schema), "pipeline_runs"))
    with psycopg.connect(dsn, autocommit=True, application_name="onboardflow-runs") as conn:
        conn.execute(query, [run_id, pipeline, runner, json.dumps(dict(options or {}), default=str)])


def record_run_finished(
    dsn: str, run_id: str, status: str, counters: Optional[Mapping[str, Any]] = None,
    schema: str = DEFAULT_SCHEMA,
) -> None:
    """Close a pipeline run with its final status and counters."""
    query = sql.SQL(
        "UPDATE {} SET finished_at = now(), status = %s, counters = %s::jsonb WHERE run_id = %s"
    ).format(sql.Identifier(_check_schema(schema), "pipeline_runs"))
    with psycopg.connect(dsn, autocommit=True, application_name="onboardflow-runs") as conn:
        conn.execute(query, [status, json.dumps(dict(counters or {}), default=str), run_id])
