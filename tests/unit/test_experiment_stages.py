"""The profile's experiments on both engines' shells: Beam's ``AssignExperiments`` and the Flink job's
``StoreChain``, each the core's ``ExperimentSet.with_experiments`` after the track (docs/experiments.md)."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

# Aliased so pytest does not try to collect Beam's class as a test class.
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from onboardflow.models.tracks import TrackPolicy
from onboardflow.pipelines.beam.experiments import AssignExperiments
from onboardflow.pipelines.flink.store import StoreChain
from onboardflow.runners.local import prism_location
from onboardflow.transforms.experiments import ExperimentSet
from onboardflow.transforms.metrics import PipelineMetrics
from onboardflow.transforms.rfm import RfmScorer, ServingReference
from onboardflow.transforms.segment import RuleSet

PRISM = ["--runner=PrismRunner", f"--prism_location={prism_location()}",
         "--experiments=disable_prism_server_singleton"]
AS_OF = 1_800_000_000_000  # 2027-01-15, inside the packaged experiment's window


@pytest.fixture(scope="module")
def rules() -> RuleSet:
    return RuleSet.load()


@pytest.fixture(scope="module")
def policy(rules) -> TrackPolicy:
    return TrackPolicy.from_yaml(segment_rules=rules)


@pytest.fixture(scope="module")
def experiments(rules, policy) -> ExperimentSet:
    return ExperimentSet.load(known_segments=rules.known_segments, known_tracks=policy.tracks)


def key(i: int) -> str:
    return hashlib.sha256(f"user-{i}".encode()).hexdigest()


# Profiles as they reach the step: with a track (models on) or without one (models off).
PROFILES = [
    {"user_key": key(1), "version": 1, "as_of": AS_OF, "segments": [], "onboarding_track": "standard"},
    {"user_key": key(2), "version": 1, "as_of": AS_OF, "segments": ["active_engaged"], "onboarding_track": "advanced"},
    {"user_key": key(3), "version": 1, "as_of": AS_OF, "segments": ["dormant"]},          # policy: simplified
    {"user_key": key(4), "version": 1, "as_of": AS_OF, "segments": ["active_engaged"]},   # policy: advanced
    {"user_key": key(5), "version": 1, "as_of": 0, "segments": [], "onboarding_track": "standard"},  # before start
]


def expected(experiments, policy) -> list[tuple[str, dict]]:
    return [(p["user_key"], experiments.with_experiments(p, policy.choose)["experiments"]) for p in PROFILES]


def test_the_expected_profiles_cover_both_arms_and_both_outcomes(experiments, policy):
    served = dict(expected(experiments, policy))
    variant = experiments["checklist_first"].variant
    assert served == {key(1): {"checklist_first": variant(key(1))}, key(2): {},
                      key(3): {"checklist_first": variant(key(3))}, key(4): {}, key(5): {}}


def test_beams_assign_experiments_writes_the_cores_variants_without_setting_a_track(experiments, policy):
    with BeamTestPipeline(options=PipelineOptions(PRISM)) as p:
        out = p | beam.Create(PROFILES) | AssignExperiments(experiments, policy)
        assert_that(out | "Experiments" >> beam.Map(lambda d: (d["user_key"], d["experiments"])),
                    equal_to(expected(experiments, policy)), label="experiments")
        assert_that(out | "Tracks" >> beam.Map(lambda d: (d["user_key"], d.get("onboarding_track"))),
                    equal_to([(p["user_key"], p.get("onboarding_track")) for p in PROFILES]), label="tracks")


def test_the_flink_chain_without_models_assigns_after_its_rules_with_the_policys_track(rules, policy, experiments):
    counts: dict[str, int] = {}
    chain = StoreChain(SimpleNamespace(), rules, policy, PipelineMetrics(prometheus=False),
                       lambda name, n: counts.__setitem__(name, counts.get(name, 0) + n), experiments=experiments)
    # What open() would set with --disable_online_models: no scorer; an empty accounts table.
    chain._accounts, chain._scorer = SimpleNamespace(accounts={}), None
    # ... and no RFM reference published yet (the scores stay null).
    chain._rfm = RfmScorer(ServingReference(store=None, refresh_seconds=60))
    variant = experiments["checklist_first"].variant
    prepared = [chain._prepare(p) for p in PROFILES]
    # The chain's rules recompute the segments (none hold on these bare profiles): the untracked profiles
    # get the policy's default track (standard), which the experiment takes; no track is written.
    assert [(p["segments"], p.get("onboarding_track")) for p in prepared] == [
        ([], "standard"), ([], "advanced"), ([], None), ([], None), ([], "standard")]
    assert [p["experiments"] for p in prepared] == [
        {"checklist_first": variant(key(1))}, {}, {"checklist_first": variant(key(3))},
        {"checklist_first": variant(key(4))}, {}]
    # Beam's step gives the same on the same segmented profiles (the Flink job and the Beam pipeline agree).
    unassigned = [{k: v for k, v in p.items() if k != "experiments"} for p in prepared]
    with BeamTestPipeline(options=PipelineOptions(PRISM)) as pipeline:
        out = pipeline | beam.Create(unassigned) | AssignExperiments(experiments, policy)
        assert_that(out, equal_to(prepared))
    arms = {name: n for name, n in counts.items() if name.startswith("experiment_")}
    assert sum(arms.values()) == 3 and set(arms) <= {"experiment_checklist_first_control",
                                                     "experiment_checklist_first_checklist"}


def test_the_flink_chain_wakes_its_relays_at_most_once_per_relay_interval(rules, policy, experiments):
    """Every flush collects finished relay rounds; a new round is asked for only once ``relay_interval_ms``
    passed since the last (``StoreChain.flush``)."""
    from onboardflow.pipelines.flink.store import DEAD_LETTERS, EVENTS, IDENTITY_ALIASES, LATE_EVENTS, RETIREMENTS

    class Sink:
        def flush(self):
            return []

    class Relays:
        def __init__(self):
            self.calls = []

        def kick(self):
            self.calls.append("kick")
            return [], []

        def collect(self):
            self.calls.append("collect")
            return [], []

    now = [100.0]
    chain = StoreChain(SimpleNamespace(), rules, policy, PipelineMetrics(prometheus=False), lambda *_: None,
                       clock=lambda: now[0], experiments=experiments)
    chain._accounts = SimpleNamespace(accounts={}, refresh=lambda: True)
    chain._scorer, chain._rfm = None, SimpleNamespace(refresh=lambda: None)
    chain._profile_sink = Sink()
    chain._tables = {table: Sink() for table in (EVENTS, LATE_EVENTS, IDENTITY_ALIASES, RETIREMENTS, DEAD_LETTERS)}
    chain._background, chain._relay_interval_s, chain._relay_kicked = Relays(), 1.0, float("-inf")
    for step in (0.0, 0.1, 0.5, 0.5, 0.1, 1.0):  # flushes at 100.0, 100.1, 100.6, 101.1, 101.2, 102.2
        now[0] += step
        chain.flush()
    assert chain._background.calls == ["kick", "collect", "collect", "kick", "collect", "kick"]
