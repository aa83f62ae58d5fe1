"""The keyed profile stage (pipelines/beam/profile.py driving transforms/profile.py): what a user notices.

Most tests drive ``BuildUserProfiles`` with a TestStream on Prism, so event
time, the watermark and the stage's timers behave as on a real runner. Each
pipeline takes well under a second on the shared Prism job server; the
ProfileConfig uses minutes and hours where production uses days.

Updates are compared through their ``ProfileUpdate.previous`` link rather than
their arrival order (assert_that sees an unordered collection): sorted by
``version``, each update's ``previous`` must be the update before it, which
pins both the monotonic version and the emission order. Which events share a
bundle (and so one coalesced update) is up to the runner, so checks select
updates by content (``events_total``, ``as_of``) rather than by position.
"""
import math
import random
from dataclasses import replace

import apache_beam as beam
import pytest
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineState

# Aliased so pytest does not try to collect Beam's class as a test class.
from apache_beam.testing.test_stream import TestStream as BeamTestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from onboardflow.pipelines.beam.profile import TOO_LATE, BuildUserProfiles
from onboardflow.runners.local import local_pipeline_options
from onboardflow.schemas.units import DAY_MS, HOUR_MS, MINUTE_MS
from onboardflow.transforms.profile import ProfileConfig, UserProfileState
from onboardflow.transforms.score import ScoreConfig

MIN, HOUR = MINUTE_MS, HOUR_MS
T0 = 1_700_000_000_000 // DAY_MS * DAY_MS  # a UTC midnight

# Hours instead of days: dormancy after 12 h, state kept 24 h after the last event.
CONFIG = ProfileConfig(
    session_gap_ms=30 * MIN,
    allowed_lateness_ms=1 * HOUR,
    dedup_horizon_ms=2 * HOUR,
    new_user_window_ms=6 * HOUR,
    dormancy_ms=12 * HOUR,
    state_ttl_ms=24 * HOUR,
)


def ts(ms: int) -> Timestamp:
    # Integer micros: float seconds would blur millisecond boundaries.
    return Timestamp(micros=ms * 1000)


def event(user, at, event_type="login", event_id=None, **properties):
    return {
        "event_id": event_id or f"{user}-{event_type}-{at}",
        "user_key": user,
        "event_type": event_type,
        "occurred_at": at,
        "properties": properties,
    }


def arriving(*events):
    """Events as a TestStream element batch, each at its own event time."""
    return [TimestampedValue(e, ts(e["occurred_at"])) for e in events]


def closed_form(events, at, config: ScoreConfig = CONFIG.score):
    """sum_i w_i * exp(-ln2 * (at - t_i) / half_life): the engagement score by definition."""
    return math.fsum(
        config.engagement_weight(e["event_type"])
        * math.exp(-math.log(2) * (at - e["occurred_at"]) / config.half_life_ms)
        for e in events
    )


def run_profiles(stream, config=CONFIG, check_updates=None, too_late=None, dead_letters=None):
    """Run ``stream | BuildUserProfiles(config)`` on Prism; returns the PipelineResult.

    ``check_updates(updates)`` gets every ProfileUpdate as
    ``{"previous": dict|None, "current": dict}``; ``too_late`` is the expected
    list of too-late event ids; ``dead_letters`` a check of the dead letters.
    Every run also checks the per-user version chain.
    """
    pipeline = beam.Pipeline(options=local_pipeline_options(streaming=True))
    outputs = pipeline | stream | BuildUserProfiles(config)
    updates = outputs.profiles | "AsDicts" >> beam.Map(lambda u: {"previous": u.previous, "current": u.current})
    assert_that(updates, versions_chain_per_user, label="VersionChain")
    if check_updates is not None:
        assert_that(updates, check_updates, label="Updates")
    late_ids = outputs[TOO_LATE] | "LateIds" >> beam.Map(lambda e: e["event_id"])
    assert_that(late_ids, equal_to(too_late or []), label="TooLate")
    if dead_letters is None:
        assert_that(outputs.dead_letter, equal_to([]), label="NoDeadLetters")
    else:
        assert_that(outputs.dead_letter, dead_letters, label="DeadLetters")
    result = pipeline.run()
    assert result.wait_until_finish() == PipelineState.DONE
    return result


def counter(result, name) -> int:
    found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in found)


def by_user(updates) -> dict:
    """user_key -> that user's updates sorted by version."""
    users: dict = {}
    for u in updates:
        users.setdefault(u["current"]["user_key"], []).append(u)
    return {k: sorted(v, key=lambda u: u["current"]["version"]) for k, v in users.items()}


def versions_chain_per_user(updates):
    for user, chain in by_user(updates).items():
        versions = [u["current"]["version"] for u in chain]
        assert len(set(versions)) == len(versions), f"{user}: repeated versions {versions}"
        for before, after in zip(chain, chain[1:]):
            # previous is None only when a fresh profile starts after the state expired.
            if after["previous"] is not None:
                assert after["previous"]["version"] == before["current"]["version"], (user, versions)
            assert after["current"]["version"] > before["current"]["version"]
        assert chain[0]["previous"] is None, f"{user}: the first update has no previous profile"


