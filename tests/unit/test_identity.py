"""Identity stitching's core (transforms/identity.py) with the profile machine, no engine.

A small in-process engine runs the resolver (per device: link, held events)
in front of the profile machine (per user: state), the way both engine shells
compose them. The account's profile must come out the same whatever order
the events arrive in, and equal to a run where every device event had carried
the account id from the start.
"""
import itertools
import random

import pytest

from onboardflow.schemas.units import DAY_MS, HOUR_MS, MINUTE_MS
from onboardflow.transforms.anonymize import Pseudonymizer
from onboardflow.transforms.identity import (
    CONFLICT,
    EMAIL_LINK,
    LINKED,
    EmailMatcher,
    IdentityConfig,
    Link,
    LinkHint,
    LocalIdentities,
    anonymous_key,
    expire_at,
    released,
)
from onboardflow.transforms.profile import ProfileConfig, ProfileMachine, Store

T0 = 1_760_000_000_000 // DAY_MS * DAY_MS
USER, OTHER, DEVICE = "u" * 64, "o" * 64, "d" * 64


def event(n, t, identified, event_type="page_view", device=DEVICE, user=USER):
    return {"event_id": f"e{n}", "event_type": event_type, "occurred_at": t, "identified": identified,
            "user_key": user if identified else device, "anonymous_key": device, "properties": {}}


class Engine:
    """``LocalIdentities`` then the profile machine, states in dicts; probe timers fired after each event
    (a strict watermark)."""

    def __init__(self, config=IdentityConfig(), lateness_ms=HOUR_MS):
        self.identities = LocalIdentities(config)
        self.machine = ProfileMachine(ProfileConfig(allowed_lateness_ms=lateness_ms, dedup_horizon_ms=lateness_ms),
                                      clock_ms=lambda: T0 + 365 * DAY_MS)
        self.links, self.pending = self.identities.links, self.identities.held
        self.states, self.stitches = {}, []
        self.too_late = 0

    def feed(self, e):
        forwarded, stitches = self.identities.resolve(e)
        self.stitches += stitches
        for f in forwarded:
            key = f["user_key"]
            for d in self.machine.on_event(self.states.get(key), f):
                if type(d) is Store:
                    self.states[key] = d.state
                elif type(d).__name__ == "TooLate":
                    self.too_late += 1
            state = self.states.get(key)
            if state is not None:  # the watermark passes the newest event at once: lateness bites
                self.machine.on_probe(state, state.engagement.last_event_at)

    def profile(self, key):
        """The user's profile; floats rounded to 9 significant digits (float sums differ in the last bit
        with the order of their terms, as between the engines: tests/integration/reliability_harness.py)."""
        state = self.states.get(key)
        if state is None:
            return None
        return {k: float(f"{v:.9g}") if isinstance(v, float) else v
                for k, v in state.snapshot(key).items() if k != "updated_at"}


def journey():
    """Two days of anonymous browsing, a signup, then mixed events (some anonymous-only)."""
    events = [event(i, T0 + i * 5 * MINUTE_MS, False) for i in range(6)]
    events += [event(i, T0 + 2 * DAY_MS + i * 7 * MINUTE_MS, False) for i in range(6, 9)]
    events.append(event(9, T0 + 3 * DAY_MS, True, "signup"))
    events += [event(10 + i, T0 + 3 * DAY_MS + (i + 1) * MINUTE_MS, i % 2 == 0, "click") for i in range(6)]
    return events


def ideal_profile(events):
    """Every event as if it had carried the account id from the start (no lateness: a fresh engine)."""
    engine = Engine(lateness_ms=60 * DAY_MS)
    for e in sorted(events, key=lambda e: e["occurred_at"]):
        engine.feed({**e, "identified": True, "user_key": USER, "anonymous_key": None})
    return engine.profile(USER)


def test_the_account_holds_the_visitors_history_as_if_it_had_been_theirs_all_along():
    events = journey()
    engine = Engine()
    for e in events:
        engine.feed(e)
    assert engine.too_late == 0  # two-day-old browsing is released, not late
    assert engine.profile(USER) == ideal_profile(events)
    assert engine.profile(USER)["events_total"] == len(events)
    # One row: the signup links the device; the identified clicks after it add nothing.
    assert [(s.status, s.retire, s.event_id) for s in engine.stitches] == [(LINKED, True, "e9")]


@pytest.mark.parametrize("seed", range(8))
def test_any_arrival_order_gives_the_same_account_profile(seed):
    events = journey()
    rng = random.Random(seed)
    shuffled = events[:]
    rng.shuffle(shuffled)
    engine = Engine(lateness_ms=30 * DAY_MS)
    for e in shuffled:
        engine.feed(e)
    assert engine.profile(USER) == ideal_profile(events)
    assert engine.links[DEVICE] == Link(USER, T0 + 3 * DAY_MS, "e9")


def test_a_late_signup_moves_the_link_earlier_and_a_replay_changes_nothing():
    events = journey()
    login = event(99, T0 + 4 * DAY_MS, True, "login")
    engine = Engine(lateness_ms=30 * DAY_MS)
    for e in [login] + events:  # the login arrives first; the signup (earlier) later
        engine.feed(e)
    assert engine.links[DEVICE] == Link(USER, T0 + 3 * DAY_MS, "e9")
    # A row when the login linked the device, another when the signup moved the link earlier.
    assert [(s.event_id, s.retire) for s in engine.stitches] == [("e99", True), ("e9", False)]
    before = engine.profile(USER)
    for e in [login] + events:  # the same input again: duplicates everywhere
        engine.feed(e)
    assert engine.profile(USER) == before == ideal_profile(events + [login])


