"""Rule segments: the seed rules, the condition language, its validation, diffs, the rule stage and its Beam step."""
import textwrap

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

# Aliased so pytest does not try to collect Beam's class as a test class.
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from onboardflow.pipelines.beam.segments import AssignRuleSegments
from onboardflow.runners.local import prism_location
from onboardflow.schemas.records import ProfileUpdate
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.segment import (
    DEFAULT_RULES_PATH,
    ProfileRejected,
    RuleError,
    RuleSet,
    segment_profile,
)

# Beam's local runner with the project's binary. No shared job server: a
# default-runner pipeline elsewhere in the process may have cached one that
# tries to download Prism.
PRISM = [
    "--runner=PrismRunner",
    f"--prism_location={prism_location()}",
    "--experiments=disable_prism_server_singleton",
]


def prism_pipeline():
    return BeamTestPipeline(options=PipelineOptions(PRISM))

AT = 1_700_000_000_000
SEEDS = {"highly_engaged_new", "dormant", "active_engaged"}


@pytest.fixture(scope="module")
def rules():
    return RuleSet.load(DEFAULT_RULES_PATH)


def seeds_of(rules, profile, at=AT):
    return rules.evaluate(profile, at) & SEEDS


def rule(when, name="s", extra="", extra_fields=None):
    """A one-segment rule set from a YAML condition."""
    body = textwrap.indent(textwrap.dedent(when).strip(), " " * 6)
    return RuleSet.from_yaml(f"version: 1\n{extra}segments:\n  - name: {name}\n    when:\n{body}\n",
                             extra_fields=extra_fields)


# --------------------------------------------------------------------------- seed rules


def test_packaged_rules_file_defines_the_seed_segments(rules):
    assert SEEDS <= set(rules.names)
    assert rules.version.startswith("2025-01.2+")


@pytest.mark.parametrize(
    "profile, expected",
    [
        # highly_engaged_new: session_count > 5 AND signup within 7 days
        ({"session_count": 6, "signup_at": AT - DAY_MS}, {"highly_engaged_new"}),
        ({"session_count": 5, "signup_at": AT - DAY_MS}, set()),  # exactly 5 is not > 5
        ({"session_count": 6, "signup_at": AT - 7 * DAY_MS}, {"highly_engaged_new"}),  # exactly 7 days: within
        ({"session_count": 6, "signup_at": AT - 7 * DAY_MS - 1}, set()),
        ({"session_count": 6}, set()),  # never signed up
        ({"signup_at": AT}, set()),  # no session count
        # dormant: last activity more than 30 days ago
        ({"last_event_at": AT - 30 * DAY_MS}, set()),  # exactly 30 days: not more than
        ({"last_event_at": AT - 30 * DAY_MS - 1}, {"dormant"}),
        ({"last_event_at": AT - 400 * DAY_MS}, {"dormant"}),
        ({"last_event_at": None}, set()),
        # active_engaged: sessions_7d > 3 OR feature_usage_score > 80
        ({"sessions_7d": 3, "feature_usage_score": 80.0}, set()),
        ({"sessions_7d": 4, "feature_usage_score": 10.0}, {"active_engaged"}),
        ({"sessions_7d": 0, "feature_usage_score": 80.01}, {"active_engaged"}),
        ({"sessions_7d": 9, "feature_usage_score": 99.0}, {"active_engaged"}),
        ({"feature_usage_score": 81.0}, {"active_engaged"}),  # OR with one branch missing
        # several at once
        (
            {"session_count": 8, "signup_at": AT - DAY_MS, "sessions_7d": 5, "last_event_at": AT},
            {"highly_engaged_new", "active_engaged"},
        ),
        ({}, set()),
    ],
)
def test_seed_rules(rules, profile, expected):
    assert seeds_of(rules, profile) == expected