def final(chain) -> dict:
    return chain[-1]["current"]


def at_most(chain, as_of) -> list:
    return [u["current"] for u in chain if u["current"]["as_of"] <= as_of]


# --------------------------------------------------------------------------- sessions


def test_events_ten_minutes_apart_share_a_session_a_two_hour_pause_starts_another_and_a_late_bridging_event_merges_them():  # noqa: E501 -- a test's name is its description; renaming would change its node id
    config = replace(CONFIG, session_gap_ms=1 * HOUR, allowed_lateness_ms=3 * HOUR, dedup_horizon_ms=6 * HOUR)
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("u", T0), event("u", T0 + 10 * MIN)))
        .advance_watermark_to(ts(T0 + 20 * MIN))
        .add_elements(arriving(event("u", T0 + 130 * MIN)))  # 2 h after the last event
        .advance_watermark_to(ts(T0 + 3 * HOUR))
        # 110 min behind the watermark, within the 3 h lateness; 60 min from both sessions.
        .add_elements(arriving(event("u", T0 + 70 * MIN)))
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["u"]
        by_total = {p["events_total"]: p for p in at_most(chain, T0 + 130 * MIN)}
        assert by_total[2]["session_count"] == 1
        assert by_total[2]["last_session_duration_s"] == 600.0
        assert by_total[3]["session_count"] == 2
        assert by_total[3]["avg_events_per_session"] == 1.5
        merged = by_total[4]
        assert merged["as_of"] == T0 + 130 * MIN  # the late event did not move as_of
        assert (merged["session_count"], merged["avg_events_per_session"]) == (1, 4.0)
        assert merged["last_session_duration_s"] == 130 * 60.0
        assert final(chain)["session_count"] == 1

    run_profiles(stream, config, check)


# --------------------------------------------------------------------------- lateness


def test_an_event_beyond_the_allowed_lateness_goes_to_too_late_without_changing_the_profile_one_within_it_updates_it():
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("u", T0)))
        .advance_watermark_to(ts(T0 + 2 * HOUR))
        .add_elements(arriving(event("u", T0 + 2 * HOUR)))
        .advance_watermark_to(ts(T0 + 2 * HOUR + 1 * MIN))
        # 71 min behind the watermark, lateness 1 h: too late.
        .add_elements(arriving(event("u", T0 + 50 * MIN, "purchase", event_id="late-purchase", plan="pro")))
        .advance_watermark_to(ts(T0 + 2 * HOUR + 2 * MIN))
        # 32 min behind the watermark: within the lateness.
        .add_elements(arriving(event("u", T0 + 90 * MIN, "feature_used", event_id="late-feature", feature="export")))
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["u"]
        for update in chain:
            assert "purchase" not in update["current"]["event_counts"]
            assert update["current"]["purchased_plan"] is None
        with_feature = [p for p in at_most(chain, T0 + 2 * HOUR) if p["events_total"] == 3]
        assert len(with_feature) == 1
        assert with_feature[0]["features_used"] == {"export": 1}
        assert with_feature[0]["event_counts"] == {"login": 2, "feature_used": 1}
        expected = closed_form([event("u", T0), event("u", T0 + 2 * HOUR),
                                event("u", T0 + 90 * MIN, "feature_used")], T0 + 2 * HOUR)
        assert with_feature[0]["engagement_score"] == pytest.approx(expected, rel=1e-12)
        assert final(chain)["events_total"] == 3

    result = run_profiles(stream, check_updates=check, too_late=["late-purchase"])
    assert counter(result, "too_late_events") == 1


def test_a_first_event_of_an_unknown_user_is_never_too_late_and_its_overdue_timers_fire_at_once():
    # The stage bounds the watermark per user; without state there is no bound.
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0 + 200 * HOUR))
        .add_elements(arriving(event("u", T0 + 1 * HOUR)))  # 199 h behind the watermark
        .advance_watermark_to(ts(T0 + 201 * HOUR))
        .add_elements(arriving(event("u", T0 + 201 * HOUR)))
        .advance_watermark_to_infinity()
    )

    def check(updates):
        summary = [(u["current"]["as_of"] - T0, u["current"]["events_total"], u["previous"] is None)
                   for u in by_user(updates)["u"]]
        assert summary == [
            (1 * HOUR, 1, True),
            (13 * HOUR + 1, 1, False),  # dormancy, at once
            # ...then the state expired (last + 24 h): the next event starts afresh.
            (201 * HOUR, 1, True),
            (213 * HOUR + 1, 1, False),
        ]

    run_profiles(stream, check_updates=check)


# --------------------------------------------------------------------------- duplicates


def test_the_same_event_id_twice_counts_once_in_events_total_and_engagement_score():
    first = event("u", T0, "feature_used", event_id="e1", feature="export")
    second = event("u", T0 + 5 * MIN, "login", event_id="e2")
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(first, dict(first), second))  # a duplicate in the same batch
        .advance_watermark_to(ts(T0 + 10 * MIN))
        .add_elements(arriving(dict(first)))  # resent after the profile was stored
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["u"]
        latest = [p for p in at_most(chain, T0 + 10 * MIN) if p["as_of"] == T0 + 5 * MIN]
        assert len(latest) == 1, "the resent duplicate emitted an update"
        profile = latest[0]
        assert profile["events_total"] == 2
        assert profile["event_counts"] == {"feature_used": 1, "login": 1}
        assert profile["features_used"] == {"export": 1}
        assert profile["engagement_score"] == pytest.approx(closed_form([first, second], T0 + 5 * MIN), rel=1e-12)
        assert final(chain)["events_total"] == 2

    result = run_profiles(stream, check_updates=check)
    assert counter(result, "duplicates_dropped") == 2


