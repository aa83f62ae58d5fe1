"""What the migrations grant the pipeline's and the readers' roles (docs/security.md)."""
import re

from onboardflow.transforms.warehouse.migrations import PIPELINE_WRITES, WarehouseRoles, discover_migrations


def _grants(roles: WarehouseRoles) -> list[str]:
    return [s.as_string(None) for s in roles.statements("wh")]


def test_every_table_the_pipeline_may_write_is_one_the_migrations_create_and_keep():
    ddl = "\n".join(m.sql for m in discover_migrations())
    created = set(re.findall(r"CREATE TABLE (\w+)", ddl)) - set(re.findall(r"DROP TABLE IF EXISTS (\w+)", ddl))
    assert set(PIPELINE_WRITES) <= created
    assert "accounts" not in PIPELINE_WRITES  # reference data: the owner loads it, the pipeline reads it


def test_the_pipeline_role_gets_writes_and_the_partition_function_but_no_ddl_or_delete():
    grants = _grants(WarehouseRoles(pipeline="pipe"))
    assert all(g.endswith('TO "pipe"') for g in grants)
    text = " ".join(grants)
    assert "INSERT, UPDATE ON" in text and '"wh"."create_day_partition"(text, date)' in text
    for never in ("CREATE ON", "DELETE", "TRUNCATE", "ALL PRIVILEGES", "REFERENCES", "TRIGGER"):
        assert never not in text


def test_the_reader_role_gets_select_only_also_on_later_tables():
    grants = _grants(WarehouseRoles(reader="analyst"))
    assert grants == ['GRANT USAGE ON SCHEMA "wh" TO "analyst"',
                      'GRANT SELECT ON ALL TABLES IN SCHEMA "wh" TO "analyst"',
                      'ALTER DEFAULT PRIVILEGES IN SCHEMA "wh" GRANT SELECT ON TABLES TO "analyst"']
    assert _grants(WarehouseRoles()) == []
