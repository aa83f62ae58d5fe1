"""The training job of ``onboardflow train``: warehouse history -> a seeded online segmenter.

The online segmenter (``models/segmentation.py``) learns as users arrive, but
a fresh deployment would start from nothing and guess its number of clusters.
This job starts it from what the warehouse already knows:

1. **Beam, batch** (``extract_features``; the I/O-bound part, parallel, on
   Prism locally or any runner): ``ReadLatestProfiles`` reads the newest
   ``profile_snapshots`` row per user (optionally as of an event time), split
   into hash ranges of ``user_key`` read in parallel through server-side
   cursors; ``BuildFeatureVectors`` turns each into
   ``models.features.feature_vector`` and dead-letters what it cannot use.
   The feature matrix is written as JSON lines to the output directory (with
   the dead letters, reasons only), so every run can be reproduced from its
   own output.
2. **scikit-learn, in the launcher** (``fit_bootstrap``; needs every row at
   once, and a matrix of a few hundred thousand users by 17 features fits in
   memory): ``StandardScaler``, ``PCA`` to 90 % of the variance, then
   ``MiniBatchKMeans`` for each k, each scored by silhouette (higher is
   better, on a seeded sample: it is quadratic) and Davies-Bouldin (lower is
   better).
3. **Choosing k** (``choose_k``): the best silhouette wins; among the k whose
   silhouette is within the tolerance (0.02) of the best, the one with the
   lowest Davies-Bouldin; a remaining tie goes to the smaller k. Silhouette
   leads because it is bounded and comparable across k; Davies-Bouldin breaks
   near-ties because it penalizes clusters that overlap, which is what makes
   onboarding tracks ambiguous.
4. ``seed_segmenter``: the chosen centres seed a ``Segmenter`` (in its
   documented space: standardized features, with the scaler's mean and
   variance handed over; with PCA the centres are mapped back from PCA space
   first). Training is seeded and rows are sorted, so re-running on the same
   warehouse gives the same bytes.
5. ``bootstrap_propensity``: the snapshot history replayed, in event-time
   order, through a fresh propensity model.

The command line (runners/cli/train.py) parses flags, publishes to the model
registry and writes the report.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from ..transforms.connections import warehouse_connect

METRICS_NAMESPACE = "onboardflow"
STAGE = "train"
DEFAULT_K_MIN = 2
DEFAULT_K_MAX = 10
DEFAULT_MIN_USERS = 100
DEFAULT_TOLERANCE = 0.02
DEFAULT_SILHOUETTE_SAMPLE = 5000
DEFAULT_SEED = 42
#: PCA to 90 % of the variance before clustering. The 17 features are strongly
#: correlated (event counts, sessions, engagement all measure activity), and
#: on generator data of 3 and 4 known personas the silhouette peaked at the
#: true k with this reduction but at k = 2 without it (docs/models-registry.md).
DEFAULT_PCA = 0.9


class TooFewProfiles(RuntimeError):
    """The warehouse holds too few usable profiles to train on."""


# --------------------------------------------------------------------------- Beam: warehouse -> feature rows


class _ReadShardFn(beam.DoFn):
    """One hash range of user_keys -> the newest snapshot of each user in it (``snapshots_read``)."""

    def __init__(self, dsn: str, schema: str, shards: int, as_of_ms: Optional[int]) -> None:
        self._dsn = dsn
        self._schema = schema
        self._shards = shards
        self._as_of_ms = as_of_ms
        self._conn = None
        self._read = Metrics.counter(METRICS_NAMESPACE, "train_snapshots_read")

    def setup(self) -> None:
        self._conn = warehouse_connect(self._dsn, application_name="onboardflow-train")

    def process(self, shard: int):
        from psycopg import sql

        # version = event-time millis * 1000 + n (transforms/profile.py): "as of
        # T" keeps versions below (T + 1) * 1000, the point-in-time view.
        where = sql.SQL("mod(hashtext(user_key) & 2147483647, {}) = {}").format(
            sql.Literal(self._shards), sql.Literal(shard))
        if self._as_of_ms is not None:
            where = sql.SQL("{} AND version < {}").format(where, sql.Literal((self._as_of_ms + 1) * 1000))
        query = sql.SQL(
            "SELECT DISTINCT ON (user_key) user_key, version, snapshot FROM {} WHERE {} "
            "ORDER BY user_key, version DESC"
        ).format(sql.Identifier(self._schema, "profile_snapshots"), where)
        # A named (server-side) cursor streams the shard instead of loading it whole.
        with self._conn.transaction(), self._conn.cursor(name=f"train_shard_{shard}") as cur:
            cur.itersize = 2000
            cur.execute(query)
            for user_key, version, snapshot in cur:
                self._read.inc()
                yield {"user_key": user_key, "version": version, "snapshot": snapshot}

    def teardown(self) -> None:
        if self._conn is not None:
            self._conn.close()


class ReadLatestProfiles(beam.PTransform):
    """The newest warehouse profile snapshot of every user, read in parallel.

    In: a pipeline root. Out: ``{"user_key", "version", "snapshot"}`` per user,
    ``snapshot`` the profile dict as the pipeline wrote it; with ``as_of_ms``
    only snapshots of event time up to it count. Nothing is dropped here.
    """

    def __init__(self, dsn: str, schema: str = "warehouse", shards: int = 4,
                 as_of_ms: Optional[int] = None) -> None:
        super().__init__()
        if shards < 1:
            raise ValueError("shards must be >= 1")
        self._fn = _ReadShardFn(dsn, schema, shards, as_of_ms)
        self._shards = shards

    def expand(self, root):
        return (
            root
            | "Shards" >> beam.Create(list(range(self._shards)))
            # One shard per worker: without it, a runner may run every query in one bundle.
            | "SpreadShards" >> beam.Reshuffle()
            | "ReadShard" >> beam.ParDo(self._fn)
        )


def feature_row(record: Mapping[str, Any], feature_names: Sequence[str]) -> list[float]:
    """The feature values of one snapshot, in ``feature_names`` order; raises ValueError if unusable."""
    from ..models.features import feature_vector

    snapshot = record.get("snapshot")
    if not isinstance(snapshot, Mapping):
        raise ValueError(f"not_a_mapping:snapshot is a {type(snapshot).__name__}")
    try:
        vector = feature_vector(snapshot)
    except Exception as exc:  # noqa: BLE001 - any failure is this record's dead letter
        raise ValueError(f"feature_error:{type(exc).__name__}") from None
    row = [float(vector.get(name, math.nan)) for name in feature_names]
    bad = [name for name, v in zip(feature_names, row) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"non_finite:{','.join(bad)}")
    return row


class _FeatureRowFn(beam.DoFn):
    def __init__(self, feature_names: Sequence[str]) -> None:
        self._names = tuple(feature_names)
        self._rows = Metrics.counter(METRICS_NAMESPACE, "train_feature_rows")
        self._dead_letters = Metrics.counter(METRICS_NAMESPACE, "train_dead_letter")

    def process(self, record):
        user_key = record.get("user_key") if isinstance(record, Mapping) else None
        try:
            row = feature_row(record if isinstance(record, Mapping) else {}, self._names)
        except ValueError as exc:
            reason, _, detail = str(exc).partition(":")
            self._dead_letters.inc()
            # Reason and pseudonymous key only: the snapshot itself stays in the warehouse.
            yield beam.pvalue.TaggedOutput(BuildFeatureVectors.DEAD_LETTER, {
                "stage": STAGE, "reason": reason, "detail": detail,
                "user_key": user_key if isinstance(user_key, str) else None,
            })
            return
        self._rows.inc()
        yield {"user_key": user_key, "x": row}


class BuildFeatureVectors(beam.PTransform):
    """Snapshot records in, feature rows out.

    In: ``{"user_key", "version", "snapshot"}``. Out (main, ``rows``):
    ``{"user_key", "x": [floats in feature_names order]}``. ``dead_letter``:
    ``{"stage": "train", "reason", "detail", "user_key"}`` for snapshots that
    are not mappings (``not_a_mapping``), that ``feature_vector`` fails on
    (``feature_error``) or that give a non-finite value (``non_finite``),
    counted in ``train_dead_letter``. Never the snapshot itself.
    """

    DEAD_LETTER = "dead_letter"

    def __init__(self, feature_names: Sequence[str]) -> None:
        super().__init__()
        self._fn = _FeatureRowFn(feature_names)

    def expand(self, records):
        return records | "FeatureVector" >> beam.ParDo(self._fn).with_outputs(self.DEAD_LETTER, main="rows")


# --------------------------------------------------------------------------- scikit-learn: choosing k


@dataclass(frozen=True)
class KScore:
    """How well k clusters fit: silhouette (higher better), Davies-Bouldin (lower better)."""

    k: int
    silhouette: float
    davies_bouldin: float
    inertia: float
    smallest_share: float  # share of users in the smallest cluster


def choose_k(scores: Sequence[KScore], tolerance: float = DEFAULT_TOLERANCE) -> KScore:
    """The best silhouette; within ``tolerance`` of it, the lowest Davies-Bouldin; then the smaller k.

    >>> choose_k([KScore(2, 0.50, 0.9, 1, .4), KScore(3, 0.49, 0.6, 1, .3), KScore(4, 0.30, 0.5, 1, .2)])
    KScore(k=3, silhouette=0.49, davies_bouldin=0.6, inertia=1, smallest_share=0.3)
    """
    if not scores:
        raise ValueError("no k was scored")
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    best = max(s.silhouette for s in scores)
    contenders = [s for s in scores if s.silhouette >= best - tolerance]
    return min(contenders, key=lambda s: (s.davies_bouldin, s.k))


@dataclass
class Bootstrap:
    """The fitted offline model: everything the report and the seeding need."""

    scores: list[KScore]
    chosen: KScore
    labels: Any  # cluster per row, numpy array
    centres_standardized: Any  # k x features, numpy array
    scaler_mean: Any
    scaler_var: Any
    n_rows: int
    pca_components: Optional[int]
    explained_variance: Optional[float]


def fit_bootstrap(matrix, k_values: Iterable[int], pca: Optional[float] = None, seed: int = DEFAULT_SEED,
                  silhouette_sample: int = DEFAULT_SILHOUETTE_SAMPLE,
                  tolerance: float = DEFAULT_TOLERANCE) -> Bootstrap:
    """Scale, optionally reduce, cluster for each k, score, choose; centres back in standardized space.

    ``pca``: None (no PCA), an int >= 1 (components) or a float in (0, 1)
    (the share of variance to keep).
    """
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import davies_bouldin_score, silhouette_score
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(matrix, dtype=float)
    k_values = sorted(set(int(k) for k in k_values))
    if not k_values or k_values[0] < 2:
        raise ValueError("k values must be >= 2 (silhouette needs two clusters)")
    if x.shape[0] <= k_values[-1]:
        raise TooFewProfiles(f"{x.shape[0]} rows cannot be split into {k_values[-1]} clusters")
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    reducer = None
    space = z
    if pca is not None:
        n_components = int(pca) if pca >= 1 else float(pca)
        reducer = PCA(n_components=n_components, random_state=seed).fit(z)
        space = reducer.transform(z)
    sample = min(silhouette_sample, x.shape[0])
    scores, fits = [], {}
    for k in k_values:
        km = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=5, batch_size=1024).fit(space)
        labels = km.labels_
        if len(set(labels.tolist())) < 2:
            # Degenerate (all rows identical): no separation to score.
            sil, db = -1.0, math.inf
        else:
            sil = float(silhouette_score(space, labels, sample_size=sample, random_state=seed))
            db = float(davies_bouldin_score(space, labels))
        sizes = np.bincount(labels, minlength=k)
        scores.append(KScore(k, round(sil, 6), round(db, 6), round(float(km.inertia_), 6),
                             round(float(sizes.min()) / x.shape[0], 6)))
        fits[k] = km
    chosen = choose_k(scores, tolerance)
    km = fits[chosen.k]
    centres = km.cluster_centers_
    if reducer is not None:
        centres = reducer.inverse_transform(centres)
    return Bootstrap(
        scores=scores, chosen=chosen, labels=km.labels_, centres_standardized=centres,
        scaler_mean=scaler.mean_, scaler_var=scaler.var_, n_rows=x.shape[0],
        pca_components=None if reducer is None else int(reducer.n_components_),
        explained_variance=None if reducer is None else round(float(reducer.explained_variance_ratio_.sum()), 6),
    )


def seed_segmenter(boot: Bootstrap, feature_names: Sequence[str], seed: int = DEFAULT_SEED,
                   profiles: Optional[Sequence[Mapping[str, float]]] = None,
                   population: Optional[Mapping[str, tuple[float, float]]] = None):
    """A ``Segmenter`` holding the chosen centres and the training scaler; and each centre's cluster id.

    ``profiles``: per cluster, the mean of the whole feature vector over its
    members (see ``cluster_profiles``), which the segment labels are read
    from; ``population``: per ``FEATURES`` entry, its (mean, std) over all
    rows (the reference the labels' z-scores are taken against).
    """
    import math

    from ..models.features import FEATURES
    from ..models.segmentation import Segmenter

    k = boot.chosen.k
    segmenter = Segmenter(n_clusters=k, seed=seed, feature_names=feature_names, min_users=k)
    scaling = {n: (float(m), math.sqrt(max(float(v), 0.0))) for n, m, v in
               zip(feature_names, boot.scaler_mean, boot.scaler_var)}
    if profiles is None:
        # Without profiles the centres themselves (in feature units) describe the clusters.
        profiles = [{n: scaling[n][0] + float(z) * scaling[n][1] for n, z in zip(feature_names, row)}
                    for row in boot.centres_standardized]
    if population is None:
        population = {n: scaling.get(n, (0.0, 1.0)) for n in FEATURES}
    sizes = [int((boot.labels == c).sum()) for c in range(k)]
    ids = segmenter.set_model([list(map(float, row)) for row in boot.centres_standardized], scaling,
                              profiles, population, sizes)
    return segmenter, ids


def cluster_profiles(full_matrix, labels, k: int, profile_names: Sequence[str]) -> list[dict[str, float]]:
    """Per cluster, the mean of every column of ``full_matrix`` (in ``profile_names`` order) over its rows."""
    import numpy as np

    x = np.asarray(full_matrix, dtype=float)
    labels = np.asarray(labels)
    out = []
    for c in range(k):
        members = x[labels == c]
        means = members.mean(axis=0) if len(members) else x.mean(axis=0)
        out.append({name: float(v) for name, v in zip(profile_names, means)})
    return out


# --------------------------------------------------------------------------- propensity bootstrap


def read_snapshot_history(dsn: str, schema: str, as_of_ms: Optional[int], batch: int = 5000):
    """Every profile snapshot of the warehouse in event-time order (``version`` = as_of * 1000 + n).

    A server-side cursor streams them, so the history need not fit in memory.
    """
    from psycopg import sql

    query = sql.SQL("SELECT snapshot FROM {}").format(sql.Identifier(schema, "profile_snapshots"))
    params: list = []
    if as_of_ms is not None:
        query = sql.SQL("{} WHERE version < %s").format(query)
        params.append((as_of_ms + 1) * 1000)
    query = sql.SQL("{} ORDER BY version, user_key").format(query)
    with warehouse_connect(dsn, application_name="onboardflow-train") as conn:
        with conn.cursor(name="onboardflow_train_history") as cur:
            cur.itersize = batch
            cur.execute(query, params)
            for (snapshot,) in cur:
                yield snapshot


@dataclass
class PropensityBootstrap:
    """What replaying the warehouse history taught a fresh propensity model."""

    model: Any  # PropensityModel
    snapshots: int
    skipped: int
    labelled: int
    positives: int
    roc_auc: Optional[float]
    log_loss: Optional[float]


def bootstrap_propensity(snapshots: Iterable[Mapping[str, Any]], timeout_days: float = 3.0) -> PropensityBootstrap:
    """Replay profile snapshots, in event-time order, through a fresh ``PropensityModel``.

    The same point-in-time labelling as the online learner: a snapshot that
    shows the tutorial completed labels the user's earlier stored points 1;
    every other snapshot is a prediction (stored at the model's checkpoints);
    points whose horizon ended before the current snapshot's time are
    labelled 0. Offline every earlier event is already known, so the stream's
    newest time stands in for the watermark. Horizons still open at the end
    of the history stay unlabelled (censored). Sequential by nature (the order
    is the point), so it runs in the launcher over a streamed cursor, not in
    Beam. ROC-AUC / log loss are prequential: the probability given when each
    point was stored, against its later label.
    """
    from ..models.features import feature_vector
    from ..models.propensity import PropensityModel, log_loss
    from ..transforms.online_models import completed_onboarding

    model = PropensityModel(timeout_days=timeout_days)
    outcomes, count, skipped = [], 0, 0
    for profile in snapshots:
        if not isinstance(profile, Mapping):  # dead-lettered by the feature stage too
            skipped += 1
            continue
        at = profile.get("as_of")  # the event time every snapshot carries (schemas/contract.py)
        user_key = profile.get("user_key")
        if not isinstance(at, int) or isinstance(at, bool) or not isinstance(user_key, str):
            skipped += 1
            continue
        count += 1
        outcomes += model.expire(at)
        if completed_onboarding(profile):
            outcomes += model.label(user_key, 1, at)
        else:
            model.predict(user_key, feature_vector(profile), at)
    labels = [o.label for o in outcomes]
    auc = None
    if 0 < sum(labels) < len(labels):
        from sklearn.metrics import roc_auc_score

        auc = round(float(roc_auc_score(labels, [o.probability for o in outcomes])), 6)
    loss = round(sum(log_loss(o.label, o.probability) for o in outcomes) / len(outcomes), 6) if outcomes else None
    return PropensityBootstrap(model, count, skipped, len(outcomes), sum(labels), auc, loss)


def count_users(dsn: str, schema: str, as_of_ms: Optional[int]) -> int:
    from psycopg import sql

    query = sql.SQL("SELECT count(DISTINCT user_key) FROM {}").format(sql.Identifier(schema, "profile_snapshots"))
    params: list = []
    if as_of_ms is not None:
        query = sql.SQL("{} WHERE version < %s").format(query)
        params.append((as_of_ms + 1) * 1000)
    with warehouse_connect(dsn, autocommit=True, application_name="onboardflow-train") as conn:
        return conn.execute(query, params).fetchone()[0]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def extract_features(options, dsn: str, schema: str, read_shards: int, as_of_ms: Optional[int],
                     out: Path) -> tuple[list[dict], list[dict]]:
    """Run the Beam part on ``options``: (feature rows sorted by user, dead letters), also in ``out``.

    Writes ``features.jsonl`` and ``dead_letters.jsonl`` to ``out`` (earlier
    ones removed first) and reads them back: the same warehouse gives the same
    matrix, the same fit, the same bytes.
    """
    from ..models.features import FEATURES

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("features.jsonl", "dead_letters.jsonl"):
        (out / stale).unlink(missing_ok=True)
    with beam.Pipeline(options=options) as p:
        records = p | "ReadLatestProfiles" >> ReadLatestProfiles(dsn, schema, read_shards, as_of_ms)
        vectors = records | "BuildFeatureVectors" >> BuildFeatureVectors(FEATURES)
        _ = (vectors.rows
             | "RowsAsJson" >> beam.Map(lambda r: json.dumps(r, separators=(",", ":")))
             | "WriteFeatureMatrix" >> beam.io.WriteToText(str(out / "features"), file_name_suffix=".jsonl",
                                                           num_shards=1, shard_name_template=""))
        _ = (vectors[BuildFeatureVectors.DEAD_LETTER]
             | "DeadLettersAsJson" >> beam.Map(lambda d: json.dumps(d, separators=(",", ":")))
             | "WriteDeadLetters" >> beam.io.WriteToText(str(out / "dead_letters"), file_name_suffix=".jsonl",
                                                         num_shards=1, shard_name_template=""))
    rows = sorted(read_jsonl(out / "features.jsonl"), key=lambda r: r["user_key"] or "")
    return rows, read_jsonl(out / "dead_letters.jsonl")
