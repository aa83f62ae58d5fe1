"""``AssignOnboardingTracks``: the Beam step that applies the tracks policy to every profile.

In: profile dicts after rule segments (``segments``, set by
``AssignRuleSegments``, which only ever emits dicts) and, when the online
models run, ``cluster_id`` / ``segment_label`` / ``propensity``. Out: the same
dicts with ``onboarding_track`` set by the compiled ``TrackPolicy``
(``models/tracks.py``), counted per track as
``onboardflow:onboarding_track_<track>``. Nothing is rejected. The policy is
loaded and validated on the driver, so a bad file fails pipeline construction;
it travels to workers as its validated document.
"""
from __future__ import annotations

from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...models.tracks import TRACK_FIELD, TrackPolicy

METRICS_NAMESPACE = "onboardflow"


class _AssignTrackFn(beam.DoFn):
    def __init__(self, policy: TrackPolicy) -> None:
        self._policy = policy
        self._counters: dict[str, Any] = {}

    def setup(self) -> None:
        self._counters = {t: Metrics.counter(METRICS_NAMESPACE, f"onboarding_track_{t}") for t in self._policy.tracks}

    def process(self, profile):
        updated = self._policy.with_track(profile)
        self._counters[updated[TRACK_FIELD]].inc()
        yield updated


class AssignOnboardingTracks(beam.PTransform):
    """Profiles -> the same profiles with ``onboarding_track`` set (module docstring).

    ``policy``: the compiled tracks policy (default: the packaged
    ``pipelines/onboarding_tracks.yaml`` checked against the packaged rules).
    """

    def __init__(self, policy: Optional[TrackPolicy] = None, label: Optional[str] = None) -> None:
        super().__init__(label)
        self.policy = policy if policy is not None else TrackPolicy.from_yaml()
        self._fn = _AssignTrackFn(self.policy)

    def expand(self, profiles):
        return profiles | "ChooseTrack" >> beam.ParDo(self._fn)