def test_seed_rules_on_real_engagement_snapshots(rules):
    from onboardflow.transforms.score import EngagementState

    state = EngagementState()
    state.add({"event_type": "signup", "occurred_at": AT - DAY_MS})
    for i in range(17):  # a burst of feature use today: feature usage score ~81.7
        state.add({"event_type": "feature_used", "occurred_at": AT - i, "properties": {"feature": "export"}})
    today = state.snapshot(AT)
    assert today["feature_usage_score"] > 80
    assert seeds_of(rules, dict(today, session_count=6, sessions_7d=2), AT) == {"highly_engaged_new", "active_engaged"}
    later = AT + 30 * DAY_MS + 1
    assert seeds_of(rules, dict(state.snapshot(later), session_count=6, sessions_7d=0), later) == {"dormant"}


def test_seed_rules_evaluate_relative_to_the_evaluation_time(rules):
    profile = {"last_event_at": AT}
    assert "dormant" not in rules.evaluate(profile, AT + 30 * DAY_MS)
    assert "dormant" in rules.evaluate(profile, AT + 30 * DAY_MS + 1)


# --------------------------------------------------------------------------- condition types


@pytest.mark.parametrize(
    "condition, value, expected",
    [
        ("{field: engagement_score, gt: 5}", 5, False),
        ("{field: engagement_score, gt: 5}", 5.5, True),
        ("{field: engagement_score, gte: 5}", 5, True),
        ("{field: engagement_score, lt: 5}", 5, False),
        ("{field: engagement_score, lt: 5}", 4.9, True),
        ("{field: engagement_score, lte: 5}", 5, True),
        ("{field: engagement_score, eq: 5}", 5.0, True),
        ("{field: engagement_score, ne: 5}", 5, False),
        ("{field: engagement_score, ne: 5}", 6, True),
        ("{field: engagement_score, in: [1, 2, 3]}", 2, True),
        ("{field: engagement_score, in: [1, 2, 3]}", 4, False),
        ("{field: engagement_score, between: [1, 3]}", 1, True),
        ("{field: engagement_score, between: [1, 3]}", 3, True),
        ("{field: engagement_score, between: [1, 3]}", 3.01, False),
        ("{field: engagement_score, gt: 5}", None, False),
        ("{field: engagement_score, ne: 5}", None, False),
        ("{field: engagement_score, gt: 5}", "9", False),  # wrong type in the profile: no match, no crash
        ("{field: engagement_score, gt: 5}", True, False),
    ],
)
def test_comparisons_on_numeric_fields(condition, value, expected):
    assert rule(condition).evaluate({"engagement_score": value}, AT) == ({"s"} if expected else set())


@pytest.mark.parametrize(
    "condition, profile, expected",
    [
        ("{field: plan, eq: pro}", {"plan": "pro"}, True),
        ("{field: plan, ne: pro}", {"plan": "free"}, True),
        ("{field: plan, in: [free, trial]}", {"plan": "trial"}, True),
        ("{field: plan, in: [free, trial]}", {"plan": "pro"}, False),
        ("{field: plan, eq: pro}", {}, False),
        ("{field: dormant, eq: true}", {"dormant": True}, True),
        ("{field: dormant, eq: true}", {"dormant": 1}, False),
    ],
)
def test_comparisons_on_string_and_boolean_fields(condition, profile, expected):
    # No profile field is a boolean today (schemas/contract.py): a caller's extra field is.
    assert bool(rule(condition, extra_fields={"dormant": "bool"}).evaluate(profile, AT)) is expected


def test_rules_name_exactly_the_contracts_rule_fields():
    from onboardflow.schemas.contract import PROFILE, rule_field_kinds

    for name, kind in rule_field_kinds().items():
        assert rule(f"{{field: {name}, {'gte: 0' if kind in ('number', 'timestamp') else 'eq: x'}}}")
        assert PROFILE[name].rule == kind
    with pytest.raises(RuleError, match="unknown field 'dormant'"):
        rule("{field: dormant, eq: true}")  # a segment, never a profile field


