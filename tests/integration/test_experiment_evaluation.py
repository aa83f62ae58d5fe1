"""The experiment report recovers a simulated lift and finds none where there is none (issue 20, item 4).

The generator simulates 8,000 users with a +5 percentage-point effect on
onboarding completion for the ``treatment`` arm of experiment ``ab``, each
user's arm being the core's assignment of the pseudonym the pipeline gives
them (``TreatmentEffect``). A second experiment, ``aa``, splits the same
users with another salt and no effect of its own: an A/A test.

What reaches the warehouse is what the pipeline and the API would write,
through the project's own code, without running the streaming job (its
profiles play no part in the report): every journey's ``tutorial_step``
events, anonymized by the anonymization stage (``EventAnonymizer``) and
written by the warehouse writer (``EVENTS``), the only events the
completion query reads; and one exposure per experiment for each user who
gets a personalized decision (personalization consent), at signup, written
by the writer the API uses (``EXPERIMENT_EXPOSURES``). Then `onboardflow
experiments report` runs as a user runs it, with a window covering the
whole simulated horizon, so the warehouse's completion is the generator's
ground truth exactly.
"""
from __future__ import annotations

import json

import psycopg
import pytest
from psycopg import sql

from onboardflow.runners.cli import main as cli_main
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator, TreatmentEffect
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.anonymize import EventAnonymizer, Pseudonymizer
from onboardflow.transforms.experiments import ExperimentSet
from onboardflow.transforms.warehouse.migrations import apply_migrations
from onboardflow.transforms.warehouse.rows import EVENTS, EXPERIMENT_EXPOSURES
from onboardflow.transforms.warehouse.writer import WarehouseWriter

pytestmark = pytest.mark.integration

SECRET = b"i20exp-evaluation-secret-0123456789"
USERS = 8_000
LIFT = 0.05
EXPERIMENTS_YAML = """
version: "eval-1"
experiments:
  - name: ab
    salt: "ab-eval-2026"
    status: running
    start: 2026-01-01T00:00:00Z
    variants: [{name: control, weight: 0.5}, {name: treatment, weight: 0.5}]
  - name: aa
    salt: "aa-eval-2026"
    status: running
    start: 2026-01-01T00:00:00Z
    variants: [{name: a1, weight: 0.5}, {name: a2, weight: 0.5}]
"""


