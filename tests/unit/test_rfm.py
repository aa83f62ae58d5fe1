"""RFM (transforms/rfm.py, models/rfm_reference.py): folding purchases, the quintile reference, scoring, rules.

No services: the registry's store is a small fake with the two reads the
serving cache makes. The pipeline on the real services:
tests/integration/test_rfm.py.
"""
import json
import random

import pytest

from onboardflow.models.model_registry import ModelVersion
from onboardflow.models.rfm_reference import (
    MIN_POPULATION,
    RFM_KIND,
    RfmReference,
    boundaries,
    fit_reference,
    quintile,
)
from onboardflow.runners.cli.rfm import Refreshed, describe
from onboardflow.schemas.contract import PROFILE, rule_field_kinds
from onboardflow.schemas.records import ProfileUpdate
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.profile import ProfileConfig, ProfileMachine, Store, UserProfileState
from onboardflow.transforms.rfm import (
    SCORE_FIELDS,
    PurchaseHistory,
    RfmScorer,
    ServingReference,
    amount_cents,
    score_profile,
)
from onboardflow.transforms.segment import DEFAULT_RULES_PATH, RuleSet

T0 = 1_767_571_200_000
VALUE_SEGMENTS = {"high_intent_engaged", "low_intent_sporadic", "big_spender"}


def purchase(i, t, amount="19.00", **props):
    return {"event_id": f"p{i}", "user_key": "u", "event_type": "purchase", "occurred_at": t,
            "properties": {"amount": amount, **props}}


# --------------------------------------------------------------------------- amounts


@pytest.mark.parametrize("value, cents", [
    ("19.00", 1900), ("0", 0), ("0.005", 0), ("0.015", 2), (49, 4900), (12.5, 1250), (" 7.10 ", 710),
    ("1000000000", 100_000_000_000),
])
def test_amounts_are_read_as_exact_cents(value, cents):
    assert amount_cents(value) == cents


@pytest.mark.parametrize("value", [None, "", "abc", "19,00", "$19", "-0.01", -5, float("nan"), float("inf"),
                                   "Infinity", "1e12", True, [19], {"v": 19}])
def test_unusable_amounts_are_none(value):
    assert amount_cents(value) is None


# --------------------------------------------------------------------------- folding


def test_a_purchase_history_counts_sums_and_keeps_the_newest_purchase():
    h = PurchaseHistory()
    for i, (t, amount) in enumerate([(T0, "19.00"), (T0 + DAY_MS, "10.50"), (T0 - DAY_MS, "abc"),
                                     (T0 + 2 * DAY_MS, "-3")]):
        h.add(purchase(i, t, amount))
    h.add({"event_id": "x", "event_type": "login", "occurred_at": T0 + 9 * DAY_MS})  # not a purchase
    assert h.to_primitive() == (4, 2950, T0 + 2 * DAY_MS, 2)
    assert h.snapshot(T0 + 5 * DAY_MS) == {
        "rfm_last_purchase_at": T0 + 2 * DAY_MS, "rfm_recency_days": 3.0, "rfm_frequency": 4,
        "rfm_monetary": 29.5, "rfm_amounts_ignored": 2}
    assert PurchaseHistory().snapshot(T0) == {"rfm_last_purchase_at": None, "rfm_recency_days": None,
                                              "rfm_frequency": 0, "rfm_monetary": 0.0, "rfm_amounts_ignored": 0}


def test_any_order_and_any_split_give_exactly_the_same_history():
    rng = random.Random(3)
    events = [purchase(i, T0 + rng.randrange(30 * DAY_MS), f"{rng.randrange(1, 10_000) / 100:.2f}")
              for i in range(200)] + [purchase(999, T0, "bogus")]
    whole = PurchaseHistory()
    for e in events:
        whole.add(e)
    for _ in range(20):
        rng.shuffle(events)
        again = PurchaseHistory()
        for e in events:
            again.add(e)
        assert again == whole  # integer cents: exactly, not to within rounding
    assert PurchaseHistory.from_primitive(whole.to_primitive()) == whole


