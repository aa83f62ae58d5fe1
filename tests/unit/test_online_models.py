"""The online models' stages: serving cache, scoring, the learner's state and its decisions.

Pure unit tests: the registry's Redis copy is replaced by an in-memory store
with the same three methods; tests/integration/test_online_models.py runs the
transforms on the real Redis and PostgreSQL.
"""
import datetime as dt
import random

from onboardflow.models.features import feature_vector
from onboardflow.models.model_registry import ModelVersion
from onboardflow.models.propensity import PropensityModel
from onboardflow.models.segmentation import Segmenter, SegmentSettings
from onboardflow.models.tracks import TrackPolicy
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.online_models import (
    PROPENSITY,
    SEGMENTATION,
    LearnerState,
    OnlineLearner,
    ProfileScorer,
    ServingModels,
    completed_onboarding,
    dump_learner,
    load_learner,
    model_version_id,
)


class MemoryStore:
    """The slice of ModelStore that ServingModels reads."""

    def __init__(self):
        self.versions: dict[tuple[str, int], bytes] = {}
        self.current: dict[str, int] = {}
        self.reads = 0

    def publish(self, kind, payload):
        number = 1 + max((n for k, n in self.versions if k == kind), default=0)
        self.versions[(kind, number)] = payload
        self.current[kind] = number
        return number

    def current_version(self, kind):
        self.reads += 1
        return self.current.get(kind)

    def get(self, kind, number):
        payload = self.versions.get((kind, number))
        if payload is None:
            return None
        return ModelVersion(kind, number, "0" * 64, dt.datetime.now(dt.timezone.utc), payload=payload)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def persona_profile(rng: random.Random, user: str, engaged: bool, at: int, progress: float = 0.5) -> dict:
    """A pipeline-shaped profile of one of two clearly different kinds of user."""
    base = 40 if engaged else 1
    return {
        "user_key": user, "as_of": at, "version": at * 1000,
        "engagement_score": base * rng.uniform(0.8, 1.2), "intent_score": base / 4 * rng.uniform(0.8, 1.2),
        "events_7d": int(base * 3 * rng.uniform(0.8, 1.2)), "events_30d": int(base * 9 * rng.uniform(0.8, 1.2)),
        "session_count": int(base * rng.uniform(0.8, 1.2)) + 1, "onboarding_progress": progress,
        "days_since_signup": 5, "feature_usage_score": 90.0 if engaged else 2.0,
    }


def trained_segmenter(rng) -> Segmenter:
    from onboardflow.models.features import feature_vector
    rows = [feature_vector(persona_profile(rng, f"u{i}", i % 2 == 0, DAY_MS * 100 + i,
                                           progress=0.9 if i % 2 == 0 else 0.1))
            for i in range(200)]
    return Segmenter(n_clusters=2, seed=1, min_users=20).fit(rows)


def test_model_version_names_the_serving_versions_that_scored():
    assert model_version_id("seg-000003", "prop-000002") == "seg-000003+prop-000002"
    assert model_version_id("seg-000003", None) == "seg-000003"
    assert model_version_id(None, None) is None


def test_completion_is_progress_reaching_one():
    assert completed_onboarding({"onboarding_progress": 1.0})
    assert not completed_onboarding({"onboarding_progress": 0.99})
    assert not completed_onboarding({"onboarding_progress": None})
    assert not completed_onboarding({})


def test_without_a_published_model_profiles_pass_through_unscored():
    models = ServingModels(MemoryStore(), refresh_seconds=60, clock=Clock())
    assert models.refresh() == []
    profile = persona_profile(random.Random(0), "u1", True, DAY_MS)
    scored = models.score(profile)
    assert scored["model_version"] is None
    assert "cluster_id" not in scored and "propensity" not in scored
    assert {k: v for k, v in scored.items() if k != "model_version"} == profile


def test_scoring_separates_the_kinds_of_user_with_the_served_segmenter():
    rng = random.Random(2)
    store = MemoryStore()
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())
    models = ServingModels(store, refresh_seconds=60, clock=Clock())
    assert models.refresh() == [(SEGMENTATION, 1)]
    engaged = models.score(persona_profile(rng, "a", True, DAY_MS))
    idle = models.score(persona_profile(rng, "b", False, DAY_MS))
    assert engaged["cluster_id"] != idle["cluster_id"]
    assert isinstance(engaged["segment_label"], str) and engaged["segment_label"]
    assert engaged["model_version"] == "seg-000001"
    assert "propensity" not in engaged  # no propensity model is serving


