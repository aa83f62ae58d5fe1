"""The profile stage as a pure state machine: one user's events and timer firings in, decisions out.

Engine-free (no Beam, no Flink). ``ProfileMachine`` is the event-time driver of
the keyed profile stage; an engine keeps one ``UserProfileState`` per
``user_key`` and two event-time timers per user (``LIFECYCLE`` and ``PROBE``),
calls the machine, and carries out what it decides:

    machine.on_event(state | None, event)          -> decisions
    machine.on_probe(state | None, fired_ms)       -> decisions
    machine.on_lifecycle(state | None, key, fired_ms) -> decisions

Decisions (plain tuples; carry them out in order): ``Store(state)``
(write the state; engines persist ``state.to_primitive()``), ``ClearState``,
``SetTimer(timer, at_ms, replaces_ms)``, ``Emit(previous, current, cause)``
(a ``ProfileUpdate``), ``DeadLetter(reason, detail)``, ``TooLate``,
``Duplicate`` and ``LifecycleHeld(reason)``. Times are epoch milliseconds.
The Beam shell is ``pipelines/beam/profile.py`` (``BuildUserProfiles``); the
evaluator (``runners/cli/evaluate.py``) drives the same machine in-process.
Design notes and measurements: docs/decisions.md (``transforms/profile.py``).

Identity stitching (transforms/identity.py) sends a visitor's anonymous
events to the account they identify as, marked ``stitched``: those are
folded in whatever their lateness.

One event, in order: *unusable* (no ``user_key``, ``event_id``,
``event_type``, integer ``occurred_at``, a ``properties`` that is not a
mapping) or stamped later than the clock +
``max_future_ms`` (``occurred_in_the_future``) -> dead letter; older than the
user's watermark bound minus ``allowed_lateness`` -> too late; an ``event_id``
already seen (``RecentEventIds``) -> duplicate; else folded into the state
(``EngagementState``, ``SessionState``, the newest context), the probe and
lifecycle timers set, the profile emitted and the state stored.

The state composes the per-concern classes: ``RecentEventIds``
(normalize.py), ``SessionState`` (sessionize.py), ``EngagementState``
(score.py), ``PurchaseHistory`` (rfm.py: recency, frequency and monetary value
of the purchases), the newest anonymized context (email domain, device class,
country, os) and the account id.

Time, lateness and timers (event time throughout):

* An event older than the watermark minus ``allowed_lateness`` is *too late*:
  it does not change the profile; the engine counts it and routes it to its
  too-late output, never silently loses it. The machine knows a lower bound
  of the watermark from a per-user ``PROBE`` timer set at the newest event
  time it has seen: when the timer fires the watermark has passed it. The
  bound lags the true watermark, so the rule never rejects an on-time event
  and may let a slightly-too-late one through. A user with no state (new, or
  expired) has no bound at all: their first event is never too late, and if
  it is far behind the watermark its overdue lifecycle timers fire at once. A
  bounded replay has a watermark too (the source's, per partition), so give a
  backfill an allowed lateness that covers how late its events really are;
  the end-to-end tests use 96 hours for 3-day-late events.
* Later events within the allowed lateness simply update the profile: every
  state class here is order-independent.
* The ``LIFECYCLE`` timer re-evaluates a user with no new events when a
  time-based rule can flip: at the end of the "new user" window (signup +
  ``new_user_window``), at dormancy (last activity + ``dormancy``; fires with
  no new event, which is how dormant users are detected), at every time mark
  of the rule segments (``time_marks``, from ``RuleSet.time_marks``: e.g.
  signup + 3 days for "onboarding stalled"), and finally clears the state at
  last activity + ``state_ttl`` (the Redis profile then expires by its own
  TTL). The timer is set lazily: events only ever move it *earlier*; when it
  fires before the next transition (later events moved that on) it is re-set
  for the transition and emits nothing.
* For ``refresh_window_ms`` after the newest event (default 7 days) the same
  timer also *refreshes* a quiet user's profile every ``refresh_ms`` of event
  time (default a day after the newest event or refresh): the 7-day counts,
  recency and the decayed scores move with time alone, and the rule segments
  and online models downstream should see them move. After the window the
  refresh slows to every ``slow_refresh_ms`` (default 7 days) until dormancy,
  so the online segmenter keeps seeing users who went quiet (docs/models.md).
  At most ``refresh_window / refresh + (dormancy - refresh_window) /
  slow_refresh`` (7 + 3) updates per silence. ``refresh_ms=0`` and
  ``slow_refresh_ms=0`` turn refreshes off.

Horizon (``ProfileConfig.horizon_ms``, set for bounded runs). When a bounded
input ends, the watermark jumps to +infinity and every pending timer fires.
With a horizon H the lifecycle timer is never set later than H: the timers
due before H fire as in streaming, and every user whose profile is older than
H gets one last update exactly *as of H*; nothing is emitted beyond it. The
launcher fixes H before the run (``transforms/backfill_horizon.py``), so a
backfill's final profiles are a function of its input alone. A streaming run
has no horizon; a lifecycle timer that fires later than the clock +
``max_future_ms`` (a drained job) emits nothing (``LifecycleHeld``). Events
stamped later than that are dead letters (``occurred_in_the_future``): folded
in, they would move ``as_of`` into the future and Redis would refuse every
honest update after them.

Versions. ``current["version"] = as_of * 1000 + n`` where ``as_of`` is the
newest event or timer time folded in and ``n = min(999, events_total)``. Both
parts depend only on *which* events are in (and the timer instant), never on
their arrival order or partitioning, so a profile built from a subset of
another's events never has a larger version (a replay that reads a user's
events in another interleaving cannot roll Redis back) and the same events
give the same version (a replay's writes are no-ops). Past 999 events, a late
event that leaves ``as_of`` where it was no longer raises the version: Redis
keeps the profile without it until the next newer event or refresh carries it
in. Versions stay below 2**53 (Redis compares doubles) until the year 2255.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Union

from ..schemas.contract import MODEL_FIELDS
from ..schemas.units import DAY_MS, HOUR_MS, MINUTE_MS
from .normalize import RecentEventIds
from .rfm import SCORE_FIELDS as RFM_SCORE_FIELDS
from .rfm import PurchaseHistory
from .score import DEFAULT_SCORE_CONFIG, EngagementState, ScoreConfig
from .sessionize import SessionState

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


#: The anonymized event's context fields a profile keeps, newest by event time (schemas/contract.py).
_CONTEXT_FIELDS = ("email_domain", "device_class", "country", "os")


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
    # timer is only moved *earlier*: see ProfileMachine.on_event.
    lifecycle_at: Optional[int] = None
    last_emitted: Optional[dict] = None
    purchases: PurchaseHistory = field(default_factory=PurchaseHistory)

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
        self.purchases.add(event)
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
        profile.update(self.purchases.snapshot(self.as_of))
        for name in (*MODEL_FIELDS, *RFM_SCORE_FIELDS):
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
            3,
            self.engagement.to_primitive(),
            (s.starts, s.ends, s.counts, s.folded_sessions, s.folded_duration_ms, s.folded_events, s.max_event_ms),
            (self.seen.seen, self.seen.max_ms, self.seen.prune_at),
            self.context, self.as_of, self.watermark_lb, self.probe_at, self.last_emitted,
            self.lifecycle_at, self.purchases.to_primitive(),
        )

    @classmethod
    def from_primitive(cls, data: tuple, config: ProfileConfig) -> "UserProfileState":
        if data[0] == 1:  # layout 1 kept an arrival-order counter after as_of (no longer used)
            data = data[:6] + data[7:]
        (_, engagement, sessions, seen, context, as_of, watermark_lb, probe_at, last_emitted,
         lifecycle_at) = data[:10]
        state = cls.new(config)
        state.engagement = EngagementState.from_primitive(engagement, config.score)
        if data[0] >= 3:
            state.purchases = PurchaseHistory.from_primitive(data[10])
        else:
            # Layouts 1 and 2 kept no purchase history: the purchase count and the newest
            # purchase with a plan are in the engagement state, the amounts are not.
            count = state.engagement.event_counts.get("purchase", 0)
            state.purchases = PurchaseHistory(count, 0, state.engagement.plan_at, count)
        s = state.sessions
        (s.starts, s.ends, s.counts, s.folded_sessions, s.folded_duration_ms, s.folded_events, s.max_event_ms) = (
            list(sessions[0]), list(sessions[1]), list(sessions[2]), *sessions[3:])
        state.seen.seen, state.seen.max_ms, state.seen.prune_at = dict(seen[0]), seen[1], seen[2]
        state.context = {k: tuple(v) for k, v in context.items()}
        state.as_of, state.watermark_lb, state.probe_at = as_of, watermark_lb, probe_at
        state.last_emitted, state.lifecycle_at = last_emitted, lifecycle_at
        return state


# -- the machine --------------------------------------------------------------------

#: The two event-time timers per user.
LIFECYCLE = "lifecycle"
PROBE = "watermark_probe"

#: ``Emit.cause``: an event was folded in, or the lifecycle timer advanced the profile.
EVENT = "event"

#: ``LifecycleHeld.reason``: the profile is as of the horizon already / the timer fired
#: later than the clock + max_future_ms (a drained streaming run).
AT_HORIZON = "at_horizon"
BEYOND_CLOCK = "beyond_clock"

#: ``ClearState.reason``: the state outlived its TTL; the user was erased (transforms/erasure.py).
EXPIRED = "expired"
ERASED = "erased"

#: ``DeadLetter.reason`` of an event stamped later than the clock + max_future_ms.
OCCURRED_IN_THE_FUTURE = "occurred_in_the_future"


class Store(NamedTuple):
    """Write ``state`` as the user's state (engines persist ``state.to_primitive()``)."""

    state: UserProfileState