def test_the_profile_machine_folds_purchases_once_and_snapshots_them():
    machine = ProfileMachine(ProfileConfig(), clock_ms=lambda: T0 + 10 * DAY_MS)
    state = None
    for e in (purchase(1, T0, "49.00"), purchase(2, T0 + DAY_MS, "10.00"), purchase(1, T0, "49.00")):
        decisions = machine.on_event(state, e)
        state = next((d.state for d in decisions if isinstance(d, Store)), state)
    profile = state.snapshot("u")
    assert (profile["rfm_frequency"], profile["rfm_monetary"], profile["rfm_last_purchase_at"]) == (2, 59.0,
                                                                                                     T0 + DAY_MS)
    assert profile["rfm_recency_days"] == 0.0
    assert all(profile[name] is None for name in SCORE_FIELDS)  # scored downstream, after enrichment
    assert set(profile) <= set(PROFILE)


def test_states_stored_before_rfm_still_load_with_the_purchases_they_can_tell():
    machine = ProfileMachine(ProfileConfig(), clock_ms=lambda: T0 + 10 * DAY_MS)
    state = None
    for e in (purchase(1, T0, "49.00", plan="pro"), purchase(2, T0 + DAY_MS, "10.00")):
        state = machine.on_event(state, e)[0].state
    current = state.to_primitive()
    assert current[0] == 3
    layout_2 = (2,) + current[1:10]  # what the previous release stored: no purchase history
    old = UserProfileState.from_primitive(layout_2, ProfileConfig())
    # The count is in the event counts, the newest purchase with a plan in the engagement state; the
    # amounts were never kept: counted as ignored, so rfm_monetary says 0 of 2 amounts are in it.
    assert old.purchases.to_primitive() == (2, 0, T0, 2)
    assert UserProfileState.from_primitive(current, ProfileConfig()).purchases == state.purchases


# --------------------------------------------------------------------------- the reference


def buyer(frequency, monetary, last_days_ago, as_of=T0 + 60 * DAY_MS):
    return {"rfm_frequency": frequency, "rfm_monetary": monetary, "as_of": as_of,
            "rfm_last_purchase_at": as_of - int(last_days_ago * DAY_MS)}


def test_boundaries_are_nearest_rank_quintiles_and_bins_are_closed_on_the_right():
    assert boundaries(list(range(1, 11))) == (2, 4, 6, 8)
    assert boundaries([7]) == (7, 7, 7, 7)
    assert [quintile(x, (2, 4, 6, 8)) for x in (1, 2, 2.5, 4, 8, 8.01, 100)] == [1, 1, 2, 2, 4, 5, 5]


def test_ties_stay_in_one_bin():
    # 60 % of buyers bought once: the first three boundaries are 1, so one purchase scores 1, two score 4.
    ref = fit_reference([buyer(1, 19.0, 3)] * 6 + [buyer(2, 38.0, 3)] * 2 + [buyer(5, 99.0, 3)] * 2)
    assert ref.frequency == (1, 1, 1, 2)
    assert [ref.score({"rfm_frequency": f, "rfm_monetary": 1.0, "rfm_recency_days": 3.0})["rfm_f"]
            for f in (1, 2, 3)] == [1, 4, 5]
    # Everybody bought 3 days before the reference: every boundary is 3 days, and 3 days is the best bin.
    assert ref.recency_days == (3.0,) * 4
    assert ref.score({"rfm_frequency": 1, "rfm_monetary": 1.0, "rfm_recency_days": 3.0})["rfm_r"] == 5
    assert ref.score({"rfm_frequency": 1, "rfm_monetary": 1.0, "rfm_recency_days": 3.5})["rfm_r"] == 1


def test_recency_is_ranked_at_one_instant_the_newest_as_of():
    # A buyer whose profile went quiet 20 days before the others bought 1 day before *its* as_of:
    # 21 days before the population's instant.
    population = [buyer(1, 10.0, d) for d in (1, 2, 3, 4)] + [buyer(1, 10.0, 1, as_of=T0 + 40 * DAY_MS)]
    assert fit_reference(population).recency_days == (1.0, 2.0, 3.0, 4.0)
    assert fit_reference(population).as_of == T0 + 60 * DAY_MS


