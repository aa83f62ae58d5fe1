"""ProfileMachine (transforms/profile.py) as a pure object: events and timer firings in, exact decisions out.

No engine here: each test calls the machine the way an engine would and
checks the decisions it returns. ``Engine`` below is the smallest faithful
engine (states by key, one pending firing per timer, replaced when set again),
used where a test needs timers to fire in event-time order.
"""
import random
from dataclasses import replace

import pytest

from onboardflow.schemas.units import DAY_MS, HOUR_MS, MINUTE_MS
from onboardflow.transforms.profile import (
    AT_HORIZON,
    BEYOND_CLOCK,
    EVENT,
    EXPIRED,
    LIFECYCLE,
    OCCURRED_IN_THE_FUTURE,
    PROBE,
    ClearState,
    DeadLetter,
    Duplicate,
    Emit,
    LifecycleHeld,
    ProfileConfig,
    ProfileMachine,
    SetTimer,
    Store,
    TooLate,
    UserProfileState,
    unusable,
)
from onboardflow.transforms.score import EngagementState, InvalidEvent

MIN, HOUR = MINUTE_MS, HOUR_MS
T0 = 1_700_000_000_000 // DAY_MS * DAY_MS  # a UTC midnight

# As tests/unit/test_profile.py: dormancy after 12 h, state kept 24 h after the last event.
CONFIG = ProfileConfig(
    session_gap_ms=30 * MIN,
    allowed_lateness_ms=1 * HOUR,
    dedup_horizon_ms=2 * HOUR,
    new_user_window_ms=6 * HOUR,
    dormancy_ms=12 * HOUR,
    state_ttl_ms=24 * HOUR,
)
DORMANT = 12 * HOUR + 1


def machine(config=CONFIG, now=T0 + 30 * DAY_MS, **kwargs) -> ProfileMachine:
    return ProfileMachine(config, clock_ms=lambda: now, **kwargs)


def event(user, at, event_type="login", event_id=None, **properties):
    return {"event_id": event_id or f"{user}-{event_type}-{at}", "user_key": user, "event_type": event_type,
            "occurred_at": at, "properties": properties}


def first(m, e):
    """The state after ``e`` as a user's first event."""
    decisions = m.on_event(None, e)
    assert type(decisions[0]) is Store
    return decisions[0].state


def emitted(decisions) -> Emit:
    (found,) = [d for d in decisions if type(d) is Emit]
    return found


def kinds(decisions) -> list:
    return [type(d).__name__ for d in decisions]


# --------------------------------------------------------------------------- events


def test_a_first_event_stores_a_state_sets_both_timers_and_emits_a_profile_with_no_previous():
    m = machine()
    decisions = m.on_event(None, event("u", T0))
    state = decisions[0].state
    assert decisions == (
        Store(state),
        SetTimer(PROBE, T0, None),
        SetTimer(LIFECYCLE, T0 + DORMANT, None),
        Emit(None, state.last_emitted, EVENT),
    )
    current = decisions[-1].current
    assert current["user_key"] == "u" and current["as_of"] == T0 and current["events_total"] == 1
    assert current["version"] == T0 * 1000 + 1


def test_an_out_of_order_event_within_the_lateness_updates_the_profile_and_moves_no_timer():
    m = machine()
    state = first(m, event("u", T0 + 2 * HOUR))
    before = state.last_emitted
    decisions = m.on_event(state, event("u", T0 + 1 * HOUR, "feature_used", feature="export"))
    assert decisions == (Store(state), Emit(before, state.last_emitted, EVENT))
    current = decisions[-1].current
    assert current["as_of"] == T0 + 2 * HOUR and current["events_total"] == 2
    assert current["version"] == (T0 + 2 * HOUR) * 1000 + 2
    assert current["first_event_at"] == T0 + 1 * HOUR


