"""Time-decay engagement scoring: the math and the per-user state (pure; the keyed
Beam stage that holds this state is pinned in test_profile.py)."""
import math
import pickle
import random

import pytest
from apache_beam.coders import FastPrimitivesCoder
from hypothesis import given, settings
from hypothesis import strategies as st

from onboardflow.transforms.score import (
    DAY_MS,
    DEFAULT_ENGAGEMENT_WEIGHTS,
    DEFAULT_SCORE_CONFIG,
    HISTOGRAM_DAYS,
    DailyActivity,
    DecayedScore,
    EngagementState,
    InvalidEvent,
    ScoreConfig,
)

HALF_LIFE = 7 * DAY_MS
T0 = 1_700_000_000_000 // DAY_MS * DAY_MS  # a UTC midnight
EVENT_TYPES = sorted(DEFAULT_ENGAGEMENT_WEIGHTS)


def closed_form(events, t, weights=DEFAULT_ENGAGEMENT_WEIGHTS, half_life=HALF_LIFE):
    return math.fsum(
        weights[e["event_type"]] * math.exp(-math.log(2) * (t - e["occurred_at"]) / half_life) for e in events
    )


def event(event_type, at, **properties):
    return {"event_type": event_type, "occurred_at": at, "properties": properties}


def random_events(rng, n, span_ms):
    return [event(rng.choice(EVENT_TYPES), T0 + rng.randrange(span_ms)) for _ in range(n)]


def state_of(events, config=DEFAULT_SCORE_CONFIG):
    state = EngagementState(config)
    for e in events:
        state.add(e)
    return state


# --------------------------------------------------------------------------- DecayedScore


@pytest.mark.parametrize("seed", range(8))
def test_engagement_score_matches_closed_form_in_any_arrival_order(seed):
    rng = random.Random(seed)
    events = random_events(rng, rng.randrange(1, 400), 90 * DAY_MS)
    read_at = T0 + 90 * DAY_MS + rng.randrange(10 * DAY_MS)
    expected = closed_form(events, read_at)
    for _ in range(4):
        rng.shuffle(events)
        score = state_of(events).snapshot(read_at)["engagement_score"]
        assert score == pytest.approx(expected, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(EVENT_TYPES), st.integers(min_value=0, max_value=400 * DAY_MS)),
        min_size=1,
        max_size=60,
    ),
    st.randoms(use_true_random=False),
)
def test_any_permutation_gives_the_same_score(pairs, rng):
    events = [event(t, T0 + offset) for t, offset in pairs]
    read_at = T0 + 400 * DAY_MS
    reference = state_of(events).snapshot(read_at)["engagement_score"]
    shuffled = list(events)
    rng.shuffle(shuffled)
    score = state_of(shuffled).snapshot(read_at)["engagement_score"]
    assert score == pytest.approx(reference, rel=1e-9, abs=1e-300)
    assert score == pytest.approx(closed_form(events, read_at), rel=1e-9, abs=1e-300)


def test_score_halves_after_one_half_life_without_events():
    score = DecayedScore(HALF_LIFE)
    for offset, weight in [(0, 4.0), (DAY_MS, 1.0), (3 * DAY_MS, 2.5)]:
        score.add(T0 + offset, weight)
    at = T0 + 5 * DAY_MS
    assert score.value_at(at + HALF_LIFE) == pytest.approx(score.value_at(at) / 2, rel=1e-12)
    assert score.value_at(at + 3 * HALF_LIFE) == pytest.approx(score.value_at(at) / 8, rel=1e-12)


def test_single_event_is_worth_its_weight_then_half_a_half_life_later():
    score = DecayedScore(HALF_LIFE)
    score.add(T0, 10.0)
    assert score.value_at(T0) == 10.0
    assert score.value_at(T0 + HALF_LIFE) == pytest.approx(5.0, rel=1e-12)


