"""``WarehouseWriter``: idempotent COPY batches into one warehouse table, with reconnecting retries.

In: rows of one ``TableSpec``. Out: a ``WriteReport`` (rows inserted, rows
already there, rows refused with the error text). Each batch is one
transaction: COPY into a temporary staging table, then ``INSERT ... SELECT
... ON CONFLICT DO NOTHING`` on the table's natural key, so bundle retries
and Kafka replays never duplicate a row (an ``earliest_wins`` table,
``experiment_exposures``, keeps the row with the earliest time instead;
its "inserted" count includes rows moved earlier); rows of erased users (tables with
a ``user_key``) are left out of the insert and counted with the rows
already there (transforms/erasure.py). A batch the database refuses for
its data (a NUL character, a violated constraint) is retried row by row
inside savepoints and only the offending rows are reported. Day partitions
of ``events`` are created on demand for the days a batch touches
(2000-01-01 up to a week ahead; other days land in the default partition,
so nothing is ever rejected for its date).
"""
from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Optional

import psycopg
from psycopg import sql

from ..connections import warehouse_connect
from ..sinks.retry import DEFAULT_MAX_ATTEMPTS, RetryPolicy
from .rows import MAX_DETAIL, TableSpec
from .schema import DEFAULT_SCHEMA, check_schema

_LOG = logging.getLogger(__name__)
_FIRST_PARTITION_DAY = dt.date(2000, 1, 1)
_PARTITION_DAYS_AHEAD = 7
#: connection-level errors: server restart, ``pg_terminate_backend``, network
#: loss, serialization failures. Retried with a fresh connection.
TRANSIENT_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)


class WriteReport(NamedTuple):
    inserted: int  # rows new to the table
    duplicates: int  # rows already there (replays, retries), or of erased users
    rejected: list[tuple[int, str]]  # (index in the batch, error without data values)


def _error_text(exc: psycopg.Error) -> str:
    if exc.sqlstate:
        # The primary message names columns and constraints; DETAIL and CONTEXT
        # may quote row values, so they are left out.
        return f"{exc.sqlstate} {exc.diag.message_primary or type(exc).__name__}"[:MAX_DETAIL]
    # Refused by psycopg before it reached the server (e.g. a NUL character):
    # these messages describe the problem, not the value.
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:MAX_DETAIL]


def _skip_erased(schema: str, spec: TableSpec) -> sql.Composable:
    """The insert's filter for a table keyed by user: no row of an erased user (V008's
    ``erased_users``; transforms/erasure.py), so a replay cannot bring one back."""
    if "user_key" not in spec.columns:
        return sql.SQL("")
    return sql.SQL("WHERE user_key IS NULL OR NOT EXISTS "
                   "(SELECT 1 FROM {} AS erased WHERE erased.user_key = {}.user_key)").format(
        sql.Identifier(schema, "erased_users"), sql.Identifier(f"_obf_stage_{spec.table}"))


def _insert_sql(target: sql.Identifier, staging: sql.Identifier, cols: sql.Composable, schema: str,
                spec: TableSpec) -> sql.Composed:
    """Staging -> table. ``ON CONFLICT DO NOTHING``; for an ``earliest_wins`` table, one row a key (the
    earliest) and ``DO UPDATE`` of a row whose time is later than the new one's."""
    if spec.earliest_wins is None:
        return sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} {} ON CONFLICT DO NOTHING").format(
            target, cols, cols, staging, _skip_erased(schema, spec))
    keys, time_column = spec.earliest_wins
    key_cols = sql.SQL(", ").join(map(sql.Identifier, keys))
    time = sql.Identifier(time_column)
    updates = sql.SQL(", ").join(sql.SQL("{} = EXCLUDED.{}").format(sql.Identifier(c), sql.Identifier(c))
                                 for c in spec.columns if c not in keys)
    return sql.SQL(
        "INSERT INTO {} AS existing ({}) SELECT DISTINCT ON ({}) {} FROM {} {} ORDER BY {}, {} "
        "ON CONFLICT ({}) DO UPDATE SET {} WHERE EXCLUDED.{} < existing.{}"
    ).format(target, cols, key_cols, cols, staging, _skip_erased(schema, spec), key_cols, time, key_cols, updates,
             time, time)