@pytest.mark.parametrize(
    "condition, profile, expected",
    [
        ("all: [{field: events_7d, gt: 1}, {field: events_30d, gt: 10}]", {"events_7d": 2, "events_30d": 11}, True),
        ("all: [{field: events_7d, gt: 1}, {field: events_30d, gt: 10}]", {"events_7d": 2, "events_30d": 10}, False),
        ("any: [{field: events_7d, gt: 1}, {field: events_30d, gt: 10}]", {"events_7d": 0, "events_30d": 11}, True),
        ("any: [{field: events_7d, gt: 1}, {field: events_30d, gt: 10}]", {"events_7d": 0, "events_30d": 0}, False),
        ("not: {field: events_7d, gt: 1}", {"events_7d": 0}, True),
        ("not: {field: events_7d, gt: 1}", {"events_7d": 5}, False),
        ("not: {field: events_7d, gt: 1}", {}, True),  # a missing field is false, so not is true
        (
            "all: [{any: [{field: plan, eq: pro}, {not: {field: events_7d, lt: 3}}]}, "
            "{field: distinct_features, gte: 1}]",
            {"plan": "free", "events_7d": 3, "distinct_features": 1},
            True,
        ),
    ],
)
def test_boolean_combinations(condition, profile, expected):
    assert bool(rule(condition).evaluate(profile, AT)) is expected