# --------------------------------------------------------------------------- timers


def test_dormancy_is_reported_when_the_watermark_passes_last_activity_plus_dormancy_without_a_new_event():
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("dormant", T0), event("active", T0)))
        .advance_watermark_to(ts(T0 + 6 * HOUR))
        .add_elements(arriving(event("active", T0 + 6 * HOUR)))
        # Past dormant's deadline (T0 + 12 h + 1 ms), before active's (T0 + 18 h + 1 ms).
        .advance_watermark_to(ts(T0 + 13 * HOUR))
        .add_elements(arriving(event("dormant", T0 + 14 * HOUR)))  # comes back
        .advance_watermark_to_infinity()
    )

    def check(updates):
        users = by_user(updates)
        dormant = users["dormant"]
        assert [u["current"]["as_of"] - T0 for u in dormant] == [0, 12 * HOUR + 1, 14 * HOUR, 26 * HOUR + 1]
        report = dormant[1]["current"]
        assert report["recency_ms"] == 12 * HOUR + 1 > CONFIG.dormancy_ms
        assert report["events_total"] == 1 and report["last_event_at"] == T0
        # Reported before the user came back: the return's previous is the dormancy report.
        assert dormant[2]["previous"]["as_of"] == T0 + 12 * HOUR + 1
        assert dormant[2]["current"]["recency_ms"] == 0
        # The watermark passing someone else's deadline does not make "active" dormant early.
        assert [u["current"]["as_of"] - T0 for u in users["active"]] == [0, 6 * HOUR, 18 * HOUR + 1]

    run_profiles(stream, check_updates=check)


def test_the_end_of_the_new_user_window_triggers_a_re_evaluation_without_new_events():
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("n", T0, "signup", plan="trial")))
        .advance_watermark_to(ts(T0 + 1 * HOUR))
        .add_elements(arriving(event("n", T0 + 1 * HOUR, "feature_used", feature="export")))
        .advance_watermark_to(ts(T0 + 7 * HOUR))  # past signup + 6 h
        .add_elements(arriving(event("n", T0 + 8 * HOUR)))
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["n"]
        window_end = T0 + 6 * HOUR + 1
        (reeval,) = [u for u in chain if u["current"]["as_of"] == window_end]
        assert reeval["previous"]["as_of"] == T0 + 1 * HOUR
        assert reeval["current"]["events_total"] == 2
        assert reeval["current"]["signup_plan"] == "trial"
        assert reeval["current"]["days_since_signup"] * DAY_MS == pytest.approx(6 * HOUR + 1)
        (later,) = [u for u in chain if u["current"]["as_of"] == T0 + 8 * HOUR]
        assert later["previous"]["as_of"] == window_end

    run_profiles(stream, check_updates=check)


def test_state_is_cleared_after_state_ttl_and_a_later_event_starts_a_fresh_profile():
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("x", T0, "signup", plan="trial")))
        .advance_watermark_to(ts(T0 + 1 * HOUR))
        .add_elements(arriving(event("x", T0 + 1 * HOUR, "feature_used", feature="export")))
        .advance_watermark_to(ts(T0 + 30 * HOUR))  # past the last event + 24 h
        .add_elements(arriving(event("x", T0 + 31 * HOUR)))
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["x"]
        # window end, dormancy, then expiry (no update); then a fresh profile and its dormancy.
        assert [u["current"]["as_of"] - T0 for u in chain] == [
            0, 1 * HOUR, 6 * HOUR + 1, 13 * HOUR + 1, 31 * HOUR, 43 * HOUR + 1]
        fresh = chain[4]
        assert fresh["previous"] is None
        profile = fresh["current"]
        assert (profile["events_total"], profile["first_event_at"], profile["session_count"]) == (1, T0 + 31 * HOUR, 1)
        assert (profile["signup_at"], profile["signup_plan"], profile["features_used"]) == (None, None, {})
        assert profile["engagement_score"] == CONFIG.score.engagement_weight("login")

    result = run_profiles(stream, check_updates=check)
    assert counter(result, "profile_state_expired") == 2  # once at T0 + 25 h, once at T0 + 55 h


# --------------------------------------------------------------------------- versions


