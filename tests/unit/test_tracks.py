"""Onboarding tracks: the shipped policy's decisions, first-match order, validation, the Beam hook."""
import doctest
import textwrap

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

# Aliased so pytest does not try to collect Beam's class as a test class.
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from onboardflow.models import tracks
from onboardflow.models.tracks import (
    DEFAULT_TRACKS_PATH,
    TrackDecision,
    TrackPolicy,
    TrackPolicyError,
)
from onboardflow.pipelines.beam.tracks import AssignOnboardingTracks
from onboardflow.runners.local import prism_location
from onboardflow.transforms.segment import RuleSet

PRISM = [
    "--runner=PrismRunner",
    f"--prism_location={prism_location()}",
    "--experiments=disable_prism_server_singleton",
]
SEGMENTS = {"highly_engaged_new", "active_engaged", "dormant", "onboarding_stalled", "needs_help",
            "purchase_intent_no_purchase", "power_user_candidate"}


@pytest.fixture(scope="module")
def shipped():
    return TrackPolicy.from_yaml(DEFAULT_TRACKS_PATH)


@pytest.mark.parametrize("profile, decision", [
    ({"segments": ["highly_engaged_new"]}, ("advanced", "highly_engaged")),
    ({"segments": ["active_engaged"], "plan": "free"}, ("advanced", "highly_engaged")),
    ({"segments": ["onboarding_stalled"]}, ("simplified", "stalled_or_dormant")),
    ({"segments": ["dormant"]}, ("simplified", "stalled_or_dormant")),
    ({"segments": ["needs_help"]}, ("guided", "asks_for_help")),
    ({"segments": ["purchase_intent_no_purchase"], "account_tier": "enterprise"},
     ("sales_assist", "enterprise_high_intent")),
    ({"segments": ["purchase_intent_no_purchase"], "account_tier": "smb"}, ("standard", "default")),
    ({"segments": [], "segment_label": "power adopter"}, ("advanced", "power_cluster")),
    ({"segments": [], "segment_label": "dropped off"}, ("simplified", "fading_cluster")),
    ({"segments": [], "segment_label": "casual visitor"}, ("simplified", "fading_cluster")),
    ({"segments": [], "segment_label": "support seeker"}, ("guided", "support_cluster")),
    ({"segments": [], "segment_label": "explorer"}, ("standard", "default")),
    ({}, ("standard", "default")),
])
def test_shipped_policy_routes_engaged_users_to_advanced_and_stalled_ones_to_simplified(shipped, profile, decision):
    assert shipped.decide(profile) == TrackDecision(*decision)
    assert shipped.choose(profile) == decision[0]


def test_first_matching_rule_wins_so_rule_order_is_priority(shipped):
    # Both engaged and asking for help: the earlier rule (guided) wins.
    assert shipped.choose({"segments": ["active_engaged", "needs_help"]}) == "guided"
    # Engaged enterprise account with intent: sales first.
    assert shipped.choose({"segments": ["active_engaged"], "account_tier": "enterprise"}) == "sales_assist"
    # Rule segments outrank the cluster: a dormant "power adopter" gets the simplified track.
    assert shipped.choose({"segments": ["dormant"], "segment_label": "power adopter"}) == "simplified"


def test_with_track_sets_the_profile_field_and_leaves_the_input_alone(shipped):
    profile = {"user_key": "a" * 64, "segments": ["dormant"]}
    updated = shipped.with_track(profile)
    assert updated["onboarding_track"] == "simplified"
    assert "onboarding_track" not in profile


def _policy(rules, **top):
    doc = {"version": "1", "default": "standard",
           "tracks": {"standard": "the tour", "advanced": "power features"}, "rules": rules, **top}
    return TrackPolicy.from_dict(doc, source="t.yaml", known_segments=SEGMENTS)


def test_propensity_conditions_need_a_scored_profile():
    policy = _policy([{"name": "likely", "track": "advanced", "when": {"propensity": {"gte": 0.7, "lt": 0.95}}}])
    assert policy.choose({"propensity": 0.8}) == "advanced"
    assert policy.choose({"propensity": 0.96}) == "standard"
    assert policy.choose({"propensity": None}) == "standard"
    assert policy.choose({}) == "standard"


def test_all_conditions_of_a_rule_must_hold():
    policy = _policy([{"name": "r", "track": "advanced",
                       "when": {"segments_all": ["active_engaged", "power_user_candidate"], "plan": ["free"],
                                "cluster_ids": [2]}}])
    matching = {"segments": ["active_engaged", "power_user_candidate"], "plan": "free", "cluster_id": 2}
    assert policy.choose(matching) == "advanced"
    for change in ({"plan": "pro"}, {"cluster_id": 3}, {"segments": ["active_engaged"]}, {"cluster_id": True}):
        assert policy.choose({**matching, **change}) == "standard"