def test_out_of_order_event_is_folded_in_without_moving_the_anchor():
    score = DecayedScore(HALF_LIFE)
    score.add(T0 + HALF_LIFE, 1.0)
    score.add(T0, 8.0)
    assert score.t_ref == T0 + HALF_LIFE
    assert score.value_at(T0 + HALF_LIFE) == pytest.approx(1.0 + 4.0, rel=1e-12)


def test_huge_gaps_and_ancient_events_neither_overflow_nor_poison_the_score():
    score = DecayedScore(60_000)  # one-minute half-life makes gaps extreme
    score.add(0, 5.0)
    score.add(10**15, 3.0)  # ~30,000 years later
    assert score.value_at(10**15) == 3.0
    score.add(1, 7.0)  # an ancient out-of-order event contributes (essentially) nothing
    assert score.value_at(10**15) == 3.0
    assert score.value_at(10**18) == 0.0
    assert math.isfinite(score.value_ref)


def test_reading_before_the_newest_event_is_clamped_to_it():
    score = DecayedScore(HALF_LIFE)
    score.add(T0 + DAY_MS, 2.0)
    assert score.value_at(T0) == score.value_at(T0 + DAY_MS) == 2.0


def test_empty_score_is_zero():
    assert DecayedScore(HALF_LIFE).value_at(T0) == 0.0


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan")])
def test_half_life_must_be_positive_and_finite(bad):
    with pytest.raises(ValueError):
        DecayedScore(bad)


def test_negative_weights_are_refused():
    with pytest.raises(ValueError, match="login"):
        ScoreConfig(engagement_weights={**DEFAULT_ENGAGEMENT_WEIGHTS, "login": -1.0})


def test_half_life_is_configurable():
    config = ScoreConfig(half_life_ms=DAY_MS)
    state = state_of([event("purchase", T0)], config)
    assert state.snapshot(T0 + DAY_MS)["engagement_score"] == pytest.approx(5.0, rel=1e-12)


# --------------------------------------------------------------------------- DailyActivity


def test_seven_and_thirty_day_windows_count_days_and_events_with_out_of_order_arrivals():
    offsets_days = [0, 0, 5, 12, 23, 24, 24, 29]
    rng = random.Random(3)
    rng.shuffle(offsets_days)
    activity = DailyActivity()
    for d in offsets_days:
        activity.add(T0 + d * DAY_MS + 3_600_000)
    at = T0 + 29 * DAY_MS + 5
    # last 7 days = days 23..29; last 30 days = days 0..29
    assert activity.window(at, 7) == (3, 4)
    assert activity.window(at, 30) == (6, 8)
    # one day later day 0 falls out of the 30-day window
    assert activity.window(at + DAY_MS, 30) == (5, 6)


def test_window_boundary_is_the_utc_day():
    activity = DailyActivity()
    activity.add(T0 - 1)  # 23:59:59.999 of the previous day
    activity.add(T0)
    assert activity.window(T0 + 6 * DAY_MS, 7) == (1, 1)
    assert activity.window(T0 + 5 * DAY_MS, 7) == (2, 2)


def test_histogram_is_pruned_to_thirty_days_and_ignores_events_beyond_it():
    activity = DailyActivity()
    for d in range(100):
        activity.add(T0 + d * DAY_MS)
    assert len(activity.days) == HISTOGRAM_DAYS
    activity.add(T0 + 10 * DAY_MS)  # 89 days older than the newest: outside every window
    assert len(activity.days) == HISTOGRAM_DAYS
    assert activity.window(T0 + 99 * DAY_MS, 30) == (30, 30)


# --------------------------------------------------------------------------- EngagementState