def test_a_later_event_leaves_the_lifecycle_timer_where_it_is_and_an_earlier_transition_moves_it_earlier():
    m = machine()
    state = first(m, event("u", T0))
    # Dormancy moves later: the timer is lazy, it fires early and is re-armed then.
    assert kinds(m.on_event(state, event("u", T0 + HOUR))) == ["Store", "Emit"]
    assert state.lifecycle_at == T0 + DORMANT
    # A signup brings the end of the new-user window (signup + 6 h + 1 ms) before dormancy.
    decisions = m.on_event(state, event("u", T0 + 2 * HOUR, "signup", plan="trial"))
    assert decisions[1] == SetTimer(LIFECYCLE, T0 + 8 * HOUR + 1, T0 + DORMANT)
    assert state.lifecycle_at == T0 + 8 * HOUR + 1


def test_the_same_event_id_twice_is_a_duplicate_and_leaves_the_state_untouched():
    m = machine()
    e = event("u", T0, event_id="e-1")
    state = first(m, e)
    stored = state.to_primitive()
    assert m.on_event(state, dict(e, occurred_at=T0 + MIN)) == (Duplicate("e-1"),)
    assert state.to_primitive() == stored


def test_an_event_older_than_the_watermark_bound_minus_the_lateness_is_too_late_one_at_the_floor_is_not():
    m = machine()
    state = first(m, event("u", T0 + 5 * HOUR))
    assert m.on_event(state, event("u", T0, "x")) != (TooLate(T0 + 4 * HOUR),)  # no bound yet: never too late
    m.on_probe(state, T0 + 5 * HOUR)
    assert state.watermark_lb == T0 + 5 * HOUR
    stored = state.to_primitive()
    assert m.on_event(state, event("u", T0 + 4 * HOUR - 1, "y")) == (TooLate(T0 + 4 * HOUR),)
    assert state.to_primitive() == stored
    # Accepted; the probe (fired at the newest event) is set again, at this event.
    decisions = m.on_event(state, event("u", T0 + 4 * HOUR, "z"))
    assert decisions == (Store(state), SetTimer(PROBE, T0 + 4 * HOUR, None), emitted(decisions))


@pytest.mark.parametrize("bad, reason", [
    ("not a dict", "not_a_mapping"),
    ({"event_id": "e", "event_type": "login", "occurred_at": T0}, "missing_user_key"),
    ({"user_key": "u", "event_type": "login", "occurred_at": T0}, "missing_event_id"),
    ({"user_key": "u", "event_id": "e", "occurred_at": T0}, "missing_event_type"),
    ({"user_key": "u", "event_id": "e", "event_type": "login", "occurred_at": float(T0)}, "missing_occurred_at"),
    ({"user_key": "u", "event_id": "e", "event_type": "login", "occurred_at": True}, "missing_occurred_at"),
    ({"user_key": "u", "event_id": "e", "event_type": "login", "occurred_at": T0, "properties": [1]},
     "bad_properties"),
    ({"user_key": "u", "event_id": "e", "event_type": "login", "occurred_at": T0, "properties": ""},
     "bad_properties"),
])
def test_an_event_the_stage_cannot_take_is_a_dead_letter_with_its_reason(bad, reason):
    m = machine()
    state = first(m, event("u", T0))
    stored = state.to_primitive()
    (decision,) = m.on_event(state, bad)
    assert type(decision) is DeadLetter and decision.reason == reason
    assert unusable(bad)[0] == reason
    assert state.to_primitive() == stored
    assert m.on_event(None, bad) == (decision,)


@pytest.mark.parametrize("field, value", [
    ("event_type", None), ("event_type", ""), ("event_type", 3), ("occurred_at", None), ("occurred_at", "1"),
    ("occurred_at", 1.0), ("occurred_at", False), ("properties", [1]), ("properties", "x"),
])
def test_every_event_the_scores_would_refuse_is_refused_by_unusable_before_it_reaches_the_state(field, value):
    bad = dict(event("u", T0), **{field: value})
    with pytest.raises(InvalidEvent):
        EngagementState.validate(bad)
    assert unusable(bad) is not None


def test_an_event_stamped_later_than_the_clock_plus_the_tolerance_is_a_dead_letter():
    m = machine(now=T0)
    assert kinds(m.on_event(None, event("u", T0 + CONFIG.max_future_ms))) == ["Store", "SetTimer", "SetTimer", "Emit"]
    (decision,) = m.on_event(None, event("u", T0 + CONFIG.max_future_ms + 1))
    assert decision == DeadLetter(OCCURRED_IN_THE_FUTURE,
                                  f"occurred_at more than {CONFIG.max_future_ms} ms after the pipeline's clock")


