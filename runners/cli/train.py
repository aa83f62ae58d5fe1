"""`onboardflow train`: bootstrap the online segmenter from the warehouse history.

The online segmenter (``models/segmentation.py``) learns as users arrive, but
a fresh deployment would start from nothing and guess its number of clusters.
This batch job starts it from what the warehouse already knows:

1. **Beam, batch** (the I/O-bound part, parallel, on Prism locally or any
   runner): ``ReadLatestProfiles`` reads the newest ``profile_snapshots`` row
   per user (optionally as of an event time), split into ``--read-shards``
   hash ranges of ``user_key`` read in parallel through server-side cursors;
   ``BuildFeatureVectors`` turns each into ``models.features.feature_vector``
   and dead-letters what it cannot use. The feature matrix is written as JSON
   lines to ``--out`` (with the dead letters, reasons only), so every run can
   be reproduced from its own output.
2. **scikit-learn, in the launcher** (needs every row at once, and a matrix of
   a few hundred thousand users by 17 features fits in memory):
   ``StandardScaler``, ``PCA`` to 90 % of the variance (``--pca``; ``none``
   turns it off), then ``MiniBatchKMeans`` for each k in
   ``--k-min``..``--k-max``, each scored by silhouette (higher is better, on a
   seeded sample of at most ``--silhouette-sample`` rows: it is quadratic) and
   Davies-Bouldin (lower is better).
3. **Choosing k** (``choose_k``): the best silhouette wins; among the k whose
   silhouette is within ``--tolerance`` (0.02) of the best, the one with the
   lowest Davies-Bouldin; a remaining tie goes to the smaller k. Silhouette
   leads because it is bounded and comparable across k; Davies-Bouldin breaks
   near-ties because it penalizes clusters that overlap, which is what makes
   onboarding tracks ambiguous.
4. The chosen centres seed a ``Segmenter`` (in its documented space:
   standardized features, with the scaler's mean and variance handed over;
   with PCA the centres are mapped back from PCA space first), and the
   snapshot is published to the model registry as a ``segmentation`` version
   with its counts and metrics (``--no-publish`` skips it). Training is
   seeded and rows are sorted, so re-running on the same warehouse publishes
   the same bytes, and the registry returns the existing version.

Report: a table per k and the chosen clusters (label, size) on the console
and in ``OUT/train-report.txt``, the same as JSON in ``train-report.json``,
and ``k-selection.png`` (silhouette and Davies-Bouldin against k).

Run it locally (services from ``make services-up``, a warehouse filled by the
pipeline)::

    onboardflow train --out .run/train
    onboardflow train --k-min 3 --k-max 8 --pca none --out .run/train --no-publish

or on another runner, passing Beam options through (``--out`` must then be
storage both the workers and the launcher see: the launcher reads the
feature matrix back from it)::

    onboardflow train --runner FlinkRunner --flink_master=localhost:8081 --environment_type=LOOPBACK

Exit status: 0 trained (and published); 2 bad arguments or an unreachable
service; 3 too few usable profiles (fewer than ``--min-users``, or not more
than ``--k-max``).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

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
EXIT_TOO_FEW = 3


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
        import psycopg

        self._conn = psycopg.connect(self._dsn, application_name="onboardflow-train")

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
    from ...models.features import feature_vector

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

    from ...models.features import FEATURES
    from ...models.segmentation import Segmenter

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


# --------------------------------------------------------------------------- the report


def format_report(boot: Bootstrap, clusters: list[dict], agreement: float, counts: Mapping[str, int],
                  tolerance: float) -> str:
    lines = [
        f"onboardflow train: {boot.n_rows} users, features standardized"
        + (f", PCA to {boot.pca_components} components ({boot.explained_variance:.1%} of variance)"
           if boot.pca_components else ""),
        "",
        f"{'k':>3}  {'silhouette':>10}  {'davies_bouldin':>14}  {'inertia':>12}  {'smallest':>8}",
    ]
    for s in boot.scores:
        mark = "  <- chosen" if s.k == boot.chosen.k else ""
        lines.append(f"{s.k:>3}  {s.silhouette:>10.4f}  {s.davies_bouldin:>14.4f}  {s.inertia:>12.1f}  "
                     f"{s.smallest_share:>8.1%}{mark}")
    lines += [
        "",
        f"rule: best silhouette; within {tolerance} of it, lowest Davies-Bouldin; "
        f"then smaller k -> k = {boot.chosen.k}",
        "",
        f"{'cluster':>7}  {'label':<20} {'users':>7} {'share':>7}",
    ]
    for c in clusters:
        lines.append(f"{c['cluster_id']:>7}  {c['label']:<20} {c['users']:>7} {c['share']:>7.1%}")
    lines += [
        "",
        f"seeded online segmenter agrees with the offline clustering on {agreement:.1%} of users",
        "counts: " + ", ".join(f"{k}={v}" for k, v in counts.items()),
    ]
    return "\n".join(lines)


def plot_k_selection(scores: Sequence[KScore], chosen_k: int, path: Path) -> None:
    """k against silhouette (left axis) and Davies-Bouldin (right axis), chosen k marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    ks = [s.k for s in scores]
    fig, left = plt.subplots(figsize=(7, 4), dpi=110)
    left.plot(ks, [s.silhouette for s in scores], "o-", color="tab:blue", label="silhouette (higher is better)")
    left.set_xlabel("k (clusters)")
    left.set_ylabel("silhouette", color="tab:blue")
    left.set_xticks(ks)
    right = left.twinx()
    right.plot(ks, [s.davies_bouldin for s in scores], "s--", color="tab:red",
               label="Davies-Bouldin (lower is better)")
    right.set_ylabel("Davies-Bouldin", color="tab:red")
    left.axvline(chosen_k, color="grey", linestyle=":", label=f"chosen k = {chosen_k}")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    left.set_title("onboardflow train: choosing the number of segments")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def _default_redis_url() -> str:
    return f"redis://{os.environ.get('REDIS_HOST', '127.0.0.1')}:{os.environ.get('REDIS_PORT', '6379')}/0"


