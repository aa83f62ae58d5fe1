"""The pipeline side of the online models: serving cache, scoring, and the learner's state.

Pure unit tests: the registry's Redis copy is replaced by an in-memory store
with the same three methods; tests/integration/test_online_models.py runs the
transforms on the real Redis and PostgreSQL.
"""
import datetime as dt
import random

from onboardflow.models.model_registry import ModelVersion
from onboardflow.models.propensity import PropensityModel
from onboardflow.models.segmentation import Segmenter, SegmentSettings
from onboardflow.schemas.units import DAY_MS
from onboardflow.transforms.online_models import (
    PROPENSITY,
    SEGMENTATION,
    LearnerState,
    ServingModels,
    completed_onboarding,
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
    from onboardflow.pipelines.onboarding import _drift_event_kv
    from onboardflow.schemas import default_registry, load_schema
    from onboardflow.schemas.wire import AvroDeserializer

    learner, events, _ = _learn_cluster_mix(seed=7, n=4000, shift_at=3000)
    assert events
    encode = _drift_event_kv(None)
    decoder = AvroDeserializer(default_registry(), load_schema("drift_event"))
    for event in events:
        key, value = encode(event)
        assert key == b"clustering"
        assert decoder.deserialize(value) == event


class _Cell:
    def __init__(self):
        self.data = None

    def read(self):
        return self.data

    def write(self, data):
        self.data = data


class _Timer:
    def set(self, ts):
        self.at = ts


class _Window:
    def max_timestamp(self):
        from apache_beam.utils.timestamp import MAX_TIMESTAMP
        return MAX_TIMESTAMP


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


class _ServingStore:
    """MemoryStore seen through ModelStore.current (the serving version with its payload)."""

    def __init__(self, store):
        self._store = store

    def current(self, kind):
        number = self._store.current_version(kind)
        return None if number is None else self._store.get(kind, number)


class _Sweep:
    """The slice of ProfileSweep the learner uses on a batch: rescore."""

    def __init__(self):
        self.rescored = []

    def rescore(self, profiles, score):
        from onboardflow.transforms.rescore import SweepCounts
        profiles = list(profiles)
        self.rescored += [score(p) for p in profiles]
        return SweepCounts(profiles=len(profiles), rescored=len(profiles))


def _learn_fn(store):
    from onboardflow.models.tracks import TrackPolicy, policy_source
    from onboardflow.transforms.online_models import _LearnFn

    fn = _LearnFn("redis://unused", "unused", "unused", "obf", SegmentSettings(refit_ms=DAY_MS), policy_source())
    fn._registry, fn._decoded, fn._sweep = _Registry(store), None, _Sweep()
    fn._serving = ServingModels(fn._registry.store._store, refresh_seconds=0.0)
    fn._tracks = TrackPolicy.from_yaml()
    return fn


def test_a_learner_without_state_continues_the_served_propensity_model_and_sets_the_next_mark():
    rng = random.Random(3)
    model = PropensityModel(min_per_class=1)
    from onboardflow.models.features import feature_vector
    for i in range(40):
        model.predict(f"u{i}", feature_vector(persona_profile(rng, f"u{i}", i % 2 == 0, DAY_MS)), DAY_MS)
        model.label(f"u{i}", i % 2 == 0, 2 * DAY_MS)
    store = MemoryStore()
    store.publish(PROPENSITY, model.to_bytes(include_pending=False))
    fn = _learn_fn(store)
    batch = [persona_profile(rng, f"n{i}", i % 2 == 0, DAY_MS * 101 + 3_600_000 + i) for i in range(10)]
    cell, mark = _Cell(), _Timer()

    list(fn.process(("learner", batch), window=_Window(), cell=cell, end=_Timer(), expire=_Timer(), mark=mark))

    learner = fn._load(cell)
    assert learner.propensity.warm and learner.profiles_seen == 10
    # Refits happen at event-time marks (multiples of refit_ms), never on a wall-clock schedule.
    assert mark.at.micros // 1000 == learner.mark_timer_ms == 102 * DAY_MS
    assert fn._registry.published == []


def test_profiles_scored_by_an_older_model_than_the_serving_one_are_rescored_by_the_learner():
    rng = random.Random(8)
    store = MemoryStore()
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())
    store.publish(SEGMENTATION, trained_segmenter(rng).to_bytes())   # seg-000002 serves
    fn = _learn_fn(store)
    current = persona_profile(rng, "a", True, DAY_MS * 5)
    current["model_version"] = "seg-000002"
    behind = persona_profile(rng, "b", False, DAY_MS * 5)
    behind["model_version"] = "seg-000001"                           # a worker's cache was behind
    unscored = persona_profile(rng, "c", False, DAY_MS * 5)

    list(fn.process(("learner", [current, behind, unscored]), window=_Window(), cell=_Cell(), end=_Timer(),
                    expire=_Timer(), mark=_Timer()))

    assert [p["user_key"] for p in fn._sweep.rescored] == ["b", "c"]
    assert all(p["model_version"] == "seg-000002" and p["segment_label"] and p["onboarding_track"]
               for p in fn._sweep.rescored)