@pytest.mark.parametrize(
    "condition, offset_ms, expected",
    [
        ("within_days: {field: signup_at, days: 14}", -14 * DAY_MS, True),
        ("within_days: {field: signup_at, days: 14}", -14 * DAY_MS - 1, False),
        ("within_days: {field: signup_at, days: 14}", DAY_MS, True),  # stamped after the evaluation time
        ("within_days: {field: signup_at, days: 0.5}", -DAY_MS // 2, True),
        ("older_than_days: {field: signup_at, days: 14}", -14 * DAY_MS, False),
        ("older_than_days: {field: signup_at, days: 14}", -14 * DAY_MS - 1, True),
        ("older_than_days: {field: signup_at, days: 14}", DAY_MS, False),
    ],
)
def test_time_conditions_are_relative_to_the_evaluation_time(condition, offset_ms, expected):
    assert bool(rule(condition).evaluate({"signup_at": AT + offset_ms}, AT)) is expected


def test_time_conditions_on_a_missing_timestamp_are_false():
    assert rule("within_days: {field: signup_at, days: 7}").evaluate({"signup_at": None}, AT) == set()
    assert rule("older_than_days: {field: signup_at, days: 7}").evaluate({}, AT) == set()


@pytest.mark.parametrize(
    "condition, profile, expected",
    [
        ("event_seen: purchase", {"event_counts": {"purchase": 1}}, True),
        ("event_seen: purchase", {"event_counts": {"purchase": 0, "login": 3}}, False),
        ("event_seen: purchase", {}, False),
        ("event_seen: tutorial_completed", {"event_counts": {}, "milestones": ["tutorial_completed"]}, True),
        ("event_seen: tutorial_completed", {"milestones": []}, False),
        ("event_count: {event: support_message, gte: 2}", {"event_counts": {"support_message": 2}}, True),
        ("event_count: {event: support_message, gte: 2}", {"event_counts": {"support_message": 1}}, False),
        ("event_count: {event: purchase, eq: 0}", {"event_counts": {"login": 1}}, True),  # never seen counts 0
        ("event_count: {event: purchase, eq: 0}", {}, True),
        ("feature_count: {feature: export, gte: 3}", {"features_used": {"export": 3}}, True),
        ("feature_count: {feature: export, gte: 3}", {"features_used": {"share": 9}}, False),
        ("feature_count: {feature: export, between: [1, 2]}", {"features_used": {"export": 2}}, True),
    ],
)
def test_event_based_conditions(condition, profile, expected):
    assert bool(rule(condition).evaluate(profile, AT)) is expected


def test_extra_fields_and_events_can_be_declared_by_the_caller():
    text = "version: 1\nsegments:\n  - name: s\n    when: {all: [{field: nps, gte: 9}, {event_seen: webinar_joined}]}\n"
    with pytest.raises(RuleError):
        RuleSet.from_yaml(text)
    rules = RuleSet.from_yaml(text, extra_fields={"nps": "number"}, extra_events={"webinar_joined"})
    assert rules.evaluate({"nps": 10, "event_counts": {"webinar_joined": 1}}, AT) == {"s"}


def test_disabled_rules_are_validated_but_not_evaluated():
    rules = RuleSet.from_yaml(
        "version: 1\nsegments:\n"
        "  - {name: live, when: {field: events_7d, gte: 0}}\n"
        "  - {name: paused, enabled: false, when: {field: events_7d, gte: 0}}\n"
    )
    assert rules.evaluate({"events_7d": 1}, AT) == {"live"}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "text, message",
    [
        ("version: 1\nsegments: [\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("segments:\n  - {name: s, when: {field: events_7d, gt: 1}}\n", "'version' is required"),
        ("version: 1\nsegments: []\n", "'segments' must be a non-empty list"),
        (
            "version: 1\nrules: []\nsegments: [{name: s, when: {field: events_7d, gt: 1}}]\n",
            "unknown top-level keys ['rules']",
        ),
        ("version: 1\nsegments:\n  - {name: Bad-Name, when: {field: events_7d, gt: 1}}\n", "'name' must match"),
        ("version: 1\nsegments:\n  - {name: s}\n", "segment 's': 'when' (the condition) is required"),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: events_7d, gt: 1}, owner: me}\n",
            "unknown keys ['owner']",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: events_7d, gt: 1}}\n"
            "  - {name: s, when: {field: events_7d, gt: 2}}\n",
            "segment 's': defined twice",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: sesion_count, gt: 5}}\n",
            "when.field: unknown field 'sesion_count'",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: session_count, greater: 5}}\n",
            "unknown comparison operator 'greater'",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: session_count, gt: 5, lt: 9}}\n",
            "exactly one comparison operator",
        ),
        ("version: 1\nsegments:\n  - {name: s, when: {gt: 5}}\n", "comparison 'gt' needs a 'field'"),
        ("version: 1\nsegments:\n  - {name: s, when: {xor: []}}\n", "unknown operator 'xor'"),
        ("version: 1\nsegments:\n  - {name: s, when: {all: [], any: []}}\n", "exactly one operator"),
        ("version: 1\nsegments:\n  - {name: s, when: {all: []}}\n", "when.all: expects a non-empty list"),
        (
            "version: 1\nsegments:\n  - {name: s, when: {any: [{field: plan, gt: 1}]}}\n",
            "when.any[0].gt: 'gt' needs a numeric",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: session_count, gt: five}}\n",
            "expects a number, got 'five'",
        ),
        ("version: 1\nsegments:\n  - {name: s, when: {field: plan, eq: 3}}\n", "expects a string, got 3"),
        ("version: 1\nsegments:\n  - {name: s, when: {field: session_count, in: 3}}\n", "expects a non-empty list"),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: session_count, between: [9, 1]}}\n",
            "low 9 is greater than high 1",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {field: session_count, between: [1]}}\n",
            "expects a list [low, high]",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {within_days: {field: plan, days: 3}}}\n",
            "'plan' is not a timestamp field",
        ),
        ("version: 1\nsegments:\n  - {name: s, when: {within_days: {field: signup_at, days: -1}}}\n", "days >= 0"),
        (
            "version: 1\nsegments:\n  - {name: s, when: {older_than_days: {field: signup_at}}}\n",
            "expects {field: <timestamp field>, days: <number>}",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {event_seen: tutorial_complete}}\n",
            "unknown event 'tutorial_complete'",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {event_count: {event: login}}}\n",
            "exactly one comparison operator",
        ),
        (
            "version: 1\nsegments:\n  - {name: s, when: {feature_count: {gte: 1}}}\n",
            "expects {feature: <name>, <op>: <number>}",
        ),
        ("version: 1\nsegments:\n  - {name: s, when: [1, 2]}\n", "a condition must be a non-empty mapping"),
        (
            "version: 1\nretired: [s]\nsegments:\n  - {name: s, when: {field: events_7d, gt: 1}}\n",
            "both defined and retired",
        ),
    ],
)
def test_invalid_rules_are_refused_at_load_time_with_a_clear_message(text, message):
    with pytest.raises(RuleError) as info:
        RuleSet.from_yaml(text, source="rules.yaml")
    assert message in str(info.value)
    assert str(info.value).startswith("rules.yaml")


