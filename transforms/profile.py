"""Build each user's profile from their anonymized events, in one keyed stage.

``BuildUserProfiles`` keys anonymized events by ``user_key`` and keeps, per
user, one state cell that composes the per-concern state classes:

* ``RecentEventIds`` (normalize.py): drops duplicate ``event_id``s within the
  dedup horizon;
* ``SessionState`` (sessionize.py): event-time sessions, gap 30 min;
* ``EngagementState`` (score.py): time-decay engagement and intent scores,
  7/30-day frequency, feature adoption, onboarding progress, signup;
* the newest anonymized context (email domain, device class, country) and the
  account id, for enrichment.

Why one stage rather than one per concern: each keyed stateful stage costs a
shuffle, and on the 2-core reference machine two chained keyed stages on Prism
took 1.8x the time of one (200k elements, 12.5 s vs 6.9 s). The concerns stay
separately testable as pure classes; this module only composes them.

Time, lateness and timers (event time throughout):

* An event older than the watermark minus ``allowed_lateness`` is *too late*:
  it does not change the profile, it is counted (``too_late_events``) and goes
  to the ``too_late`` output, never silently lost. The stage knows a lower
  bound of the watermark from a per-user "probe" timer set at the newest event
  time it has seen: when the timer fires the watermark has passed it. The
  bound lags the true watermark, so the rule never rejects an on-time event
  and may let a slightly-too-late one through. A user the stage holds no
  state for (new, or expired) has no bound at all: their first event is never
  too late, and if it is far behind the watermark its overdue lifecycle timers
  fire at once. A bounded replay has a watermark too (the source's, per
  partition), so give a backfill an allowed lateness that covers how late its
  events really are; the end-to-end tests use 96 hours for 3-day-late events.
* Later events within the allowed lateness simply update the profile: every
  state class here is order-independent.
* A ``lifecycle`` timer re-evaluates a user with no new events when a
  time-based rule can flip: at the end of the "new user" window (signup +
  ``new_user_window``), at dormancy (last activity + ``dormancy``; fires with
  no new event, which is how dormant users are detected), at every time mark
  of the rule segments (``time_marks``, from ``RuleSet.time_marks``: e.g.
  signup + 3 days for "onboarding stalled"), and finally clears the state at
  last activity + ``state_ttl`` (the Redis profile then expires by its own
  TTL).
* For ``refresh_window_ms`` after the newest event (default 7 days) the same
  timer also *refreshes* a quiet user's profile every ``refresh_ms`` of event
  time (default a day after the newest event or refresh): the 7-day counts
  (events, sessions, active days), recency and the decayed scores move with
  time alone, and the rule segments and online models downstream should see
  them move. After the window the 7-day counts are 0, and the refresh slows
  to every ``slow_refresh_ms`` (default 7 days) until dormancy: recency, the
  30-day counts and the cluster assignment stay current within a week, and
  the online segmenter keeps seeing the users who went quiet (without them
  the centre of a segment whose users all went quiet is pulled into its
  neighbours; docs/models.md). At most ``refresh_window / refresh +
  (dormancy - refresh_window) / slow_refresh`` (7 + 3) updates per silence;
  a replay of old data (or a streaming run whose watermark jumps to the wall
  clock) fires them one after another. ``refresh_ms=0`` and
  ``slow_refresh_ms=0`` turn refreshes off.

Horizon (``ProfileConfig.horizon_ms``, set for bounded runs). When a bounded
input ends, the watermark jumps to +infinity and every pending timer fires:
without a horizon a backfill of last week's events would emit each user's
dormancy at last event + 30 days, i.e. profiles (and versions) in the future,
which Redis then holds against every live event that follows. With a horizon
H the lifecycle timer is never set later than H: the timers due before H fire
as they would in streaming, and every user whose profile is older than H gets
one last update exactly *as of H*; nothing is emitted beyond it. The launcher
fixes H before the run (``transforms/backfill_horizon.py``: the newest event
time in the exact offset ranges the run reads, capped at the wall clock), so
a backfill's final profiles are a function of its input alone: the same
topic backfilled twice, a day apart, ends with the same profiles and versions.
A streaming run has no horizon; its watermark never passes the wall clock
(the Kafka source caps it there), and a lifecycle timer that fires later than
the wall clock + ``max_future_ms`` anyway (a drained job) emits nothing.
Events stamped later than that (a skewed client or collector clock) are dead
letters (``occurred_in_the_future``): folded in, they would move ``as_of``
into the future and Redis would refuse every honest update after them.

Output: ``ProfileUpdate(previous, current)`` per user touched in a bundle (the
profile as last emitted, and as it is now), coalesced per bundle so a burst of
one user's events yields one update.

Versions. ``current["version"] = as_of * 1000 + n`` where ``as_of`` is the
newest event or timer time folded in and ``n = min(999, events_total)``, the
number of distinct events folded into the profile. Both parts depend only on
*which* events are in (and the timer instant), never on their arrival order
or partitioning, so:

* a profile built from a subset of another's events never has a larger
  version: its ``as_of`` is at most the other's, and at equal ``as_of`` its
  count is at most the other's. A replay that reads a user's events from
  several partitions in another interleaving cannot roll Redis back;
* the same events give the same version, so a replay's writes are no-ops
  (Redis treats an equal version from another write as stale);
* an event that does not move ``as_of`` (a late one) still raises ``n`` and
  reaches Redis, up to the cap. Past 999 events, a late event that leaves
  ``as_of`` where it was no longer raises the version: Redis keeps the
  profile without it until the user's next newer event or the next refresh
  timer (a day later by default) carries it in. A count within a recent
  window would hit the cap later for heavy users but never count an event
  older than the window, which in a skewed replay is exactly the late kind.

Versions stay below 2**53 (Redis compares them as doubles) until as_of reaches
the year 2255. Timer updates at ``t`` carry ``t * 1000 + n``, so they are
monotonic too.

Events the stage cannot key or fold in (no ``user_key``, ``event_id`` or
integer ``occurred_at``, a malformed ``event_type`` or ``properties``, an
``occurred_at`` after the wall clock + ``max_future_ms``) go to the
``dead_letter`` output with a reason, counted ``profile_dead_letter``:
upstream validation makes them rare, but they must neither crash the stage
nor vanish.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from ..schemas.units import DAY_MS, HOUR_MS, MINUTE_MS
from .dead_letter import pipeline_dead_letter
from .enrich import ProfileUpdate
from .metrics import PipelineMetrics
from .normalize import RecentEventIds
from .score import DEFAULT_SCORE_CONFIG, EngagementState, InvalidEvent, ScoreConfig
from .sessionize import SessionState

TOO_LATE = "too_late"
DEAD_LETTER = "dead_letter"

#: Profile fields reserved for the online-learning stage (filled in later).
MODEL_FIELDS = ("cluster_id", "segment_label", "propensity", "model_version", "onboarding_track")


#: The profile's timestamp fields a time mark may be measured from.
TIMESTAMP_FIELDS = ("signup_at", "first_event_at", "last_event_at")


@dataclass(frozen=True)
class ProfileConfig:
    """Settings of the keyed profile stage (see the module docstring)."""

    session_gap_ms: int = 30 * MINUTE_MS
    allowed_lateness_ms: int = 24 * HOUR_MS
    dedup_horizon_ms: int = 48 * HOUR_MS
    new_user_window_ms: int = 7 * DAY_MS
    dormancy_ms: int = 30 * DAY_MS
    state_ttl_ms: int = 90 * DAY_MS
    #: re-emit a quiet user's profile this long after the newest event or refresh (0: never) ...
    refresh_ms: int = 24 * HOUR_MS
    #: ... for this long after the newest event (and never past dormancy)
    refresh_window_ms: int = 7 * DAY_MS
    #: after that window, re-emit every this long until dormancy (0: never)
    slow_refresh_ms: int = 7 * DAY_MS
    #: (timestamp field, offset ms): also re-evaluate at profile[field] + offset (RuleSet.time_marks)
    time_marks: tuple[tuple[str, int], ...] = ()
    score: ScoreConfig = DEFAULT_SCORE_CONFIG
    #: bounded runs: no lifecycle timer later than this event time (epoch ms); every profile
    #: older than it gets one last update as of it. None: no horizon (streaming).
    horizon_ms: Optional[int] = None
    #: a profile is never as of later than the wall clock + this: later events are dead
    #: letters, later lifecycle timers (a drained streaming run) emit nothing
    max_future_ms: int = 10 * MINUTE_MS

    def __post_init__(self):
        for name in ("session_gap_ms", "allowed_lateness_ms", "dedup_horizon_ms", "new_user_window_ms",
                     "dormancy_ms", "state_ttl_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer number of milliseconds, got {value!r}")
        if self.dedup_horizon_ms < self.allowed_lateness_ms:
            raise ValueError("dedup_horizon_ms must cover allowed_lateness_ms, or late duplicates would count twice")
        if self.state_ttl_ms <= self.dormancy_ms:
            raise ValueError("state_ttl_ms must exceed dormancy_ms, or dormancy would never be reported")
        if self.state_ttl_ms <= self.allowed_lateness_ms + self.session_gap_ms:
            # Sessions are kept for state_ttl_ms; a late event landing next to an
            # already folded session would otherwise be counted as a new one.
            raise ValueError("state_ttl_ms must exceed allowed_lateness_ms + session_gap_ms")
        for name in ("refresh_ms", "refresh_window_ms", "slow_refresh_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer number of milliseconds, got {value!r}")
        if self.horizon_ms is not None and (
                not isinstance(self.horizon_ms, int) or isinstance(self.horizon_ms, bool) or self.horizon_ms < 0):
            raise ValueError(f"horizon_ms must be None or a non-negative epoch millisecond int, "
                             f"got {self.horizon_ms!r}")
        if not isinstance(self.max_future_ms, int) or isinstance(self.max_future_ms, bool) or self.max_future_ms < 0:
            raise ValueError(f"max_future_ms must be a non-negative integer number of milliseconds, "
                             f"got {self.max_future_ms!r}")
        for mark in self.time_marks:
            if (not isinstance(mark, tuple) or len(mark) != 2 or mark[0] not in TIMESTAMP_FIELDS
                    or not isinstance(mark[1], int) or isinstance(mark[1], bool) or mark[1] <= 0):
                raise ValueError(f"time_marks holds (one of {TIMESTAMP_FIELDS}, a positive integer of "
                                 f"milliseconds), got {mark!r}")


_CONTEXT_FIELDS = ("email_domain", "device_class", "country", "os", "locale")


@dataclass
class UserProfileState:
    """Everything the profile stage keeps about one user."""

    config: ProfileConfig
    engagement: EngagementState
    sessions: SessionState
    seen: RecentEventIds
    # name -> (event time, value): the newest by event time wins, whatever the arrival order.
    context: dict = field(default_factory=dict)
    as_of: int = 0
    watermark_lb: Optional[int] = None
    probe_at: Optional[int] = None
    # Event time the lifecycle timer is set for (None: not set). Kept so the
    # timer is only moved *earlier*: see _UserProfileFn.process.
    lifecycle_at: Optional[int] = None
    last_emitted: Optional[dict] = None

    @classmethod
    def new(cls, config: ProfileConfig) -> "UserProfileState":
        return cls(
            config=config,
            engagement=EngagementState(config.score),
            sessions=SessionState(gap_ms=config.session_gap_ms, retention_ms=config.state_ttl_ms),
            seen=RecentEventIds(config.dedup_horizon_ms),
        )

    # -- updates -------------------------------------------------------------

    def is_too_late(self, t: int) -> bool:
        return self.watermark_lb is not None and t < self.watermark_lb - self.config.allowed_lateness_ms

    def apply(self, event: dict) -> None:
        """Fold one new (not duplicate, not too late) event in."""
        t = event["occurred_at"]
        self.engagement.add(event)
        self.sessions.add(t)
        props = event.get("properties") or {}
        account = props.get("account_id")
        if account:
            self._newest("account_id", t, account)
        if event.get("event_type") == "signup" and props.get("plan"):
            self._newest("signup_plan", t, props["plan"])
        for name in _CONTEXT_FIELDS:
            value = event.get(name)
            if value:
                self._newest(name, t, value)
        self._advance(t)

    def _newest(self, name: str, t: int, value: Any) -> None:
        seen = self.context.get(name)
        if seen is None or (t, str(value)) > (seen[0], str(seen[1])):
            self.context[name] = (t, value)

    def _advance(self, t: int) -> None:
        if t > self.as_of:
            self.as_of = t

    def advance_to(self, t: int) -> None:
        """A timer at event time ``t`` fired: the profile is now as of ``t``."""
        self._advance(t)
        if self.watermark_lb is None or t > self.watermark_lb:
            self.watermark_lb = t

    @property
    def version(self) -> int:
        """``as_of * 1000 + min(999, events folded in)``: see "Versions" in the module docstring."""
        return self.as_of * 1000 + min(self.engagement.events_total, 999)

    def next_lifecycle_ms(self) -> Optional[int]:
        """Next event time at which a time-based rule can flip, a refresh is due, or the state expires.

        With a horizon: never later than it, and None once the profile is as of the horizon.
        """
        due = self._next_transition_ms()
        horizon = self.config.horizon_ms
        if horizon is None:
            return due
        return None if self.as_of >= horizon else min(due, horizon)

    def _next_transition_ms(self) -> int:
        config = self.config
        last = self.engagement.last_event_at
        signup = self.engagement.signup_at
        dormant_at = last + config.dormancy_ms + 1
        candidates = [dormant_at, last + config.state_ttl_ms]
        if signup is not None:
            candidates.append(signup + config.new_user_window_ms + 1)
        refresh = self.as_of + config.refresh_ms
        if not (config.refresh_ms and refresh <= last + config.refresh_window_ms):
            # Past the refresh window: the slow refresh, until dormancy.
            refresh = self.as_of + config.slow_refresh_ms if config.slow_refresh_ms else dormant_at
        if refresh < dormant_at:
            candidates.append(refresh)
        for name, offset in config.time_marks:
            since = getattr(self.engagement, name)
            if since is not None:
                candidates.append(since + offset)
        return min(c for c in candidates if c > self.as_of)

    def expired_at(self, t: int) -> bool:
        return t >= self.engagement.last_event_at + self.config.state_ttl_ms

    # -- output --------------------------------------------------------------

    def snapshot(self, user_key: str) -> dict:
        profile = self.engagement.snapshot(self.as_of)
        profile["purchased_plan"] = profile.pop("plan")
        profile.update(self.sessions.snapshot(self.as_of))
        for name, (_, value) in self.context.items():
            profile[name] = value
        for name in ("account_id", "signup_plan", *_CONTEXT_FIELDS):
            profile.setdefault(name, None)
        for name in MODEL_FIELDS:
            profile[name] = None
        profile["user_key"] = user_key
        profile["as_of"] = self.as_of
        profile["version"] = self.version
        profile["segments"] = []
        return profile

    # -- storage: compact primitives for FastPrimitivesCoder -------------------

    def to_primitive(self) -> tuple:
        s = self.sessions
        return (
            2,
            self.engagement.to_primitive(),
            (s.starts, s.ends, s.counts, s.folded_sessions, s.folded_duration_ms, s.folded_events, s.max_event_ms),
            (self.seen.seen, self.seen.max_ms, self.seen.prune_at),
            self.context, self.as_of, self.watermark_lb, self.probe_at, self.last_emitted,
            self.lifecycle_at,
        )

    @classmethod
    def from_primitive(cls, data: tuple, config: ProfileConfig) -> "UserProfileState":
        if data[0] == 1:  # layout 1 kept an arrival-order counter after as_of (no longer used)
            data = data[:6] + data[7:]
        (_, engagement, sessions, seen, context, as_of, watermark_lb, probe_at, last_emitted,
         lifecycle_at) = data
        state = cls.new(config)
        state.engagement = EngagementState.from_primitive(engagement, config.score)
        s = state.sessions
        (s.starts, s.ends, s.counts, s.folded_sessions, s.folded_duration_ms, s.folded_events, s.max_event_ms) = (
            list(sessions[0]), list(sessions[1]), list(sessions[2]), *sessions[3:])
        state.seen.seen, state.seen.max_ms, state.seen.prune_at = dict(seen[0]), seen[1], seen[2]
        state.context = {k: tuple(v) for k, v in context.items()}
        state.as_of, state.watermark_lb, state.probe_at = as_of, watermark_lb, probe_at
        state.last_emitted, state.lifecycle_at = last_emitted, lifecycle_at
        return state


def _ts(ms: int) -> Timestamp:
    # From integer micros: float seconds would round some millis down by one.
    return Timestamp(micros=ms * 1000)


def _ms(ts: Timestamp) -> int:
    return ts.micros // 1000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _dead_letter(reason: str, detail: str, event: Any) -> dict:
    return pipeline_dead_letter("profile", reason, detail, event)


def _unusable(event: Any) -> Optional[tuple[str, str]]:
    """(reason, detail) if the keyed stage cannot take ``event``, else None."""
    if not isinstance(event, Mapping):
        return "not_a_mapping", f"event is a {type(event).__name__}"
    for name in ("user_key", "event_id", "event_type"):
        value = event.get(name)
        if not isinstance(value, str) or not value:
            return f"missing_{name}", f"{name} missing or not a non-empty string"
    t = event.get("occurred_at")
    if not isinstance(t, int) or isinstance(t, bool):
        return "missing_occurred_at", "occurred_at missing or not epoch millis"
    properties = event.get("properties")
    if properties is not None and not isinstance(properties, Mapping):
        return "bad_properties", "properties is not a mapping"
    return None


class _KeyByUserFn(beam.DoFn):
    """Usable events -> (user_key, event); the rest -> dead letters."""

    def __init__(self):
        self._dead_letters = Metrics.counter("onboardflow", "profile_dead_letter")

    def process(self, event):
        problem = _unusable(event)
        if problem is not None:
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, _dead_letter(*problem, event))
            return
        yield event["user_key"], event


class _UserProfileFn(beam.DoFn):
    PROFILE = ReadModifyWriteStateSpec("profile", FastPrimitivesCoder())
    LIFECYCLE = TimerSpec("lifecycle", TimeDomain.WATERMARK)
    PROBE = TimerSpec("watermark_probe", TimeDomain.WATERMARK)

    def __init__(self, config: ProfileConfig, metrics: Optional[PipelineMetrics] = None):
        self._config = config
        self._metrics = metrics or PipelineMetrics(prometheus=False)

    def setup(self):
        self._metrics.setup()
        self._duplicates = Metrics.counter("onboardflow", "duplicates_dropped")
        self._too_late = Metrics.counter("onboardflow", "too_late_events")
        self._dead_letters = Metrics.counter("onboardflow", "profile_dead_letter")
        self._lifecycle = Metrics.counter("onboardflow", "lifecycle_timers_fired")
        self._expired = Metrics.counter("onboardflow", "profile_state_expired")
        self._emitted = Metrics.counter("onboardflow", "profile_updates_emitted")
        self._future = Metrics.counter("onboardflow", "future_events")
        self._beyond_clock = Metrics.counter("onboardflow", "lifecycle_timers_beyond_clock")

    def start_bundle(self):
        # (user_key, window) -> (previous profile, current profile): one update per user per bundle.
        # Keyed with the window too: state and timers are per key *and* window.
        self._pending: dict[tuple[str, Any], tuple[Optional[dict], dict]] = {}
        # (user_key, window) -> (the primitive last written to the cell, its decoded state).
        # A user's events mostly arrive together in one bundle: decoding the
        # state once per bundle rather than once per event is a measured
        # share of the stage's CPU. Identity with what the cell returns proves
        # the cached state is the cell's current value.
        self._decoded: dict[tuple[str, Any], tuple[tuple, UserProfileState]] = {}

    def _load(self, cell, user_key: str, window) -> UserProfileState:
        data = cell.read()
        if data is None:
            return UserProfileState.new(self._config)
        cached = self._decoded.get((user_key, window))
        if cached is not None and cached[0] is data:
            return cached[1]
        return UserProfileState.from_primitive(data, self._config)

    def _store(self, cell, user_key: str, window, state: UserProfileState) -> None:
        data = state.to_primitive()
        cell.write(data)
        self._decoded[(user_key, window)] = (data, state)

    def _emit(self, user_key: str, state: UserProfileState, window) -> None:
        current = state.snapshot(user_key)
        pending = self._pending.get((user_key, window))
        previous = pending[0] if pending else state.last_emitted
        self._pending[(user_key, window)] = (previous, current)
        state.last_emitted = current

    def process(
        self,
        element,
        window=beam.DoFn.WindowParam,
        cell=beam.DoFn.StateParam(PROFILE),
        lifecycle=beam.DoFn.TimerParam(LIFECYCLE),
        probe=beam.DoFn.TimerParam(PROBE),
    ):
        user_key, event = element
        try:
            # Before anything touches the state: the decoded state of this
            # bundle is shared with the cell's value (see _load), so a
            # rejected event must not change it.
            EngagementState.validate(event)
        except InvalidEvent as exc:
            # _KeyByUserFn checks the same fields, so this is a second line of defence.
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, _dead_letter("invalid_event", str(exc), event))
            return
        t = event["occurred_at"]
        if t > _now_ms() + self._config.max_future_ms:
            self._dead_letters.inc()
            self._future.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, _dead_letter(
                "occurred_in_the_future", f"occurred_at more than {self._config.max_future_ms} ms after the "
                "pipeline's clock", event))
            return
        state = self._load(cell, user_key, window)
        if state.is_too_late(t):
            self._too_late.inc()
            self._metrics.late(1)
            yield beam.pvalue.TaggedOutput(TOO_LATE, event)
            return
        if not state.seen.add(event["event_id"], t):
            self._duplicates.inc()
            self._metrics.duplicates(1)
            return
        state.apply(event)
        if state.probe_at is None:
            state.probe_at = t
            probe.set(_ts(t))
        # Lazy lifecycle timer: every event pushes dormancy and expiry later, so
        # re-setting the timer per event would cost a timer write per event.
        # It is only moved earlier; when it fires early, on_lifecycle re-arms it.
        due = state.next_lifecycle_ms()
        if due is not None and (state.lifecycle_at is None or due < state.lifecycle_at):
            state.lifecycle_at = due
            lifecycle.set(_ts(due))
        self._emit(user_key, state, window)
        self._store(cell, user_key, window, state)

    @on_timer(PROBE)
    def on_probe(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        cell=beam.DoFn.StateParam(PROFILE),
        probe=beam.DoFn.TimerParam(PROBE),
    ):
        data = cell.read()
        if data is None:
            return
        state = UserProfileState.from_primitive(data, self._config)
        t = _ms(fired)
        state.watermark_lb = t if state.watermark_lb is None else max(state.watermark_lb, t)
        state.seen.forget_before(state.watermark_lb - self._config.allowed_lateness_ms)
        newest = state.engagement.last_event_at
        if newest is not None and newest > t:
            state.probe_at = newest
            probe.set(_ts(newest))
        else:
            state.probe_at = None
        cell.write(state.to_primitive())

    @on_timer(LIFECYCLE)
    def on_lifecycle(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        cell=beam.DoFn.StateParam(PROFILE),
        lifecycle=beam.DoFn.TimerParam(LIFECYCLE),
    ):
        data = cell.read()
        if data is None:
            return
        state = UserProfileState.from_primitive(data, self._config)
        t = _ms(fired)
        due = state.next_lifecycle_ms()
        if due is None or t > _now_ms() + self._config.max_future_ms:
            # At the horizon already (set before later events moved as_of
            # there), or the watermark ran past the wall clock (a drained
            # streaming run): the profile stays as it is; the next event re-arms.
            if due is not None:
                self._beyond_clock.inc()
            state.lifecycle_at = None
            cell.write(state.to_primitive())
            return
        if due > t:
            # Set before later events moved the next transition on: not due yet.
            state.lifecycle_at = due
            lifecycle.set(_ts(due))
            cell.write(state.to_primitive())
            return
        if state.expired_at(t):
            self._expired.inc()
            cell.clear()
            # An update emitted earlier in this bundle still goes out: only the state goes.
            return
        self._lifecycle.inc()
        state.advance_to(t)
        state.lifecycle_at = state.next_lifecycle_ms()
        if state.lifecycle_at is not None:
            lifecycle.set(_ts(state.lifecycle_at))
        self._emit(key, state, window)
        cell.write(state.to_primitive())

    def finish_bundle(self):
        for (_, window), (previous, current) in self._pending.items():
            self._emitted.inc()
            yield WindowedValue(ProfileUpdate(previous, current), _ts(current["as_of"]), [window])
        self._pending = {}
        self._decoded = {}


class ProfileOutputs(NamedTuple):
    """The outputs of ``BuildUserProfiles``, by attribute or by tag (``outputs[TOO_LATE]``)."""

    profiles: Any
    too_late: Any
    dead_letter: Any

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


class BuildUserProfiles(beam.PTransform):
    """Anonymized events in; ``ProfileUpdate(previous, current)`` out.

    Input events carry ``user_key`` (AnonymizeEvents). Duplicates are dropped
    (counted ``duplicates_dropped``); events later than the allowed lateness go
    to the ``too_late`` output (counted ``too_late_events``); events without a
    usable ``user_key``, ``event_id``, ``event_type``, integer ``occurred_at``
    or mapping ``properties``, or stamped later than the wall clock +
    ``max_future_ms`` (reason ``occurred_in_the_future``, also counted
    ``future_events``), go to ``dead_letter`` as
    ``{"stage": "profile", "reason", "detail", "event_id", "payload"}``
    (counted ``profile_dead_letter``). With ``config.horizon_ms`` (bounded
    runs) no update is as of later than the horizon. Returns ``ProfileOutputs(profiles,
    too_late, dead_letter)``.
    """

    def __init__(self, config: ProfileConfig = ProfileConfig(), metrics: Optional[PipelineMetrics] = None):
        super().__init__()
        self._config = config
        self._metrics = metrics

    def expand(self, events):
        keyed = (
            events
            # Typed, so runners pick a deterministic key coder for the state.
            | "KeyByUser" >> beam.ParDo(_KeyByUserFn()).with_output_types(tuple[str, dict])
            .with_outputs(DEAD_LETTER, main="keyed")
        )
        built = keyed.keyed | "UpdateProfileState" >> beam.ParDo(
            _UserProfileFn(self._config, self._metrics)).with_outputs(TOO_LATE, DEAD_LETTER, main="profiles")
        dead_letters = (keyed[DEAD_LETTER], built[DEAD_LETTER]) | "MergeDeadLetters" >> beam.Flatten()
        return ProfileOutputs(built.profiles, built[TOO_LATE], dead_letters)
