"""models/propensity.py: delayed labels, point-in-time training, bounded memory, snapshots."""
import random
import zlib

import pytest
from sklearn.metrics import roc_auc_score

from onboardflow.models.propensity import DAY_MS, PropensityModel, log_loss

T0 = 1_767_571_200_000
NAMES = ("progress", "activity")


def _model(**kw):
    kw.setdefault("min_per_class", 5)
    return PropensityModel(feature_names=NAMES, **kw)


def _user(rng):
    completes = rng.random() < 0.5
    x = {"progress": (0.7 if completes else 0.2) + rng.gauss(0, 0.1),
         "activity": (3.0 if completes else 1.0) + rng.gauss(0, 0.5)}
    return completes, x


def test_learns_a_separable_signal_from_delayed_labels():
    model, rng = _model(), random.Random(1)
    for i in range(600):
        at = T0 + i * 3_600_000
        completes, x = _user(rng)
        model.predict(f"u{i}", x, at)
        if completes:
            model.label(f"u{i}", 1, at + DAY_MS // 2)
        model.expire(at)
    held_out = [_user(rng) for _ in range(300)]
    scores = [model.predict(f"new{i}", x, T0 + 10 ** 10) for i, (_, x) in enumerate(held_out)]
    assert roc_auc_score([c for c, _ in held_out], scores) > 0.95


def test_training_uses_features_as_they_were_at_prediction_time():
    seen = []
    model = _model()
    model.model.learn_one = lambda x, y: seen.append((dict(x), y))
    x = {"progress": 0.2, "activity": 1.0}
    model.predict("u", x, T0)
    # The caller mutates its dict and the user moves on after the prediction ...
    x["progress"] = 0.9
    model.predict("u", {"progress": 0.95, "activity": 9.0}, T0 + 3_600_000)  # same checkpoint (day 0): not stored
    model.label("u", 1, T0 + 2 * 3_600_000)
    # ... but training sees only what was known when the prediction was made.
    assert seen == [({"progress": 0.2, "activity": 1.0}, True)]


def test_points_predicted_after_the_label_time_are_not_trained_on():
    model = _model(checkpoints_days=(0, 1))
    model.predict("u", {"progress": 0.1}, T0)
    model.predict("u", {"progress": 0.9}, T0 + DAY_MS + 1)  # a later checkpoint, after completion (out of order)
    outcomes = model.label("u", 1, T0 + DAY_MS)
    assert [o.predicted_at for o in outcomes] == [T0]


def test_one_point_per_checkpoint_and_timeout_labels_zero():
    model = _model(timeout_days=7)
    for hours in range(0, 24 * 5, 6):  # every 6 hours for 5 days: checkpoints at days 0, 1, 2, 4
        model.predict("u", {"progress": 0.1, "activity": hours / 24}, T0 + hours * 3_600_000)
    assert model.expire(T0 + 7 * DAY_MS - 1) == []
    first = model.expire(T0 + 7 * DAY_MS)
    assert [(o.label, o.predicted_at) for o in first] == [(0, T0)]
    rest = model.expire(T0 + 12 * DAY_MS)
    assert [(o.predicted_at - T0) // DAY_MS for o in rest] == [1, 2, 4]
    assert all(o.label == 0 and o.labelled_at == o.predicted_at + 7 * DAY_MS for o in rest)


def test_completed_user_is_not_relabelled_by_the_timeout():
    model = _model(timeout_days=7)
    model.predict("u", {"progress": 0.5}, T0)
    assert [o.label for o in model.label("u", 1, T0 + DAY_MS)] == [1]
    model.predict("u", {"progress": 1.0}, T0 + 2 * DAY_MS)
    assert model.expire(T0 + 100 * DAY_MS) == []
    assert model.pending_users == 0


def test_outcomes_carry_the_probability_given_before_the_label():
    model = _model(min_per_class=1)
    for i in range(20):  # warm the model up with both classes
        model.predict(f"w{i}", {"progress": i % 2}, T0)
        model.label(f"w{i}", i % 2, T0 + 1)
    p = model.predict("u", {"progress": 1.0}, T0 + 2)
    [outcome] = model.label("u", 1, T0 + 3)
    assert outcome.probability == p
    assert 0.0 < outcome.probability_at_label < 1.0


def test_cold_model_answers_the_prior_until_it_has_seen_both_classes():
    model = _model(min_per_class=3, prior=0.5)
    for i in range(10):
        model.predict(f"p{i}", {"progress": 1.0}, T0)
        model.label(f"p{i}", 1, T0 + 1)
    assert model.predict("x", {"progress": 1.0}, T0 + 2) == 0.5 and not model.warm
    for i in range(3):
        model.predict(f"n{i}", {"progress": 0.0}, T0)
        model.label(f"n{i}", 0, T0 + 1)
    assert model.warm and model.predict("y", {"progress": 1.0}, T0 + 2) != 0.5


def test_pending_users_are_bounded_and_the_oldest_is_labelled_zero_early():
    model = _model(max_pending=3)
    for i in range(5):
        model.predict(f"u{i}", {"progress": 0.1}, T0 + i)
    assert model.pending_users == 3
    assert model.evicted == 2
    assert model.label("u0", 1, T0 + 10) == []  # evicted: its point was already used as a negative


def test_snapshot_round_trip_gives_identical_predictions_and_pending_state():
    model, rng = _model(), random.Random(3)
    for i in range(200):
        completes, x = _user(rng)
        model.predict(f"u{i}", x, T0 + i)
        if completes and i < 150:
            model.label(f"u{i}", 1, T0 + i + 1)
    model.expire(T0 + 8 * DAY_MS)
    restored = PropensityModel.from_bytes(model.to_bytes())
    probe = [_user(rng)[1] for _ in range(50)]
    at = T0 + 9 * DAY_MS
    assert [restored.predict(f"q{i}", x, at) for i, x in enumerate(probe)] == \
           [model.predict(f"q{i}", x, at) for i, x in enumerate(probe)]
    assert restored.pending_users == model.pending_users


def test_hoeffding_tree_variant_learns_and_predicts():
    model, rng = _model(classifier="hoeffding_tree"), random.Random(4)
    for i in range(400):
        completes, x = _user(rng)
        model.predict(f"u{i}", x, T0)
        model.label(f"u{i}", int(completes), T0 + 1)
    assert model.predict("hi", {"progress": 0.8, "activity": 3.2}, T0 + 2) > \
           model.predict("lo", {"progress": 0.1, "activity": 0.9}, T0 + 2)


def test_log_loss_is_clipped_and_symmetric():
    assert log_loss(1, 0.0) == pytest.approx(log_loss(0, 1.0)) == pytest.approx(13.8155, rel=1e-4)
    assert log_loss(1, 0.5) == pytest.approx(0.6931, rel=1e-4)


def test_snapshot_without_pending_scores_alike_and_carries_no_user_keys():
    model, rng = _model(), random.Random(6)
    for i in range(120):
        completes, x = _user(rng)
        model.predict(f"user-{i}", x, T0 + i)
        if completes:
            model.label(f"user-{i}", 1, T0 + i + 1)
    data = model.to_bytes(include_pending=False)
    served = PropensityModel.from_bytes(data)
    assert served.pending_users == 0 and model.pending_users > 0
    probe = {"progress": 0.6, "activity": 2.0}
    assert served.predict("q", probe, T0 + 500) == model.predict("q", probe, T0 + 500)
    assert b"user-" not in zlib.decompress(data[data.index(b"propensity") + len(b"propensity"):])


def test_pending_points_are_stored_packed_and_older_dict_points_still_train_alike():
    # Points awaiting labels keep their features as packed float64s in
    # feature order (compact checkpoints); a snapshot written before that
    # holds dicts, and both give the same outcomes and the same training.
    def run(convert_to_dicts):
        model, rng = _model(), random.Random(5)
        xs = [_user(rng)[1] for _ in range(40)]
        for i, x in enumerate(xs):
            model.predict(f"u{i}", x, T0 + i)
        assert all(isinstance(pt[2], bytes) for p in model._pending.values() for pt in p.points)
        if convert_to_dicts:
            for p in model._pending.values():
                p.points = [(a, d, model._unpack(f), pr) for a, d, f, pr in p.points]
            model = PropensityModel.from_bytes(model.to_bytes())
        outcomes = [o for i in range(0, 40, 2) for o in model.label(f"u{i}", 1, T0 + DAY_MS)]
        outcomes += model.expire(T0 + 5 * DAY_MS)
        return outcomes, model.predict("probe", xs[0], T0 + 6 * DAY_MS)

    packed, packed_score = run(False)
    dicts, dict_score = run(True)
    assert len(packed) == 40
    assert packed == dicts and packed_score == dict_score
    # Stored values round-trip exactly.
    model = _model()
    model.predict("u", {"progress": 0.123456789, "activity": 2.5}, T0)
    assert model._unpack(model._pending["u"].points[0][2]) == {"progress": 0.123456789, "activity": 2.5}