# --------------------------------------------------------------------------- timers


def test_the_probe_raises_the_watermark_bound_and_follows_the_newest_event():
    m = machine()
    state = first(m, event("u", T0))
    m.on_event(state, event("u", T0 + HOUR))
    assert m.on_probe(state, T0) == (Store(state), SetTimer(PROBE, T0 + HOUR, None))
    assert state.watermark_lb == T0 and state.probe_at == T0 + HOUR
    assert m.on_probe(state, T0 + HOUR) == (Store(state),)
    assert state.watermark_lb == T0 + HOUR and state.probe_at is None
    # The next event sets the probe again.
    assert SetTimer(PROBE, T0 + 2 * HOUR, None) in m.on_event(state, event("u", T0 + 2 * HOUR))
    assert m.on_probe(None, T0) == ()


def test_a_lifecycle_timer_that_fires_before_the_next_transition_is_re_armed_and_emits_nothing():
    m = machine()
    state = first(m, event("u", T0))
    m.on_event(state, event("u", T0 + 3 * HOUR))  # dormancy now T0 + 15 h + 1 ms
    due = T0 + 3 * HOUR + DORMANT
    assert m.on_lifecycle(state, "u", T0 + DORMANT) == (Store(state), SetTimer(LIFECYCLE, due, None))
    assert state.lifecycle_at == T0 + 3 * HOUR + DORMANT


def test_the_lifecycle_timer_at_dormancy_advances_the_profile_emits_it_and_sets_the_expiry():
    m = machine()
    state = first(m, event("u", T0))
    before = state.last_emitted
    decisions = m.on_lifecycle(state, "u", T0 + DORMANT)
    assert decisions == (Store(state), SetTimer(LIFECYCLE, T0 + 24 * HOUR, None),
                         Emit(before, state.last_emitted, LIFECYCLE))
    current = decisions[-1].current
    assert current["as_of"] == T0 + DORMANT and current["recency_ms"] == DORMANT
    assert current["version"] == (T0 + DORMANT) * 1000 + 1
    assert state.watermark_lb == T0 + DORMANT


def test_the_lifecycle_timer_at_the_state_ttl_clears_the_state_and_a_later_event_starts_afresh():
    m = machine()
    state = first(m, event("u", T0))
    m.on_lifecycle(state, "u", T0 + DORMANT)
    assert m.on_lifecycle(state, "u", T0 + 24 * HOUR) == (ClearState(EXPIRED),)
    assert m.on_lifecycle(None, "u", T0 + 24 * HOUR) == ()
    decisions = m.on_event(None, event("u", T0 + 30 * HOUR))
    assert emitted(decisions).previous is None and emitted(decisions).current["events_total"] == 1


def test_a_lifecycle_timer_later_than_the_clock_holds_the_profile():
    m = machine(now=T0 + HOUR)
    state = first(m, event("u", T0))
    assert m.on_lifecycle(state, "u", T0 + DORMANT) == (Store(state), LifecycleHeld(BEYOND_CLOCK))
    assert state.lifecycle_at is None and state.as_of == T0


def test_with_a_horizon_the_last_update_is_as_of_the_horizon_and_the_timer_stops_there():
    m = machine(config=replace(CONFIG, horizon_ms=T0 + 2 * HOUR))
    state = first(m, event("u", T0))
    assert state.lifecycle_at == T0 + 2 * HOUR
    decisions = m.on_lifecycle(state, "u", T0 + 2 * HOUR)
    assert kinds(decisions) == ["Store", "Emit"] and decisions[-1].current["as_of"] == T0 + 2 * HOUR
    assert state.lifecycle_at is None
    # A timer set before the profile reached the horizon finds nothing left to do.
    assert m.on_lifecycle(state, "u", T0 + 2 * HOUR) == (Store(state), LifecycleHeld(AT_HORIZON))