class WarehouseWriter:
    """Idempotent COPY-based batch writes to one table (see the module docstring).

    ``attempt(rows)`` is one try on the current connection (dropped after a
    connection-level error); ``write(rows)`` retries ``TRANSIENT_ERRORS`` under
    ``RetryPolicy`` (``max_attempts`` attempts and the retry budget, capped
    exponential backoff with full jitter), then raises. ``on_retry(table)`` is
    called on every failed attempt as it happens (e.g.
    ``PipelineMetrics.warehouse_error``: an outage shows while it lasts);
    ``count(name, n)`` receives the ``warehouse_retries`` counter.
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
        count: Optional[Callable[[str, int], None]] = None,
    ) -> None:
        self.spec = spec
        self.retry = RetryPolicy(max_attempts=max_attempts, base_s=backoff_base_s, cap_s=backoff_cap_s)
        self._on_retry = on_retry
        self._count = count
        self.schema = check_schema(schema)
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._conn: Optional[psycopg.Connection] = None
        self._partitions: set[dt.date] = set()  # days known to have a partition (or to stay in default)
        self.retries = 0
        self._target = sql.Identifier(self.schema, spec.table)
        self._staging = sql.Identifier(f"_obf_stage_{spec.table}")
        cols = sql.SQL(", ").join(map(sql.Identifier, spec.columns))
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(self._staging, cols)
        self._insert_sql = _insert_sql(self._target, self._staging, cols, self.schema, spec)
        self._partition_index = spec.columns.index(spec.day_partition_column) if spec.day_partition_column else None

    @property
    def description(self) -> str:
        return f"warehouse write to {self.spec.table}"

    @property
    def application_name(self) -> str:
        # Visible in pg_stat_activity: which sink holds which backend.
        return f"onboardflow-warehouse-{self.spec.table}"

    @property
    def backend_pid(self) -> Optional[int]:
        return self._conn.info.backend_pid if self._conn is not None and not self._conn.closed else None

    def connect(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            conn = warehouse_connect(
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

    def failed(self, error: BaseException) -> None:
        """Report one failed attempt (``on_retry(table)``)."""
        if self._on_retry is not None:
            self._on_retry(self.spec.table)

    def retried(self, error: BaseException) -> None:
        """Count one retry (``retries`` and the ``warehouse_retries`` counter)."""
        self.retries += 1
        if self._count is not None:
            self._count("warehouse_retries", 1)

    def attempt(self, rows: Sequence[tuple]) -> WriteReport:
        """One try at writing ``rows``; a connection-level error drops the connection and is raised."""
        try:
            conn = self.connect()
            if self._partition_index is not None:
                self._ensure_partitions(conn, rows)
            return self._write_once(conn, rows)
        except TRANSIENT_ERRORS:
            # The transaction either committed (a retry then inserts nothing:
            # ON CONFLICT) or rolled back with the connection.
            self.close()
            raise

    def write(self, rows: Sequence[tuple]) -> WriteReport:
        """Write ``rows``, retrying connection-level errors; raises past the retry budget."""
        if not rows:
            return WriteReport(0, 0, [])
        return self.retry.run(lambda: self.attempt(rows), transient=TRANSIENT_ERRORS, what=self.description,
                              log=_LOG, on_error=self.failed, on_retry=self.retried)

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
        # Through the migrations' create_day_partition (V007), which runs as the
        # schema's owner: the pipeline's own role needs no DDL privilege.
        create = sql.SQL("SELECT {}(%s, %s)").format(sql.Identifier(self.schema, "create_day_partition"))
        try:
            # Its own short transaction: it locks the parent table exclusively.
            with conn.transaction():
                conn.execute(create, [self.spec.table, day])
        except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
            pass  # another worker created it between our check and our CREATE
        except (psycopg.errors.CheckViolation, psycopg.errors.InvalidObjectDefinition):
            # The default partition already holds rows of that day, or another
            # partition covers it: the rows keep going where they go today.
            pass