def test_successive_updates_have_strictly_increasing_versions_and_a_late_event_that_keeps_as_of_still_bumps_it():
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("u", T0), event("v", T0 + 1 * MIN)))
        .advance_watermark_to(ts(T0 + 20 * MIN))
        .add_elements(arriving(event("u", T0 + 20 * MIN), event("v", T0 + 20 * MIN)))
        .advance_watermark_to(ts(T0 + 21 * MIN))
        .add_elements(arriving(event("u", T0 + 10 * MIN, "click")))  # late, within the lateness
        .advance_watermark_to(ts(T0 + 22 * MIN))
        .add_elements(arriving(event("u", T0 + 5 * MIN, "click")))  # and another
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["u"]
        at_20 = [u for u in chain if u["current"]["as_of"] == T0 + 20 * MIN]
        base = (T0 + 20 * MIN) * 1000
        # n is the number of events folded in: each late event raises it without moving as_of.
        assert [(u["current"]["version"] - base, u["current"]["events_total"]) for u in at_20] == [
            (2, 2), (3, 3), (4, 4)]
        assert at_20[1]["previous"]["version"] == base + 2
        # Timer updates move as_of and keep the count.
        assert final(chain)["version"] == (T0 + 20 * MIN + CONFIG.dormancy_ms + 1) * 1000 + 4
        # The other user's versions follow their own as_of (and chain, checked for every run).
        assert [u["current"]["version"] for u in by_user(updates)["v"]] == [
            (T0 + 1 * MIN) * 1000 + 1, base + 2, (T0 + 20 * MIN + CONFIG.dormancy_ms + 1) * 1000 + 2]

    run_profiles(stream, check_updates=check)


# --------------------------------------------------------------------------- decay


def test_engagement_score_equals_the_closed_form_sum_for_events_arriving_shuffled():
    config = replace(CONFIG, score=ScoreConfig(half_life_ms=2 * HOUR))
    events = [
        event("u", T0, "signup", plan="trial"),
        event("u", T0 + 7 * MIN, "page_view", page="/pricing"),
        event("u", T0 + 25 * MIN, "tutorial_step", step="1", step_total="3"),
        event("u", T0 + 50 * MIN, "feature_used", feature="export"),
        event("u", T0 + 95 * MIN, "purchase", plan="pro"),
        event("u", T0 + 3 * HOUR, "logout"),
        event("u", T0 + 200 * MIN, "invite_sent"),
    ]
    shuffled = list(events)
    random.Random(7).shuffle(shuffled)
    stream = BeamTestStream().advance_watermark_to(ts(T0))
    for i, e in enumerate(shuffled):
        # All on time (the watermark stays at T0 + i ms), one batch each.
        stream = stream.add_elements(arriving(e)).advance_watermark_to(ts(T0 + i + 1))
    stream = stream.advance_watermark_to_infinity()
    newest = T0 + 200 * MIN

    def check(updates):
        chain = by_user(updates)["u"]
        complete = [p for p in at_most(chain, newest) if p["events_total"] == len(events)]
        assert complete[-1]["as_of"] == newest
        assert complete[-1]["engagement_score"] == pytest.approx(closed_form(events, newest, config.score), rel=1e-12)
        last = final(chain)
        assert last["as_of"] > newest + config.dormancy_ms  # read again after the timers, decayed
        assert last["engagement_score"] == pytest.approx(closed_form(events, last["as_of"], config.score), rel=1e-12)
        assert last["purchased_plan"] == "pro"

    run_profiles(stream, config, check)


# --------------------------------------------------------------------------- dead letters


def test_events_the_stage_cannot_key_or_fold_in_are_dead_lettered_with_a_reason():
    good = event("u", T0)
    bad = [
        {"event_id": "no-key", "event_type": "login", "occurred_at": T0},
        {"event_id": "no-time", "user_key": "u", "event_type": "login"},
        {"event_id": "float-time", "user_key": "u", "event_type": "login", "occurred_at": T0 + 0.5},
        {"user_key": "u", "event_type": "login", "occurred_at": T0},
        {"event_id": "no-type", "user_key": "u", "occurred_at": T0},
        {"event_id": "list-props", "user_key": "u", "event_type": "login", "occurred_at": T0, "properties": ["x"]},
    ]
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements([TimestampedValue(e, ts(T0)) for e in [good, *bad]])
        .advance_watermark_to_infinity()
    )

    def check_letters(letters):
        assert sorted((d["stage"], str(d["event_id"]), d["reason"]) for d in letters) == sorted([
            ("profile", "no-key", "missing_user_key"),
            ("profile", "no-time", "missing_occurred_at"),
            ("profile", "float-time", "missing_occurred_at"),
            ("profile", "None", "missing_event_id"),
            ("profile", "no-type", "missing_event_type"),
            ("profile", "list-props", "bad_properties"),
        ])
        assert sorted(map(repr, (d["payload"] for d in letters))) == sorted(map(repr, bad))

    def check(updates):
        assert final(by_user(updates)["u"])["events_total"] == 1

    result = run_profiles(stream, check_updates=check, dead_letters=check_letters)
    assert counter(result, "profile_dead_letter") == len(bad)


# --------------------------------------------------------------------------- UserProfileState (pure)


def state_with(*events, config=CONFIG) -> UserProfileState:
    state = UserProfileState.new(config)
    for e in events:
        assert state.seen.add(e["event_id"], e["occurred_at"])
        state.apply(e)
    return state