class ClearState(NamedTuple):
    """Drop the user's state. ``EXPIRED``: an update emitted earlier still goes out. ``ERASED``: the
    user was erased: nothing of theirs goes out any more (a pending update is dropped too)."""

    reason: str


class SetTimer(NamedTuple):
    """Set ``timer`` (``LIFECYCLE`` or ``PROBE``) to fire at event time ``at_ms``.

    ``replaces_ms``: when the timer is still pending at that time (an engine whose
    timers do not replace each other, like Flink's, deletes it); None if none is.
    """

    timer: str
    at_ms: int
    replaces_ms: Optional[int]


class Emit(NamedTuple):
    """Emit ``ProfileUpdate(previous, current)``; ``cause`` is ``EVENT`` or ``LIFECYCLE``.

    ``previous`` is the profile as last emitted (None for a fresh state). An
    engine that coalesces a user's updates keeps the first ``previous`` and the
    last ``current``. Both None from a machine made with ``snapshots=False``.
    """

    previous: Optional[dict]
    current: Optional[dict]
    cause: str


class DeadLetter(NamedTuple):
    """Route the event to the dead letters with ``reason`` and ``detail`` (field names only)."""

    reason: str
    detail: str


class TooLate(NamedTuple):
    """Route the event to the too-late output: older than ``floor_ms`` (watermark bound - allowed lateness)."""

    floor_ms: int


