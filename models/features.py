"""The feature vector the online models see: one user's profile, as numbers.

The profile stage (``transforms/profile.py``, ``UserProfileState.snapshot``)
emits a dict per user update; ``feature_vector`` turns it into a fixed set of
named, bounded floats that the segmenter and the propensity model share:

* counts with heavy tails (events, sessions, scores that sum events) go
  through ``log1p``, so a power user with 5,000 events is not 100 standard
  deviations from everyone else;
* rates are normalized by how long the user has been around (sessions per
  week of tenure, share of active days since signup), because on a stream the
  same persona is seen at every age;
* shares of *content* event types (support, browsing, feature use, invites,
  forms, tutorial steps: everything but the events that open or close a
  visit, ``SESSION_EVENTS``) describe *how* a user works, independently of
  how much, and are shrunk by ``CONTENT_PRIOR`` pseudo-events;
* what a visit holds (median events and minutes over sessions of at least two
  events) is robust to a lone login;
* every value is clipped to ``[0, FEATURE_BOUNDS[name]]`` so one absurd input
  (a replayed bot, a clock bug) cannot move a cluster centre arbitrarily far.

``SEGMENT_FEATURES`` are the ones the segmenter clusters on: chosen so that one
more ordinary event cannot swing them (docs/models.md "Features").

No identifiers, timestamps or free-text fields enter the vector: a model
snapshot must never carry per-user data, and absolute timestamps would make
every centre drift with the calendar.

A profile is read by the field names of the contract (schemas/contract.py),
whether it comes from the pipeline or back from Redis. Missing or null fields
count as 0 (without ``event_counts`` the event-type shares are 0).

>>> from onboardflow.models.features import feature_vector
>>> x = feature_vector({"events_7d": 0, "onboarding_progress": 0.4, "days_since_signup": 2.0})
>>> x["onboarding_progress"], round(x["tenure_days"], 3)
(0.4, 1.099)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..schemas.units import DAY_MS

#: Feature names, in the order models and reports list them.
FEATURES: tuple[str, ...] = (
    "engagement",            # log1p(time-decayed engagement score)
    "intent",                # log1p(time-decayed intent score)
    "feature_usage",         # feature_usage_score / 100, 0..1
    "recency_days",          # log1p(days since the last event)
    "events_7d",             # log1p(events in the last 7 days)
    "events_30d",            # log1p(events in the last 30 days)
    "active_share_30d",      # active days / days since signup (at most 30), 0..1
    "sessions_per_week",     # log1p(sessions per week of tenure)
    "active_sessions_per_week",  # log1p(sessions per week of the active span: signup to newest event, + 1 day)
    "events_per_session",    # log1p(mean events per session)
    "content_per_session",   # log1p(content events per session)
    "session_minutes",       # log1p(mean session duration, minutes)
    "visit_events",          # log1p(median events per visit: sessions of 2+ events)
    "visit_minutes",         # log1p(median visit duration, minutes)
    "feature_breadth",       # log1p(distinct features used)
    "onboarding_progress",   # fraction of the tutorial done, 0..1
    "support_share",         # support messages / content events, 0..1 (shrunk, see CONTENT_PRIOR)
    "browse_share",          # (page views + clicks) / content events
    "feature_use_share",     # feature_used / content events
    "invite_share",          # invite_sent / content events
    "form_share",            # form_submit / content events
    "tutorial_share",        # tutorial_step / content events
    "purchased",             # 1 if the user bought a plan, else 0
    "tenure_days",           # log1p(days since signup)
)

#: Event types that open, close or identify a visit rather than say what the
#: user did in it. They are left out of the *content* counts the shares and
#: ``content_per_session`` divide by, so a login -- the most ordinary event
#: there is -- moves no share at all.
SESSION_EVENTS: frozenset[str] = frozenset({"signup", "login", "logout", "unknown"})

#: Pseudo-events added to every share's denominator: a share of 1 out of 1
#: content event reads 0.33, of 10 out of 10 reads 0.83, of 100 out of 100
#: 0.98. Shares of users with almost no content are thereby shrunk towards 0
#: (they look alike: people who did little), and one more event can move a
#: share by at most 1 / (n + 3).
CONTENT_PRIOR = 2.0

#: The features the *segmenter* clusters on: what a user does (the mix of
#: their content, how much a visit holds, how far into the tutorial and the
#: product they got) and how regularly they come, normalized so that neither
#: the user's age nor one more event can swing them:
#:
#: * no recency, and no rate over the *active span* (signup to newest event):
#:   one login after weeks of silence resets the first and stretches the
#:   second, and moved most dormant users into the cluster of daily visitors
#:   (issue 14, docs/models.md "Stability"). Recency belongs to rules
#:   (``dormant``) and to the labels, which read the cluster's profile.
#: * every event type the contract knows contributes: invites and forms have
#:   their shares; logins, signups and logouts only count sessions.
#: * session rates are per week of tenure and active days per day of tenure,
#:   both bounded: one more visit moves them by 1 / tenure at most.
#:
#: ``feature_vector`` still returns all ``FEATURES``: the propensity model and
#: the segment labels use them.
SEGMENT_FEATURES: tuple[str, ...] = (
    "visit_events",
    "visit_minutes",
    "support_share",
    "browse_share",
    "feature_use_share",
    "invite_share",
    "form_share",
    "sessions_per_week",
    "active_share_30d",
    "feature_breadth",
    "onboarding_progress",
)

#: Upper clip per feature (lower clip is 0 for all). log1p features are capped
#: at log1p of a generous raw maximum.
FEATURE_BOUNDS: dict[str, float] = {
    "engagement": math.log1p(1e5),
    "intent": math.log1p(1e5),
    "feature_usage": 1.0,
    "recency_days": math.log1p(3650.0),
    "events_7d": math.log1p(1e5),
    "events_30d": math.log1p(1e6),
    "active_share_30d": 1.0,
    "sessions_per_week": math.log1p(500.0),
    "active_sessions_per_week": math.log1p(500.0),
    "events_per_session": math.log1p(1e4),
    "content_per_session": math.log1p(1e4),
    "visit_events": math.log1p(1e4),
    "visit_minutes": math.log1p(24 * 60.0),
    "session_minutes": math.log1p(24 * 60.0),
    "feature_breadth": math.log1p(1e3),
    "onboarding_progress": 1.0,
    "support_share": 1.0,
    "browse_share": 1.0,
    "feature_use_share": 1.0,
    "invite_share": 1.0,
    "form_share": 1.0,
    "tutorial_share": 1.0,
    "purchased": 1.0,
    "tenure_days": math.log1p(3650.0),
}


def _number(profile: Mapping[str, Any], *names: str) -> float:
    """The first of ``names`` the profile has as a finite, non-negative number; else 0."""
    for name in names:
        value = profile.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        value = float(value)
        if math.isfinite(value):
            return max(0.0, value)
    return 0.0


def _clip(name: str, value: float) -> float:
    return min(max(value, 0.0), FEATURE_BOUNDS[name])


def is_activity_update(profile: Mapping[str, Any]) -> bool:
    """Whether new events moved this profile, as opposed to a timer with no event.

    The profile stage also emits updates when time alone changes a user (the
    daily refresh, a rule's time mark, dormancy; ``transforms/profile.py``):
    their ``as_of`` is the timer's time, after the newest event. The models
    learn from both, but the segment-mix drift detector watches activity
    updates only: the timer updates of a quiet, ageing population would
    otherwise read as a shift in who is onboarding every day.
    """
    as_of, last = profile.get("as_of"), profile.get("last_event_at")
    if isinstance(as_of, int) and isinstance(last, int):
        return as_of <= last
    return not profile.get("recency_ms")


def feature_vector(profile: Mapping[str, Any]) -> dict[str, float]:
    """The model features of one profile (see the module docstring), keyed by ``FEATURES``."""
    recency_days = _number(profile, "recency_ms") / DAY_MS
    tenure = _number(profile, "days_since_signup")
    # A visitor without signup: tenure since the first event, else 0.
    if profile.get("days_since_signup") is None and profile.get("first_event_at") is not None:
        as_of = _number(profile, "as_of", "last_event_at")
        tenure = max(0.0, as_of - _number(profile, "first_event_at")) / DAY_MS

    counts = profile.get("event_counts")
    counts = counts if isinstance(counts, Mapping) else {}
    events_total = _number(profile, "events_total") or float(sum(
        v for v in counts.values() if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0))

    def count(*types: str) -> float:
        n = 0.0
        for t in types:
            v = counts.get(t)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                n += v
        return n

    # Content: what the user did within visits (see SESSION_EVENTS).
    content = max(0.0, events_total - count(*SESSION_EVENTS)) if counts else 0.0

    def share(*types: str) -> float:
        return count(*types) / (content + CONTENT_PRIOR) if content > 0 else 0.0

    features_used = profile.get("features_used")
    breadth = _number(profile, "distinct_features")
    if not breadth and isinstance(features_used, Mapping):
        breadth = float(len(features_used))

    sessions = _number(profile, "session_count")
    # Tenure of at least one day: a user's first day is one day of exposure.
    weeks = max(tenure, 1.0) / 7.0
    # The span the user was active in: signup to their newest event. Its
    # session rate is how often they come back *while* they come back; the
    # silence since is recency's. One day is added so a user's first day
    # counts as a day of exposure, as above.
    active_weeks = (max(0.0, tenure - recency_days) + 1.0) / 7.0
    active_days = _number(profile, "active_days_30d")
    progress = profile.get("onboarding_progress")

    raw = {
        "engagement": math.log1p(_number(profile, "engagement_score")),
        "intent": math.log1p(_number(profile, "intent_score")),
        "feature_usage": _number(profile, "feature_usage_score") / 100.0,
        "recency_days": math.log1p(recency_days),
        "events_7d": math.log1p(_number(profile, "events_7d")),
        "events_30d": math.log1p(_number(profile, "events_30d")),
        "active_share_30d": active_days / min(30.0, math.floor(tenure) + 1.0),
        "sessions_per_week": math.log1p(sessions / weeks),
        "active_sessions_per_week": math.log1p(sessions / active_weeks),
        "events_per_session": math.log1p(_number(profile, "avg_events_per_session")
                                         or (events_total / sessions if sessions else 0.0)),
        "content_per_session": math.log1p(content / sessions if sessions else 0.0),
        "visit_events": math.log1p(_number(profile, "median_visit_events")),
        "visit_minutes": math.log1p(_number(profile, "median_visit_duration_s") / 60.0),
        "session_minutes": math.log1p(_number(profile, "avg_session_duration_s") / 60.0),
        "feature_breadth": math.log1p(breadth),
        "onboarding_progress": _number({"p": progress}, "p"),
        "support_share": share("support_message"),
        "browse_share": share("page_view", "click"),
        "feature_use_share": share("feature_used"),
        "invite_share": share("invite_sent"),
        "form_share": share("form_submit"),
        "tutorial_share": share("tutorial_step"),
        "purchased": 1.0 if profile.get("purchased_plan") or counts.get("purchase") else 0.0,
        "tenure_days": math.log1p(tenure),
    }
    return {name: _clip(name, raw[name]) for name in FEATURES}
