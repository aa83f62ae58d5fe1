"""Time-decay engagement scoring: the math and the per-user state, pure Python (no engine).

The engagement score of a user at time t is

    S(t) = sum_i w(event_type_i) * exp(-ln2 * (t - t_i) / half_life)

so every event counts fully when it happens and half as much one half-life
later. Keeping every event is not an option at 10k events/s, so ``DecayedScore``
keeps the sum incrementally as a pair (S_ref, t_ref) anchored at the newest
event time seen:

* an event at t_i >= t_ref re-anchors: S_ref = S_ref * decay(t_i - t_ref) + w
* an out-of-order event at t_i < t_ref is folded in without reordering:
  S_ref += w * decay(t_ref - t_i)
* reading at t: S_ref * decay(t - t_ref)

Because the anchor is always the newest event, every decay factor is
exp(-x) with x >= 0: it lies in [0, 1], so nothing can overflow however old an
event or however long a gap; very old contributions underflow gracefully to 0,
which is also their true value to double precision. Weights must be >= 0, so
the sum has no cancellation and any arrival order gives the same score to
within a few ulps per event (tests check 1e-9 relative on random permutations).
Reads are clamped to the newest event time (``as_of`` >= ``last_event_at``): a
score "before" an event already folded in has no meaning.

``EngagementState`` bundles what a profile needs, all order-independent:

* ``engagement_score``: the decayed sum with ``DEFAULT_ENGAGEMENT_WEIGHTS``.
* ``intent_score``: the same mechanics with intent weights: purchases, views of
  pricing pages, form submissions, use of premium features.
* ``feature_usage_score``: 0..100, a saturating map of the decayed count of
  ``feature_used`` events: 100 * (1 - exp(-count / feature_usage_scale)); with
  the default scale of 10, 10 recent feature uses give 63 and 17 give 81
  (80 is crossed at 10 * ln 5 ~ 16.1 uses).
* recency (``recency_ms`` = as_of - newest event), ``first_event_at``,
  ``last_event_at``, ``events_total`` and per-type ``event_counts``.
* frequency: ``events_7d`` / ``events_30d`` and ``active_days_7d`` /
  ``active_days_30d`` over UTC days of event time (the window ending at
  ``as_of`` includes its day and the 6 / 29 days before), from a per-day
  histogram pruned to the newest 30 days (``DailyActivity``).
* feature adoption: ``features_used`` (feature -> count, bounded) and
  ``distinct_features``.
* onboarding: ``tutorial_steps_done`` (distinct steps), ``tutorial_step_total``
  (largest ``step_total`` seen) and ``onboarding_progress`` = done / total,
  capped at 1; reaching 1 adds the milestone ``tutorial_completed``.
* ``signup_at`` (earliest signup) and ``days_since_signup``; ``plan`` (the
  ``plan`` property of the latest purchase).

State is stored by the engine as a compact, versioned tuple of primitives
(``to_primitive`` / ``from_primitive``) so the scoring configuration is not
repeated in every user's state; ``EngagementState`` also pickles whole.

Engine-free: ``UserProfileState`` (``transforms/profile.py``) keeps one
``EngagementState`` per user beside the session and duplicate-detection
state, and ``ProfileMachine`` there drives it (its dormancy and state-expiry
timers); the Beam shell is ``pipelines/beam/profile.py``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from ..schemas.units import DAY_MS

LN2 = math.log(2.0)
HISTOGRAM_DAYS = 30
TUTORIAL_COMPLETED = "tutorial_completed"

# Engagement weights. Passive browsing counts little, doing things in the
# product counts more, buying counts most; logging out is not engagement.
# invite_sent (schema v2) is a strong adoption signal: the user brings others.
DEFAULT_ENGAGEMENT_WEIGHTS: dict[str, float] = {
    "signup": 3.0,
    "login": 1.0,
    "page_view": 0.5,
    "click": 1.0,
    "form_submit": 2.0,
    "tutorial_step": 3.0,
    "feature_used": 4.0,
    "support_message": 1.5,
    "purchase": 10.0,
    "logout": 0.0,
    "invite_sent": 3.0,
}

# Intent weights, keyed by intent signal rather than event type (see
# ScoreConfig.intent_weight for how events map to signals).
DEFAULT_INTENT_WEIGHTS: dict[str, float] = {
    "purchase": 10.0,
    "pricing_page_view": 3.0,
    "form_submit": 2.0,
    "premium_feature_used": 4.0,
}

_PAGE_PROPERTIES = ("page", "path", "url", "screen")
_TRUE_STRINGS = frozenset({"true", "1", "yes"})


def _positive_finite(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_weights(weights: Mapping[str, float], name: str) -> dict[str, float]:
    checked = {}
    for key, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            # Negative weights would let terms cancel and break the
            # order-independence guarantee of the incremental sum.
            raise ValueError(f"{name}[{key!r}] must be a finite number >= 0, got {weight!r}")
        checked[str(key)] = float(weight)
    return checked


@dataclass(frozen=True)
class ScoreConfig:
    """Scoring parameters; shared by all users, never stored in their state."""

    half_life_ms: float = 7 * DAY_MS
    intent_half_life_ms: float = 7 * DAY_MS
    engagement_weights: dict = field(default_factory=lambda: dict(DEFAULT_ENGAGEMENT_WEIGHTS))
    intent_weights: dict = field(default_factory=lambda: dict(DEFAULT_INTENT_WEIGHTS))
    # Event types missing from engagement_weights (a newer schema) count this much.
    unknown_event_weight: float = 0.0
    # A page_view whose page/path/url/screen contains one of these is a pricing view.
    pricing_page_markers: tuple = ("pricing", "plans", "upgrade", "checkout")
    # feature_used of these features (or with property premium=true) is premium.
    premium_features: frozenset = frozenset()
    feature_usage_scale: float = 10.0
    # Bounds on per-user state against unbounded property values.
    max_tracked_features: int = 200
    max_tutorial_steps: int = 200
    max_event_types: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "half_life_ms", _positive_finite(self.half_life_ms, "half_life_ms"))
        object.__setattr__(
            self, "intent_half_life_ms", _positive_finite(self.intent_half_life_ms, "intent_half_life_ms")
        )
        object.__setattr__(
            self, "engagement_weights", _check_weights(self.engagement_weights, "engagement_weights")
        )
        object.__setattr__(self, "intent_weights", _check_weights(self.intent_weights, "intent_weights"))
        unknown = set(self.intent_weights) - set(DEFAULT_INTENT_WEIGHTS)
        if unknown:
            raise ValueError(f"unknown intent signals {sorted(unknown)}; known: {sorted(DEFAULT_INTENT_WEIGHTS)}")
        _check_weights({"unknown_event_weight": self.unknown_event_weight}, "config")
        object.__setattr__(
            self, "feature_usage_scale", _positive_finite(self.feature_usage_scale, "feature_usage_scale")
        )
        object.__setattr__(
            self, "pricing_page_markers", tuple(str(m).lower() for m in self.pricing_page_markers)
        )
        object.__setattr__(self, "premium_features", frozenset(self.premium_features))
        for name in ("max_tracked_features", "max_tutorial_steps", "max_event_types"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")

    def engagement_weight(self, event_type: str) -> float:
        return self.engagement_weights.get(event_type, self.unknown_event_weight)

    def intent_weight(self, event_type: str, properties: Mapping[str, Any]) -> float:
        weights = self.intent_weights
        if event_type == "purchase":
            return weights.get("purchase", 0.0)
        if event_type == "form_submit":
            return weights.get("form_submit", 0.0)
        if event_type == "page_view":
            for key in _PAGE_PROPERTIES:
                page = properties.get(key)
                if isinstance(page, str):
                    page = page.lower()
                    if any(marker in page for marker in self.pricing_page_markers):
                        return weights.get("pricing_page_view", 0.0)
            return 0.0
        if event_type == "feature_used":
            premium = properties.get("premium")
            if properties.get("feature") in self.premium_features or (
                isinstance(premium, str) and premium.lower() in _TRUE_STRINGS
            ) or premium is True:
                return weights.get("premium_feature_used", 0.0)
        return 0.0


DEFAULT_SCORE_CONFIG = ScoreConfig()


class DecayedScore:
    """An exponentially time-decayed sum kept as (value at t_ref, t_ref)."""

    __slots__ = ("half_life_ms", "_rate", "value_ref", "t_ref")

    def __init__(self, half_life_ms: float, value_ref: float = 0.0, t_ref: Optional[int] = None) -> None:
        self.half_life_ms = _positive_finite(half_life_ms, "half_life_ms")
        self._rate = LN2 / self.half_life_ms
        self.value_ref = float(value_ref)
        self.t_ref = t_ref

    def add(self, t_ms: int, weight: float) -> None:
        if weight == 0.0:
            return
        if self.t_ref is None:
            self.value_ref = weight
            self.t_ref = t_ms
        elif t_ms >= self.t_ref:
            # exp of a non-positive argument: in [0, 1], underflows to 0, never overflows.
            self.value_ref = self.value_ref * math.exp(-self._rate * (t_ms - self.t_ref)) + weight
            self.t_ref = t_ms
        else:
            self.value_ref += weight * math.exp(-self._rate * (self.t_ref - t_ms))

    def value_at(self, t_ms: int) -> float:
        """The score at t_ms (reads before the anchor are clamped to the anchor)."""
        if self.t_ref is None or t_ms <= self.t_ref:
            return self.value_ref
        return self.value_ref * math.exp(-self._rate * (t_ms - self.t_ref))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DecayedScore)
            and self.half_life_ms == other.half_life_ms
            and self.value_ref == other.value_ref
            and self.t_ref == other.t_ref
        )

    def __repr__(self) -> str:
        return f"DecayedScore(half_life_ms={self.half_life_ms}, value_ref={self.value_ref}, t_ref={self.t_ref})"

    def __getstate__(self):
        return (self.half_life_ms, self.value_ref, self.t_ref)

    def __setstate__(self, state) -> None:
        self.__init__(*state)


class DailyActivity:
    """Event counts per UTC day of event time, for the newest HISTOGRAM_DAYS days.

    Out-of-order safe: an event within the horizon lands in its own day
    whenever it arrives; one older than the horizon of the newest day can never
    be inside a 7 or 30 day window read at or after the newest event, so it is
    ignored.
    """

    __slots__ = ("days", "newest_day")

    def __init__(self, days: Optional[dict[int, int]] = None, newest_day: Optional[int] = None) -> None:
        self.days: dict[int, int] = dict(days or {})
        self.newest_day = newest_day

    def add(self, t_ms: int) -> None:
        day = t_ms // DAY_MS
        newest = self.newest_day
        if newest is not None and day <= newest - HISTOGRAM_DAYS:
            return
        self.days[day] = self.days.get(day, 0) + 1
        if newest is None or day > newest:
            self.newest_day = day
            if newest is not None:
                oldest_kept = day - HISTOGRAM_DAYS + 1
                for stale in [d for d in self.days if d < oldest_kept]:
                    del self.days[stale]

    def window(self, at_ms: int, window_days: int) -> tuple[int, int]:
        """(active days, events) in the window_days UTC days ending with at_ms's day."""
        if not 1 <= window_days <= HISTOGRAM_DAYS:
            raise ValueError(f"window_days must be in 1..{HISTOGRAM_DAYS}")
        last_day = at_ms // DAY_MS
        first_day = last_day - window_days + 1
        active = events = 0
        for day, count in self.days.items():
            if first_day <= day <= last_day:
                active += 1
                events += count
        return active, events

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DailyActivity) and self.days == other.days and self.newest_day == other.newest_day

    def __repr__(self) -> str:
        return f"DailyActivity(days={self.days}, newest_day={self.newest_day})"

    def __getstate__(self):
        return (self.days, self.newest_day)

    def __setstate__(self, state) -> None:
        self.days, self.newest_day = state


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


