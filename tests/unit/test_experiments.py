"""Experiments (transforms/experiments.py): assignment is sticky, uniform and independent; loading validates.

The statistical checks run over 100,000 pseudonyms computed as the
anonymization stage computes them (HMAC-SHA256 of the raw id); the hash is
deterministic, so each p-value is a fixed number, not a flaky draw.
"""
from __future__ import annotations

import doctest
import hashlib
import hmac
import pickle

import numpy as np
import pytest
from scipy import stats

from onboardflow.models.tracks import TrackPolicy
from onboardflow.transforms import experiments as experiments_module
from onboardflow.transforms.experiments import ExperimentError, ExperimentSet, unit_point
from onboardflow.transforms.segment import RuleSet

SECRET = b"unit-test-secret-for-experiments-0123"
N = 100_000
START = "2026-12-01T00:00:00Z"
START_MS = 1_796_083_200_000  # 2026-12-01T00:00:00Z
END_MS = START_MS + 90 * 86_400_000


def pseudonym(i: int) -> str:
    return hmac.new(SECRET, f"usr-{i:06d}".encode(), hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def keys() -> list[str]:
    return [pseudonym(i) for i in range(N)]


def experiment_doc(name="checklist", salt=None, weights=(0.5, 0.5), **fields) -> dict:
    doc = {"name": name, "salt": f"{name}-salt" if salt is None else salt, "status": "running", "start": START,
           "end": "2027-03-01T00:00:00Z",
           "variants": [{"name": n, "weight": w} for n, w in zip(("control", "b", "c", "d"), weights)]}
    doc.update(fields)
    return doc


def compile_(*docs, **known) -> ExperimentSet:
    return ExperimentSet.from_dict({"version": "t1", "experiments": list(docs)}, **known)


def test_the_module_examples_run():
    assert doctest.testmod(experiments_module).failed == 0


def test_points_are_uniform_over_100k_pseudonyms(keys):
    points = np.array([unit_point("checklist-salt", k) for k in keys])
    assert points.min() >= 0.0 and points.max() < 1.0
    observed, _ = np.histogram(points, bins=20, range=(0.0, 1.0))
    chi2 = stats.chisquare(observed)
    assert chi2.pvalue > 0.001, chi2
    assert stats.kstest(points, "uniform").pvalue > 0.001


def test_variants_get_their_declared_weights(keys):
    experiment = compile_(experiment_doc(weights=(0.2, 0.3, 0.5)))["checklist"]
    counts = {name: 0 for name in ("control", "b", "c")}
    for key in keys:
        counts[experiment.variant(key)] += 1
    observed = [counts[n] for n in ("control", "b", "c")]
    chi2 = stats.chisquare(observed, [N * 0.2, N * 0.3, N * 0.5])
    assert chi2.pvalue > 0.001, (observed, chi2)


def test_two_experiments_assign_independently(keys):
    both = compile_(experiment_doc("first"), experiment_doc("second", weights=(0.3, 0.7)))
    table = np.zeros((2, 2))
    for key in keys:
        table[int(both["first"].variant(key) == "b"), int(both["second"].variant(key) == "b")] += 1
    result = stats.chi2_contingency(table)
    assert result.pvalue > 0.001, (table, result.pvalue)
    # Knowing the first variant tells nothing about the second: within each arm the second's share is ~0.7.
    shares = table[:, 1] / table.sum(axis=1)
    assert np.allclose(shares, 0.7, atol=0.01), shares
    first = np.array([both["first"].point(k) for k in keys[:20_000]])
    second = np.array([both["second"].point(k) for k in keys[:20_000]])
    assert abs(stats.pearsonr(first, second).statistic) < 0.03


def test_a_users_variant_is_sticky_across_loads_pickles_and_time(keys):
    doc = experiment_doc(weights=(0.25, 0.25, 0.25, 0.25))
    one, two = compile_(doc), pickle.loads(pickle.dumps(compile_(doc)))
    profile = {"onboarding_track": "standard"}
    for key in keys[:2000]:
        variant = one["checklist"].variant(key)
        assert two["checklist"].variant(key) == variant
        assert {one.assign(profile, t, key)["checklist"] for t in (START_MS, START_MS + 86_400_000, END_MS - 1)} == \
            {variant}


def test_a_new_salt_reshuffles_users(keys):
    old, new = compile_(experiment_doc(salt="a"))["checklist"], compile_(experiment_doc(salt="b"))["checklist"]
    same = sum(old.variant(k) == new.variant(k) for k in keys[:10_000])
    assert 4_700 < same < 5_300  # half agree by chance, as for unrelated coins


@pytest.mark.parametrize("at_ms,status,served", [
    (START_MS - 1, "running", False),   # before start
    (START_MS, "running", True),        # start is inclusive
    (END_MS - 1, "running", True),
    (END_MS, "running", False),         # end is exclusive
    (START_MS + 1, "paused", False),
    (START_MS + 1, "draft", False),
    (START_MS + 1, "stopped", False),
])
def test_only_a_running_experiment_inside_its_window_serves(at_ms, status, served):
    experiments = compile_(experiment_doc(status=status))
    assert bool(experiments.assign({"user_key": "k"}, at_ms)) is served


def test_an_open_ended_experiment_runs_until_stopped():
    experiments = compile_(experiment_doc(end=None))
    assert experiments.assign({"user_key": "k"}, END_MS * 10) == {"checklist": experiments["checklist"].variant("k")}


@pytest.mark.parametrize("profile,served", [
    ({"segments": ["onboarding_stalled"], "onboarding_track": "simplified"}, True),
    ({"segments": ["dormant", "onboarding_stalled"], "onboarding_track": "standard"}, True),
    ({"segments": ["onboarding_stalled"], "onboarding_track": "advanced"}, False),   # wrong track
    ({"segments": ["dormant"], "onboarding_track": "simplified"}, False),            # no listed segment
    ({"onboarding_track": "simplified"}, False),                                     # segments unknown
    ({"segments": ["onboarding_stalled"]}, False),                                   # track unknown
])
def test_eligibility_needs_every_condition_given(profile, served):
    experiments = compile_(experiment_doc(eligible={"segments_any": ["onboarding_stalled"],
                                                    "tracks": ["standard", "simplified"]}))
    assert bool(experiments.assign({"user_key": "k", **profile}, START_MS)) is served


def test_a_profile_without_a_pseudonym_is_in_no_experiment():
    assert compile_(experiment_doc()).assign({"segments": []}, START_MS) == {}


def test_the_packaged_file_loads_against_the_packaged_rules_and_tracks():
    rules = RuleSet.load()
    policy = TrackPolicy.from_yaml(segment_rules=rules)
    experiments = ExperimentSet.load(known_segments=rules.known_segments, known_tracks=policy.tracks)
    assert len(experiments) >= 1
    for experiment in experiments:
        assert experiment.control in experiment.weights


@pytest.mark.parametrize("change,message", [
    ({"weights": (0.5, 0.4)}, "weights must sum to 1"),
    ({"weights": (1.0, 0.0)}, "must be a number above 0"),
    ({"weights": (1.0,)}, "at least two variants"),
    ({"start": "2026-12-01T00:00:00"}, "needs a timezone"),
    ({"start": "yesterday"}, "not an ISO-8601 timestamp"),
    ({"end": "2026-11-01T00:00:00Z"}, "must be after start"),
    ({"status": "live"}, "must be one of draft, running, paused, stopped"),
    ({"control": "nobody"}, "'nobody' is not one of the variants"),
    ({"salt": ""}, "salt: needs a non-empty string"),
    ({"owner": "me"}, "unknown fields ['owner']"),
    ({"eligible": {"segments_any": ["no_such_segment"]}}, "unknown names ['no_such_segment']"),
    ({"eligible": {"tracks": ["no_such_track"]}}, "unknown names ['no_such_track']"),
    ({"eligible": {"plan": ["pro"]}}, "unknown conditions ['plan']"),
    ({"name": "Checklist"}, "name: must match"),
])
def test_a_bad_experiment_is_refused_with_its_place(change, message):
    weights = change.pop("weights", (0.5, 0.5))
    with pytest.raises(ExperimentError, match="experiment") as error:
        compile_(experiment_doc(weights=weights, **change), known_segments={"onboarding_stalled"},
                 known_tracks={"standard"})
    assert message in str(error.value)


def test_names_and_salts_must_be_unique():
    with pytest.raises(ExperimentError, match=r"salts must be unique; repeated: \['same'\]"):
        compile_(experiment_doc("one", salt="same"), experiment_doc("two", salt="same"))
    with pytest.raises(ExperimentError, match=r"names must be unique"):
        compile_(experiment_doc("one", salt="a"), experiment_doc("one", salt="b"))


def test_a_file_that_cannot_be_read_names_its_path(tmp_path):
    with pytest.raises(ExperimentError, match="cannot read experiments file"):
        ExperimentSet.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("version: [", encoding="utf-8")
    with pytest.raises(ExperimentError, match="bad.yaml: not valid YAML"):
        ExperimentSet.load(tmp_path / "bad.yaml")


# --------------------------------------------------------------------------- the profile's experiments field


def stalled_experiments() -> ExperimentSet:
    return compile_(experiment_doc(eligible={"segments_any": ["onboarding_stalled"], "tracks": ["simplified"]}),
                    experiment_doc(name="everyone", weights=(0.2, 0.3, 0.5)))


def profile_at(as_of, key=None, **fields) -> dict:
    return {"user_key": key or pseudonym(7), "as_of": as_of, "segments": ["onboarding_stalled"],
            "onboarding_track": "simplified", **fields}


def test_a_profiles_experiments_are_the_assignment_at_its_own_event_time():
    experiments = stalled_experiments()
    for as_of in (START_MS - 1, START_MS, END_MS - 1, END_MS):
        profile = profile_at(as_of)
        updated = experiments.with_experiments(profile)
        assert updated["experiments"] == experiments.assign(profile, as_of)
        assert {k: v for k, v in updated.items() if k != "experiments"} == profile  # nothing else changes
    assert experiments.with_experiments(profile_at(START_MS - 1))["experiments"] == {}        # before start
    assert experiments.with_experiments(profile_at(END_MS))["experiments"] == {}              # end is exclusive
    assert set(experiments.with_experiments(profile_at(START_MS))["experiments"]) == {"checklist", "everyone"}


def test_the_same_profile_gets_the_same_variants_whenever_and_wherever_it_is_computed(keys):
    experiments = stalled_experiments()
    copy = pickle.loads(pickle.dumps(experiments))  # as a worker receives it
    for key in keys[:2000]:
        profile = profile_at(START_MS + 5, key)
        first = experiments.with_experiments(profile)["experiments"]
        assert copy.with_experiments(profile)["experiments"] == first
        assert first == {"checklist": experiments["checklist"].variant(key),
                         "everyone": experiments["everyone"].variant(key)}


def test_leaving_eligibility_removes_the_experiment_and_coming_back_gives_the_same_variant(keys):
    experiments = stalled_experiments()
    for key in keys[:500]:
        stalled = experiments.with_experiments(profile_at(START_MS, key))["experiments"]
        engaged = experiments.with_experiments(profile_at(START_MS + 1, key, segments=["active_engaged"],
                                                          onboarding_track="advanced"))["experiments"]
        back = experiments.with_experiments(profile_at(START_MS + 2, key))["experiments"]
        assert set(engaged) == {"everyone"} and engaged["everyone"] == stalled["everyone"]
        assert back == stalled


def test_a_stopped_experiment_leaves_the_profiles_written_after_the_stop():
    running, stopped = stalled_experiments(), compile_(
        experiment_doc(status="stopped", eligible={"segments_any": ["onboarding_stalled"], "tracks": ["simplified"]}),
        experiment_doc(name="everyone", weights=(0.2, 0.3, 0.5)))
    assert set(running.with_experiments(profile_at(START_MS))["experiments"]) == {"checklist", "everyone"}
    assert set(stopped.with_experiments(profile_at(START_MS))["experiments"]) == {"everyone"}


def test_without_a_track_eligibility_follows_the_policys_choice_and_no_track_is_written():
    experiments = stalled_experiments()
    untracked = profile_at(START_MS)
    del untracked["onboarding_track"]
    chosen = []

    def choose(profile):
        chosen.append(profile["segments"])
        return "simplified"

    updated = experiments.with_experiments(untracked, choose)
    assert set(updated["experiments"]) == {"checklist", "everyone"} and chosen == [["onboarding_stalled"]]
    assert "onboarding_track" not in updated
    assert set(experiments.with_experiments(untracked, lambda p: "advanced")["experiments"]) == {"everyone"}
    assert set(experiments.with_experiments(untracked)["experiments"]) == {"everyone"}  # no policy: not eligible
    # A profile with a track is judged by it; the policy is not asked.
    assert set(experiments.with_experiments(profile_at(START_MS), lambda p: "advanced")["experiments"]) == {
        "checklist", "everyone"}


def test_a_profile_without_an_event_time_or_a_pseudonym_gets_no_experiments():
    experiments = stalled_experiments()
    assert experiments.with_experiments(profile_at(None))["experiments"] == {}
    assert experiments.with_experiments(profile_at(True))["experiments"] == {}
    assert experiments.with_experiments({"as_of": START_MS, "segments": []})["experiments"] == {}


def test_the_packaged_experiments_reach_profiles_of_the_packaged_tracks():
    rules = RuleSet.load()
    policy = TrackPolicy.from_yaml(segment_rules=rules)
    experiments = ExperimentSet.load(known_segments=rules.known_segments, known_tracks=policy.tracks)
    checklist = experiments["checklist_first"]
    key = pseudonym(3)
    on = {"user_key": key, "as_of": checklist.start_ms, "segments": [], "onboarding_track": "standard"}
    assert experiments.with_experiments(on)["experiments"] == {"checklist_first": checklist.variant(key)}
    assert experiments.with_experiments({**on, "onboarding_track": "advanced"})["experiments"] == {}
    # With the models off: no track, and the policy's default (standard) makes the profile eligible.
    untracked = {k: v for k, v in on.items() if k != "onboarding_track"}
    assert experiments.with_experiments(untracked, policy.choose)["experiments"] == {
        "checklist_first": checklist.variant(key)}