def _pca(value: str) -> Optional[float]:
    if value.lower() in ("none", "off", "0"):
        return None
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError("--pca is a component count, a variance share or 'none'") from None
    if not (0 < number < 1 or (number >= 1 and number == int(number))):
        raise argparse.ArgumentTypeError("--pca is a component count (>= 1) or a variance share in (0, 1)")
    return number


def _as_of(value: str) -> int:
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("--as-of is an ISO-8601 time, e.g. 2026-02-01T00:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onboardflow train",
        description="Bootstrap the online segmenter from the warehouse: choose k, seed, publish. "
                    "Unknown flags are passed to Beam's PipelineOptions.")
    parser.add_argument("--warehouse-dsn", default=None, help="PostgreSQL DSN (default: from PG_* variables)")
    parser.add_argument("--schema", default="warehouse", help="warehouse schema (default: %(default)s)")
    parser.add_argument("--redis-url", default=_default_redis_url(), help="Redis of the model registry")
    parser.add_argument("--key-prefix", default="obf", help="Redis key prefix (default: %(default)s)")
    parser.add_argument("--k-min", type=int, default=DEFAULT_K_MIN, help="smallest k tried (default: %(default)s)")
    parser.add_argument("--k-max", type=int, default=DEFAULT_K_MAX, help="largest k tried (default: %(default)s)")
    parser.add_argument("--pca", type=_pca, default=DEFAULT_PCA,
                        help="reduce with PCA before clustering: components (e.g. 5), variance share "
                             "(default: %(default)s) or 'none'")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="silhouette within this of the best counts as a tie (default: %(default)s)")
    parser.add_argument("--silhouette-sample", type=int, default=DEFAULT_SILHOUETTE_SAMPLE,
                        help="rows sampled for the silhouette (default: %(default)s)")
    parser.add_argument("--min-users", type=int, default=DEFAULT_MIN_USERS,
                        help="refuse to train on fewer usable profiles (default: %(default)s)")
    parser.add_argument("--as-of", type=_as_of, default=None,
                        help="train on the profiles as of this event time (ISO-8601; default: the latest)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default: %(default)s)")
    parser.add_argument("--read-shards", type=int, default=4, help="parallel warehouse reads (default: %(default)s)")
    parser.add_argument("--out", default=".run/train", help="report directory (default: %(default)s)")
    parser.add_argument("--no-publish", action="store_true", help="report only; do not register the model")
    parser.add_argument("--no-propensity", action="store_true",
                        help="do not bootstrap the propensity model from the snapshot history")
    parser.add_argument("--timeout-days", type=float, default=3.0,
                        help="propensity horizon: completes onboarding within N days (default: %(default)s)")
    parser.add_argument("--runner", default="prism",
                        help="'prism' (local, default) or a Beam runner name; other flags go to Beam")
    parser.add_argument("--prism-path", default=None, help=argparse.SUPPRESS)
    return parser