def test_missing_rules_file_is_a_rule_error(tmp_path):
    with pytest.raises(RuleError, match="cannot read rules file"):
        RuleSet.load(tmp_path / "absent.yaml")


def test_rule_text_is_never_evaluated_as_code():
    with pytest.raises(RuleError):
        RuleSet.from_yaml("version: 1\nsegments:\n  - {name: s, when: {field: \"__import__('os')\", gt: 1}}\n")
    with pytest.raises(RuleError, match="not valid YAML"):
        RuleSet.from_yaml("version: 1\nsegments: !!python/object/apply:os.system ['true']\n")


# --------------------------------------------------------------------------- diff and assignment


def test_diff_reports_entered_and_exited_segments_as_rule_codes(rules):
    changes = rules.diff(
        {"dormant", "active_engaged"}, {"active_engaged", "highly_engaged_new"}, AT,
        user_key="k1", version=AT * 1000 + 2,
    )
    assert changes == [
        {"user_key": "k1", "segment": "dormant", "change": "exited", "at": AT,
         "reason": "rule:dormant", "version": AT * 1000 + 2},
        {"user_key": "k1", "segment": "highly_engaged_new", "change": "entered", "at": AT,
         "reason": "rule:highly_engaged_new", "version": AT * 1000 + 2},
    ]


def test_diff_version_defaults_to_the_evaluation_time_and_reason_can_be_given():
    rules = rule("{field: events_7d, gt: 1}", name="busy")
    (change,) = rules.diff(set(), {"busy"}, AT)
    assert (change["reason"], change["version"]) == ("rule:busy", AT)
    (change,) = rules.diff({"cluster_7"}, set(), AT, reason="model:cluster_7")
    assert (change["segment"], change["change"], change["reason"]) == ("cluster_7", "exited", "model:cluster_7")


def test_no_change_means_no_diff(rules):
    assert rules.diff({"dormant"}, {"dormant"}, AT) == []


def test_assignment_keeps_segments_owned_by_others_and_removes_retired_ones():
    rules = rule("{field: events_7d, gt: 1}", name="busy", extra="retired: [old_rule]\n")
    new = rules.assign({"ml_cluster_3", "old_rule", "busy"}, {"events_7d": 0}, AT)
    assert new == {"ml_cluster_3"}
    changes = rules.diff({"ml_cluster_3", "old_rule", "busy"}, new, AT)
    assert [(c["segment"], c["change"], c["reason"]) for c in changes] == [
        ("busy", "exited", "rule:busy"),
        ("old_rule", "exited", "retired:old_rule"),
    ]


def test_version_changes_when_the_rules_change():
    first = rule("{field: events_7d, gt: 1}")
    second = rule("{field: events_7d, gt: 2}")
    assert first.version.split("+")[0] == second.version.split("+")[0] == "1"
    assert first.version != second.version


# --------------------------------------------------------------------------- transform