def test_profile_state_survives_a_fast_primitives_coder_round_trip():
    state = state_with(
        dict(event("u", T0, "signup", plan="trial"), email_domain="example.com", country="FR"),
        dict(event("u", T0 + 5 * MIN, "feature_used", feature="export", account_id="acc-1"), device_class="mobile"),
        event("u", T0 + 3 * HOUR, "tutorial_step", step="2", step_total="4"),
        event("u", T0 + 1 * MIN, "click"),  # out of order
    )
    state.advance_to(T0 + 6 * HOUR + 1)
    state.probe_at = T0 + 3 * HOUR
    state.last_emitted = state.snapshot("u")
    coder = FastPrimitivesCoder()

    restored = UserProfileState.from_primitive(coder.decode(coder.encode(state.to_primitive())), CONFIG)

    assert restored.to_primitive() == state.to_primitive()
    assert restored.snapshot("u") == state.snapshot("u")
    assert (restored.as_of, restored.version, restored.watermark_lb, restored.probe_at) == (
        T0 + 6 * HOUR + 1, (T0 + 6 * HOUR + 1) * 1000 + 4, T0 + 6 * HOUR + 1, T0 + 3 * HOUR)
    snapshot = restored.snapshot("u")
    assert (snapshot["account_id"], snapshot["email_domain"], snapshot["country"], snapshot["device_class"]) == (
        "acc-1", "example.com", "FR", "mobile")
    assert snapshot["session_count"] == 2
    # Still recognises the ids it had seen, and keeps folding in the same way.
    assert not restored.seen.add("u-click-" + str(T0 + 1 * MIN), T0 + 1 * MIN)
    later = event("u", T0 + 7 * HOUR)
    for s in (state, restored):
        s.seen.add(later["event_id"], later["occurred_at"])
        s.apply(later)
    assert restored.snapshot("u") == state.snapshot("u")


def test_next_lifecycle_is_the_new_user_window_end_then_dormancy_then_state_expiry():
    state = state_with(event("u", T0, "signup"), event("u", T0 + 1 * HOUR))
    assert state.next_lifecycle_ms() == T0 + CONFIG.new_user_window_ms + 1
    state.advance_to(T0 + CONFIG.new_user_window_ms + 1)
    assert state.next_lifecycle_ms() == T0 + 1 * HOUR + CONFIG.dormancy_ms + 1
    state.advance_to(T0 + 1 * HOUR + CONFIG.dormancy_ms + 1)
    assert state.next_lifecycle_ms() == T0 + 1 * HOUR + CONFIG.state_ttl_ms
    assert not state.expired_at(T0 + 1 * HOUR + CONFIG.state_ttl_ms - 1)
    assert state.expired_at(T0 + 1 * HOUR + CONFIG.state_ttl_ms)


def test_next_lifecycle_without_signup_is_dormancy_and_moves_with_the_newest_event():
    state = state_with(event("u", T0))
    assert state.next_lifecycle_ms() == T0 + CONFIG.dormancy_ms + 1
    state.apply(event("u", T0 + 2 * HOUR))
    assert state.next_lifecycle_ms() == T0 + 2 * HOUR + CONFIG.dormancy_ms + 1
    state.apply(event("u", T0 + 1 * HOUR))  # older: the deadline stays
    assert state.next_lifecycle_ms() == T0 + 2 * HOUR + CONFIG.dormancy_ms + 1


def test_a_late_signup_whose_new_user_window_already_ended_does_not_schedule_it():
    state = state_with(event("u", T0 + 10 * HOUR))
    state.apply(event("u", T0, "signup"))  # window ended at T0 + 6 h, before as_of
    assert state.next_lifecycle_ms() == T0 + 10 * HOUR + CONFIG.dormancy_ms + 1


def test_is_too_late_needs_a_watermark_bound_and_spares_events_within_the_lateness():
    state = state_with(event("u", T0))
    assert not state.is_too_late(T0 - 1000 * HOUR)  # no bound known yet
    state.watermark_lb = T0 + 2 * HOUR
    assert not state.is_too_late(T0 + 1 * HOUR)  # exactly the allowed lateness behind
    assert state.is_too_late(T0 + 1 * HOUR - 1)
    state.advance_to(T0 + 5 * HOUR)  # a timer fired: the watermark is past it
    assert state.watermark_lb == T0 + 5 * HOUR
    assert state.is_too_late(T0 + 4 * HOUR - 1) and not state.is_too_late(T0 + 4 * HOUR)


def test_version_is_as_of_times_1000_plus_the_number_of_events_folded_in_capped_at_999():
    state = state_with(event("u", T0 + 1 * HOUR))
    assert state.version == (T0 + 1 * HOUR) * 1000 + 1
    state.apply(event("u", T0))
    state.apply(event("u", T0 + 1 * HOUR, "click"))  # same time as as_of: does not move it either
    assert state.version == (T0 + 1 * HOUR) * 1000 + 3
    state.apply(event("u", T0 + 2 * HOUR))
    assert state.version == (T0 + 2 * HOUR) * 1000 + 4
    state.advance_to(T0 + 5 * HOUR)  # a timer: as_of moves, the count stays
    assert state.version == (T0 + 5 * HOUR) * 1000 + 4
    for i in range(1200):
        state.apply(event("u", T0 + 3 * HOUR, event_id=f"many-{i}"))
    assert state.version == (T0 + 5 * HOUR) * 1000 + 999  # past the cap a late event no longer raises it


