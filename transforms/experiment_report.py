"""An experiment's report: per-variant onboarding completion, the difference against control, the sample ratio.

In: the declared ``Experiment`` (transforms/experiments.py), one
``ExposureOutcome`` per exposed user (transforms/warehouse/experiments.py:
variant, first exposure, onboarding completion), the window ``days`` and
the report's time ``as_of_ms``. Out: ``ExperimentReport`` (``to_dict()`` is
the ``--json`` output of `onboardflow experiments report`). Pure: no I/O.

* **Analysed users**: exposed users whose window is over (``served_at + days
  <= as_of``); users exposed more recently are counted as exposed only, as
  their completion is not known yet.
* **Completion**: completed onboarding by ``served_at + days`` (a user who
  had completed before the exposure counts as completed: assignment does not
  depend on it, so such users fall in every arm alike). The rate's interval
  is Wilson's score interval.
* **Time to activation**: from the first exposure to completion, among those
  who completed in the window (0 for a completion before the exposure); the
  median, in hours.
* **Difference against control**: treatment rate minus control rate, with
  Newcombe's hybrid score interval (method 10 of Newcombe 1998, built from
  the two Wilson intervals: better coverage than Wald's at small counts and
  rates near 0 or 1), and the two-sided p-value of the pooled two-proportion
  z-test.
* **Sample ratio mismatch**: a chi-square test of every exposed user's
  variant against the declared weights; flagged when p < 0.001 (then the
  assignment or the exposure logging is broken, and the differences are not
  to be trusted). Exposures of variants the file no longer declares are
  listed apart and left out of the test.

Reasoning: docs/experiments.md.

>>> from onboardflow.transforms.experiments import ExperimentSet
>>> from onboardflow.transforms.warehouse.experiments import ExposureOutcome
>>> experiment = ExperimentSet.from_dict({"version": "1", "experiments": [{"name": "e", "salt": "s",
...     "status": "running", "start": "2026-01-01T00:00:00Z",
...     "variants": [{"name": "control", "weight": 0.5}, {"name": "checklist", "weight": 0.5}]}]})["e"]
>>> DAY = 86_400_000
>>> outcomes = ([ExposureOutcome("control", 0, DAY if i < 40 else None) for i in range(100)]
...             + [ExposureOutcome("checklist", 0, 2 * DAY if i < 55 else None) for i in range(100)])
>>> report = build_report(experiment, outcomes, days=14, as_of_ms=30 * DAY)
>>> [(v.variant, v.analysed, v.completed, v.median_hours_to_activation) for v in report.variants]
[('control', 100, 40, 24.0), ('checklist', 100, 55, 48.0)]
>>> c = report.comparisons[0]
>>> c.variant, round(c.difference, 3), round(c.ci_low, 3), round(c.ci_high, 3)
('checklist', 0.15, 0.012, 0.28)
>>> report.srm_p_value, report.srm_flagged
(1.0, False)
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from scipy import stats

from .experiments import Experiment
from .warehouse.experiments import ExposureOutcome

Z_95 = statistics.NormalDist().inv_cdf(0.975)
SRM_ALPHA = 0.001
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson's score interval for a proportion; (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: int, n1: int, k0: int, n0: int, z: float = Z_95) -> tuple[float, float, float]:
    """``(p1 - p0, low, high)``: the difference of two proportions with Newcombe's hybrid score interval."""
    p1, p0 = (k1 / n1 if n1 else 0.0), (k0 / n0 if n0 else 0.0)
    l1, u1 = wilson_interval(k1, n1, z)
    l0, u0 = wilson_interval(k0, n0, z)
    d = p1 - p0
    return d, d - math.sqrt((p1 - l1) ** 2 + (u0 - p0) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p0 - l0) ** 2)


def two_proportion_p_value(k1: int, n1: int, k0: int, n0: int) -> Optional[float]:
    """Two-sided p-value of the pooled two-proportion z-test; None when it is undefined."""
    if not n1 or not n0:
        return None
    pooled = (k1 + k0) / (n1 + n0)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n0))
    if se == 0:
        return None
    return 2 * statistics.NormalDist().cdf(-abs((k1 / n1 - k0 / n0) / se))


def sample_ratio_test(counts: dict[str, int], weights: dict[str, float]) -> tuple[float, float]:
    """``(chi2, p)`` of the observed counts against the declared weights (the variants of ``weights``)."""
    observed = [counts.get(name, 0) for name in weights]
    total = sum(observed)
    if total == 0:
        return 0.0, 1.0
    result = stats.chisquare(observed, [total * w for w in weights.values()])
    return float(result.statistic), float(result.pvalue)


@dataclass(frozen=True)
class VariantResult:
    variant: str
    weight: float
    exposed: int
    analysed: int  # exposed users whose window is over
    completed: int
    completion_rate: Optional[float]
    rate_ci_low: float
    rate_ci_high: float
    median_hours_to_activation: Optional[float]


@dataclass(frozen=True)
class Comparison:
    variant: str
    control: str
    difference: float  # completion rate of variant minus control's
    ci_low: float
    ci_high: float
    p_value: Optional[float]
    method: str = "newcombe_hybrid_score"


@dataclass(frozen=True)
class ExperimentReport:
    experiment: str
    control: str
    days: float
    as_of_ms: int
    variants: list[VariantResult]
    comparisons: list[Comparison]
    srm_chi2: float
    srm_p_value: float
    srm_flagged: bool
    undeclared: dict[str, int] = field(default_factory=dict)
    confidence: float = 0.95
    srm_alpha: float = SRM_ALPHA

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _variant_result(name: str, weight: float, outcomes: list[ExposureOutcome], window_ms: int,
                    as_of_ms: int) -> VariantResult:
    analysed = [o for o in outcomes if o.served_at + window_ms <= as_of_ms]
    completed = [o for o in analysed if o.completed_at is not None and o.completed_at <= o.served_at + window_ms]
    low, high = wilson_interval(len(completed), len(analysed))
    hours = [max(0, o.completed_at - o.served_at) / HOUR_MS for o in completed]
    return VariantResult(name, weight, len(outcomes), len(analysed), len(completed),
                         len(completed) / len(analysed) if analysed else None, low, high,
                         statistics.median(hours) if hours else None)


def build_report(experiment: Experiment, outcomes: Iterable[ExposureOutcome], days: float,
                 as_of_ms: int) -> ExperimentReport:
    """The report (module docstring) of ``experiment`` over its exposed users' ``outcomes``."""
    if days <= 0:
        raise ValueError("days must be positive")
    window_ms = int(days * DAY_MS)
    by_variant: dict[str, list[ExposureOutcome]] = {}
    for outcome in outcomes:
        by_variant.setdefault(outcome.variant, []).append(outcome)
    weights = experiment.weights
    results = [_variant_result(name, weight, by_variant.get(name, []), window_ms, as_of_ms)
               for name, weight in weights.items()]
    control = next(r for r in results if r.variant == experiment.control)
    comparisons = []
    for r in results:
        if r.variant == control.variant:
            continue
        d, low, high = newcombe_interval(r.completed, r.analysed, control.completed, control.analysed)
        comparisons.append(Comparison(r.variant, control.variant, d, low, high,
                                      two_proportion_p_value(r.completed, r.analysed, control.completed,
                                                             control.analysed)))
    chi2, p = sample_ratio_test({r.variant: r.exposed for r in results}, weights)
    undeclared = {name: len(rows) for name, rows in sorted(by_variant.items()) if name not in weights}
    return ExperimentReport(experiment.name, experiment.control, days, as_of_ms, results, comparisons, chi2, p,
                            p < SRM_ALPHA, undeclared)