def _changes(rules, before, profiles):
    """Segment changes as the profile store's outbox derives them (transforms/outbox/): each
    profile's segments against the ones it replaces, ``before[user_key]`` at first, then the user's
    previous profile's."""
    last, out = dict(before), []
    for p in sorted(profiles, key=lambda p: (p["user_key"], p.get("version") or 0)):
        out += rules.diff(last.get(p["user_key"], ()), p["segments"], p["as_of"], user_key=p["user_key"],
                          version=p.get("version"))
        last[p["user_key"]] = p["segments"]
    return out


UNSEGMENTABLE = [
    {"as_of": AT, "session_count": 1},
    {"user_key": "k-bad", "as_of": AT, "segments": "dormant"},
]
PROFILES = [
    {"user_key": "k-new", "as_of": AT, "version": AT * 1000, "session_count": 6, "signup_at": AT - DAY_MS,
     "last_event_at": AT},
    {"user_key": "k-back", "as_of": AT, "version": AT * 1000 + 1, "last_event_at": AT, "sessions_7d": 4,
     "segments": ["dormant", "ml_cluster_1"]},
    {"user_key": "k-same", "as_of": AT, "last_event_at": AT - 31 * DAY_MS, "segments": ["dormant"]},
]


def test_segment_profile_sets_rule_segments_keeps_foreign_ones_and_changes_follow(rules):
    out = [segment_profile(rules, p, AT - 1) for p in PROFILES]
    assert [(p["user_key"], tuple(p["segments"])) for p in out] == [
        ("k-new", ("highly_engaged_new",)),
        ("k-back", ("active_engaged", "ml_cluster_1")),
        ("k-same", ("dormant",)),
    ]
    assert {k: v for k, v in out[0].items() if k != "segments"} == PROFILES[0]  # nothing else is touched
    before = {p["user_key"]: p.get("segments") or () for p in PROFILES}
    assert sorted((c["user_key"], c["segment"], c["change"], c["at"], c["reason"], c["version"])
                  for c in _changes(rules, before, out)) == [
        ("k-back", "active_engaged", "entered", AT, "rule:active_engaged", AT * 1000 + 1),
        ("k-back", "dormant", "exited", AT, "rule:dormant", AT * 1000 + 1),
        ("k-new", "highly_engaged_new", "entered", AT, "rule:highly_engaged_new", AT * 1000),
    ]


def test_segment_profile_refuses_what_it_cannot_segment_with_a_reason(rules):
    reasons = []
    for element in UNSEGMENTABLE + [ProfileUpdate(PROFILES[0], UNSEGMENTABLE[0])]:
        with pytest.raises(ProfileRejected) as rejected:
            segment_profile(rules, element, AT)
        reasons.append(rejected.value.reason)
    assert reasons == ["missing_user_key", "bad_segments", "missing_user_key"]


def test_segment_profile_evaluates_at_the_profiles_as_of_else_at_the_element_time(rules):
    quiet = {"user_key": "k", "last_event_at": AT - 31 * DAY_MS}
    assert segment_profile(rules, dict(quiet, as_of=AT), AT - 30 * DAY_MS)["segments"] == ["dormant"]
    assert segment_profile(rules, quiet, AT)["segments"] == ["dormant"]
    assert segment_profile(rules, quiet, AT - 30 * DAY_MS)["segments"] == []