def test_a_restored_layout_1_state_drops_its_arrival_order_counter():
    state = state_with(event("u", T0), event("u", T0 + 1 * MIN))
    current = state.to_primitive()
    layout_1 = (1,) + current[1:6] + (7,) + current[6:]
    restored = UserProfileState.from_primitive(layout_1, CONFIG)
    assert restored.to_primitive() == current and restored.version == (T0 + 1 * MIN) * 1000 + 2


@pytest.mark.parametrize("changes, message", [
    ({"dedup_horizon_ms": 30 * MIN}, "dedup_horizon_ms must cover allowed_lateness_ms"),
    ({"state_ttl_ms": 12 * HOUR}, "state_ttl_ms must exceed dormancy_ms"),
    ({"allowed_lateness_ms": 20 * HOUR, "dedup_horizon_ms": 20 * HOUR, "session_gap_ms": 5 * HOUR},
     "state_ttl_ms must exceed allowed_lateness_ms \\+ session_gap_ms"),
    ({"session_gap_ms": 0}, "session_gap_ms must be a positive"),
    ({"dormancy_ms": 1.5 * HOUR}, "dormancy_ms must be a positive"),
])
def test_profile_config_refuses_settings_that_would_lose_or_double_count_events(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **changes)


# -- refresh and time marks ----------------------------------------------------


def lifecycle_until_expiry(state):
    """The lifecycle timer's instants (ms after T0) a quiet user's state goes through before it expires."""
    due = []
    while (t := state.next_lifecycle_ms()) < state.engagement.last_event_at + state.config.state_ttl_ms:
        due.append(t - T0)
        state.advance_to(t)
    return due


def test_a_quiet_user_is_refreshed_every_refresh_period_after_the_newest_event_until_dormancy():
    config = replace(CONFIG, refresh_ms=4 * HOUR)
    state = state_with(event("u", T0), event("u", T0 + 1 * HOUR), config=config)
    due = []
    while (t := state.next_lifecycle_ms()) <= T0 + 1 * HOUR + config.dormancy_ms + 1:
        due.append(t - T0)
        state.advance_to(t)
    # 5 h, 9 h, 13 h: refreshes 4 h apart; dormancy at 13 h + 1 ms; then nothing until expiry.
    assert due == [5 * HOUR, 9 * HOUR, 13 * HOUR, 13 * HOUR + 1]
    assert state.next_lifecycle_ms() == T0 + 1 * HOUR + config.state_ttl_ms
    state.apply(event("u", T0 + 14 * HOUR))  # back: refreshes resume from the new event
    assert state.next_lifecycle_ms() == T0 + 18 * HOUR


def test_a_time_mark_schedules_a_re_evaluation_at_its_offset_from_the_field():
    config = replace(CONFIG, time_marks=(("signup_at", 3 * HOUR + 1), ("last_event_at", 2 * HOUR)))
    state = state_with(event("u", T0, "signup"), event("u", T0 + 30 * MIN), config=config)
    assert state.next_lifecycle_ms() == T0 + 2 * HOUR + 30 * MIN
    state.advance_to(T0 + 2 * HOUR + 30 * MIN)
    assert state.next_lifecycle_ms() == T0 + 3 * HOUR + 1
    # A user without a signup has no signup_at: that mark does not apply.
    anonymous = state_with(event("v", T0), config=config)
    assert anonymous.next_lifecycle_ms() == T0 + 2 * HOUR


@pytest.mark.parametrize("changes, message", [
    ({"refresh_ms": -1}, "refresh_ms must be a non-negative"),
    ({"slow_refresh_ms": -1}, "slow_refresh_ms must be a non-negative"),
    ({"time_marks": (("updated_at", HOUR),)}, "time_marks holds"),
    ({"time_marks": (("signup_at", 0),)}, "time_marks holds"),
])
def test_profile_config_refuses_a_negative_refresh_and_unknown_time_marks(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **changes)


def test_refreshes_bring_rolling_counts_recency_and_decayed_scores_up_to_date_without_new_events():
    config = replace(CONFIG, refresh_ms=3 * HOUR)
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("u", T0, "signup"), event("u", T0 + 10 * MIN, "feature_used", feature="export")))
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["u"]
        quiet = [u["current"] for u in chain if u["current"]["as_of"] > T0 + 10 * MIN]
        # A refresh 3 h after the newest event; the end of the new-user window (+6 h + 1 ms);
        # refreshes 3 h after that one and the next; dormancy at +12 h 10 min + 1 ms.
        assert [p["as_of"] - T0 for p in quiet] == [
            3 * HOUR + 10 * MIN, 6 * HOUR + 1, 9 * HOUR + 1, 12 * HOUR + 1, 12 * HOUR + 10 * MIN + 1]
        assert all(p["events_total"] == 2 for p in quiet)
        assert [p["recency_ms"] for p in quiet] == [p["as_of"] - T0 - 10 * MIN for p in quiet]
        scores = [p["engagement_score"] for p in quiet]
        assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]

    run_profiles(stream, config=config, check_updates=check)