def test_onboarding_progress_counts_distinct_steps_and_caps_at_one():
    state = state_of([
        event("tutorial_step", T0, step="1", step_total="3"),
        event("tutorial_step", T0 + 1, step="1", step_total="3"),
        event("tutorial_step", T0 + 2, step="2", step_total="3"),
    ])
    snap = state.snapshot(T0 + 2)
    assert snap["tutorial_steps_done"] == 2
    assert snap["onboarding_progress"] == pytest.approx(2 / 3)
    assert snap["milestones"] == []
    for step in ("3", "4", "bonus"):
        state.add(event("tutorial_step", T0 + 3, step=step, step_total="3"))
    snap = state.snapshot(T0 + 3)
    assert snap["onboarding_progress"] == 1.0
    assert snap["milestones"] == ["tutorial_completed"]


def test_onboarding_progress_uses_the_largest_step_total_and_is_unknown_without_one():
    state = state_of([event("tutorial_step", T0, step="a")])
    assert state.snapshot(T0)["onboarding_progress"] is None
    state.add(event("tutorial_step", T0 + 1, step="b", step_total="4"))
    state.add(event("tutorial_step", T0 + 2, step="c", step_total="2"))
    assert state.snapshot(T0 + 2)["onboarding_progress"] == 0.75


def test_snapshot_reports_signup_recency_frequency_features_and_plan():
    state = state_of([
        event("page_view", T0 - 3 * DAY_MS, page="/home"),
        event("signup", T0),
        event("signup", T0 + DAY_MS),  # a second signup does not move signup_at
        event("feature_used", T0 + DAY_MS, feature="export"),
        event("feature_used", T0 + 2 * DAY_MS, feature="export"),
        event("feature_used", T0 + 2 * DAY_MS, feature="share"),
        event("purchase", T0 + 2 * DAY_MS, plan="pro"),
        event("purchase", T0 + DAY_MS, plan="basic"),  # older purchase arrives late
    ])
    snap = state.snapshot(T0 + 4 * DAY_MS)
    assert snap["signup_at"] == T0
    assert snap["days_since_signup"] == 4.0
    assert snap["first_event_at"] == T0 - 3 * DAY_MS
    assert snap["last_event_at"] == T0 + 2 * DAY_MS
    assert snap["recency_ms"] == 2 * DAY_MS
    assert snap["events_total"] == 8
    assert snap["event_counts"] == {"page_view": 1, "signup": 2, "feature_used": 3, "purchase": 2}
    assert snap["features_used"] == {"export": 2, "share": 1}
    assert snap["distinct_features"] == 2
    assert snap["plan"] == "pro"
    # the 7-day window read on day +4 covers days -2..+4: the page view on day -3 is out
    assert snap["events_7d"] == 7 and snap["active_days_7d"] == 3
    assert snap["events_30d"] == 8 and snap["active_days_30d"] == 4
    assert 0 < snap["feature_usage_score"] < 100


def test_intent_score_counts_pricing_views_purchases_and_premium_features_only():
    config = ScoreConfig(premium_features=frozenset({"sso"}))
    state = state_of([
        event("page_view", T0, page="/Pricing"),
        event("page_view", T0, page="/blog"),
        event("form_submit", T0),
        event("feature_used", T0, feature="sso"),
        event("feature_used", T0, feature="export", premium="true"),
        event("feature_used", T0, feature="share"),
        event("purchase", T0),
        event("login", T0),
    ], config)
    assert state.snapshot(T0)["intent_score"] == pytest.approx(3.0 + 2.0 + 4.0 + 4.0 + 10.0)


def test_feature_usage_score_saturates_towards_100_and_crosses_80_at_17_recent_uses():
    state = state_of([event("feature_used", T0, feature="f") for _ in range(16)])
    assert state.snapshot(T0)["feature_usage_score"] == pytest.approx(100 * (1 - math.exp(-1.6)))
    assert state.snapshot(T0)["feature_usage_score"] < 80
    state.add(event("feature_used", T0, feature="f"))
    assert state.snapshot(T0)["feature_usage_score"] > 80
    state = state_of([event("feature_used", T0, feature="f") for _ in range(5000)])
    assert state.snapshot(T0)["feature_usage_score"] <= 100.0


