"""Warehouse schema migrations from the command line.

    onboardflow warehouse migrate [--warehouse-dsn DSN] [--warehouse-schema SCHEMA]
    onboardflow warehouse status  [--warehouse-dsn DSN] [--warehouse-schema SCHEMA]

``migrate`` applies the pending ``schemas/warehouse/V*.sql`` migrations in
order (each in its own transaction) and is a no-op when everything is applied;
it fails, changing nothing, when an applied migration's file was edited.
``status`` lists every migration with its state and exits 1 unless all are
applied and unchanged, so scripts can gate on it.

The DSN and schema default to the deployment's (runners/settings.py): the
owner's (``OBF_WAREHOUSE_OWNER_DSN``) when set, else ``OBF_WAREHOUSE_DSN``;
the DSN is never printed, since it may carry the password. ``migrate`` also
grants the pipeline's and the readers' roles (``OBF_WAREHOUSE_PIPELINE_ROLE``,
``OBF_WAREHOUSE_READER_ROLE``, or ``--pipeline-role``/``--reader-role``)
what they may do (docs/security.md).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onboardflow warehouse", description="Warehouse schema migrations.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("migrate", "apply pending migrations"), ("status", "list migrations and their state")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("--warehouse-dsn", default=None,
                         help="PostgreSQL DSN (default: the deployment's, OBF_WAREHOUSE_DSN)")
        cmd.add_argument("--warehouse-schema", default=None,
                         help="target schema (default: the deployment's, OBF_WAREHOUSE_SCHEMA)")
        cmd.add_argument("--migrations-dir", default=None, help=argparse.SUPPRESS)
        if name == "migrate":
            cmd.add_argument("--pipeline-role", default=None,
                             help="grant this role the pipeline's writes (default: OBF_WAREHOUSE_PIPELINE_ROLE)")
            cmd.add_argument("--reader-role", default=None,
                             help="grant this role SELECT (default: OBF_WAREHOUSE_READER_ROLE)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from ...transforms.warehouse.migrations import (
        MigrationError,
        WarehouseRoles,
        apply_migrations,
        migration_status,
    )
    from ..settings import settings

    dsn = args.warehouse_dsn or settings().warehouse_owner_dsn or settings().warehouse_dsn
    schema = args.warehouse_schema or settings().warehouse_schema
    try:
        if args.command == "migrate":
            roles = WarehouseRoles(args.pipeline_role or settings().warehouse_pipeline_role,
                                   args.reader_role or settings().warehouse_reader_role)
            applied = apply_migrations(dsn, schema, args.migrations_dir,
                                       roles if roles.pipeline or roles.reader else None)
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
    for state in states:
        when = f"  {state.applied_at:%Y-%m-%d %H:%M:%S %Z}" if state.applied_at else ""
        print(f"V{state.version:03d}  {state.name:<30} {state.state}{when}")
    return 0 if all(s.state == "applied" for s in states) else 1


if __name__ == "__main__":
    sys.exit(main())
