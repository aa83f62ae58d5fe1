"""models/segmentation.py: online clusters, readable labels, seeding, snapshots."""
import doctest
import math
import random

import pytest
from river import preprocessing
from sklearn.metrics import adjusted_rand_score

from onboardflow.models import segmentation
from onboardflow.models.features import FEATURES, SEGMENT_FEATURES
from onboardflow.models.segmentation import UNASSIGNED, FadingStandardScaler, OnlineSegmenter, describe_centre

BASE = {name: 0.2 for name in FEATURES} | {"tenure_days": math.log1p(20.0), "browse_share": 0.4,
                                           "feature_use_share": 0.1, "support_share": 0.02}
#: Three behaviours, as feature_vector would give them.
ARCHETYPES = {
    "dormant": BASE | {"recency_days": math.log1p(30.0), "events_7d": 0.0, "onboarding_progress": 0.2},
    "power adopter": BASE | {"feature_use_share": 0.45, "onboarding_progress": 1.0, "purchased": 1.0,
                             "events_7d": 4.5, "active_share_30d": 0.8},
    "support seeker": BASE | {"support_share": 0.3, "onboarding_progress": 0.6, "events_7d": 3.0,
                              "active_share_30d": 0.4},
}


def _stream(n, seed=7):
    rng = random.Random(seed)
    names = sorted(ARCHETYPES)
    for _ in range(n):
        truth = rng.choice(names)
        # Noise only where the behaviours differ: the scaler would blow pure-noise features up to unit variance.
        x = {k: v if v == BASE[k] else max(0.0, v + rng.gauss(0, 0.03)) for k, v in ARCHETYPES[truth].items()}
        yield truth, x


def _trained(n=1500, **kw):
    seg = OnlineSegmenter(n_clusters=3, warmup=60, seed=3, **kw)
    for _, x in _stream(n):
        seg.learn_one(x)
    return seg


def test_unassigned_until_warmup_then_ready():
    seg = OnlineSegmenter(n_clusters=3, warmup=60)
    stream = list(_stream(60))
    for _, x in stream[:59]:
        seg.learn_one(x)
        assert seg.predict_one(x) == UNASSIGNED and not seg.ready
    seg.learn_one(stream[59][1])
    assert seg.ready and seg.predict_one(stream[59][1]) in {0, 1, 2}


def test_recovers_well_separated_behaviours():
    seg = _trained()
    truth, assigned = zip(*((t, seg.predict_one(x)) for t, x in _stream(300, seed=99)))
    assert adjusted_rand_score(truth, assigned) == 1.0


def test_labels_are_read_off_the_centres():
    seg = _trained()
    labels = {seg.label(seg.predict_one(ARCHETYPES[name])) for name in ARCHETYPES}
    assert labels == set(ARCHETYPES)
    assert seg.label(UNASSIGNED) == "unassigned"


def test_describe_centre_rules():
    assert describe_centre(ARCHETYPES["dormant"]) == "dormant"
    assert describe_centre(BASE | {"tenure_days": 0.2}) == describe_centre(BASE)  # age is not a label
    explorer = BASE | {"browse_share": 0.75, "events_per_session": math.log1p(18.0),
                       "active_share_30d": 0.6, "onboarding_progress": 0.7}
    assert describe_centre(explorer) == "explorer"
    assert describe_centre(BASE | {"active_share_30d": 0.1}) == "stalled"


def test_seeded_centres_in_the_given_scaling_decide_assignments():
    seg = OnlineSegmenter(n_clusters=5)
    mean = {n: 1.0 for n in SEGMENT_FEATURES}
    var = {n: 4.0 for n in SEGMENT_FEATURES}
    low = {n: -1.0 for n in SEGMENT_FEATURES}   # z = -1  <=>  x = 1 - 2 = -1
    high = {n: 1.0 for n in SEGMENT_FEATURES}   # z = +1  <=>  x = 3
    seg.seed_centers([low, high], SEGMENT_FEATURES, scaler={"mean": mean, "var": var, "count": 1000})
    assert seg.ready and seg.seeded and seg.n_clusters == 2
    assert seg.predict_one({n: -0.5 for n in SEGMENT_FEATURES}) == 0
    assert seg.predict_one({n: 2.5 for n in SEGMENT_FEATURES}) == 1
    assert seg.centres()[1] == pytest.approx({n: 3.0 for n in SEGMENT_FEATURES})