def test_unknown_event_types_count_as_activity_with_the_configured_weight():
    state = state_of([event("brand_new_type", T0), event("invite_sent", T0)])
    snap = state.snapshot(T0)
    assert snap["events_total"] == 2
    assert snap["engagement_score"] == DEFAULT_ENGAGEMENT_WEIGHTS["invite_sent"]
    weighted = state_of([event("brand_new_type", T0)], ScoreConfig(unknown_event_weight=0.25))
    assert weighted.snapshot(T0)["engagement_score"] == 0.25


def test_tracked_features_are_bounded():
    state = state_of(
        [event("feature_used", T0, feature=f"f{i}") for i in range(12)], ScoreConfig(max_tracked_features=10)
    )
    snap = state.snapshot(T0)
    assert snap["distinct_features"] == 10 and state.features_overflow == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"event_type": "login"},
        {"event_type": "login", "occurred_at": "2024-01-01"},
        {"event_type": "login", "occurred_at": True},
        {"occurred_at": T0},
        {"event_type": "login", "occurred_at": T0, "properties": ["x"]},
        "login",
    ],
)
def test_invalid_events_are_refused_and_leave_the_state_unchanged(bad):
    state = state_of([event("login", T0)])
    before = state.to_primitive()
    with pytest.raises(InvalidEvent):
        state.add(bad)
    assert state.to_primitive() == before


@pytest.mark.parametrize("seed", range(4))
def test_whole_snapshot_is_order_independent(seed):
    rng = random.Random(seed)
    events = random_events(rng, 200, 45 * DAY_MS)
    for e in events:
        e["properties"] = {"feature": rng.choice("abc"), "step": str(rng.randrange(6)), "step_total": "5",
                           "plan": rng.choice(["free", "pro"]), "page": rng.choice(["/pricing", "/docs"])}
    at = T0 + 46 * DAY_MS
    reference = state_of(events).snapshot(at)
    rng.shuffle(events)
    shuffled = state_of(events).snapshot(at)
    for key, value in reference.items():
        if isinstance(value, float):
            assert shuffled[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert shuffled[key] == value, key


def test_empty_state_snapshot_has_zero_scores_and_no_times():
    snap = EngagementState().snapshot(T0)
    assert snap["engagement_score"] == 0.0 and snap["last_event_at"] is None and snap["recency_ms"] is None
    assert snap["onboarding_progress"] is None and snap["events_7d"] == 0


def rich_state():
    rng = random.Random(11)
    state = state_of(random_events(rng, 50, 20 * DAY_MS))
    state.add(event("tutorial_step", T0 + 5, step="1", step_total="4"))
    state.add(event("feature_used", T0 + 6, feature="export"))
    state.add(event("purchase", T0 + 7, plan="pro"))
    return state


def test_state_survives_a_pickle_round_trip():
    state = rich_state()
    restored = pickle.loads(pickle.dumps(state))
    assert restored == state
    assert restored.snapshot(T0 + 30 * DAY_MS) == state.snapshot(T0 + 30 * DAY_MS)
    restored.add(event("login", T0 + 21 * DAY_MS))  # and keeps working
    assert restored.events_total == state.events_total + 1


def test_state_survives_the_beam_state_coder_round_trip():
    state = rich_state()
    coder = FastPrimitivesCoder()
    encoded = coder.encode(state.to_primitive())
    restored = EngagementState.from_primitive(coder.decode(encoded), DEFAULT_SCORE_CONFIG)
    assert restored == state
    assert restored.snapshot(T0 + 30 * DAY_MS) == state.snapshot(T0 + 30 * DAY_MS)


def test_stored_state_of_an_unknown_format_is_refused():
    data = (99,) + EngagementState().to_primitive()[1:]
    with pytest.raises(ValueError, match="unsupported EngagementState format"):
        EngagementState.from_primitive(data)