def _pipeline_options(args, beam_args: list[str]):
    from apache_beam.options.pipeline_options import PipelineOptions

    from ..local import local_pipeline_options

    if args.runner.lower() in ("prism", "prismrunner"):
        if beam_args:
            raise SystemExit(f"onboardflow train: unknown arguments for the local runner: {' '.join(beam_args)}")
        return local_pipeline_options(False, prism_path=args.prism_path, job_name="onboardflow-train")
    return PipelineOptions([f"--runner={args.runner}", *beam_args])


# --------------------------------------------------------------------------- propensity bootstrap


def read_snapshot_history(dsn: str, schema: str, as_of_ms: Optional[int], batch: int = 5000):
    """Every profile snapshot of the warehouse in event-time order (``version`` = as_of * 1000 + n).

    A server-side cursor streams them, so the history need not fit in memory.
    """
    import psycopg
    from psycopg import sql

    query = sql.SQL("SELECT snapshot FROM {}").format(sql.Identifier(schema, "profile_snapshots"))
    params: list = []
    if as_of_ms is not None:
        query = sql.SQL("{} WHERE version < %s").format(query)
        params.append((as_of_ms + 1) * 1000)
    query = sql.SQL("{} ORDER BY version, user_key").format(query)
    with psycopg.connect(dsn, application_name="onboardflow-train") as conn:
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
    from ...models.features import feature_vector
    from ...models.propensity import PropensityModel, log_loss
    from ...transforms.online_models import _event_time_ms, completed_onboarding

    model = PropensityModel(timeout_days=timeout_days)
    outcomes, count, skipped = [], 0, 0
    for profile in snapshots:
        if not isinstance(profile, Mapping):  # dead-lettered by the feature stage too
            skipped += 1
            continue
        at = _event_time_ms(profile)
        user_key = profile.get("user_key")
        if at is None or not isinstance(user_key, str):
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