def test_seed_centres_accepts_sequences_in_feature_name_order():
    names = list(reversed(SEGMENT_FEATURES))
    seg = OnlineSegmenter()
    seg.seed_centers([[0.0] * len(names), [2.0] * len(names)], names,
                     scaler={"mean": [0.0] * len(names), "var": [1.0] * len(names), "count": 10})
    assert seg.predict_one({n: 1.9 for n in SEGMENT_FEATURES}) == 1


@pytest.mark.parametrize("bad", [
    dict(centers=[{"a": 1.0}], feature_names=("a",)),                               # not our features
    dict(centers=[], feature_names=SEGMENT_FEATURES),                                       # nothing to seed
    dict(centers=[{n: float("nan") for n in SEGMENT_FEATURES}], feature_names=SEGMENT_FEATURES),    # not finite
])
def test_seed_centres_rejects_inconsistent_input(bad):
    with pytest.raises(ValueError):
        OnlineSegmenter().seed_centers(scaler={"mean": [0.0] * len(SEGMENT_FEATURES), "var": [1.0] * len(SEGMENT_FEATURES),
                                               "count": 1}, **bad)


def test_seeding_without_a_scaler_needs_a_scaler_that_saw_data():
    with pytest.raises(ValueError, match="scaler"):
        OnlineSegmenter().seed_centers([{n: 0.0 for n in SEGMENT_FEATURES}], SEGMENT_FEATURES)


def test_snapshot_round_trip_gives_identical_predictions_and_keeps_learning_alike():
    seg = _trained(600)
    restored = OnlineSegmenter.from_bytes(seg.to_bytes())
    assert restored.scaler.fading == seg.scaler.fading == 0.001
    probe = [x for _, x in _stream(200, seed=5)]
    assert [restored.predict_one(x) for x in probe] == [seg.predict_one(x) for x in probe]
    assert restored.labels() == seg.labels()
    for x in probe:
        seg.learn_one(x)
        restored.learn_one(x)
    assert restored.centres() == seg.centres()


def test_a_snapshot_keeps_the_features_it_was_built_on_when_the_segment_features_change():
    # A segmenter published before active_sessions_per_week replaced sessions_per_week.
    before = tuple("sessions_per_week" if n == "active_sessions_per_week" else n for n in SEGMENT_FEATURES)
    assert before != SEGMENT_FEATURES
    seg = _trained(600, feature_names=before)
    restored = OnlineSegmenter.from_bytes(seg.to_bytes())
    assert restored.feature_names == before
    probe = [x for _, x in _stream(200, seed=5)]
    # Today's vectors carry both rates: the old snapshot reads the one it knows, and nothing else.
    assert [restored.predict_one(x | {"active_sessions_per_week": 9.0}) for x in probe] == \
        [seg.predict_one(x) for x in probe]


@pytest.mark.parametrize("name", ["streamkmeans", "dbstream"])
def test_other_clusterers_learn_and_predict(name):
    seg = OnlineSegmenter(n_clusters=3, clusterer=name, warmup=60)
    for _, x in _stream(400):
        seg.learn_one(x)
    assert isinstance(seg.predict_one(ARCHETYPES["dormant"]), int)


def test_clusters_on_behaviour_features_only():
    # Age and volume do not move a user between clusters: the same behaviour
    # at 1 day and at 40 days of tenure, with 10x the events, is one cluster.
    seg = _trained()
    assert seg.feature_names == SEGMENT_FEATURES
    assert "tenure_days" not in SEGMENT_FEATURES and "events_30d" not in SEGMENT_FEATURES
    for name, x in ARCHETYPES.items():
        older = x | {"tenure_days": math.log1p(40.0), "events_30d": x["events_30d"] + math.log(10.0),
                     "engagement": 9.0}
        assert seg.predict_one(older) == seg.predict_one(x), name