class InvalidEvent(ValueError):
    """An event the scoring state cannot take (the state is left unchanged)."""


class EngagementState:
    """Everything scoring keeps about one user; ``add`` events, read ``snapshot``s.

    Pure and order-independent: any permutation of the same events yields the
    same snapshot (scores within floating point rounding).
    """

    FORMAT_VERSION = 1
    __slots__ = (
        "config", "engagement", "intent", "feature_usage", "activity", "first_event_at",
        "last_event_at", "events_total", "event_counts", "features", "features_overflow",
        "tutorial_steps", "tutorial_step_total", "signup_at", "plan", "plan_at",
    )

    def __init__(self, config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> None:
        self.config = config
        self.engagement = DecayedScore(config.half_life_ms)
        self.intent = DecayedScore(config.intent_half_life_ms)
        self.feature_usage = DecayedScore(config.half_life_ms)
        self.activity = DailyActivity()
        self.first_event_at: Optional[int] = None
        self.last_event_at: Optional[int] = None
        self.events_total = 0
        self.event_counts: dict[str, int] = {}
        self.features: dict[str, int] = {}
        self.features_overflow = 0
        self.tutorial_steps: set[str] = set()
        self.tutorial_step_total: Optional[int] = None
        self.signup_at: Optional[int] = None
        self.plan: Optional[str] = None
        self.plan_at: Optional[int] = None

    @property
    def is_empty(self) -> bool:
        return self.events_total == 0

    @staticmethod
    def validate(event: Any) -> None:
        """Raise InvalidEvent if ``add`` could not fold ``event`` in."""
        if not isinstance(event, Mapping):
            raise InvalidEvent("event is not a mapping")
        event_type = event.get("event_type")
        t = event.get("occurred_at")
        if not isinstance(event_type, str) or not event_type:
            raise InvalidEvent("event_type missing")
        if not isinstance(t, int) or isinstance(t, bool):
            raise InvalidEvent("occurred_at missing or not epoch millis")
        if not isinstance(event.get("properties") or {}, Mapping):
            raise InvalidEvent("properties is not a mapping")

    def add(self, event: Mapping[str, Any]) -> None:
        """Fold one (anonymized) event in; raises InvalidEvent and changes nothing if malformed."""
        self.validate(event)
        event_type, t = event["event_type"], event["occurred_at"]
        properties = event.get("properties") or {}
        config = self.config
        self.engagement.add(t, config.engagement_weight(event_type))
        self.intent.add(t, config.intent_weight(event_type, properties))
        self.activity.add(t)
        self.events_total += 1
        if self.first_event_at is None or t < self.first_event_at:
            self.first_event_at = t
        if self.last_event_at is None or t > self.last_event_at:
            self.last_event_at = t
        if event_type in self.event_counts or len(self.event_counts) < config.max_event_types:
            self.event_counts[event_type] = self.event_counts.get(event_type, 0) + 1

        if event_type == "feature_used":
            self.feature_usage.add(t, 1.0)
            feature = properties.get("feature")
            if isinstance(feature, str) and feature:
                if feature in self.features or len(self.features) < config.max_tracked_features:
                    self.features[feature] = self.features.get(feature, 0) + 1
                else:
                    self.features_overflow += 1
        elif event_type == "tutorial_step":
            step = properties.get("step")
            if step is not None and not isinstance(step, (dict, list)):
                step = str(step)
                if step in self.tutorial_steps or len(self.tutorial_steps) < config.max_tutorial_steps:
                    self.tutorial_steps.add(step)
            total = _as_int(properties.get("step_total"))
            if total is not None and total > 0 and (
                    self.tutorial_step_total is None or total > self.tutorial_step_total):
                self.tutorial_step_total = total
        elif event_type == "signup":
            if self.signup_at is None or t < self.signup_at:
                self.signup_at = t
        elif event_type == "purchase":
            plan = properties.get("plan")
            # Latest purchase wins; ties broken by value so arrival order never matters.
            if isinstance(plan, str) and plan and (
                self.plan_at is None or (t, plan) > (self.plan_at, self.plan)
            ):
                self.plan, self.plan_at = plan, t

    def onboarding_progress(self) -> Optional[float]:
        if not self.tutorial_step_total:
            return None
        return min(1.0, len(self.tutorial_steps) / self.tutorial_step_total)

    def milestones(self) -> list[str]:
        progress = self.onboarding_progress()
        return [TUTORIAL_COMPLETED] if progress is not None and progress >= 1.0 else []

    def snapshot(self, at_ms: int) -> dict[str, Any]:
        """Profile features as of at_ms (clamped to the newest event time)."""
        as_of = at_ms if self.last_event_at is None else max(at_ms, self.last_event_at)
        active_7, events_7 = self.activity.window(as_of, 7)
        active_30, events_30 = self.activity.window(as_of, 30)
        feature_uses = self.feature_usage.value_at(as_of)
        return {
            "as_of": as_of,
            "engagement_score": self.engagement.value_at(as_of),
            "intent_score": self.intent.value_at(as_of),
            "feature_usage_score": 100.0 * -math.expm1(-feature_uses / self.config.feature_usage_scale),
            "first_event_at": self.first_event_at,
            "last_event_at": self.last_event_at,
            "recency_ms": None if self.last_event_at is None else as_of - self.last_event_at,
            "events_total": self.events_total,
            "event_counts": dict(self.event_counts),
            "events_7d": events_7,
            "events_30d": events_30,
            "active_days_7d": active_7,
            "active_days_30d": active_30,
            "features_used": dict(self.features),
            "distinct_features": len(self.features),
            "tutorial_steps_done": len(self.tutorial_steps),
            "tutorial_step_total": self.tutorial_step_total,
            "onboarding_progress": self.onboarding_progress(),
            "milestones": self.milestones(),
            "signup_at": self.signup_at,
            "days_since_signup": None if self.signup_at is None else (as_of - self.signup_at) / DAY_MS,
            "plan": self.plan,
        }

    # -- storage ---------------------------------------------------------------

    def to_primitive(self) -> tuple:
        """Compact, versioned form for engine state (no config: it is per pipeline)."""
        return (
            self.FORMAT_VERSION,
            self.engagement.value_ref, self.engagement.t_ref,
            self.intent.value_ref, self.intent.t_ref,
            self.feature_usage.value_ref, self.feature_usage.t_ref,
            self.activity.days, self.activity.newest_day,
            self.first_event_at, self.last_event_at, self.events_total,
            self.event_counts, self.features, self.features_overflow,
            sorted(self.tutorial_steps), self.tutorial_step_total,
            self.signup_at, self.plan, self.plan_at,
        )

    @classmethod
    def from_primitive(cls, data: tuple, config: ScoreConfig = DEFAULT_SCORE_CONFIG) -> "EngagementState":
        if not data or data[0] != cls.FORMAT_VERSION:
            raise ValueError(f"unsupported EngagementState format {data[0] if data else None!r}")
        (_, e_v, e_t, i_v, i_t, f_v, f_t, days, newest_day, first, last, total, counts, features,
         overflow, steps, step_total, signup_at, plan, plan_at) = data
        state = cls(config)
        state.engagement = DecayedScore(config.half_life_ms, e_v, e_t)
        state.intent = DecayedScore(config.intent_half_life_ms, i_v, i_t)
        state.feature_usage = DecayedScore(config.half_life_ms, f_v, f_t)
        state.activity = DailyActivity(days, newest_day)
        state.first_event_at, state.last_event_at, state.events_total = first, last, total
        state.event_counts, state.features, state.features_overflow = dict(counts), dict(features), overflow
        state.tutorial_steps, state.tutorial_step_total = set(steps), step_total
        state.signup_at, state.plan, state.plan_at = signup_at, plan, plan_at
        return state

    def __getstate__(self):
        return (self.config, self.to_primitive())

    def __setstate__(self, state) -> None:
        config, data = state
        restored = EngagementState.from_primitive(data, config)
        for name in self.__slots__:
            setattr(self, name, getattr(restored, name))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, EngagementState)
            and self.config == other.config
            and self.to_primitive() == other.to_primitive()
        )

    def __repr__(self) -> str:
        return f"EngagementState(events_total={self.events_total}, last_event_at={self.last_event_at})"
