"""An experiment's exposures and their onboarding outcomes, read from the warehouse for the report.

In: a DSN, schema and experiment name. Out: one ``ExposureOutcome`` per
exposed user: the variant, the first exposure (``served_at``) and when the
user completed onboarding, if they did (epoch ms; None otherwise).

Onboarding completion is the profile's ``tutorial_completed`` milestone
(transforms/score.py) computed from ``events``: the first time the user's
distinct ``tutorial_step`` steps (``properties.step``) reach the largest
``properties.step_total`` they sent, i.e. the occurred_at of the
``step_total``-th distinct step, in event time. It is the generator's ground
truth ``will_complete_onboarding`` (all tutorial steps done) as the
warehouse sees it. Only pseudonyms are read; nothing is written.
"""
from __future__ import annotations

import datetime as dt
from typing import NamedTuple, Optional

from psycopg import sql

from ..connections import warehouse_connect
from .rows import EPOCH
from .schema import DEFAULT_SCHEMA, check_schema

_OUTCOMES = """
WITH exposed AS (
    SELECT user_key, variant, served_at FROM {exposures} WHERE experiment = %(experiment)s
), steps AS (
    SELECT e.user_key, e.properties->>'step' AS step, min(e.occurred_at) AS first_at,
           max(CASE WHEN e.properties->>'step_total' ~ '^[0-9]{{1,6}}$'
                    THEN (e.properties->>'step_total')::int END) AS total
    FROM {events} AS e JOIN exposed USING (user_key)
    WHERE e.event_type = 'tutorial_step' AND e.properties ? 'step'
    GROUP BY e.user_key, e.properties->>'step'
), ranked AS (
    SELECT user_key, first_at, row_number() OVER (PARTITION BY user_key ORDER BY first_at) AS n,
           max(total) OVER (PARTITION BY user_key) AS total
    FROM steps
), completed AS (
    SELECT user_key, first_at AS completed_at FROM ranked WHERE total > 0 AND n = total
)
SELECT exposed.variant, exposed.served_at, completed.completed_at
FROM exposed LEFT JOIN completed USING (user_key)
"""


class ExposureOutcome(NamedTuple):
    variant: str
    served_at: int  # epoch ms, the first exposure
    completed_at: Optional[int]  # epoch ms of onboarding completion (event time); None: not completed


def _ms(value: Optional[dt.datetime]) -> Optional[int]:
    return None if value is None else (value - EPOCH) // dt.timedelta(milliseconds=1)


def read_outcomes(dsn: str, experiment: str, schema: str = DEFAULT_SCHEMA) -> list[ExposureOutcome]:
    """Every exposed user of ``experiment`` with their completion time (module docstring)."""
    schema = check_schema(schema)
    query = sql.SQL(_OUTCOMES).format(exposures=sql.Identifier(schema, "experiment_exposures"),
                                      events=sql.Identifier(schema, "events"))
    with warehouse_connect(dsn, autocommit=True, application_name="onboardflow-experiments") as conn:
        rows = conn.execute(query, {"experiment": experiment}).fetchall()
    return [ExposureOutcome(variant, _ms(served_at), _ms(completed_at)) for variant, served_at, completed_at in rows]


def exposure_counts(dsn: str, schema: str = DEFAULT_SCHEMA) -> dict[str, dict[str, int]]:
    """``{experiment: {variant: exposed users}}`` of every experiment with exposures."""
    query = sql.SQL("SELECT experiment, variant, count(*) FROM {} GROUP BY experiment, variant").format(
        sql.Identifier(check_schema(schema), "experiment_exposures"))
    with warehouse_connect(dsn, autocommit=True, application_name="onboardflow-experiments") as conn:
        rows = conn.execute(query).fetchall()
    counts: dict[str, dict[str, int]] = {}
    for experiment, variant, n in rows:
        counts.setdefault(experiment, {})[variant] = n
    return counts