def test_labels_come_from_cluster_profiles_including_features_the_distance_ignores():
    # "purchased" is not a clustering feature, yet a cluster of users far into
    # the tutorial who all bought a plan is labelled "power adopter": the
    # label is read off the cluster profile (the whole vector), not the centre.
    buyers = ARCHETYPES["support seeker"] | {"support_share": 0.02, "onboarding_progress": 0.9, "purchased": 1.0}
    kinds = {"dormant": ARCHETYPES["dormant"], "buyers": buyers, "support seeker": ARCHETYPES["support seeker"]}
    seg = OnlineSegmenter(n_clusters=3, warmup=60, seed=3)
    rng = random.Random(1)
    for _ in range(900):
        seg.learn_one(kinds[rng.choice(sorted(kinds))])
    cluster = seg.predict_one(buyers)
    assert "purchased" not in seg.feature_names
    assert seg.profiles()[cluster]["purchased"] == pytest.approx(1.0)
    assert seg.label(cluster) == "power adopter"
    assert {seg.label(seg.predict_one(kinds[n])) for n in ("dormant", "support seeker")} == \
        {"dormant", "support seeker"}
    # The centre alone (no purchases) reads as a steady learner.
    assert describe_centre(seg.centres()[cluster]) == "steady learner"


def test_initialization_is_the_best_of_several_restarts_whatever_the_seed():
    # Batch k-means with k-means++ restarts over the warm-up buffer finds the
    # same partition from any seed on separable data (ids may differ).
    probe = [x for _, x in _stream(200, seed=11)]
    partitions = []
    for seed in (1, 2, 3, 42):
        seg = OnlineSegmenter(n_clusters=3, warmup=90, seed=seed)
        for _, x in _stream(90):
            seg.learn_one(x)
        assert seg.ready
        partitions.append([seg.predict_one(x) for x in probe])
    assert all(adjusted_rand_score(partitions[0], p) == 1.0 for p in partitions[1:])


def test_snapshot_from_before_cluster_profiles_still_loads_and_labels_from_centres():
    seg = _trained(600)
    state = seg.__getstate__()
    for key in ("profile_names", "_profiles", "_profile_counts", "_buffer_full", "init_restarts"):
        state.pop(key)
    old = OnlineSegmenter.__new__(OnlineSegmenter)
    old.__setstate__(state)
    assert old.profiles() == {}
    assert old.labels() == {i: describe_centre(c) for i, c in old.centres().items()}
    x = ARCHETYPES["dormant"]
    assert old.predict_one(x) == seg.predict_one(x)
    old.learn_one(x)
    assert old.profiles()[old.predict_one(x)]


def test_describe_centre_skips_rules_whose_feature_is_absent():
    centre = {"support_share": 0.02, "feature_use_share": 0.1, "onboarding_progress": 0.9,
              "browse_share": 0.3, "events_per_session": 1.0}
    assert describe_centre(centre) == "steady learner"          # no activity share: not "stalled"
    assert describe_centre(centre | {"active_share_30d": 0.1}) == "stalled"
    assert describe_centre(centre | {"recency_days": math.log1p(20.0)}) == "dormant"


# --------------------------------------------------------------------------- the fading scaler


def test_the_module_examples_run():
    assert doctest.testmod(segmentation).failed == 0


def test_the_fading_scaler_without_fading_is_rivers_standard_scaler():
    rng = random.Random(3)
    fading, river = FadingStandardScaler(fading=0.0), preprocessing.StandardScaler()
    for _ in range(2000):
        x = {"a": rng.gauss(3.0, 2.0), "b": rng.expovariate(0.5)}
        fading.learn_one(x)
        river.learn_one(x)
    for name in ("a", "b"):
        assert fading.means[name] == pytest.approx(river.means[name], rel=1e-12)
        assert fading.vars[name] == pytest.approx(river.vars[name], rel=1e-9)
    x = {"a": 1.0, "b": 4.0}
    assert fading.transform_one(x) == pytest.approx(river.transform_one(x), rel=1e-9)


