"""models/propensity.py snapshots: portable JSON (no pickle) that restores the model exactly.

A restored model must give the same probabilities and keep learning exactly
like the original (same outcomes, same next predictions), and its bytes must
be readable without unpickling anything. The cross-environment half (dump in
one River/numpy, load in the other) is tests/integration/test_portable_snapshots.py.
"""
import json
import random
import zlib

import pytest

from onboardflow.models import snapshot
from onboardflow.models.propensity import DAY_MS, SNAPSHOT_KIND, PropensityModel

T0 = 1_767_571_200_000
NAMES = ("progress", "activity", "sessions")


def _x(rng, completes):
    return {"progress": (0.7 if completes else 0.2) + rng.gauss(0, 0.15),
            "activity": (3.0 if completes else 1.0) + rng.gauss(0, 0.8),
            "sessions": rng.randint(0, 9)}


def _feed(model, rng, users, start, prefix):
    """``users`` users, each predicted at a few ages, half of the completers labelled; timeouts on the way."""
    outcomes, probabilities = [], []
    for i in range(users):
        completes = rng.random() < 0.45
        first = start + i * 600_000
        for age_days in (0, 1.2, 2.5):
            at = first + int(age_days * DAY_MS)
            probabilities.append(model.predict(f"{prefix}{i}", _x(rng, completes), at))
        if completes and rng.random() < 0.8:
            outcomes += model.label(f"{prefix}{i}", 1, first + int(2.6 * DAY_MS))
        outcomes += model.expire(first)
    return outcomes, probabilities


def _trained(**kw):
    kw.setdefault("min_per_class", 20)
    model, rng = PropensityModel(feature_names=NAMES, max_pending=150, max_resolved=120, **kw), random.Random(7)
    _feed(model, rng, 400, T0, "u")
    return model


def _continue(model):
    rng = random.Random(99)
    outcomes, probabilities = _feed(model, rng, 150, T0 + 40 * DAY_MS, "v")
    outcomes += model.expire(T0 + 60 * DAY_MS)
    probe = [model.score(_x(rng, i % 2 == 0)) for i in range(50)]
    return outcomes, probabilities, probe


def test_a_restored_model_predicts_and_keeps_learning_exactly_like_the_original():
    model = _trained()
    assert model.warm and model.n_learned > 300 and model.evicted > 0  # every part of the state is in use
    assert model.pending_users > 0 and len(model._resolved) == 120 and model._deadlines
    data = model.to_bytes()
    restored = PropensityModel.from_bytes(data)

    probe = [_x(random.Random(3), i % 2 == 0) for i in range(100)]
    assert [restored.score(x) for x in probe] == [model.score(x) for x in probe]
    assert restored.to_bytes() == data  # every field survives, in order
    assert (restored.class_counts, restored.n_learned, restored.evicted, restored.pending_users) == (
        model.class_counts, model.n_learned, model.evicted, model.pending_users)
    assert list(restored._resolved) == list(model._resolved) and restored._deadlines == model._deadlines
    # Same further stream, same training: identical outcomes and next predictions.
    assert _continue(restored) == _continue(model)


def test_the_snapshot_is_json_with_the_parameters_spelled_out_and_no_pickle():
    model = _trained()
    data = model.to_bytes()
    assert snapshot.format_of(data) == snapshot.PORTABLE_FORMAT
    body = zlib.decompress(data[data.index(SNAPSHOT_KIND.encode()) + len(SNAPSHOT_KIND):])
    doc = json.loads(body)
    assert doc["kind"] == "propensity" and doc["format"] == 2
    logreg, scaler = doc["classifier"]["logreg"], doc["classifier"]["scaler"]
    assert dict(zip(logreg["names"], logreg["weights"])) == model.model["logreg"].weights
    assert logreg["intercept"] == model.model["logreg"].intercept
    assert logreg["optimizer"] == {"type": "SGD", "lr": 0.02, "n_iterations": model.n_learned}
    assert scaler["names"] == list(NAMES) and scaler["counts"] == [model.n_learned] * 3
    assert scaler["means"] == [model.model["scale"].means[n] for n in NAMES]
    assert doc["settings"]["timeout_ms"] == 3 * DAY_MS and doc["counters"]["n_learned"] == model.n_learned
    assert len(doc["pending"]["users"]["keys"]) == model.pending_users


