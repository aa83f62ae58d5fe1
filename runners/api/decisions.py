"""What the onboarding UI needs for one user in one call: track, segments, next steps, or the fallback.

In: the user's stored profile (or None), whether the store could be read, the
time, the staleness limit, the track policy (pipelines/onboarding_tracks.yaml)
and the steps catalogue (pipelines/onboarding_steps.yaml). Out: a
``Decision``. Engine-free and without I/O; the route (``routes.py``) reads
the profile and counts the fallbacks.

The track is the profile's ``onboarding_track`` (set by the pipeline's
models stage); a profile written before that stage ran gets the policy's
choice for it (``TrackPolicy.decide``), the same function the pipeline
applies. The fallback decision, when the API cannot personalize, is the
catalogue's ``fallback.track`` with all its steps, no segments, and
``fallback_reason`` saying why:

* ``unknown_user``: no profile (never written, expired, or erased);
* ``stale_profile``: the store last accepted a write for it (``updated_at``,
  wall clock) more than ``stale_after_s`` ago;
* ``store_unavailable``: Redis could not be read in time;
* ``secret_unavailable``: the service has no pseudonymization secret.

``experiments`` (``{experiment: variant}``) is the profile's own
``experiments`` field, which the pipeline computed at the profile's event
time (transforms/experiments.py ``with_experiments``): the single source of
truth, the same on every server. The service's experiments file only takes
away: an experiment it does not have running at ``now_ms`` (stopped, paused,
ended, or no longer declared) or a variant it does not declare is not
served, so a stop takes effect at once. A profile written before the field
existed gets what the pipeline would write, evaluated now: every running
experiment whose eligibility it meets, with the decision's track as its
``onboarding_track``. A fallback decision is in no experiment: the user's
segments and track are unknown or not trusted, and the UI shows the default
onboarding, so no variant is served and no exposure recorded
(docs/experiments.md "Serving and exposures").

>>> from onboardflow.models.tracks import TrackPolicy
>>> policy = TrackPolicy.from_dict({"version": "1", "default": "standard",
...     "tracks": {"standard": "the tour"}, "rules": []})
>>> catalogue = StepCatalogue.from_dict({"version": "1", "fallback": {"track": "standard"},
...     "tracks": {"standard": [{"id": "tour", "title": "Take the tour"}]}})
>>> d = decide(None, now_ms=0, stale_after_s=60, policy=policy, catalogue=catalogue)
>>> d.fallback, d.fallback_reason, d.track, [s.id for s in d.next_steps], d.experiments
(True, 'unknown_user', 'standard', ['tour'], {})
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from ...models.tracks import TRACK_FIELD, TrackPolicy
from ...transforms.experiments import EXPERIMENTS_FIELD, ExperimentSet
from .catalogue import Step, StepCatalogue

UNKNOWN_USER, STALE_PROFILE = "unknown_user", "stale_profile"
STORE_UNAVAILABLE, SECRET_UNAVAILABLE = "store_unavailable", "secret_unavailable"
FALLBACK_REASONS = (UNKNOWN_USER, STALE_PROFILE, STORE_UNAVAILABLE, SECRET_UNAVAILABLE)


@dataclass(frozen=True)
class Decision:
    track: str
    next_steps: list[Step]
    fallback: bool
    catalogue_version: str
    user_key: Optional[str] = None
    segments: list[str] = field(default_factory=list)
    experiments: dict[str, str] = field(default_factory=dict)
    segment_label: Optional[str] = None
    track_rule: Optional[str] = None
    fallback_reason: Optional[str] = None
    profile_version: Optional[int] = None
    updated_at: Optional[int] = None


def fallback_decision(reason: str, catalogue: StepCatalogue, user_key: Optional[str] = None) -> Decision:
    """The configured default decision, with ``reason`` (one of ``FALLBACK_REASONS``)."""
    if reason not in FALLBACK_REASONS:
        raise ValueError(f"unknown fallback reason {reason!r}")
    track = catalogue.fallback_track
    return Decision(track, catalogue.next_steps(track), True, catalogue.version, user_key=user_key,
                    fallback_reason=reason)


def is_stale(profile: Mapping[str, Any], now_ms: int, stale_after_s: Optional[float]) -> bool:
    """Whether the store accepted the profile's last write more than ``stale_after_s`` ago (None: never stale)."""
    updated_at = profile.get("updated_at")
    if stale_after_s is None:
        return False
    if not isinstance(updated_at, int):
        return True
    return now_ms - updated_at > stale_after_s * 1000


def decide(profile: Optional[Mapping[str, Any]], *, now_ms: int, stale_after_s: Optional[float],
           policy: TrackPolicy, catalogue: StepCatalogue, user_key: Optional[str] = None,
           experiments: Optional[ExperimentSet] = None) -> Decision:
    """The decision for a stored profile (None: the user is unknown); see the module docstring."""
    if profile is None:
        return fallback_decision(UNKNOWN_USER, catalogue, user_key)
    user_key = profile.get("user_key") or user_key
    if is_stale(profile, now_ms, stale_after_s):
        return fallback_decision(STALE_PROFILE, catalogue, user_key)
    track, rule = profile.get("onboarding_track"), "profile"
    if not isinstance(track, str) or track not in catalogue.tracks:
        track, rule = policy.decide(profile)
    segments = profile.get("segments")
    label = profile.get("segment_label")
    variants = served_experiments(profile, track, now_ms, user_key, experiments)
    return Decision(
        track, catalogue.next_steps(track, profile), False, catalogue.version, user_key=user_key,
        segments=[s for s in segments if isinstance(s, str)] if isinstance(segments, list) else [],
        experiments=variants,
        segment_label=label if isinstance(label, str) else None, track_rule=rule,
        profile_version=profile.get("version"), updated_at=profile.get("updated_at"),
    )


def served_experiments(profile: Mapping[str, Any], track: str, now_ms: int, user_key: Optional[str],
                       experiments: Optional[ExperimentSet]) -> dict[str, str]:
    """The variants a personalized decision serves (module docstring): the profile's ``experiments`` that
    ``experiments`` has running at ``now_ms``; for a profile without the field, ``assign`` at ``now_ms``."""
    if experiments is None or not user_key:
        return {}
    stored = profile.get(EXPERIMENTS_FIELD)
    if not isinstance(stored, Mapping):
        return experiments.assign({**profile, TRACK_FIELD: track}, now_ms, user_key)
    return {name: variant for name, variant in stored.items()
            if name in experiments and experiments[name].is_active(now_ms) and variant in experiments[name].weights}