def test_without_slow_refreshes_refreshes_stop_at_the_end_of_the_refresh_window_and_the_next_update_is_dormancy():
    config = replace(CONFIG, refresh_ms=2 * HOUR, refresh_window_ms=5 * HOUR, slow_refresh_ms=0)
    state = state_with(event("u", T0), config=config)
    due = lifecycle_until_expiry(state)
    # Refreshes at 2 h and 4 h (6 h is past the 5 h window); dormancy at 12 h + 1 ms.
    assert due == [2 * HOUR, 4 * HOUR, 12 * HOUR + 1]


def test_after_the_refresh_window_a_quiet_user_is_refreshed_at_the_slow_pace_until_dormancy():
    config = replace(CONFIG, refresh_ms=2 * HOUR, refresh_window_ms=5 * HOUR, slow_refresh_ms=3 * HOUR)
    state = state_with(event("u", T0), config=config)
    due = lifecycle_until_expiry(state)
    # Every 2 h within the 5 h window (2 h, 4 h), then every 3 h (7 h, 10 h; 13 h is past
    # dormancy at 12 h + 1 ms), then nothing until the state expires.
    assert due == [2 * HOUR, 4 * HOUR, 7 * HOUR, 10 * HOUR, 12 * HOUR + 1]
    state.apply(event("u", T0 + 13 * HOUR))  # back: the fast pace resumes from the new event
    assert state.next_lifecycle_ms() == T0 + 15 * HOUR


def test_slow_refreshes_alone_start_from_the_newest_event():
    config = replace(CONFIG, refresh_ms=0, slow_refresh_ms=5 * HOUR)
    state = state_with(event("u", T0), config=config)
    due = lifecycle_until_expiry(state)
    assert due == [5 * HOUR, 10 * HOUR, 12 * HOUR + 1]


def test_the_refresh_options_reach_the_profile_stage():
    from onboardflow.pipelines.configuration import profile_config
    from onboardflow.pipelines.options import OnboardingOptions

    default = profile_config(OnboardingOptions([]))
    assert (default.refresh_ms, default.refresh_window_ms, default.slow_refresh_ms) == (
        24 * HOUR, 7 * 24 * HOUR, 7 * 24 * HOUR)
    given = profile_config(OnboardingOptions(
        ["--profile_refresh_hours=12", "--profile_refresh_window_days=3", "--profile_slow_refresh_days=0"]))
    assert (given.refresh_ms, given.refresh_window_ms, given.slow_refresh_ms) == (12 * HOUR, 3 * 24 * HOUR, 0)


# -- versions depend only on which events are in (issue 13) -------------------------


def journey(user="u", n=40, seed=3):
    """``n`` events of one user over two hours, some sharing a timestamp, ids unique."""
    rng = random.Random(seed)
    kinds = ["login", "page_view", "click", "feature_used", "tutorial_step", "support_message"]
    return [event(user, T0 + rng.randrange(0, 120) * MIN, rng.choice(kinds), event_id=f"{user}-{i}",
                  feature=rng.choice(["export", "reports"]), step=str(rng.randrange(4)), step_total="4")
            for i in range(n)]


def folded(events, config=CONFIG) -> UserProfileState:
    """The state after folding ``events`` in this order (all on time), as the stage would."""
    state = UserProfileState.new(config)
    for e in events:
        if state.seen.add(e["event_id"], e["occurred_at"]):
            state.apply(e)
    return state


def test_a_users_events_in_any_interleaving_give_the_same_final_version_and_profile(assert_same_profiles):
    events = journey()
    expected = folded(events)
    rng = random.Random(13)
    for _ in range(50):
        # Several "partitions", each in its own order, merged in a random interleaving.
        partitions = [[], [], []]
        for e in events:
            rng.choice(partitions).append(e)
        merged = []
        while any(partitions):
            merged.append(rng.choice([p for p in partitions if p]).pop(0))
        merged += [dict(rng.choice(events)) for _ in range(5)]  # resent duplicates change nothing
        state = folded(merged)
        assert state.version == expected.version == max(e["occurred_at"] for e in events) * 1000 + len(events)
        assert_same_profiles({"u": state.snapshot("u")}, {"u": expected.snapshot("u")})  # floats: a few ulps


def test_no_prefix_or_subset_of_a_users_events_carries_a_larger_version_than_all_of_them():
    events = journey(n=60, seed=5)
    full = folded(events).version
    rng = random.Random(17)
    for _ in range(200):
        order = rng.sample(events, len(events))
        versions = []
        state = UserProfileState.new(CONFIG)
        for e in order:  # every prefix of an arrival order: the updates a replay can emit
            state.seen.add(e["event_id"], e["occurred_at"])
            state.apply(e)
            versions.append(state.version)
        assert versions == sorted(versions) and versions[-1] == full
        assert len(set(versions)) == len(versions), "every event must raise the version below the cap"
        subset = rng.sample(events, rng.randrange(1, len(events)))
        assert folded(subset).version < full  # a strict subset: fewer events, never a larger as_of