def test_without_snapshots_emits_carry_no_profiles_and_the_state_keeps_no_last_emitted():
    m = machine(snapshots=False)
    decisions = m.on_event(None, event("u", T0))
    assert decisions[-1] == Emit(None, None, EVENT)
    assert decisions[0].state.last_emitted is None
    assert emitted(m.on_lifecycle(decisions[0].state, "u", T0 + DORMANT)) == Emit(None, None, LIFECYCLE)


# --------------------------------------------------------------------------- driven by an engine


class Engine:
    """States by key (stored as primitives, or as objects); one pending firing per timer; emits per call."""

    def __init__(self, m: ProfileMachine, primitives: bool):
        self.m, self.primitives = m, primitives
        self.states, self.timers, self.updates = {}, {}, []

    def _state(self, key):
        stored = self.states.get(key)
        return self.m.load(stored) if self.primitives else stored

    def _carry_out(self, key, decisions):
        for d in decisions:
            if type(d) is Store:
                self.states[key] = d.state.to_primitive() if self.primitives else d.state
            elif type(d) is ClearState:
                del self.states[key]
            elif type(d) is SetTimer:
                self.timers[(key, d.timer)] = d.at_ms
            elif type(d) is Emit:
                self.updates.append(d)

    def advance_watermark(self, to):
        while True:
            due = sorted((at, key, timer) for (key, timer), at in self.timers.items() if at <= to)
            if not due:
                return
            at, key, timer = due[0]
            del self.timers[(key, timer)]
            if timer == PROBE:
                self._carry_out(key, self.m.on_probe(self._state(key), at))
            else:
                self._carry_out(key, self.m.on_lifecycle(self._state(key), key, at))

    def event(self, e):
        self._carry_out(e["user_key"], self.m.on_event(self._state(e["user_key"]), e))


def journey(user="u"):
    rng = random.Random(7)
    events = [event(user, T0, "signup", plan="trial")]
    for i in range(40):
        at = T0 + rng.randrange(0, 5 * HOUR)
        events.append(event(user, at, rng.choice(["login", "feature_used", "page_view"]), event_id=f"e{i}",
                            feature=rng.choice(["export", "reports"])))
    return events


def run(events, primitives=False, shuffle_seed=None):
    engine = Engine(machine(), primitives)
    events = list(events)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(events)
    for e in events:
        engine.event(e)
    engine.advance_watermark(T0 + 20 * HOUR)
    return engine


def test_states_stored_as_primitives_give_the_same_decisions_as_states_kept_as_objects():
    events = journey()
    as_objects, as_primitives = run(events), run(events, primitives=True)
    assert as_objects.updates == as_primitives.updates
    assert as_objects.states["u"].to_primitive() == as_primitives.states["u"]
    assert UserProfileState.from_primitive(as_primitives.states["u"], CONFIG).snapshot("u") == \
        as_objects.states["u"].snapshot("u")


def test_any_arrival_order_with_duplicates_ends_in_the_same_profile_and_version():
    events = journey()
    in_order = run(events).updates[-1].current
    with_duplicates = run(events + events[:10], shuffle_seed=3).updates[-1].current
    shuffled = run(events, shuffle_seed=11).updates[-1].current
    # The decayed scores agree to a few ulps (transforms/score.py); everything else exactly.
    for other in (with_duplicates, shuffled):
        assert other.keys() == in_order.keys()
        for name, value in in_order.items():
            if isinstance(value, float):
                assert other[name] == pytest.approx(value, rel=1e-12), name
            else:
                assert other[name] == value, name
    assert in_order["events_total"] == 41
    # After the events: one update at the end of the new-user window, then dormancy, in event time.
    tail = [u for u in run(events).updates if u.cause == LIFECYCLE]
    assert [u.current["as_of"] for u in tail] == [T0 + 6 * HOUR + 1, max(e["occurred_at"] for e in events) + DORMANT]


def test_the_profile_core_imports_with_apache_beam_unavailable():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class NoBeam:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('apache_beam', 'pyflink'):\n"
        "            raise ImportError('no ' + name)\n"
        "sys.meta_path.insert(0, NoBeam())\n"
        "import onboardflow.transforms.profile, onboardflow.transforms.normalize\n"
        "import onboardflow.transforms.score, onboardflow.transforms.sessionize\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