def test_a_new_version_or_a_rollback_is_loaded_only_after_the_refresh_interval():
    rng = random.Random(3)
    store, clock = MemoryStore(), Clock()
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())
    models = ServingModels(store, refresh_seconds=60, clock=clock)
    models.refresh()
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())
    clock.now = 59
    assert models.refresh() == []
    assert models.versions[SEGMENTATION] == "seg-000001"
    clock.now = 61
    assert models.refresh() == [(SEGMENTATION, 2)]
    store.current[SEGMENTATION] = 1  # rollback: the pointer moves back
    clock.now = 200
    assert models.refresh() == [(SEGMENTATION, 1)]
    assert models.score(persona_profile(rng, "a", True, DAY_MS))["model_version"] == "seg-000001"


def test_learner_labels_completions_with_the_features_of_prediction_time():
    learner = LearnerState(propensity=PropensityModel(min_per_class=1, timeout_days=7))
    rng = random.Random(4)
    t0 = DAY_MS * 100
    early = persona_profile(rng, "u1", False, t0, progress=0.2)
    assert learner.learn(early) == []
    assert learner.propensity.pending_users == 1
    # Much more engaged later, then completes: the stored point is the early one.
    learner.learn(persona_profile(rng, "u1", True, t0 + DAY_MS // 2, progress=1.0))
    assert learner.labels_seen == 1
    assert learner.propensity.pending_users == 0
    assert learner.propensity.class_counts == [0, 1]
    # Another user never completes. Newer events of other users do not label
    # them: only the watermark passing the 7-day horizon does.
    learner.learn(persona_profile(rng, "u2", False, t0, progress=0.1))
    learner.learn(persona_profile(rng, "u3", False, t0 + 8 * DAY_MS, progress=0.1))
    assert learner.propensity.class_counts == [0, 1]
    learner.expire(t0 + 6 * DAY_MS)
    assert learner.propensity.class_counts == [0, 1]
    learner.expire(t0 + 8 * DAY_MS)
    assert learner.propensity.class_counts == [1, 1]
    assert learner.labels_seen == 2


def _learn_cluster_mix(seed: int, n: int, shift_at=None):
    """A learner fed ``n`` engaged profiles scored into clusters 0/1, then only 2 from ``shift_at``."""
    learner, rng, events = LearnerState(), random.Random(seed), []
    for i in range(n):
        profile = persona_profile(rng, f"u{i}", True, DAY_MS * 100 + i)
        profile["cluster_id"] = rng.choice([0, 1]) if shift_at is None or i < shift_at else 2
        events += learner.learn(profile)
    return learner, events, rng


def test_learner_reports_drift_when_the_segment_mix_shifts_and_not_before():
    learner, events, rng = _learn_cluster_mix(seed=5, n=3000)
    assert events == []
    for i in range(3000, 4000):
        profile = persona_profile(rng, f"u{i}", True, DAY_MS * 100 + i)
        profile["cluster_id"] = 2 if rng.random() < 0.9 else 0
        events += learner.learn(profile)
    assert events
    assert {e["model_name"] for e in events} == {"clustering"}
    assert all(e["metric"].startswith("segment_share:") for e in events)


def test_a_profile_without_key_or_event_time_is_refused_not_learned():
    learner = LearnerState()
    for bad in ({"as_of": DAY_MS}, {"user_key": "u1"}, {"user_key": 7, "as_of": DAY_MS}):
        try:
            learner.learn(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{bad} was learned")
    assert learner.profiles_seen == 0


def test_the_served_propensity_model_carries_no_users_but_scores_the_same():
    model = PropensityModel(min_per_class=1)
    rng = random.Random(6)
    from onboardflow.models.features import feature_vector
    for i in range(60):
        x = feature_vector(persona_profile(rng, f"u{i}", i % 2 == 0, DAY_MS * 100))
        model.predict(f"u{i}", x, DAY_MS * 100)
        model.label(f"u{i}", i % 2 == 0, DAY_MS * 101)
    model.predict("waiting", feature_vector(persona_profile(rng, "w", True, DAY_MS)), DAY_MS * 102)
    assert model.pending_users == 1
    served = PropensityModel.from_bytes(model.to_bytes(include_pending=False))
    assert served.pending_users == 0
    assert model.pending_users == 1  # the learner's own model is untouched
    x = feature_vector(persona_profile(rng, "probe", True, DAY_MS))
    assert served.score(x) == model.score(x)
    assert served.score(x) > served.score(feature_vector(persona_profile(rng, "probe2", False, DAY_MS)))


def test_drift_events_encode_for_the_model_events_topic_and_decode_back():
    from onboardflow.pipelines.configuration import drift_event_kv
    from onboardflow.schemas import default_registry, load_schema
    from onboardflow.schemas.wire import AvroDeserializer

    learner, events, _ = _learn_cluster_mix(seed=7, n=4000, shift_at=3000)
    assert events
    encode = drift_event_kv(None)
    decoder = AvroDeserializer(default_registry(), load_schema("drift_event"))
    for event in events:
        key, value = encode(event)
        assert key == b"clustering"
        assert decoder.deserialize(value) == event


class _Registry:
    """The slice of ModelRegistry the learner uses: the Redis store, publish, prune."""

    def __init__(self, store):
        self._memory = store
        self.store = _ServingStore(store)
        self.published = []

    def publish(self, kind, payload, **_):
        number = self._memory.publish(kind, payload)
        self.published.append((kind, number))
        from onboardflow.models.model_registry import PublishResult
        return PublishResult(self._memory.get(kind, number), True, True)

    def prune(self, *_, **__):
        return []

    def close(self):
        pass


class _ServingStore:
    """MemoryStore seen through ModelStore.current (the serving version with its payload)."""

    def __init__(self, store):
        self._store = store

    def current(self, kind):
        number = self._store.current_version(kind)
        return None if number is None else self._store.get(kind, number)


class _Sweep:
    """The slice of ProfileSweep the learner uses: population and rescore."""

    def __init__(self, population=()):
        self.rescored = []
        self._population = list(population)

    def population(self):
        return list(self._population)

    def rescore(self, profiles, score):
        from onboardflow.transforms.rescore import SweepCounts
        profiles = list(profiles)
        self.rescored += [score(p) for p in profiles]
        return SweepCounts(profiles=len(profiles), rescored=len(profiles))

    def close(self):
        pass


class _Counts(dict):
    def __call__(self, name, n):
        self[name] = self.get(name, 0) + n


def _learner(store, population=(), segments=SegmentSettings(refit_ms=DAY_MS)) -> OnlineLearner:
    registry = _Registry(store)
    return OnlineLearner(registry, _Sweep(population), ServingModels(store, refresh_seconds=0.0), segments,
                         TrackPolicy.from_yaml(), count=_Counts())


def test_a_learner_without_state_continues_the_served_propensity_model_and_sets_the_next_mark():
    rng = random.Random(3)
    model = PropensityModel(min_per_class=1)
    from onboardflow.models.features import feature_vector
    for i in range(40):
        model.predict(f"u{i}", feature_vector(persona_profile(rng, f"u{i}", i % 2 == 0, DAY_MS)), DAY_MS)
        model.label(f"u{i}", i % 2 == 0, 2 * DAY_MS)
    store = MemoryStore()
    store.publish(PROPENSITY, model.to_bytes(include_pending=False))
    core = _learner(store)
    batch = [persona_profile(rng, f"n{i}", i % 2 == 0, DAY_MS * 101 + 3_600_000 + i) for i in range(10)]

    learner = core.fresh()
    step = core.learn_batch(learner, batch)

    assert learner.propensity.warm and learner.profiles_seen == 10
    # Refits happen at event-time marks (multiples of refit_ms), never on a wall-clock schedule.
    assert step.mark_at == learner.mark_timer_ms == 102 * DAY_MS
    assert step.expire_at == learner.expire_timer_ms == learner.newest_ms == DAY_MS * 101 + 3_600_000 + 9
    assert step.watch_end  # the first batch asks for the end-of-input timer
    assert core.registry.published == []
    assert core._count["profiles_learned"] == 10
    # Pending timers are not set again by the next batch.
    again = core.learn_batch(learner, [persona_profile(rng, "m", True, DAY_MS * 101 + 4_000_000)])
    assert (again.expire_at, again.mark_at, again.watch_end) == (None, None, False)


def test_profiles_scored_by_an_older_model_than_the_serving_one_are_rescored_by_the_learner():
    rng = random.Random(8)
    store = MemoryStore()
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())   # seg-000002 serves
    core = _learner(store)
    current = persona_profile(rng, "a", True, DAY_MS * 5)
    current["model_version"] = "seg-000002"
    behind = persona_profile(rng, "b", False, DAY_MS * 5)
    behind["model_version"] = "seg-000001"                           # a worker's cache was behind
    unscored = persona_profile(rng, "c", False, DAY_MS * 5)

    core.learn_batch(core.fresh(), [current, behind, unscored])

    assert [p["user_key"] for p in core.sweep.rescored] == ["b", "c"]
    assert all(p["model_version"] == "seg-000002" and p["segment_label"] and p["onboarding_track"]
               for p in core.sweep.rescored)


def test_unlearnable_updates_are_counted_and_skipped_while_the_rest_of_the_batch_is_learned():
    core = _learner(MemoryStore())
    learner = core.fresh()
    core.learn_batch(learner, [{"as_of": DAY_MS}, persona_profile(random.Random(1), "u", True, DAY_MS)])
    assert learner.profiles_seen == 1
    assert core._count == {"profiles_not_learnable": 1, "profiles_learned": 1}


def test_the_expiry_timer_moves_on_only_while_newer_events_wait():
    core = _learner(MemoryStore())
    learner = core.fresh()
    core.learn_batch(learner, [persona_profile(random.Random(1), "u", True, 10 * DAY_MS)])
    assert core.on_expire(learner, 5 * DAY_MS).expire_at == 10 * DAY_MS
    assert learner.expire_timer_ms == 10 * DAY_MS
    step = core.on_expire(learner, 10 * DAY_MS)
    assert step.expire_at is None and learner.expire_timer_ms is None


def _population(rng, n=120):
    """Identified users (a signup) as the profile store holds them: what the segmenter is fitted on."""
    return [dict(persona_profile(rng, f"u{i:03d}", i % 2 == 0, DAY_MS * 100 + i), signup_at=DAY_MS * 99)
            for i in range(n)]


def test_a_mark_refits_on_the_store_publishes_and_rescores_everyone_then_waits_for_newer_events():
    rng = random.Random(11)
    population = _population(rng)
    store = MemoryStore()
    core = _learner(store, population, SegmentSettings(refit_ms=DAY_MS, n_clusters=2, min_users=20))
    learner = core.fresh()
    core.learn_batch(learner, population[:10])
    assert learner.mark_timer_ms == 101 * DAY_MS

    step = core.on_mark(learner, 101 * DAY_MS)

    assert core.registry.published == [(SEGMENTATION, 1)]
    assert learner.last_mark_ms == 101 * DAY_MS
    assert len(core.sweep.rescored) == 120 and all(p["model_version"] == "seg-000001" for p in core.sweep.rescored)
    # No event past the mark yet: the next mark is set by the next batch, not now.
    assert step.mark_at is None and learner.mark_timer_ms is None
    nxt = core.learn_batch(learner, [persona_profile(rng, "late", True, 101 * DAY_MS + 5)])
    assert nxt.mark_at == 102 * DAY_MS


def test_a_mark_the_input_already_ran_a_whole_interval_past_is_skipped_once_a_model_serves():
    rng = random.Random(12)
    population = _population(rng)
    store = MemoryStore()
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())
    core = _learner(store, population, SegmentSettings(refit_ms=DAY_MS, n_clusters=2, min_users=20))
    learner = core.fresh()
    core.learn_batch(learner, [persona_profile(rng, "ahead", True, 103 * DAY_MS)])

    step = core.on_mark(learner, 101 * DAY_MS)

    assert core.registry.published == [] and learner.last_mark_ms == 0
    assert step.mark_at == 104 * DAY_MS  # the next mark after the newest event


def test_the_end_of_a_bounded_input_settles_due_labels_and_refits_once_more():
    rng = random.Random(13)
    population = _population(rng)
    core = _learner(MemoryStore(), population, SegmentSettings(refit_ms=DAY_MS, n_clusters=2, min_users=20))
    learner = LearnerState(propensity=PropensityModel(min_per_class=1, timeout_days=1))
    core.learn_batch(learner, [persona_profile(rng, "quiet", False, 100 * DAY_MS, progress=0.1),
                               persona_profile(rng, "late", True, 102 * DAY_MS, progress=0.1)])
    core.on_end(learner)
    assert learner.labels_seen == 1  # "quiet"'s horizon ended by the newest event; "late"'s is censored
    assert [kind for kind, _ in core.registry.published] == [SEGMENTATION]


def test_a_hoeffding_tree_learner_keeps_learning_in_its_state_but_publishes_no_propensity_model():
    # The tree has no portable snapshot (models/propensity.py ``portable``): it is
    # left out of the registry, and the learner's engine-local state carries it.
    rng = random.Random(14)
    population = _population(rng)
    core = _learner(MemoryStore(), population, SegmentSettings(refit_ms=DAY_MS, n_clusters=2, min_users=20))
    learner = LearnerState(propensity=PropensityModel(classifier="hoeffding_tree", min_per_class=1,
                                                      timeout_days=1))
    core.learn_batch(learner, [persona_profile(rng, f"q{i}", i % 2 == 0, 100 * DAY_MS + i, progress=0.1)
                               for i in range(40)])
    core.learn_batch(learner, [persona_profile(rng, f"q{i}", True, 100 * DAY_MS + 3_600_000, progress=1.0)
                               for i in range(0, 40, 4)])
    core.on_expire(learner, 102 * DAY_MS)
    assert learner.propensity.warm
    core.on_end(learner)
    assert [kind for kind, _ in core.registry.published] == [SEGMENTATION]
    copy = load_learner(dump_learner(learner))
    assert copy.propensity.n_learned == learner.propensity.n_learned > 0
    probe = feature_vector(persona_profile(rng, "p", True, 103 * DAY_MS))
    assert copy.propensity.score(probe) == learner.propensity.score(probe)


def test_the_learner_state_survives_its_snapshot_bytes():
    core = _learner(MemoryStore())
    learner = core.fresh()
    core.learn_batch(learner, [persona_profile(random.Random(2), "u", False, 100 * DAY_MS)])
    copy = load_learner(dump_learner(learner))
    assert (copy.profiles_seen, copy.newest_ms, copy.expire_timer_ms, copy.mark_timer_ms) == (
        learner.profiles_seen, learner.newest_ms, learner.expire_timer_ms, learner.mark_timer_ms)
    assert copy.propensity.pending_users == 1


def test_the_scorer_passes_a_profile_through_unscored_when_scoring_fails_and_counts_it():
    class Broken(ServingModels):
        def score(self, profile):
            raise ArithmeticError("boom")

    counts = _Counts()
    scorer = ProfileScorer(Broken(MemoryStore(), refresh_seconds=60, clock=Clock()), count=counts)
    profile = persona_profile(random.Random(0), "u1", True, DAY_MS)
    assert scorer.score(profile) is profile
    assert counts == {"model_score_failures": 1}
    scorer.models = ServingModels(MemoryStore(), refresh_seconds=60, clock=Clock())
    scorer.score(profile)
    assert counts["profiles_unscored"] == 1


def test_a_failed_refresh_keeps_the_loaded_models_and_is_counted():
    rng = random.Random(14)
    store = MemoryStore()
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())
    counts, clock = _Counts(), Clock()
    scorer = ProfileScorer(ServingModels(store, refresh_seconds=60, clock=clock), count=counts)
    scorer.refresh()
    store.current_version = lambda kind: (_ for _ in ()).throw(ConnectionError("redis down"))
    clock.now = 100
    scorer.refresh()
    assert counts == {"model_refresh_failures": 1}
    assert scorer.score(persona_profile(rng, "a", True, DAY_MS))["model_version"] == "seg-000001"
    assert counts["profiles_scored"] == 1