def test_the_fading_scaler_is_exact_for_its_first_one_over_fading_observations():
    values = [float(v) for v in range(1, 11)]
    scaler = FadingStandardScaler(fading=0.1)
    for v in values:
        scaler.learn_one({"x": v})
    mean = sum(values) / len(values)
    assert scaler.means["x"] == pytest.approx(mean)
    assert scaler.vars["x"] == pytest.approx(sum((v - mean) ** 2 for v in values) / len(values))


def test_the_fading_scaler_follows_a_population_that_drifts_where_the_cumulative_one_lags():
    rng = random.Random(5)
    fading, cumulative = FadingStandardScaler(fading=0.001), FadingStandardScaler(fading=0.0)
    for mean, std in ((0.0, 1.0), (5.0, 2.0)):   # e.g. recency, as the users of the first days age
        for _ in range(10_000):
            x = {"x": rng.gauss(mean, std)}
            fading.learn_one(x)
            cumulative.learn_one(x)
    assert fading.means["x"] == pytest.approx(5.0, abs=0.3)
    assert math.sqrt(fading.vars["x"]) == pytest.approx(2.0, abs=0.3)
    assert cumulative.means["x"] == pytest.approx(2.5, abs=0.1)   # half of what it remembers is the old population
    assert math.sqrt(cumulative.vars["x"]) > 2.8                   # and the two populations' spread counts as variance


def test_the_fading_scaler_learns_a_batch_as_its_rows_in_order():
    import pyarrow  # an apache-beam dependency
    rng = random.Random(9)
    rows = [{"a": rng.gauss(0.0, 1.0) + i / 50, "b": rng.random()} for i in range(300)]
    batch, one_by_one = FadingStandardScaler(fading=0.01), FadingStandardScaler(fading=0.01)
    batch.learn_many(pyarrow.Table.from_pylist(rows))
    for row in rows:
        one_by_one.learn_one(row)
    assert (batch.counts, batch.means, batch.vars) == (one_by_one.counts, one_by_one.means, one_by_one.vars)


@pytest.mark.parametrize("fading", [-0.1, 1.0, True, "0.1"])
def test_the_fading_scaler_refuses_a_fading_outside_0_1(fading):
    with pytest.raises(ValueError, match="fading"):
        FadingStandardScaler(fading=fading)


def test_seeding_keeps_the_segmenters_fading():
    for fading in (0.0, 0.01):
        seg = OnlineSegmenter(scaler_fading=fading)
        seg.seed_centers([[0.0] * len(SEGMENT_FEATURES)], SEGMENT_FEATURES,
                         scaler={"mean": [0.0] * len(SEGMENT_FEATURES), "var": [1.0] * len(SEGMENT_FEATURES),
                                 "count": 10})
        assert isinstance(seg.scaler, FadingStandardScaler) and seg.scaler.fading == fading
        assert seg.scaler.counts["support_share"] == 10


def test_a_snapshot_with_rivers_cumulative_scaler_still_loads_and_keeps_it():
    # Snapshots published before the fading scaler hold River's StandardScaler.
    seg = _trained(600, scaler_fading=0.0)
    state = seg.__getstate__()
    state["scaler"] = preprocessing.StandardScaler._from_state(
        counts=dict(seg.scaler.counts), means=dict(seg.scaler.means), vars=dict(seg.scaler.vars))
    old = OnlineSegmenter.__new__(OnlineSegmenter)
    old.__setstate__(state)
    restored = OnlineSegmenter.from_bytes(old.to_bytes())
    assert type(restored.scaler) is preprocessing.StandardScaler
    probe = [x for _, x in _stream(200, seed=5)]
    assert [restored.predict_one(x) for x in probe] == [seg.predict_one(x) for x in probe]
    for x in probe:
        seg.learn_one(x)
        restored.learn_one(x)
    assert restored.centres().keys() == seg.centres().keys()
    for i, centre in seg.centres().items():
        assert restored.centres()[i] == pytest.approx(centre, rel=1e-9)