def test_a_device_that_identifies_as_a_second_account_stays_with_the_first():
    engine = Engine()
    engine.feed(event(1, T0, False))
    engine.feed(event(2, T0 + MINUTE_MS, True, "signup"))
    engine.feed(event(3, T0 + 2 * MINUTE_MS, True, "login", user=OTHER))
    engine.feed(event(4, T0 + 3 * MINUTE_MS, False))
    assert [s.status for s in engine.stitches] == [LINKED, CONFLICT]
    assert engine.profile(USER)["events_total"] == 3  # the visit, the signup, the later anonymous view
    assert engine.profile(OTHER)["events_total"] == 1


def test_held_events_are_capped_and_released_once_each():
    engine = Engine(IdentityConfig(max_pending=3))
    for i in range(5):
        engine.feed(event(i, T0 + i * MINUTE_MS, False))
    engine.feed(event(2, T0 + 2 * MINUTE_MS, False))  # a re-sent duplicate, held again
    assert len(engine.pending[DEVICE]) == 3  # the rest reached the visitor's profile only
    engine.feed(event(9, T0 + HOUR_MS, True, "signup"))
    assert engine.profile(USER)["events_total"] == 4  # three released + the signup
    assert engine.profile(DEVICE)["events_total"] == 5


def test_released_copies_are_marked_and_deduplicated():
    held = [event(1, T0, False), event(1, T0, False), event(2, T0 + 1, False)]
    out = released(held, USER)
    assert [(e["event_id"], e["user_key"], e["stitched"]) for e in out] == [("e1", USER, True), ("e2", USER, True)]
    assert held[0]["user_key"] == DEVICE  # the held events themselves are not changed


def test_events_without_a_device_id_skip_the_resolver_and_bad_settings_are_refused():
    assert anonymous_key({"user_key": USER, "anonymous_key": None}) is None
    assert anonymous_key("not an event") is None
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            IdentityConfig(max_pending=bad)
    # A day after the end of the event's hour: a device's expiry moves at most once an hour.
    assert expire_at(T0 + MINUTE_MS, DAY_MS) == T0 + HOUR_MS + DAY_MS


def test_the_permutations_of_a_short_journey_all_agree():
    events = [event(1, T0, False), event(2, T0 + MINUTE_MS, True, "signup"), event(3, T0 + 2 * MINUTE_MS, False)]
    profiles = []
    for order in itertools.permutations(events):
        engine = Engine(lateness_ms=DAY_MS)
        for e in order:
            engine.feed(e)
        profiles.append(engine.profile(USER))
    assert len(profiles) == 6 and all(p == profiles[0] for p in profiles)


# --------------------------------------------------------------------------- e-mail matching

ADDRESS = "e" * 64
OTHER_DEVICE = "f" * 64


def with_email(e, address=ADDRESS):
    return {**e, "email_key": address}


def test_a_device_that_gave_the_accounts_address_is_linked_by_email_in_either_order():
    form = with_email(event(1, T0, False, "form_submit", device=OTHER_DEVICE))
    views = [event(2 + i, T0 - (i + 1) * MINUTE_MS, False, device=OTHER_DEVICE) for i in range(3)]
    signup = with_email(event(9, T0 + DAY_MS, True, "signup"))
    profiles, links = [], set()
    for order in ([*views, form, signup], [signup, *views, form], [form, signup, *views], [*views, signup, form]):
        engine = Engine(lateness_ms=30 * DAY_MS)
        for e in order:
            engine.feed(e)
        assert engine.profile(USER)["events_total"] == 5
        emailed = [s for s in engine.stitches if s.anonymous_key == OTHER_DEVICE]
        assert [(s.match, s.status, s.retire) for s in emailed] == [("email", LINKED, True)]
        profiles.append(engine.profile(USER))
        links.add(engine.links[OTHER_DEVICE])
    assert all(p == profiles[0] for p in profiles) and links == {Link(USER, T0, "e1")}


def test_an_address_keeps_its_first_account_and_unknown_addresses_link_nothing():
    matcher = EmailMatcher()
    first = matcher.on_event(None, {}, with_email(event(1, T0, True, "signup")))
    assert first.owner == Link(USER, T0, "e1") and first.hints == ()
    second = matcher.on_event(first.owner, {}, with_email(event(2, T0 - 1, True, "signup", user=OTHER)))
    assert second.owner == first.owner  # an address is one account's
    waiting = matcher.on_event(None, {}, with_email(event(3, T0, False), "a" * 64))
    assert waiting.owner is None and waiting.devices == {DEVICE: (T0, "e3")} and EMAIL_LINK not in waiting.forward
    owned = matcher.on_event(None, waiting.devices, with_email(event(4, T0 + 5, True, "signup"), "a" * 64))
    assert owned.hints == (LinkHint(DEVICE, USER, T0, "e3"),) and owned.devices == {}


def test_the_email_pseudonym_ignores_case_and_needs_a_valid_address():
    p = Pseudonymizer(b"k" * 32)
    assert p.email_key("Jane.Doe@Example.COM ") == p.email_key("jane.doe@example.com") is not None
    assert p.email_key("not an address") is None and p.email_key(None) is None
    assert p.email_key("jane.doe@example.com") != p.user_key("jane.doe@example.com")
