"""The account reference table: read for the enrichment side input, upserted from a CRM export or the demo.

In: a DSN and schema (and account dicts to upsert). Out:
``{account_id: {"plan", "account_tier", "industry", "company_size", "updated_at"}}``
or the number of rows written.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Any

from psycopg import sql

from ..connections import warehouse_connect
from .rows import EPOCH
from .schema import DEFAULT_SCHEMA, check_schema


def read_accounts(dsn: str, schema: str = DEFAULT_SCHEMA) -> dict[str, dict[str, Any]]:
    """The account reference table for the enrichment side input.

    ``{account_id: {"plan", "account_tier", "industry", "company_size", "updated_at"}}``;
    ``account_tier`` is the table's ``tier`` under the profile's field name,
    ``updated_at`` is epoch milliseconds.
    """
    query = sql.SQL(
        "SELECT account_id, plan, tier, industry, company_size, updated_at FROM {}"
    ).format(sql.Identifier(check_schema(schema), "accounts"))
    with warehouse_connect(dsn, autocommit=True, application_name="onboardflow-accounts") as conn:
        rows = conn.execute(query).fetchall()
    return {
        account_id: {
            "plan": plan,
            "account_tier": tier,
            "industry": industry,
            "company_size": company_size,
            "updated_at": (updated_at - EPOCH) // dt.timedelta(milliseconds=1),
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
    ).format(sql.Identifier(check_schema(schema), "accounts"))
    with warehouse_connect(dsn, application_name="onboardflow-accounts") as conn:
        with conn.cursor() as cur:
            cur.executemany(query, rows)
    return len(rows)

