"""The profile's ``experiments`` field through the whole Beam pipeline on Prism (issue 20, item 2).

Real Kafka, Redis and PostgreSQL. The input is the reliability suite's
seeded journey stream (about two weeks ago, 1 % malformed, duplicated and
late records), read as a bounded run with the online models off, so every
profile's eligibility by track is judged with the track policy's choice. The
experiments file is the test's: one for everyone, one by track, one by
segment, one whose window closes inside the input's time span, one stopped.
What is pinned (docs/experiments.md "The profile's experiments"):

* every profile in Redis carries ``experiments``, equal to the core's
  assignment (``ExperimentSet.with_experiments``) of that stored profile at
  its own ``as_of``; each variant is the hash of the pseudonym and the salt;
* so does every version the store applied (the warehouse's profile
  snapshots), each at its own ``as_of``;
* eligibility and the window, at event time, decide presence: each
  conditional experiment is in some profiles and not in others; the windowed
  one is in exactly the versions whose ``as_of`` falls inside it; one that
  ended days before the wall clock but after the input's horizon is in every
  final profile; the stopped one is in none;
* a replay of the same input into the same sinks leaves Redis as it was.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter

import pytest

from onboardflow.models.tracks import TrackPolicy
from onboardflow.runners.cli.produce import produce
from onboardflow.schemas.units import DAY_MS
from onboardflow.tests.integration.reliability_harness import (
    Deployment,
    Outputs,
    create_topics,
    delete_topics,
    make_input,
    run_to_end,
    write_secret,
)
from onboardflow.transforms.experiments import ExperimentSet
from onboardflow.transforms.segment import RuleSet

pytestmark = pytest.mark.integration

SEED = 2020
USERS = 120
DAYS_AGO = 14.0
NO_MODELS = "--disable_online_models"


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def experiments_yaml(start_ms: int) -> str:
    """The test's experiments. ``windowed`` runs from 36 to 60 hours after the input starts, before its
    horizon (about 69 hours: where every final profile's ``as_of`` ends in a bounded run); ``ended`` covers
    the horizon but ended nine days before the wall clock."""
    window = (_iso(start_ms + 36 * 3_600_000), _iso(start_ms + 60 * 3_600_000))
    variants = "[{name: control, weight: 0.5}, {name: treatment, weight: 0.5}]"
    return f"""
version: "t-profile-1"
experiments:
  - {{name: everyone, salt: "everyone-p1", status: running, start: 2026-01-01T00:00:00Z,
     variants: [{{name: control, weight: 0.34}}, {{name: b, weight: 0.33}}, {{name: c, weight: 0.33}}]}}
  - {{name: by_track, salt: "by-track-p1", status: running, start: 2026-01-01T00:00:00Z,
     variants: {variants}, eligible: {{tracks: [standard, simplified]}}}}
  - {{name: by_segment, salt: "by-segment-p1", status: running, start: 2026-01-01T00:00:00Z,
     variants: {variants}, eligible: {{segments_any: [highly_engaged_new, active_engaged, power_user_candidate]}}}}
  - {{name: windowed, salt: "windowed-p1", status: running, start: {window[0]}, end: {window[1]},
     variants: {variants}}}
  - {{name: ended, salt: "ended-p1", status: running, start: 2026-01-01T00:00:00Z, end: {_iso(start_ms + 5 * DAY_MS)},
     variants: {variants}}}
  - {{name: stopped, salt: "stopped-p1", status: stopped, start: 2026-01-01T00:00:00Z, variants: {variants}}}
"""


@pytest.fixture(scope="module")
def setup(kafka_bootstrap, redis_url, pg_dsn, tmp_path_factory):
    now_ms = int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)
    start_ms = now_ms - int(DAYS_AGO * DAY_MS)
    messages = make_input(SEED, USERS, days_ago=DAYS_AGO, now_ms=now_ms)
    name = f"t-exprof-{uuid.uuid4().hex[:8]}"
    topic = f"{name}.events"
    create_topics(kafka_bootstrap, {topic: 2})
    stats = produce(messages, kafka_bootstrap, topic, progress=False)
    assert stats.ok and stats.total_sent == len(messages)
    folder = tmp_path_factory.mktemp("exprof")
    path = folder / "experiments.yaml"
    path.write_text(experiments_yaml(start_ms), encoding="utf-8")
    d = Deployment(name, kafka_bootstrap, topic, redis_url, pg_dsn, write_secret(folder)).create()
    try:
        yield d, path, folder
    finally:
        d.cleanup()
        delete_topics(kafka_bootstrap, [topic])


def test_profiles_carry_the_cores_experiments_and_a_replay_leaves_them_as_they_were(setup, assert_same_profiles):
    d, path, folder = setup
    rules = RuleSet.load()
    policy = TrackPolicy.from_yaml(segment_rules=rules)
    experiments = ExperimentSet.load(path, rules.known_segments, policy.tracks)

    run_to_end(d, f"{d.name}-first", folder / "first.log", NO_MODELS, f"--experiments_file={path}", timeout_s=900)
    first = Outputs.read(d)
    profiles = first.profiles
    assert len(profiles) > 80

    # Every profile in Redis, and every version the store applied (the warehouse's snapshots, at their
    # own as_of over the input's three days), carries the core's assignment of itself.
    snapshots = [row["snapshot"] for row in first.rows["profile_snapshots"]]
    assert len(snapshots) > len(profiles)
    for profile in [*profiles.values(), *snapshots]:
        stored = profile["experiments"]
        assert "onboarding_track" not in profile  # models off: no track written, the policy's judged
        unassigned = {k: v for k, v in profile.items() if k != "experiments"}
        assert stored == experiments.with_experiments(unassigned, policy.choose)["experiments"], profile["as_of"]
        assert all(variant == experiments[name].variant(profile["user_key"]) for name, variant in stored.items())

    # The window is judged at each version's event time: in exactly the versions inside it.
    windowed = experiments["windowed"]
    inside = [windowed.start_ms <= p["as_of"] < windowed.end_ms for p in snapshots]
    assert 0 < sum(inside) < len(snapshots)
    assert [("windowed" in p["experiments"]) for p in snapshots] == inside
    present = Counter(name for p in profiles.values() for name in p["experiments"])
    # The final profiles sit at the horizon: past `windowed`, inside `ended` (which the wall clock is past).
    assert present["windowed"] == 0 and present["ended"] == present["everyone"] == len(profiles)
    for conditional in ("by_track", "by_segment"):
        assert 0 < present[conditional] < len(profiles), (conditional, present)
    assert present["stopped"] == 0
    # Every arm of the experiments everyone is in is used.
    for name, arms in (("everyone", 3), ("by_track", 2)):
        assert len({p["experiments"][name] for p in profiles.values() if name in p["experiments"]}) == arms

    # The same input again, from the earliest offset into the same sinks: nothing changes.
    run_to_end(d, f"{d.name}-replay", folder / "replay.log", NO_MODELS, f"--experiments_file={path}", timeout_s=900)
    again = Outputs.read(d)
    assert_same_profiles(again.profiles, profiles)
    assert {k: p["experiments"] for k, p in again.profiles.items()} == {k: p["experiments"] for k, p in
                                                                        profiles.items()}
    assert again.memberships() == first.memberships()