def test_no_buyers_or_too_few_give_no_reference():
    assert fit_reference([]) is None
    assert fit_reference([{"rfm_frequency": 0, "rfm_monetary": 0.0, "as_of": T0}] * 50) is None
    assert fit_reference([buyer(1, 1.0, 1)] * (MIN_POPULATION - 1)) is None
    assert fit_reference([buyer(1, 1.0, 1)] * (MIN_POPULATION - 1), min_population=1) is not None


def test_malformed_profiles_are_left_out_of_the_population():
    good = [buyer(f, 10.0 * f, f) for f in range(1, 6)]
    bad = [{"rfm_frequency": "3", "rfm_monetary": 1.0, "rfm_last_purchase_at": T0, "as_of": T0},
           {"rfm_frequency": 2, "rfm_monetary": float("nan"), "rfm_last_purchase_at": T0, "as_of": T0},
           {"rfm_frequency": 2, "rfm_monetary": 1.0, "rfm_last_purchase_at": None, "as_of": T0},
           {"user_key": "no rfm fields"}]
    assert fit_reference(good + bad) == fit_reference(good)
    assert fit_reference(good + bad).population == 5


def test_the_reference_is_the_same_in_any_order_and_its_json_is_portable_and_stable():
    rng = random.Random(5)
    population = [buyer(rng.randint(1, 8), rng.randrange(1, 50_000) / 100, rng.uniform(0, 45)) for _ in range(300)]
    ref = fit_reference(population)
    rng.shuffle(population)
    assert fit_reference(population).to_json() == ref.to_json()  # same bytes: the same registry version
    body = json.loads(ref.to_json())
    assert body["format"] == 1 and body["population"] == 300 and "version" not in body
    loaded = RfmReference.from_json(ref.to_json(), "rfm-000004")
    assert loaded.version == "rfm-000004" and loaded.with_version(None) == ref


@pytest.mark.parametrize("payload", [b"[]", b'{"format": 2}', b'{"format": 1, "recency_days": [1, 2, 3]}',
                                     b'{"format": 1, "recency_days": [4, 3, 2, 1], "frequency": [1, 1, 1, 1], '
                                     b'"monetary": [1, 1, 1, 1], "population": 5, "as_of": 0}'])
def test_a_malformed_reference_is_refused(payload):
    with pytest.raises((ValueError, KeyError)):
        RfmReference.from_json(payload)


# --------------------------------------------------------------------------- scoring


REFERENCE = RfmReference((2.0, 7.0, 14.0, 30.0), (1, 1, 2, 4), (19.0, 49.0, 99.0, 150.0), 40, T0, "rfm-000002")


def test_scores_need_a_purchase_and_a_reference():
    buyer_profile = {"user_key": "u", "rfm_frequency": 3, "rfm_monetary": 120.0, "rfm_recency_days": 1.5}
    assert score_profile(buyer_profile, REFERENCE) == dict(buyer_profile, rfm_r=5, rfm_f=4, rfm_m=4,
                                                           rfm_reference="rfm-000002")
    visitor = {"user_key": "v", "rfm_frequency": 0, "rfm_monetary": 0.0, "rfm_recency_days": None}
    assert {k: score_profile(visitor, REFERENCE)[k] for k in SCORE_FIELDS} == dict.fromkeys(SCORE_FIELDS)
    assert {k: score_profile(buyer_profile, None)[k] for k in SCORE_FIELDS} == dict.fromkeys(SCORE_FIELDS)


class FakeStore:
    """The two reads ``ServingReference`` makes of the registry's Redis copy."""

    def __init__(self):
        self.versions, self.current, self.reads = {}, None, 0

    def publish(self, reference):
        n = len(self.versions) + 1
        self.versions[n] = reference.to_json()
        self.current = n

    def current_version(self, kind):
        assert kind == RFM_KIND
        self.reads += 1
        return self.current

    def get(self, kind, number):
        payload = self.versions.get(number)
        return None if payload is None else ModelVersion(kind, number, "sha", None, payload=payload)


