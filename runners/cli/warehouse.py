"""Warehouse schema migrations from the command line.

    python -m onboardflow.runners.cli.warehouse migrate [--dsn DSN] [--schema warehouse]
    python -m onboardflow.runners.cli.warehouse status  [--dsn DSN] [--schema warehouse]

``migrate`` applies the pending ``schemas/warehouse/V*.sql`` migrations in
order (each in its own transaction) and is a no-op when everything is applied;
it fails, changing nothing, when an applied migration's file was edited.
``status`` lists every migration with its state and exits 1 unless all are
applied and unchanged, so scripts can gate on it.

The DSN defaults to the local services' settings (PG_HOST, PG_PORT, PG_USER,
PG_PASSWORD, PG_DATABASE, as in runners/services/env.sh); it is never printed,
since it carries the password.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def default_dsn() -> str:
    env = os.environ.get
    return (
        f"postgresql://{env('PG_USER', 'onboardflow')}:{env('PG_PASSWORD', 'onboardflow')}"
        f"@{env('PG_HOST', '127.0.0.1')}:{env('PG_PORT', '5432')}/{env('PG_DATABASE', 'onboardflow')}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onboardflow warehouse", description="Warehouse schema migrations.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("migrate", "apply pending migrations"), ("status", "list migrations and their state")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--dsn", default=None, help="PostgreSQL DSN (default: from PG_* variables)")
        cmd.add_argument("--schema", default=None, help="target schema (default: warehouse)")
        cmd.add_argument("--migrations-dir", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    import psycopg

    from ...transforms.warehouse.migrations import MigrationError, apply_migrations, migration_status
    from ...transforms.warehouse.schema import DEFAULT_SCHEMA

    dsn = args.dsn or default_dsn()
    schema = args.schema or DEFAULT_SCHEMA
    try:
        if args.command == "migrate":
            applied = apply_migrations(dsn, schema, args.migrations_dir)
            if applied:
                for migration in applied:
                    print(f"applied {migration.label}")
            else:
                print(f"schema {schema} is up to date")
            return 0
        states = migration_status(dsn, schema, args.migrations_dir)
    except (MigrationError, ValueError) as exc:
        print(f"onboardflow warehouse: {exc}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        # psycopg's connection messages name host and port, not the password.
        print(f"onboardflow warehouse: cannot reach PostgreSQL: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    for state in states:
        when = f"  {state.applied_at:%Y-%m-%d %H:%M:%S %Z}" if state.applied_at else ""
        print(f"V{state.version:03d}  {state.name:<30} {state.state}{when}")
    return 0 if all(s.state == "applied" for s in states) else 1


if __name__ == "__main__":
    sys.exit(main())