@pytest.mark.parametrize("rules, top, message", [
    ([], {"colour": "red"}, "t.yaml: unknown fields ['colour']"),
    ([{"name": "r", "track": "advanced", "when": {"segments_any": ["dormant"]}, "priority": 1}], {},
     "rules[0]: unknown fields ['priority']"),
    ([{"name": "r", "track": "advanced", "when": {"segmnets_any": ["dormant"]}}], {},
     "rules[0].when.segmnets_any: unknown condition"),
    ([{"name": "r", "track": "advanced", "when": {"segments_any": ["dormnat"]}}], {},
     "rules[0].when.segments_any: unknown segments ['dormnat']"),
    ([{"name": "r", "track": "expert", "when": {"segments_any": ["dormant"]}}], {},
     "rules[0].track: unknown track 'expert'"),
    ([{"name": "r", "track": "advanced", "when": {}}], {}, "rules[0].when: needs at least one condition"),
    ([{"name": "r", "track": "advanced", "when": {"plan": ["free"]}},
      {"name": "r", "track": "standard", "when": {"plan": ["pro"]}}], {}, "rules[1].name: rule name 'r' is used twice"),
    ([{"name": "Bad Name", "track": "advanced", "when": {"plan": ["free"]}}], {}, "rules[0].name"),
    ([{"name": "r", "track": "advanced", "when": {"propensity": {"above": 0.5}}}], {},
     "rules[0].when.propensity.above: unknown operator"),
    ([{"name": "r", "track": "advanced", "when": {"propensity": {"gte": 7}}}], {}, "expects a number in [0, 1]"),
    ([{"name": "r", "track": "advanced", "when": {"cluster_ids": ["2"]}}], {}, "non-negative integers"),
    ([{"name": "r", "track": "advanced", "when": {"segment_labels": []}}], {}, "non-empty list"),
    ([{"name": "r", "track": "advanced", "when": {"segment_labels": ["stalled 2"]}}], {}, "unknown segment labels"),
    ([], {"default": "expert"}, "default: default track 'expert' is not declared"),
    ([], {"tracks": {"standard": ""}}, "tracks.standard: needs a description"),
])
def test_invalid_policies_fail_on_load_naming_the_place(rules, top, message):
    with pytest.raises(TrackPolicyError) as error:
        _policy(rules, **top)
    assert message in str(error.value)


def test_tracks_file_errors_name_the_file(tmp_path):
    with pytest.raises(TrackPolicyError, match="cannot read tracks file"):
        TrackPolicy.from_yaml(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [\n")
    with pytest.raises(TrackPolicyError, match="broken.yaml: not valid YAML"):
        TrackPolicy.from_yaml(broken)


def test_segment_names_are_checked_against_the_given_rule_set(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent("""\
        version: "1"
        segments:
          - name: trialists
            when: {field: plan, eq: trial}
        retired: [old_segment]
        """))
    policy_file = tmp_path / "tracks.yaml"
    policy_file.write_text(textwrap.dedent("""\
        version: "1"
        default: standard
        tracks: {standard: "the tour", advanced: "power features"}
        rules:
          - {name: trial, track: advanced, when: {segments_any: [trialists, old_segment]}}
        """))
    assert TrackPolicy.from_yaml(policy_file, RuleSet.load(rules)).choose({"segments": ["trialists"]}) == "advanced"
    with pytest.raises(TrackPolicyError, match="unknown segments"):
        TrackPolicy.from_yaml(policy_file)  # the shipped rules know no "trialists"


def test_module_examples_run():
    assert doctest.testmod(tracks).failed == 0


def test_assign_onboarding_tracks_sets_tracks():
    profiles = [
        {"user_key": "a" * 64, "segments": ["dormant"]},
        {"user_key": "b" * 64, "segments": ["active_engaged"]},
        {"user_key": "c" * 64, "segments": []},
    ]
    with BeamTestPipeline(options=PipelineOptions(PRISM)) as p:
        out = p | beam.Create(profiles) | AssignOnboardingTracks()
        assert_that(out | "Tracks" >> beam.Map(lambda d: (d["user_key"][0], d["onboarding_track"])),
                    equal_to([("a", "simplified"), ("b", "advanced"), ("c", "standard")]), label="tracks")


def test_a_bad_tracks_file_fails_before_any_transform_is_built(tmp_path):
    bad = tmp_path / "tracks.yaml"
    bad.write_text('version: "1"\ndefault: nowhere\ntracks: {standard: "the tour"}\n')
    with pytest.raises(TrackPolicyError, match="default track 'nowhere'"):
        AssignOnboardingTracks(TrackPolicy.from_yaml(bad))


def test_a_compiled_policy_pickles_and_decides_the_same_after_the_trip(shipped):
    import pickle

    copy = pickle.loads(pickle.dumps(shipped))
    assert copy.version == shipped.version and copy.tracks == shipped.tracks
    for profile in ({"segments": ["dormant"]}, {"segments": ["active_engaged", "needs_help"]},
                    {"segments": [], "segment_label": "power adopter"}, {}):
        assert copy.decide(profile) == shipped.decide(profile)