def test_the_serving_reference_is_rechecked_on_its_schedule_and_failures_keep_the_cached_one():
    store, now, counted = FakeStore(), [0.0], []
    scorer = RfmScorer(ServingReference(store, 60.0, clock=lambda: now[0]), lambda n, k: counted.append(n))
    profile = {"user_key": "u", "rfm_frequency": 5, "rfm_monetary": 500.0, "rfm_recency_days": 0.0}
    scorer.refresh()
    assert scorer.score(profile)["rfm_reference"] is None  # nothing published yet
    store.publish(REFERENCE)
    now[0] = 30.0
    scorer.refresh()
    assert scorer.score(profile)["rfm_reference"] is None and store.reads == 1  # not due yet
    now[0] = 61.0
    scorer.refresh()
    assert scorer.score(profile)["rfm_reference"] == "rfm-000001" and scorer.score(profile)["rfm_m"] == 5
    store.current_version = lambda kind: 1 / 0
    now[0] = 200.0
    scorer.refresh()
    assert counted == ["rfm_reference_refresh_failures"]
    assert scorer.score(profile)["rfm_reference"] == "rfm-000001"
    update = scorer.score_update(ProfileUpdate(None, profile))
    assert update.previous is None and update.current["rfm_f"] == 5


# --------------------------------------------------------------------------- value segments


def test_rules_can_name_the_rfm_fields():
    kinds = rule_field_kinds()
    assert {"rfm_r", "rfm_f", "rfm_m", "rfm_recency_days", "rfm_frequency", "rfm_monetary"} <= set(kinds)


@pytest.mark.parametrize("scores, extra, expected", [
    ((5, 5, 5), {"active_days_7d": 4, "intent_score": 12.0}, {"high_intent_engaged", "big_spender"}),
    ((4, 4, 3), {"active_days_7d": 3, "intent_score": 0.0}, {"high_intent_engaged"}),
    ((4, 4, 3), {"active_days_7d": 2, "intent_score": 0.0}, set()),  # bought lately, but not around now
    ((1, 2, 4), {"active_days_7d": 0, "intent_score": 5.9}, {"low_intent_sporadic"}),
    ((2, 1, 5), {"active_days_7d": 0, "intent_score": 6.0}, {"big_spender"}),  # intent not low enough
    ((None, None, None), {"active_days_7d": 7, "intent_score": 0.0}, set()),  # no reference or no purchase
])
def test_the_value_segments_of_the_shipped_rules(scores, extra, expected):
    rules = RuleSet.load(DEFAULT_RULES_PATH)
    assert VALUE_SEGMENTS <= set(rules.names)
    profile = {"user_key": "u", "as_of": T0, "last_event_at": T0, "session_count": 1, "sessions_7d": 1,
               "rfm_r": scores[0], "rfm_f": scores[1], "rfm_m": scores[2], **extra}
    assert rules.evaluate(profile, T0) & VALUE_SEGMENTS == expected


# --------------------------------------------------------------------------- the batch job's line


def test_the_refresh_is_described_in_one_line():
    ref = REFERENCE.with_version("rfm-000003")
    assert describe(Refreshed(120, ref, True)) == (
        'RFM reference rfm-000003 published: 40 buyers of 120 profiles; quintile boundaries '
        '{"recency_days": [2.0, 7.0, 14.0, 30.0], "frequency": [1, 1, 2, 4], "monetary": [19.0, 49.0, 99.0, 150.0]}')
    assert describe(Refreshed(120, ref, False)).startswith("RFM reference rfm-000003 unchanged:")
    assert describe(Refreshed(7, None, False)) == "RFM reference: not published, too few buyers among 7 profiles"


def test_the_docstring_examples_run():
    import doctest

    from onboardflow.models import rfm_reference
    from onboardflow.transforms import rfm

    assert doctest.testmod(rfm_reference).attempted > 0 and doctest.testmod(rfm_reference).failed == 0
    assert doctest.testmod(rfm).attempted > 0 and doctest.testmod(rfm).failed == 0
