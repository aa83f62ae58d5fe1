"""`onboardflow train`, the pure parts: choosing k, fitting, seeding the online segmenter, the report."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

# Aliased so pytest does not try to collect Beam's class as a test class.
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from sklearn.datasets import make_blobs

from onboardflow.models.features import FEATURES, feature_vector
from onboardflow.pipelines.train import (
    BuildFeatureVectors,
    KScore,
    TooFewProfiles,
    choose_k,
    feature_row,
    fit_bootstrap,
    seed_segmenter,
)
from onboardflow.runners.cli import train
from onboardflow.runners.local import prism_location

PRISM = [
    "--runner=PrismRunner",
    f"--prism_location={prism_location()}",
    "--experiments=disable_prism_server_singleton",
]


def _score(k, silhouette, db):
    return KScore(k, silhouette, db, 1.0, 0.1)


def test_clearly_best_silhouette_wins():
    scores = [_score(2, 0.40, 0.5), _score(3, 0.60, 0.9), _score(4, 0.45, 0.4)]
    assert choose_k(scores).k == 3


def test_near_tie_on_silhouette_goes_to_the_lower_davies_bouldin():
    scores = [_score(2, 0.520, 0.80), _score(3, 0.505, 0.60), _score(4, 0.30, 0.10)]
    assert choose_k(scores, tolerance=0.02).k == 3
    assert choose_k(scores, tolerance=0.0).k == 2


def test_full_tie_goes_to_the_smaller_k():
    assert choose_k([_score(5, 0.5, 0.7), _score(4, 0.5, 0.7)]).k == 4


def test_choose_k_refuses_nothing_to_choose_from():
    with pytest.raises(ValueError, match="no k"):
        choose_k([])


def _blobs(centres=4, n=400, seed=3):
    x, truth = make_blobs(n_samples=n, n_features=len(FEATURES), centers=centres, cluster_std=1.0,
                          center_box=(-8, 8), random_state=seed)
    # Different units per feature, as in real profiles: scaling must not matter.
    return x * np.linspace(0.1, 50, len(FEATURES)), truth


@pytest.mark.parametrize("pca", [None, 0.9, 3])
def test_fit_finds_the_number_of_blobs(pca):
    x, _ = _blobs(centres=4)
    boot = fit_bootstrap(x, range(2, 8), pca=pca)
    assert boot.chosen.k == 4
    assert [s.k for s in boot.scores] == [2, 3, 4, 5, 6, 7]
    assert boot.centres_standardized.shape == (4, len(FEATURES))
    if pca is None:
        assert boot.pca_components is None
    else:
        assert boot.pca_components >= 1 and 0 < boot.explained_variance <= 1


def test_fit_is_deterministic_for_a_seed():
    x, _ = _blobs()
    a, b = fit_bootstrap(x, range(2, 6), seed=7), fit_bootstrap(x, range(2, 6), seed=7)
    assert a.scores == b.scores and (a.labels == b.labels).all()


def test_fit_refuses_more_clusters_than_rows_and_k_below_two():
    x, _ = _blobs(n=8)
    with pytest.raises(TooFewProfiles):
        fit_bootstrap(x, range(2, 9))
    with pytest.raises(ValueError, match=">= 2"):
        fit_bootstrap(x, [1, 2])


@pytest.mark.parametrize("pca", [None, 0.9])
def test_seeded_segmenter_assigns_users_as_the_offline_clustering_did(pca):
    x, _ = _blobs()
    boot = fit_bootstrap(x, range(2, 7), pca=pca)
    segmenter, ids = seed_segmenter(boot, FEATURES)
    online = np.array([segmenter.predict_one(dict(zip(FEATURES, row))) for row in x.tolist()])
    assert (online == np.array(ids)[boot.labels]).mean() == 1.0
    assert len(set(ids)) == len(segmenter.labels()) == boot.chosen.k


def test_feature_row_is_the_feature_vector_in_feature_order():
    snapshot = {"events_7d": 12, "onboarding_progress": 0.6, "days_since_signup": 4.0, "session_count": 5}
    vector = feature_vector(snapshot)
    assert feature_row({"snapshot": snapshot}, FEATURES) == [vector[n] for n in FEATURES]


class _Unreadable(dict):
    def get(self, *args):
        raise RuntimeError("corrupt")


@pytest.mark.parametrize("record, reason", [
    ({"snapshot": ["a", "list"]}, "not_a_mapping:snapshot is a list"),
    ({}, "not_a_mapping:snapshot is a NoneType"),
    ({"snapshot": _Unreadable()}, "feature_error:RuntimeError"),
])
def test_unusable_snapshots_raise_with_a_reason(record, reason):
    with pytest.raises(ValueError) as error:
        feature_row(record, FEATURES)
    assert str(error.value) == reason


def test_a_feature_missing_from_the_vector_is_reported_not_guessed():
    with pytest.raises(ValueError, match="non_finite:not_a_feature"):
        feature_row({"snapshot": {}}, (*FEATURES, "not_a_feature"))


def test_build_feature_vectors_splits_rows_from_dead_letters():
    good = {"events_7d": 3, "onboarding_progress": 0.2}
    records = [
        {"user_key": "a" * 64, "version": 1, "snapshot": good},
        {"user_key": "b" * 64, "version": 1, "snapshot": "garbage"},
    ]
    with BeamTestPipeline(options=PipelineOptions(PRISM)) as p:
        out = p | beam.Create(records) | BuildFeatureVectors(FEATURES)
        assert_that(out.rows | "Keys" >> beam.Map(lambda r: (r["user_key"][0], len(r["x"]))),
                    equal_to([("a", len(FEATURES))]), label="rows")
        assert_that(out.dead_letter, equal_to([{"stage": "train", "reason": "not_a_mapping",
                                                "detail": "snapshot is a str", "user_key": "b" * 64}]),
                    label="dead_letters")


def test_report_marks_the_chosen_k_and_the_plot_is_a_png(tmp_path):
    x, _ = _blobs(centres=3)
    boot = fit_bootstrap(x, range(2, 6))
    clusters = [{"cluster_id": 0, "label": "power adopter", "users": 10, "share": 0.5}]
    text = train.format_report(boot, clusters, 1.0, {"users": 400}, 0.02)
    chosen_line = next(line for line in text.splitlines() if "<- chosen" in line)
    assert chosen_line.split()[0] == "3"
    assert "power adopter" in text and "agrees with the offline clustering on 100.0%" in text
    train.plot_k_selection(boot.scores, boot.chosen.k, tmp_path / "k.png")
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--k-min", "1"], "2 <= --k-min <= --k-max"),
    (["--k-min", "6", "--k-max", "4"], "2 <= --k-min <= --k-max"),
])
def test_bad_k_range_exits_2_before_touching_any_service(argv, message, capsys):
    assert train.main([*argv, "--warehouse-dsn", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("value, parsed", [("0.9", 0.9), ("5", 5.0), ("none", None), ("0", None)])
def test_pca_flag_takes_components_variance_share_or_none(value, parsed):
    assert train._parser().parse_args(["--pca", value]).pca == parsed


@pytest.mark.parametrize("value", ["1.5", "-2", "lots"])
def test_pca_flag_rejects_other_values(value):
    with pytest.raises(SystemExit):
        train._parser().parse_args(["--pca", value])

