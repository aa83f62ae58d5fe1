"""The experiment report's statistics (transforms/experiment_report.py) and the generator's simulated effect.

Intervals are checked against the published values of Newcombe (1998),
"Interval estimation for the difference between independent proportions"
(Statistics in Medicine 17, 873-890), Table II, method 10, and "Two-sided
confidence intervals for the single proportion" (same volume, 857-872),
Table I, method 3 (Wilson).
"""
from __future__ import annotations

import doctest
import json

import pytest

from onboardflow.runners.cli.experiments import format_report
from onboardflow.runners.sim.generator import GeneratorConfig, JourneyGenerator, TreatmentEffect
from onboardflow.transforms import experiment_report
from onboardflow.transforms.experiment_report import (
    build_report,
    newcombe_interval,
    sample_ratio_test,
    two_proportion_p_value,
    wilson_interval,
)
from onboardflow.transforms.experiments import ExperimentSet
from onboardflow.transforms.warehouse.experiments import ExposureOutcome

DAY = 86_400_000


@pytest.fixture(scope="module")
def experiment():
    return ExperimentSet.from_dict({"version": "1", "experiments": [{
        "name": "ab", "salt": "ab-unit", "status": "running", "start": "2026-01-01T00:00:00Z", "control": "control",
        "variants": [{"name": "control", "weight": 0.5}, {"name": "treatment", "weight": 0.5}]}]})["ab"]


def test_the_module_examples_run():
    assert doctest.testmod(experiment_report).failed == 0


@pytest.mark.parametrize("k,n,low,high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                                          (1, 29, 0.0061, 0.1718)])
def test_wilson_intervals_match_newcombes_table(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=5e-5)


@pytest.mark.parametrize("k1,n1,k0,n0,low,high", [(56, 70, 48, 80, 0.0524, 0.3339), (9, 10, 3, 10, 0.1705, 0.8090),
                                                  (6, 7, 2, 7, 0.0582, 0.8062), (5, 56, 0, 29, -0.0381, 0.1926)])
def test_newcombe_intervals_match_newcombes_table(k1, n1, k0, n0, low, high):
    d, lo, hi = newcombe_interval(k1, n1, k0, n0)
    assert d == pytest.approx(k1 / n1 - k0 / n0)
    assert (lo, hi) == pytest.approx((low, high), abs=5e-5)


def test_the_z_test_and_the_sample_ratio_test():
    assert two_proportion_p_value(50, 100, 50, 100) == pytest.approx(1.0)
    assert two_proportion_p_value(60, 100, 40, 100) == pytest.approx(0.0047, abs=1e-4)
    assert two_proportion_p_value(0, 100, 0, 100) is None
    chi2, p = sample_ratio_test({"a": 5000, "b": 5000}, {"a": 0.5, "b": 0.5})
    assert (chi2, p) == (0.0, 1.0)
    chi2, p = sample_ratio_test({"a": 5200, "b": 4800}, {"a": 0.5, "b": 0.5})
    assert chi2 == pytest.approx(16.0) and p < 0.001
    assert sample_ratio_test({"a": 2000, "b": 8000}, {"a": 0.2, "b": 0.8})[1] == pytest.approx(1.0)


def test_users_whose_window_is_not_over_are_exposed_but_not_analysed(experiment):
    as_of = 30 * DAY
    outcomes = [ExposureOutcome("control", 0, 2 * DAY), ExposureOutcome("control", 20 * DAY, 21 * DAY),
                ExposureOutcome("treatment", 0, None), ExposureOutcome("treatment", 0, 20 * DAY)]  # after 14 days
    report = build_report(experiment, outcomes, days=14, as_of_ms=as_of)
    control, treatment = report.variants
    assert (control.exposed, control.analysed, control.completed) == (2, 1, 1)
    assert (treatment.exposed, treatment.analysed, treatment.completed) == (2, 2, 0)
    assert control.median_hours_to_activation == 48.0 and treatment.median_hours_to_activation is None


def test_a_completion_before_the_exposure_counts_with_no_time_to_activation(experiment):
    report = build_report(experiment, [ExposureOutcome("control", 5 * DAY, 1 * DAY)], days=14, as_of_ms=60 * DAY)
    assert report.variants[0].completed == 1 and report.variants[0].median_hours_to_activation == 0.0


def test_a_sample_ratio_mismatch_is_flagged_and_undeclared_variants_are_set_apart(experiment):
    outcomes = ([ExposureOutcome("control", 0, None)] * 1000 + [ExposureOutcome("treatment", 0, None)] * 850
                + [ExposureOutcome("retired_arm", 0, None)] * 7)
    report = build_report(experiment, outcomes, days=14, as_of_ms=60 * DAY)
    assert report.srm_flagged and report.srm_p_value < 0.001
    assert report.undeclared == {"retired_arm": 7}
    text = format_report(report)
    assert "MISMATCH" in text and "retired_arm" in text and "Newcombe" in text


def test_no_exposures_give_an_empty_report_not_an_error(experiment):
    report = build_report(experiment, [], days=14, as_of_ms=DAY)
    assert [v.exposed for v in report.variants] == [0, 0] and not report.srm_flagged
    assert report.variants[0].completion_rate is None and report.comparisons[0].p_value is None


def test_the_simulated_effect_changes_only_the_treatment_arms_completion(experiment):
    config = GeneratorConfig(users=3000, seed=11)
    plain = list(JourneyGenerator(config).users())
    effect = TreatmentEffect(experiment, "treatment", 0.2, b"unit-test-secret-0123456789")
    treated = list(JourneyGenerator(GeneratorConfig(users=3000, seed=11, treatment=effect)).users())
    arms = [effect.treated(u.user_id) for u in plain]
    assert 1350 < sum(arms) < 1650
    for before, after, in_treatment in zip(plain, treated, arms):
        if not in_treatment:
            assert after == before
        else:
            assert after.persona == before.persona and after.signup_ms == before.signup_ms
            assert after.will_complete_onboarding >= before.will_complete_onboarding  # the same draw, a higher bar
    gained = sum(a.will_complete_onboarding and not b.will_complete_onboarding for a, b in zip(treated, plain))
    expected = JourneyGenerator(GeneratorConfig(users=3000, seed=11, treatment=effect)).expected_lift()
    assert 0.1 < expected < 0.2
    assert gained / sum(arms) == pytest.approx(expected, abs=0.03)


def test_a_treatment_must_name_one_of_the_experiments_variants(experiment):
    with pytest.raises(ValueError, match="not one of"):
        TreatmentEffect(experiment, "nope", 0.05, b"s")
    with pytest.raises(ValueError, match="at least 16"):
        TreatmentEffect(experiment, "treatment", 0.05, b"short")


def test_experiments_list_shows_the_declared_experiments_even_without_a_warehouse(capsys):
    from onboardflow.runners.cli import main as cli_main

    unreachable = "postgresql://nobody:x@127.0.0.1:8949/none?connect_timeout=2"
    assert cli_main(["experiments", "list", "--json", "--warehouse-dsn", unreachable]) == 0
    listed = capsys.readouterr()
    body = json.loads(listed.out)
    assert {e["name"] for e in body["experiments"]} == {e.name for e in ExperimentSet.load()}
    assert all(e["exposed"] is None for e in body["experiments"]) and "exposures unavailable" in listed.err
    assert cli_main(["experiments", "report", "no_such_experiment", "--warehouse-dsn", unreachable]) == 2