def test_a_timer_update_of_a_subset_never_outranks_the_same_timer_update_of_all_events():
    events = journey(n=30, seed=9)
    at = T0 + 5 * HOUR
    full = folded(events)
    full.advance_to(at)
    part = folded(events[:17])
    part.advance_to(at)
    assert part.version < full.version == at * 1000 + 30


def test_two_arrival_orders_through_the_stage_end_with_the_same_final_version():
    events = journey(n=12, seed=21)
    horizon = T0 + 3 * HOUR
    expected = (horizon, horizon * 1000 + 12, 12)
    for seed in (1, 2):
        order = random.Random(seed).sample(events, len(events))
        stream = BeamTestStream().advance_watermark_to(ts(T0))
        for e in order:
            stream = stream.add_elements(arriving(e))

        def check(updates):
            last = final(by_user(updates)["u"])
            assert (last["as_of"], last["version"], last["events_total"]) == expected

        run_profiles(stream.advance_watermark_to_infinity(), replace(CONFIG, horizon_ms=horizon), check)


# -- the horizon of a bounded run, and the wall clock (issue 13) ----------------------


def test_with_a_horizon_the_last_update_is_as_of_the_horizon_and_no_timer_fires_beyond_it():
    horizon = T0 + 5 * HOUR  # before dormancy (T0 + 13 h + 1 ms)
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("u", T0), event("u", T0 + 1 * HOUR), event("v", horizon)))
        .advance_watermark_to_infinity()  # the end of a bounded input
    )

    def check(updates):
        users = by_user(updates)
        assert [u["current"]["as_of"] for u in users["u"]][-1] == horizon
        last = final(users["u"])
        assert (last["version"], last["recency_ms"], last["events_total"]) == (horizon * 1000 + 2, 4 * HOUR, 2)
        # v's newest event is the horizon itself: no timer update at all.
        assert [u["current"]["as_of"] for u in users["v"]] == [horizon]
        assert max(u["current"]["as_of"] for chain in users.values() for u in chain) == horizon

    result = run_profiles(stream, replace(CONFIG, horizon_ms=horizon), check)
    assert counter(result, "lifecycle_timers_fired") == 1


def test_timers_due_before_the_horizon_fire_as_in_streaming_then_one_update_at_the_horizon():
    horizon = T0 + 20 * HOUR  # after dormancy (12 h + 1 ms), before state expiry (24 h)
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(T0))
        .add_elements(arriving(event("u", T0, "signup")))
        .advance_watermark_to_infinity()
    )

    def check(updates):
        chain = by_user(updates)["u"]
        # new-user window end, dormancy, then the horizon (not the state expiry at 24 h).
        assert [u["current"]["as_of"] - T0 for u in chain] == [0, 6 * HOUR + 1, 12 * HOUR + 1, 20 * HOUR]
        assert final(chain)["recency_ms"] == 20 * HOUR

    run_profiles(stream, replace(CONFIG, horizon_ms=horizon), check)


def test_an_event_stamped_after_the_wall_clock_is_dead_lettered_and_changes_no_profile():
    import time as _time
    now = _time.time_ns() // 1_000_000
    future = event("u", now + 1 * HOUR, event_id="from-the-future")
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(now - 2 * HOUR))
        .add_elements(arriving(event("u", now - 2 * HOUR)))
        .add_elements([TimestampedValue(future, ts(now - 2 * HOUR))])
        .advance_watermark_to(ts(now - 1 * HOUR))
    )

    def letters(found):
        assert [(d["reason"], d["event_id"]) for d in found] == [("occurred_in_the_future", "from-the-future")]

    def check(updates):
        assert final(by_user(updates)["u"])["events_total"] == 1

    result = run_profiles(stream, check_updates=check, dead_letters=letters)
    assert counter(result, "future_events") == 1


def test_a_streaming_run_emits_no_timer_update_later_than_the_wall_clock_when_its_watermark_ends():
    import time as _time
    now = _time.time_ns() // 1_000_000
    last = now - 1 * HOUR  # dormancy at last + 12 h + 1 ms: in the future
    stream = (
        BeamTestStream()
        .advance_watermark_to(ts(last))
        .add_elements(arriving(event("u", last)))
        .advance_watermark_to_infinity()  # a drained streaming job, no horizon
    )

    def check(updates):
        assert [u["current"]["as_of"] for u in by_user(updates)["u"]] == [last]

    result = run_profiles(stream, check_updates=check)
    assert counter(result, "lifecycle_timers_beyond_clock") == 1
    assert counter(result, "lifecycle_timers_fired") == 0


def test_next_lifecycle_stops_at_the_horizon():
    state = state_with(event("u", T0), config=replace(CONFIG, horizon_ms=T0 + 2 * HOUR))
    assert state.next_lifecycle_ms() == T0 + 2 * HOUR
    state.advance_to(T0 + 2 * HOUR)
    assert state.next_lifecycle_ms() is None


@pytest.mark.parametrize("changes, message", [
    ({"horizon_ms": -1}, "horizon_ms must be None or"),
    ({"horizon_ms": 1.5}, "horizon_ms must be None or"),
    ({"max_future_ms": -1}, "max_future_ms must be a non-negative"),
])
def test_profile_config_refuses_a_bad_horizon_or_future_tolerance(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **changes)
