"""Versioned warehouse DDL: discover the migration files, apply the pending ones, report their state.

In: ``schemas/warehouse/V<number>__<name>.sql`` files and a database. Out:
the migrations applied now (``apply_migrations``) or every migration with its
state (``migration_status``). Each migration runs in its own transaction and
is recorded with its SHA-256 in ``schema_migrations``. Re-running is a no-op;
an applied migration whose file changed is an error (add a new migration
instead), as is a new one that sorts before one already applied.

Roles (``WarehouseRoles``, docs/security.md): the role that applies the
migrations owns the schema; ``apply_migrations`` grants the pipeline's role
what it writes and the readers' role SELECT, idempotently, on every run. A
role that may not change the schema (the pipeline's) applies nothing: it
checks that nothing is pending.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psycopg
from psycopg import sql

from ..connections import warehouse_connect
from .schema import DEFAULT_SCHEMA, check_schema

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "schemas" / "warehouse"
_MIGRATION_FILE_RE = re.compile(r"^V(\d+)__([A-Za-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The migrations on disk and those applied to the database disagree."""


#: The tables the pipeline inserts into and updates (warehouse sinks, outbox
#: relays, the model registry and its retention, and the API's experiment
#: exposures where it runs as the pipeline's role); every other table it only reads.
PIPELINE_WRITES = ("events", "late_events", "profile_snapshots", "segment_changes", "dead_letters",
                   "drift_events", "model_versions", "model_pointers", "model_events", "experiment_exposures",
                   "identity_aliases")


@dataclass(frozen=True)
class WarehouseRoles:
    """The roles besides the migrating one, and what ``apply_migrations`` grants them (None: not granted).

    ``pipeline``: USAGE on the schema, SELECT on every table, INSERT and UPDATE
    on ``PIPELINE_WRITES``, its sequences, and EXECUTE on
    ``create_day_partition`` (V007): no DDL. ``reader``: USAGE and SELECT only,
    also on tables later migrations create (default privileges).
    """

    pipeline: Optional[str] = None
    reader: Optional[str] = None

    def statements(self, schema: str) -> list[sql.Composed]:
        s = sql.Identifier(schema)
        out = []
        if self.pipeline:
            p = sql.Identifier(self.pipeline)
            writes = sql.SQL(", ").join(sql.Identifier(schema, t) for t in PIPELINE_WRITES)
            out += [
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, p),
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, p),
                sql.SQL("GRANT INSERT, UPDATE ON {} TO {}").format(writes, p),
                sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {} TO {}").format(s, p),
                sql.SQL("GRANT EXECUTE ON FUNCTION {}(text, date) TO {}").format(
                    sql.Identifier(schema, "create_day_partition"), p),
            ]
        if self.reader:
            r = sql.Identifier(self.reader)
            out += [
                sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(s, r),
                sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(s, r),
                sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA {} GRANT SELECT ON TABLES TO {}").format(s, r),
            ]
        return out


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


_MAY_CHANGE_SCHEMA = """
SELECT CASE WHEN n.oid IS NULL THEN has_database_privilege(current_database(), 'CREATE')
            ELSE has_schema_privilege(n.oid, 'CREATE') END
FROM (SELECT %s::text AS name) AS wanted LEFT JOIN pg_namespace n ON n.nspname = wanted.name
"""


def apply_migrations(
    dsn: str, schema: str = DEFAULT_SCHEMA, migrations_dir: Optional[Path] = None,
    roles: Optional[WarehouseRoles] = None,
) -> list[Migration]:
    """Apply pending migrations to ``schema`` in order, then grant ``roles``; return the migrations applied now.

    Each migration runs in its own transaction with ``search_path`` set to
    ``schema`` and is recorded in ``schema_migrations``. Concurrent callers
    serialize on an advisory lock, so two workers starting at once apply each
    migration once. Raises ``MigrationError`` when an applied migration changed
    on disk or vanished, or a new one sorts before an applied one. Connected
    as a role without CREATE on the schema (the pipeline's), nothing is
    applied: ``MigrationError`` names the pending migrations, if any.
    """
    check_schema(schema)
    migrations = discover_migrations(migrations_dir)
    ident = sql.Identifier(schema)
    with warehouse_connect(dsn, autocommit=True, application_name="onboardflow-migrate") as conn:
        if not conn.execute(_MAY_CHANGE_SCHEMA, [schema]).fetchone()[0]:
            pending = _verify(migrations, _applied(conn, schema))
            if pending or roles is not None:
                raise MigrationError(
                    f"role {conn.info.user} may not change schema {schema}"
                    + (f" and migrations {', '.join(m.label for m in pending)} are pending" if pending else "")
                    + ": run `onboardflow warehouse migrate` as the owner role (docs/security.md)")
            return []
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
            for statement in (roles.statements(schema) if roles is not None else []):
                conn.execute(statement)
            return pending
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", [_lock_id(schema)])


def migration_status(
    dsn: str, schema: str = DEFAULT_SCHEMA, migrations_dir: Optional[Path] = None
) -> list[MigrationState]:
    """Every migration on disk or in the database, with its state; changes nothing."""
    check_schema(schema)
    migrations = {m.version: m for m in discover_migrations(migrations_dir)}
    with warehouse_connect(dsn, autocommit=True, application_name="onboardflow-migrate") as conn:
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