def _count_users(dsn: str, schema: str, as_of_ms: Optional[int]) -> int:
    import psycopg
    from psycopg import sql

    query = sql.SQL("SELECT count(DISTINCT user_key) FROM {}").format(sql.Identifier(schema, "profile_snapshots"))
    params: list = []
    if as_of_ms is not None:
        query = sql.SQL("{} WHERE version < %s").format(query)
        params.append((as_of_ms + 1) * 1000)
    with psycopg.connect(dsn, autocommit=True, application_name="onboardflow-train") as conn:
        return conn.execute(query, params).fetchone()[0]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def run(argv: Optional[list[str]] = None) -> dict:
    """Train (and publish); returns the report as a dict. Raises TooFewProfiles, RegistryError, psycopg errors."""
    args, beam_args = _parser().parse_known_args(argv)
    if not 2 <= args.k_min <= args.k_max:
        raise ValueError("need 2 <= --k-min <= --k-max")
    if args.read_shards < 1 or args.silhouette_sample < 2 or args.min_users < 1:
        raise ValueError("--read-shards, --min-users must be >= 1 and --silhouette-sample >= 2")
    from ...models.features import FEATURES, SEGMENT_FEATURES
    from .warehouse import default_dsn

    dsn = args.warehouse_dsn or default_dsn()
    needed = max(args.min_users, args.k_max + 1)
    available = _count_users(dsn, args.schema, args.as_of)
    if available < needed:
        raise TooFewProfiles(
            f"the warehouse has {available} users with profile snapshots"
            f"{' as of the --as-of time' if args.as_of is not None else ''}; training needs at least {needed} "
            f"(--min-users {args.min_users}, and more than --k-max {args.k_max}). "
            "Run the pipeline on more events first, or lower --min-users / --k-max.")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("features.jsonl", "dead_letters.jsonl"):
        (out / stale).unlink(missing_ok=True)
    started = time.monotonic()
    options = _pipeline_options(args, beam_args)
    with beam.Pipeline(options=options) as p:
        records = p | "ReadLatestProfiles" >> ReadLatestProfiles(dsn, args.schema, args.read_shards, args.as_of)
        vectors = records | "BuildFeatureVectors" >> BuildFeatureVectors(FEATURES)
        _ = (vectors.rows
             | "RowsAsJson" >> beam.Map(lambda r: json.dumps(r, separators=(",", ":")))
             | "WriteFeatureMatrix" >> beam.io.WriteToText(str(out / "features"), file_name_suffix=".jsonl",
                                                           num_shards=1, shard_name_template=""))
        _ = (vectors[BuildFeatureVectors.DEAD_LETTER]
             | "DeadLettersAsJson" >> beam.Map(lambda d: json.dumps(d, separators=(",", ":")))
             | "WriteDeadLetters" >> beam.io.WriteToText(str(out / "dead_letters"), file_name_suffix=".jsonl",
                                                         num_shards=1, shard_name_template=""))
    beam_seconds = time.monotonic() - started

    # Sorted by user: the same warehouse gives the same matrix, the same fit, the same bytes.
    rows = sorted(_read_jsonl(out / "features.jsonl"), key=lambda r: r["user_key"] or "")
    dead_letters = _read_jsonl(out / "dead_letters.jsonl")
    if len(rows) < needed:
        raise TooFewProfiles(
            f"only {len(rows)} of {available} profiles gave usable feature vectors "
            f"({len(dead_letters)} dead letters in {out / 'dead_letters.jsonl'}); training needs at least {needed}.")

    import numpy as np

    # The feature matrix holds the whole vector; the clustering uses the
    # behaviour features the online segmenter uses, the profiles (labels) all.
    full = np.array([r["x"] for r in rows], dtype=float)
    matrix = full[:, [FEATURES.index(name) for name in SEGMENT_FEATURES]]
    boot = fit_bootstrap(matrix, range(args.k_min, args.k_max + 1), args.pca, args.seed,
                         args.silhouette_sample, args.tolerance)
    population = {n: (float(m), float(s)) for n, m, s in zip(FEATURES, full.mean(axis=0), full.std(axis=0))}
    segmenter, ids = seed_segmenter(boot, SEGMENT_FEATURES, args.seed,
                                    profiles=cluster_profiles(full, boot.labels, boot.chosen.k, FEATURES),
                                    population=population)
    online = np.array([segmenter.predict_one(dict(zip(FEATURES, r))) for r in full.tolist()])
    agreement = float((online == np.array(ids)[boot.labels]).mean())
    sizes = np.bincount(boot.labels, minlength=boot.chosen.k)
    clusters = [{"cluster_id": ids[i], "label": segmenter.label(ids[i]), "users": int(sizes[i]),
                 "share": round(float(sizes[i]) / boot.n_rows, 6)} for i in range(boot.chosen.k)]
    counts = {"users": boot.n_rows, "users_in_warehouse": available, "dead_letters": len(dead_letters)}
    metrics = {
        "k": boot.chosen.k, "silhouette": boot.chosen.silhouette, "davies_bouldin": boot.chosen.davies_bouldin,
        "online_agreement": round(agreement, 6), "pca_components": boot.pca_components,
        "explained_variance": boot.explained_variance, "tolerance": args.tolerance,
        "k_scores": [asdict(s) for s in boot.scores], "clusters": clusters, "seed": args.seed,
        "features": list(SEGMENT_FEATURES),
    }
    if args.as_of is not None:
        metrics["as_of_ms"] = args.as_of
    report = {"counts": counts, "metrics": metrics, "beam_seconds": round(beam_seconds, 3), "published": None}

    prop = None
    if not args.no_propensity:
        # closing(): an error mid-replay must not leave the server-side cursor's transaction open.
        with contextlib.closing(read_snapshot_history(dsn, args.schema, args.as_of)) as history:
            prop = bootstrap_propensity(history, args.timeout_days)
        report["propensity"] = {
            "snapshots": prop.snapshots, "skipped": prop.skipped, "labelled": prop.labelled,
            "positives": prop.positives, "roc_auc": prop.roc_auc, "log_loss": prop.log_loss,
            "warm": prop.model.warm, "timeout_days": args.timeout_days, "published": None,
        }

    if not args.no_publish:
        from ...models.model_registry import ModelRegistry

        with ModelRegistry(args.redis_url, dsn, args.schema, args.key_prefix) as registry:
            result = registry.publish("segmentation", segmenter.to_bytes(), counts=counts, metrics=metrics,
                                      source="train", reason=f"onboardflow train: k={boot.chosen.k}")
            if prop is not None and prop.model.warm:
                pub = registry.publish(
                    "propensity", prop.model.to_bytes(include_pending=False),
                    counts={"snapshots": prop.snapshots, "labels": prop.labelled, "positives": prop.positives},
                    metrics={"roc_auc": prop.roc_auc, "log_loss": prop.log_loss, "timeout_days": args.timeout_days},
                    source="train", reason="onboardflow train: replay of the snapshot history")
                report["propensity"]["published"] = {"version": pub.version.id, "created": pub.created,
                                                     "serving": pub.serving}
        report["published"] = {"version": result.version.id, "created": result.created, "serving": result.serving}

    text = format_report(boot, clusters, agreement, counts, args.tolerance)
    if report["published"]:
        p = report["published"]
        text += (f"\npublished {p['version']}" + ("" if p["created"] else " (already registered: same model)")
                 + ("" if p["serving"] else "; NOT serving: the segmentation pointer is pinned by a rollback"))
    if prop is not None:
        text += (f"\npropensity (completes onboarding within {args.timeout_days:g} days), replayed from "
                 f"{prop.snapshots:,} snapshots: {prop.labelled:,} labelled points ({prop.positives:,} positive), "
                 f"prequential ROC-AUC {prop.roc_auc if prop.roc_auc is not None else 'n/a'}, "
                 f"log loss {prop.log_loss if prop.log_loss is not None else 'n/a'}; ")
        published = report["propensity"]["published"]
        if published:
            text += f"published {published['version']}" + ("" if published["created"] else " (already registered)")
        elif not prop.model.warm:
            text += (f"not published: needs {prop.model.min_per_class} labelled points of each class "
                     f"(has {prop.positives:,} positive, {prop.labelled - prop.positives:,} negative)")
        else:
            text += "not published (--no-publish)"
    (out / "train-report.txt").write_text(text + "\n", encoding="utf-8")
    (out / "train-report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    plot_k_selection(boot.scores, boot.chosen.k, out / "k-selection.png")
    print(text)
    print(f"report: {out / 'train-report.txt'}, {out / 'train-report.json'}, plot: {out / 'k-selection.png'}")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    import psycopg

    from ...models.model_registry import RegistryError

    try:
        run(argv)
    except TooFewProfiles as exc:
        print(f"onboardflow train: not enough data: {exc}", file=sys.stderr)
        return EXIT_TOO_FEW
    except (ValueError, RegistryError, FileNotFoundError) as exc:
        print(f"onboardflow train: {exc}", file=sys.stderr)
        return 2
    except psycopg.errors.UndefinedTable:
        print("onboardflow train: warehouse tables are missing: run `onboardflow warehouse migrate` "
              "(and the pipeline, to fill profile_snapshots)", file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        print(f"onboardflow train: cannot reach PostgreSQL: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