def test_segment_profile_on_profile_updates_gives_the_segments_each_version_had(rules):
    day = DAY_MS
    quiet = {"user_key": "k1", "as_of": AT, "version": AT * 1000, "last_event_at": AT, "sessions_7d": 1,
             "segments": []}
    busy = dict(quiet, version=AT * 1000 + 1, sessions_7d=5)
    # the profile stage re-emits a silent user when its dormancy timer fires
    gone = dict(busy, as_of=AT + 31 * day, version=(AT + 31 * day) * 1000, sessions_7d=0)
    updates = [
        ProfileUpdate(None, quiet),
        ProfileUpdate(quiet, busy),
        ProfileUpdate(busy, gone),
        ProfileUpdate(gone, dict(gone, version=gone["version"] + 1, segments=["ml_cluster_2"])),
    ]
    out = [segment_profile(rules, u, AT) for u in updates]
    assert [(p["version"], tuple(p["segments"])) for p in out] == [
        (AT * 1000, ()),
        (AT * 1000 + 1, ("active_engaged",)),
        ((AT + 31 * day) * 1000, ("dormant",)),
        # segments from elsewhere are kept; nothing changed for the rules
        ((AT + 31 * day) * 1000 + 1, ("dormant", "ml_cluster_2")),
    ]
    assert [(c["segment"], c["change"], c["at"], c["version"], c["reason"]) for c in _changes(rules, {}, out)] == [
        ("active_engaged", "entered", AT, AT * 1000 + 1, "rule:active_engaged"),
        ("active_engaged", "exited", AT + 31 * day, (AT + 31 * day) * 1000, "rule:active_engaged"),
        ("dormant", "entered", AT + 31 * day, (AT + 31 * day) * 1000, "rule:dormant"),
        ("ml_cluster_2", "entered", AT + 31 * day, (AT + 31 * day) * 1000 + 1, "segment:ml_cluster_2"),
    ]


def test_a_compiled_rule_set_pickles_as_its_text_and_evaluates_the_same(rules):
    import pickle

    extra = RuleSet.from_yaml("version: 1\nsegments:\n  - {name: s, when: {field: score_x, gt: 1}}\n",
                              extra_fields={"score_x": "number"})
    for original in (rules, extra):
        copy = pickle.loads(pickle.dumps(original))
        assert (copy.version, copy.names, copy.retired, copy.time_marks) == (
            original.version, original.names, original.retired, original.time_marks)
    copy = pickle.loads(pickle.dumps(rules))
    for p in PROFILES:
        assert copy.evaluate(p, AT) == rules.evaluate(p, AT)
    assert pickle.loads(pickle.dumps(extra)).evaluate({"score_x": 2}, AT) == {"s"}


def test_assign_rule_segments_updates_profiles_and_dead_letters_the_rest(rules):
    with prism_pipeline() as pipeline:
        result = pipeline | beam.Create(PROFILES + UNSEGMENTABLE) | AssignRuleSegments(rules)
        assert_that(
            result.profiles | "Segments" >> beam.Map(lambda p: (p["user_key"], tuple(p["segments"]))),
            equal_to([
                ("k-new", ("highly_engaged_new",)),
                ("k-back", ("active_engaged", "ml_cluster_1")),
                ("k-same", ("dormant",)),
            ]),
            label="profiles",
        )
        assert_that(
            result.dead_letter | "Reasons" >> beam.Map(lambda d: (d["stage"], d["reason"])),
            equal_to([("segment", "missing_user_key"), ("segment", "bad_segments")]),
            label="dead_letter",
        )


# --------------------------------------------------------------------------- time marks


def test_the_packaged_rules_mark_the_times_their_conditions_flip_without_new_events(rules):
    assert rules.time_marks == (
        ("last_event_at", 7 * DAY_MS),        # purchase_intent_no_purchase: recency_ms <= 7 days ...
        ("last_event_at", 7 * DAY_MS + 1),    # ... is false from 7 days + 1 ms
        ("last_event_at", 30 * DAY_MS + 1),   # dormant
        ("signup_at", 3 * DAY_MS + 1),        # onboarding_stalled
        ("signup_at", 7 * DAY_MS + 1),        # highly_engaged_new
    )


def _as_time_passes(base: int, at: int) -> dict:
    """A user whose signup and last event were at ``base``, seen at ``at``: the fields time alone moves."""
    return {"signup_at": base, "last_event_at": base, "recency_ms": at - base,
            "days_since_signup": (at - base) / DAY_MS, "events_7d": 4}