class Duplicate(NamedTuple):
    """Drop the event: its ``event_id`` was folded in already."""

    event_id: str


class LifecycleHeld(NamedTuple):
    """The lifecycle timer fired and the profile stays as it is (``AT_HORIZON``, ``BEYOND_CLOCK``)."""

    reason: str


Decision = Union[Store, ClearState, SetTimer, Emit, DeadLetter, TooLate, Duplicate, LifecycleHeld]


def wall_clock_ms() -> int:
    """The wall clock in epoch milliseconds: the default clock of ``ProfileMachine``."""
    return time.time_ns() // 1_000_000


def unusable(event: Any) -> Optional[tuple[str, str]]:
    """(reason, detail) if the profile stage cannot key or take ``event``, else None.

    Engines check it before keying (an event without ``user_key`` has no key);
    ``ProfileMachine.on_event`` checks it again.
    """
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


class ProfileMachine:
    """The profile stage's event-time driver for one user at a time (module docstring).

    Parameters: ``config`` (``ProfileConfig``); ``clock_ms``, a callable
    returning "now" in epoch ms (default the wall clock; a replay passes its
    own), against which ``max_future_ms`` is measured; ``snapshots``: with
    False, ``Emit`` carries no profiles (``previous`` and ``current`` None) and
    the state no ``last_emitted``: for an in-process engine that reads the
    profile it emits from the state itself (``state.snapshot(user_key)``) at
    its bundle's end, sparing a snapshot per event (the Beam shell must keep
    them: it writes the state per event and emits at ``finish_bundle``);
    ``erased``, a predicate on a user_key (``ErasedUsers``,
    transforms/erasure.py): an erased user's next event or lifecycle timer
    clears the state (``ClearState(ERASED)``), so nothing of them is kept.

    The machine holds no per-user data: each call takes the user's state (None
    when the engine holds none), may change it in place, and returns the
    decisions. A call that rejects an event (dead letter, too late, duplicate)
    leaves the state untouched, so an engine may keep decoded states in a cache.

    >>> m = ProfileMachine(ProfileConfig(), clock_ms=lambda: 10 * DAY_MS)
    >>> e = {"event_id": "e1", "user_key": "u", "event_type": "login", "occurred_at": DAY_MS}
    >>> [type(d).__name__ for d in m.on_event(None, e)]
    ['Store', 'SetTimer', 'SetTimer', 'Emit']
    >>> state = m.on_event(None, e)[0].state
    >>> m.on_event(state, e)
    (Duplicate(event_id='e1'),)
    >>> [d for d in m.on_probe(state, DAY_MS) if type(d) is not Store]
    []
    >>> m.on_lifecycle(state, "u", 2 * DAY_MS)[-1].current["as_of"] == 2 * DAY_MS  # a day's refresh
    True
    """

    def __init__(self, config: ProfileConfig = ProfileConfig(), clock_ms: Callable[[], int] = wall_clock_ms,
                 snapshots: bool = True, erased: Optional[Callable[[str], bool]] = None):
        self.config = config
        self._clock_ms = clock_ms
        self._snapshots = snapshots
        self._erased = erased

    # -- state ---------------------------------------------------------------------

    def new_state(self) -> UserProfileState:
        return UserProfileState.new(self.config)

    def load(self, primitive: Optional[tuple]) -> Optional[UserProfileState]:
        """The state stored as ``primitive`` (``UserProfileState.to_primitive``); None for None."""
        return None if primitive is None else UserProfileState.from_primitive(primitive, self.config)

    # -- inputs --------------------------------------------------------------------

    def on_event(self, state: Optional[UserProfileState], event: Any) -> tuple[Decision, ...]:
        """One event of the user ``event["user_key"]`` whose state is ``state``."""
        # unusable() covers EngagementState.validate: a rejected event never touches the state.
        problem = unusable(event)
        if problem is not None:
            return (DeadLetter(*problem),)
        if self._erased is not None and self._erased(event["user_key"]):
            return (ClearState(ERASED),)
        config = self.config
        t = event["occurred_at"]
        if t > self._clock_ms() + config.max_future_ms:
            return (DeadLetter(OCCURRED_IN_THE_FUTURE,
                               f"occurred_at more than {config.max_future_ms} ms after the pipeline's clock"),)
        if state is None:
            state = UserProfileState.new(config)
        elif state.is_too_late(t) and not event.get("stitched"):
            # A visitor's events released on identification (transforms/identity.py) are
            # history, not late input: they count as if they had been the user's all along.
            return (TooLate(state.watermark_lb - config.allowed_lateness_ms),)
        if not state.seen.add(event["event_id"], t):
            return (Duplicate(event["event_id"]),)
        state.apply(event)
        decisions: list[Decision] = [Store(state)]
        if state.probe_at is None:
            state.probe_at = t
            decisions.append(SetTimer(PROBE, t, None))
        # Lazy lifecycle timer: every event pushes dormancy and expiry later, so
        # re-setting the timer per event would cost a timer write per event.
        # It is only moved earlier; when it fires early, on_lifecycle re-arms it.
        due = state.next_lifecycle_ms()
        if due is not None and (state.lifecycle_at is None or due < state.lifecycle_at):
            decisions.append(SetTimer(LIFECYCLE, due, state.lifecycle_at))
            state.lifecycle_at = due
        decisions.append(self._emit(event["user_key"], state, EVENT))
        return tuple(decisions)

    def on_probe(self, state: Optional[UserProfileState], fired_ms: int) -> tuple[Decision, ...]:
        """The ``PROBE`` timer fired at ``fired_ms``: the watermark has passed it."""
        if state is None:
            return ()
        t = fired_ms
        state.watermark_lb = t if state.watermark_lb is None else max(state.watermark_lb, t)
        state.seen.forget_before(state.watermark_lb - self.config.allowed_lateness_ms)
        newest = state.engagement.last_event_at
        if newest is not None and newest > t:
            state.probe_at = newest
            return (Store(state), SetTimer(PROBE, newest, None))
        state.probe_at = None
        return (Store(state),)

    def on_lifecycle(self, state: Optional[UserProfileState], user_key: str, fired_ms: int) -> tuple[Decision, ...]:
        """The ``LIFECYCLE`` timer of ``user_key`` fired at ``fired_ms``."""
        if state is None:
            return ()
        if self._erased is not None and self._erased(user_key):
            return (ClearState(ERASED),)
        t = fired_ms
        due = state.next_lifecycle_ms()
        if due is None or t > self._clock_ms() + self.config.max_future_ms:
            # At the horizon already (set before later events moved as_of
            # there), or the watermark ran past the clock (a drained streaming
            # run): the profile stays as it is; the next event re-arms.
            state.lifecycle_at = None
            return (Store(state), LifecycleHeld(AT_HORIZON if due is None else BEYOND_CLOCK))
        if due > t:
            # Set before later events moved the next transition on: not due yet.
            state.lifecycle_at = due
            return (Store(state), SetTimer(LIFECYCLE, due, None))
        if state.expired_at(t):
            return (ClearState(EXPIRED),)
        state.advance_to(t)
        state.lifecycle_at = state.next_lifecycle_ms()
        decisions: list[Decision] = [Store(state)]
        if state.lifecycle_at is not None:
            decisions.append(SetTimer(LIFECYCLE, state.lifecycle_at, None))
        decisions.append(self._emit(user_key, state, LIFECYCLE))
        return tuple(decisions)

    def _emit(self, user_key: str, state: UserProfileState, cause: str) -> Emit:
        if not self._snapshots:
            return Emit(None, None, cause)
        current = state.snapshot(user_key)
        previous, state.last_emitted = state.last_emitted, current
        return Emit(previous, current, cause)