def test_a_serving_snapshot_has_no_per_user_state_and_scores_and_learns_alike():
    model = _trained()
    data = model.to_bytes(include_pending=False)
    served = PropensityModel.from_bytes(data)
    assert served.pending_users == 0 and not served._deadlines and not served._resolved
    assert b"u1" not in zlib.decompress(data[data.index(b"propensity") + len(b"propensity"):])
    probe = [_x(random.Random(4), i % 2 == 0) for i in range(50)]
    assert [served.score(x) for x in probe] == [model.score(x) for x in probe]
    assert (served.class_counts, served.n_learned) == (model.class_counts, model.n_learned)
    # The model parameters are the same, so learning the same examples gives the same model.
    for m in (model, served):
        for i, x in enumerate(probe):
            m.model.learn_one(m._select(x), i % 3 == 0)
    assert [served.score(x) for x in probe] == [model.score(x) for x in probe]


def test_a_cold_model_round_trips_too():
    model = PropensityModel(feature_names=NAMES)
    restored = PropensityModel.from_bytes(model.to_bytes())
    assert not restored.warm and restored.score({"progress": 1.0}) == 0.5
    assert restored.to_bytes() == model.to_bytes()


def test_settings_survive_even_when_days_do_not_divide_into_whole_milliseconds():
    model = PropensityModel(timeout_days=1 / 3, checkpoints_days=(0, 0.7), prior=0.2, min_per_class=3,
                            max_pending=10, max_resolved=11, feature_names=NAMES)
    restored = PropensityModel.from_bytes(model.to_bytes())
    assert (restored.timeout_ms, restored.checkpoints_ms, restored.prior, restored.min_per_class,
            restored.max_pending, restored.max_resolved, restored.feature_names) == (
        model.timeout_ms, model.checkpoints_ms, 0.2, 3, 10, 11, NAMES)


def test_a_format_one_pickle_from_before_still_loads():
    model = _trained()
    legacy = snapshot.dump(SNAPSHOT_KIND, model)  # what to_bytes wrote before the portable format
    assert snapshot.format_of(legacy) == 1
    restored = PropensityModel.from_bytes(legacy)
    assert _continue(restored) == _continue(model)


def test_the_hoeffding_tree_refuses_a_portable_snapshot_with_the_reason():
    model = PropensityModel(classifier="hoeffding_tree", feature_names=NAMES)
    assert not model.portable
    with pytest.raises(ValueError, match="hoeffding_tree propensity model has no portable snapshot"):
        model.to_bytes(include_pending=False)


def test_a_classifier_with_state_the_format_does_not_carry_is_refused_not_dropped():
    from river import optim
    model = PropensityModel(feature_names=NAMES)
    model.model["logreg"].optimizer = optim.Adam()  # per-weight moments the format has no place for
    with pytest.raises(ValueError, match="only StandardScaler"):
        model.to_bytes()


def _doc(model):
    return snapshot.load(SNAPSHOT_KIND, model.to_bytes())


@pytest.mark.parametrize("spoil", [
    lambda d: d.update(format=3),
    lambda d: d.update(kind="segmenter"),
    lambda d: d["classifier"]["logreg"]["weights"].pop(),
    lambda d: d["classifier"]["scaler"].pop("vars"),
    lambda d: d["pending"]["users"]["keys"].pop(),
    lambda d: d["pending"]["points"].update(features="AAAA"),
    lambda d: d["pending"]["points"].update(features="not base64!"),
    lambda d: d["settings"].update(classifier="hoeffding_tree"),
])
def test_a_damaged_document_is_refused_with_a_snapshot_error(spoil):
    doc = _doc(_trained())
    spoil(doc)
    with pytest.raises(snapshot.SnapshotError):
        PropensityModel.from_bytes(snapshot.dump_json(SNAPSHOT_KIND, doc))


def test_a_model_with_non_finite_parameters_is_not_written():
    model = _trained()
    model.model["logreg"].intercept = float("nan")
    with pytest.raises(ValueError, match="propensity snapshot"):
        model.to_bytes()