@pytest.mark.parametrize(
    "condition, marks",
    [
        ("within_days: {field: signup_at, days: 3}", {("signup_at", 3 * DAY_MS + 1)}),
        ("older_than_days: {field: last_event_at, days: 0.5}", {("last_event_at", DAY_MS // 2 + 1)}),
        ("{field: recency_ms, lte: 1000}", {("last_event_at", 1000), ("last_event_at", 1001)}),
        ("{field: recency_ms, gt: 1000.5}", {("last_event_at", 1001)}),
        ("{field: days_since_signup, between: [1, 2]}",
         {("signup_at", DAY_MS), ("signup_at", DAY_MS + 1), ("signup_at", 2 * DAY_MS), ("signup_at", 2 * DAY_MS + 1)}),
        ("not: {older_than_days: {field: signup_at, days: 1}}", {("signup_at", DAY_MS + 1)}),
    ],
)
def test_a_time_condition_flips_only_at_its_marks(condition, marks):
    rules = rule(condition)
    assert set(rules.time_marks) == marks
    base = AT
    instants = sorted({base + offset + d for _, offset in marks for d in (-2, -1, 0, 1, 2)} | {base})
    truth = [bool(rules.evaluate(_as_time_passes(base, t), t)) for t in instants]
    flips = {t - base for t, before, now in zip(instants[1:], truth, truth[1:]) if before != now}
    assert flips and flips <= {offset for _, offset in marks}


def test_conditions_that_time_alone_does_not_move_have_no_marks_and_disabled_rules_add_none():
    assert rule("{field: events_7d, gt: 3}").time_marks == ()
    assert rule("{field: signup_at, gt: 1700000000000}").time_marks == ()  # an absolute instant
    rules = RuleSet.from_yaml(
        "version: 1\nsegments:\n"
        "  - {name: live, when: {field: events_7d, gte: 0}}\n"
        "  - {name: paused, enabled: false, when: {older_than_days: {field: signup_at, days: 2}}}\n"
    )
    assert rules.time_marks == ()


def test_a_user_who_signs_up_and_goes_quiet_enters_onboarding_stalled_three_days_later_to_the_millisecond():
    """The profile stage's lifecycle timer follows the rules' marks (no refresh, no new event)."""
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.trigger import AccumulationMode, AfterWatermark
    from apache_beam.transforms.window import GlobalWindows, TimestampedValue
    from apache_beam.utils.timestamp import Timestamp

    from onboardflow.pipelines.beam.profile import BuildUserProfiles
    from onboardflow.transforms.profile import ProfileConfig

    rules = RuleSet.load(DEFAULT_RULES_PATH)
    signup = AT // DAY_MS * DAY_MS
    events = [
        {"event_id": "e1", "user_key": "quiet", "event_type": "signup", "occurred_at": signup,
         "properties": {"plan": "trial"}},
        {"event_id": "e2", "user_key": "quiet", "event_type": "page_view", "occurred_at": signup + 60_000,
         "properties": {}},
    ]
    stream = (TestStream()
              .advance_watermark_to(Timestamp(micros=signup * 1000))
              .add_elements([TimestampedValue(e, Timestamp(micros=e["occurred_at"] * 1000)) for e in events])
              .advance_watermark_to_infinity())
    config = ProfileConfig(refresh_ms=0, time_marks=rules.time_marks)
    options = PipelineOptions(PRISM + ["--streaming"])
    with BeamTestPipeline(options=options) as pipeline:
        segmented = (pipeline | stream | BuildUserProfiles(config)).profiles | AssignRuleSegments(rules)
        assert_that(
            segmented.profiles
            | beam.WindowInto(GlobalWindows(), trigger=AfterWatermark(), accumulation_mode=AccumulationMode.DISCARDING)
            | beam.combiners.ToList()
            | beam.FlatMap(lambda profiles: [(c["segment"], c["change"], c["at"] - signup)
                                             for c in _changes(rules, {}, profiles)]),
            equal_to([
                ("onboarding_stalled", "entered", 3 * DAY_MS + 1),
                ("dormant", "entered", 60_000 + 30 * DAY_MS + 1),
            ]),
        )