@pytest.fixture(scope="module")
def simulated(pg_dsn, tmp_path_factory):
    """The warehouse after the simulated experiment; yields (dir, schema, generator, experiments, truth)."""
    import uuid

    schema = f"i20exp_eval_{uuid.uuid4().hex[:8]}"
    apply_migrations(pg_dsn, schema)
    folder = tmp_path_factory.mktemp("experiments")
    (folder / "experiments.yaml").write_text(EXPERIMENTS_YAML, encoding="utf-8")
    experiments = ExperimentSet.load(folder / "experiments.yaml")
    generator = JourneyGenerator(GeneratorConfig(
        users=USERS, seed=2020, treatment=TreatmentEffect(experiments["ab"], "treatment", LIFT, SECRET)))
    anonymizer, pseudonymizer = EventAnonymizer(Pseudonymizer(SECRET)), Pseudonymizer(SECRET)
    events, exposures = WarehouseWriter(pg_dsn, EVENTS, schema), WarehouseWriter(pg_dsn, EXPERIMENT_EXPOSURES, schema)
    truth: dict[str, dict[str, list[bool]]] = {"ab": {}, "aa": {}}  # experiment -> variant -> completions
    event_rows, exposure_rows = [], []
    try:
        for user in generator.users():
            for event in generator.journey(user):
                if event["event_type"] == "tutorial_step":
                    routed = anonymizer.anonymize(event)
                    if routed.record is not None:
                        event_rows.append(EVENTS.to_row(routed.record))
            if user.consent["personalization"]:  # only they get personalized decisions, hence exposures
                key = pseudonymizer.user_key(user.user_id)
                for experiment in experiments:
                    variant = experiment.variant(key)
                    exposure_rows.append(EXPERIMENT_EXPOSURES.to_row(
                        {"experiment": experiment.name, "user_key": key, "variant": variant,
                         "served_at": user.signup_ms}))
                    truth[experiment.name].setdefault(variant, []).append(user.will_complete_onboarding)
            if len(event_rows) >= 5000:
                events.write(event_rows)
                event_rows = []
        events.write(event_rows)
        for start in range(0, len(exposure_rows), 5000):
            exposures.write(exposure_rows[start:start + 5000])
    finally:
        events.close()
        exposures.close()
    yield folder, schema, generator, experiments, truth
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def report(capsys, simulated, pg_dsn, name: str) -> tuple[int, dict]:
    folder, schema, generator, _, _ = simulated
    as_of = generator.start_ms + int((generator.config.signup_window_days + generator.config.horizon_days + 1) * DAY_MS)
    status = cli_main(["experiments", "report", name, "--json", "--days", str(generator.config.horizon_days),
                       "--as-of", _iso(as_of), "--experiments-file", str(folder / "experiments.yaml"),
                       "--warehouse-dsn", pg_dsn, "--warehouse-schema", schema,
                       "--plot", str(folder / f"{name}.png")])
    return status, json.loads(capsys.readouterr().out)


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_report_recovers_a_simulated_five_point_lift_within_its_interval(capsys, simulated, pg_dsn):
    folder, _, generator, _, truth = simulated
    status, body = report(capsys, simulated, pg_dsn, "ab")
    print("ab report:", json.dumps(body))  # the figures, for the record (-s)
    assert status == 0 and not body["srm_flagged"] and body["srm_p_value"] > 0.001
    by_variant = {v["variant"]: v for v in body["variants"]}
    # The warehouse's completion is the ground truth's, user for user in total.
    for variant, completions in truth["ab"].items():
        assert by_variant[variant]["analysed"] == by_variant[variant]["exposed"] == len(completions)
        assert by_variant[variant]["completed"] == sum(completions)
    (comparison,) = body["comparisons"]
    expected = generator.expected_lift()
    assert 0.045 < expected <= LIFT
    assert comparison["variant"] == "treatment" and comparison["method"] == "newcombe_hybrid_score"
    assert comparison["ci_low"] <= expected <= comparison["ci_high"]
    assert comparison["ci_low"] > 0, "with 8,000 users the interval should exclude no effect"
    assert by_variant["treatment"]["median_hours_to_activation"] > 0
    assert (folder / "ab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_aa_split_of_the_same_users_shows_no_lift_and_no_sample_ratio_mismatch(capsys, simulated, pg_dsn):
    status, body = report(capsys, simulated, pg_dsn, "aa")
    print("aa report:", json.dumps(body))
    (comparison,) = body["comparisons"]
    assert comparison["ci_low"] <= 0 <= comparison["ci_high"]
    assert status == 0 and not body["srm_flagged"] and body["srm_p_value"] > 0.001


def test_lost_exposures_in_one_arm_are_flagged_as_a_sample_ratio_mismatch(capsys, simulated, pg_dsn):
    _, schema, _, _, _ = simulated
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # an eighth of the a2 arm's exposures never logged
        conn.execute(sql.SQL("DELETE FROM {} WHERE experiment = 'aa' AND variant = 'a2' AND user_key LIKE '0%%' "
                             "OR experiment = 'aa' AND variant = 'a2' AND user_key LIKE '1%%'").format(
            sql.Identifier(schema, "experiment_exposures")))
    status, body = report(capsys, simulated, pg_dsn, "aa")
    print("aa report with lost exposures:", json.dumps(body))
    assert status == 1 and body["srm_flagged"] and body["srm_p_value"] < 0.001