class _Cell:
    def __init__(self):
        self.data = None

    def read(self):
        return self.data

    def write(self, data):
        self.data = data


class _Timer:
    at = None

    def set(self, ts):
        self.at = ts


class _Window:
    def max_timestamp(self):
        from apache_beam.utils.timestamp import MAX_TIMESTAMP
        return MAX_TIMESTAMP


def test_the_beam_learner_keeps_the_state_in_its_cell_and_sets_the_timers_the_learner_asks_for():
    from onboardflow.pipelines.beam.online_models import _LearnFn
    from onboardflow.transforms.online_models import LearnerSettings

    fn = _LearnFn(LearnerSettings("redis://unused", "unused", "unused", "obf"), TrackPolicy.from_yaml())
    fn._learner, fn._decoded = _learner(MemoryStore()), None
    cell, end, expire, mark = _Cell(), _Timer(), _Timer(), _Timer()
    at = DAY_MS * 101 + 7
    list(fn.process(("learner", [persona_profile(random.Random(1), "u", True, at)]), window=_Window(),
                    cell=cell, end=end, expire=expire, mark=mark))
    assert fn._load(cell).profiles_seen == 1 and load_learner(cell.data).profiles_seen == 1
    assert (expire.at.micros // 1000, mark.at.micros // 1000) == (at, 102 * DAY_MS)
    assert end.at is not None
    assert list(fn.on_expire(fired=_Window().max_timestamp(), cell=_Cell(), expire=_Timer())) == []  # no state
