"""``AssignExperiments``: the Beam step that writes each profile's experiment variants into it.

In: profile dicts after the onboarding track (``AssignOnboardingTracks``) or,
with the online models off, after the rule segments. Out: the same dicts with
``experiments`` (``{experiment: variant}``) set by the compiled
``ExperimentSet`` (transforms/experiments.py ``with_experiments``): every
experiment running at the profile's ``as_of`` that its segments and track
make it eligible for; a profile without a track is judged with the track
policy's choice, as the decisions API would serve it. Each assignment is
counted as ``onboardflow:experiment_<experiment>_<variant>`` (profile writes,
not users). Nothing is rejected. Both files are loaded and validated on the
driver, so a bad file fails pipeline construction. Reasoning:
docs/experiments.md "The profile's experiments".
"""
from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...models.tracks import TrackPolicy
from ...transforms.experiments import EXPERIMENTS_FIELD, ExperimentSet

METRICS_NAMESPACE = "onboardflow"


class _AssignExperimentsFn(beam.DoFn):
    def __init__(self, experiments: ExperimentSet, policy: TrackPolicy) -> None:
        self._experiments = experiments
        self._policy = policy
        self._counters: dict[tuple[str, str], Any] = {}

    def setup(self) -> None:
        self._counters = {(e.name, v.name): Metrics.counter(METRICS_NAMESPACE, f"experiment_{e.name}_{v.name}")
                          for e in self._experiments for v in e.variants}

    def process(self, profile):
        updated = self._experiments.with_experiments(profile, self._policy.choose)
        for assignment in updated[EXPERIMENTS_FIELD].items():
            self._counters[assignment].inc()
        yield updated


class AssignExperiments(beam.PTransform):
    """Profiles -> the same profiles with ``experiments`` set (module docstring).

    ``experiments``: the compiled experiments file; ``policy``: the tracks
    policy that stands in for a profile's missing ``onboarding_track``.
    """

    def __init__(self, experiments: ExperimentSet, policy: TrackPolicy, label=None) -> None:
        super().__init__(label)
        self.experiments = experiments
        self._fn = _AssignExperimentsFn(experiments, policy)

    def expand(self, profiles):
        return profiles | "AssignVariants" >> beam.ParDo(self._fn)
