"""Online segmentation: users clustered as their profiles evolve, with readable labels.

``OnlineSegmenter`` is a River pipeline, ``FadingStandardScaler | KMeans``,
over the behaviour features of ``models/features.py`` (``SEGMENT_FEATURES``:
how a user works -- rates, shares, depth -- not how much or for how long,
which would split a stream of users of every age by age). Every profile
update is one observation: the scaler's mean and variance move (weighing
about the last ``1 / scaler_fading`` updates: the population ages, and the
scaling follows it), then the closest centre moves ``halflife`` of the way
towards the scaled point. The
user's ``cluster_id`` is the closest centre. Its ``segment_label`` ("power
adopter", "explorer", "stalled", ...) is read off the cluster's *profile*: a
running mean, over the points the cluster won, of the whole feature vector
(``FEATURES``, including recency and tenure, which the distance does not
use), so a label follows its cluster when the centres move.

Why KMeans, with these settings (evidence in docs/models.md, measured by
tests/benchmarks/bench_models.py and ``onboardflow evaluate --clusterer``
on the generator's stream): its adjusted Rand index against the five
ground-truth personas was the best or close to it, with stable cluster ids.
DenStream scored comparably but predicts 150x slower (it re-clusters on every
``predict_one``) and renumbers its clusters each time; DBSTREAM fragmented the
personas; STREAMKMeans lost a third of the ARI. A small ``halflife`` (0.02)
makes each centre average over about fifty recent points: stable, yet able
to follow a population that ages.

Initialization: River's KMeans starts from random Gaussian centres, some of
which never win a point. Instead the segmenter buffers its first ``warmup``
observations (only the scaler learns from them) and runs batch k-means over
them (``init_restarts`` k-means++ seedings refined by Lloyd's iterations, the
one of least inertia kept). Until then ``predict_one`` returns
``UNASSIGNED`` (-1) and ``ready`` is False: the pipeline writes no
``cluster_id`` for those updates. ``seed_centers`` skips the warm-up with
centres found offline (``onboardflow train``, scikit-learn's MiniBatchKMeans).

The space of seeded centres: a centre is a dict feature name -> value in the
*standardized* space, z = (x - mean) / sqrt(var), where x is the value
``feature_vector`` gives and mean/var are per-feature statistics of the data
the centres were fitted on. Pass those statistics as ``scaler`` (scikit-learn's
``StandardScaler.mean_``, ``.var_`` and ``.n_samples_seen_``): they replace the
segmenter's running scaler, so the centres and the scaling that defines them
stay consistent, and the scaler keeps learning from there. Without ``scaler``
the centres are read in the segmenter's current running scaling (which must
then have seen data).

Snapshots (``to_bytes``/``from_bytes``) hold the scaler, the centres, the
cluster profiles and the counters, no per-user data.

>>> from onboardflow.models.segmentation import OnlineSegmenter
>>> seg = OnlineSegmenter(n_clusters=2, warmup=4, feature_names=("a", "b"))
>>> for x in ({"a": 0.0, "b": 0.0}, {"a": 10.0, "b": 10.0}, {"a": 0.2, "b": 0.1}, {"a": 9.8, "b": 10.1}):
...     seg.learn_one(x)
>>> seg.ready
True
>>> seg.predict_one({"a": 0.1, "b": 0.0}) != seg.predict_one({"a": 10.0, "b": 9.9})
True
"""
from __future__ import annotations

import collections
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
from river import cluster, compose, preprocessing, utils

from onboardflow.models import snapshot
from onboardflow.models.features import FEATURES, SEGMENT_FEATURES

UNASSIGNED = -1
CLUSTERERS = ("kmeans", "streamkmeans", "dbstream", "denstream")
SNAPSHOT_KIND = "segmenter"

ScalerState = Mapping[str, Union[Mapping[str, float], Sequence[float], float, int]]


class FadingStandardScaler(preprocessing.StandardScaler):
    """River's ``StandardScaler`` whose statistics forget old observations at rate ``fading``.

    In: feature dicts (``learn_one``); out: the same features standardized,
    z = (x - mean) / std (``transform_one``, River's own). Observation n of a
    feature moves its mean and (population) variance with weight
    ``max(1 / n, fading)``: exactly River's running mean and variance for the
    first ``1 / fading`` observations, then exponentially weighted ones whose
    memory is about the last ``1 / fading`` observations. ``fading=0`` never
    forgets (River's ``StandardScaler``).

    Why forget: the segmenter learns from profile updates of a population
    that ages through onboarding, so its features drift (recency and breadth
    grow, session rates fall); a scaler that remembers every update since
    launch scales today's users with the statistics of the first days' young
    ones. The state is River's (``counts``, ``means``, ``vars``), so
    ``centres()`` and ``_from_state`` read and seed it unchanged.

    >>> scaler = FadingStandardScaler(fading=0.5)
    >>> for value in (0.0, 2.0, 10.0):
    ...     scaler.learn_one({"x": value})
    >>> scaler.means["x"], scaler.vars["x"]
    (5.5, 20.75)
    """

    def __init__(self, fading: float = 0.0, with_std: bool = True):
        if isinstance(fading, bool) or not isinstance(fading, (int, float)) or not 0.0 <= fading < 1.0:
            raise ValueError(f"fading must be a number in [0, 1), got {fading!r}")
        super().__init__(with_std=with_std)
        self.fading = float(fading)

    def learn_one(self, x):
        counts, means, variances, fading = self.counts, self.means, self.vars, self.fading
        for name, value in x.items():
            counts[name] += 1
            rate = max(1.0 / counts[name], fading)
            delta = value - means[name]
            means[name] += rate * delta
            if self.with_std:
                # West's weighted update; with rate 1/n it is Welford's population variance.
                variances[name] = (1.0 - rate) * (variances[name] + rate * delta * delta)

    def learn_many(self, X):
        """Row by row, in order: River's batched merge would weigh the rows as if nothing faded."""
        for row in utils.dataframe.into_frame(X).iter_rows(named=True):
            self.learn_one(row)


def make_clusterer(name: str, n_clusters: int = 5, halflife: float = 0.02, seed: int = 42):
    """A River clusterer by name, with the settings compared in docs/models.md."""
    if name == "kmeans":
        return cluster.KMeans(n_clusters=n_clusters, halflife=halflife, sigma=1.0, seed=seed)
    if name == "streamkmeans":
        return cluster.STREAMKMeans(chunk_size=100, n_clusters=n_clusters, halflife=halflife, sigma=1.0, seed=seed)
    if name == "dbstream":
        return cluster.DBSTREAM(clustering_threshold=1.5, fading_factor=0.01, cleanup_interval=4,
                                intersection_factor=0.5, minimum_weight=1.0)
    if name == "denstream":
        return cluster.DenStream(decaying_factor=0.01, beta=0.5, mu=2.5, epsilon=1.5,
                                 n_samples_init=500, stream_speed=100)
    raise ValueError(f"unknown clusterer {name!r}; known: {CLUSTERERS}")


def describe_centre(centre: Mapping[str, float]) -> str:
    """A human-readable label for a cluster centre given in ``feature_vector`` units.

    The rules read the features that separate the onboarding behaviours, most
    decisive first: a long silence trumps everything, heavy support use comes
    next, then how far and how deep into the product the user has gone. Age
    is not a label: clusters group behaviours (a cluster of mostly new users
    is still explorers or stalled users; the "new user" rule segments say
    who is new). A
    rule whose feature the centre lacks does not apply (a centre of a
    segmenter clustering on fewer features, before its profile is known).
    """
    def has(name: str) -> bool:
        return centre.get(name) is not None

    def f(name: str) -> float:
        return float(centre.get(name) or 0.0)

    if has("recency_days") and f("recency_days") >= math.log1p(14.0):
        return "dormant"
    if f("support_share") >= 0.15:
        return "support seeker"
    if f("feature_use_share") >= 0.3 or (f("onboarding_progress") >= 0.85 and f("purchased") >= 0.4):
        return "power adopter"
    if f("browse_share") >= 0.6 and f("events_per_session") >= math.log1p(12.0):
        return "explorer"
    if (has("active_share_30d") and f("active_share_30d") < 0.3) or f("onboarding_progress") < 0.4:
        return "stalled"
    return "steady learner"


def _aligned(values: Union[Mapping[str, float], Sequence[float]], names: Sequence[str], what: str) -> dict[str, float]:
    if isinstance(values, Mapping):
        missing = set(names) - set(values)
        if missing:
            raise ValueError(f"{what} lacks features {sorted(missing)}")
        out = {n: float(values[n]) for n in names}
    else:
        values = list(values)
        if len(values) != len(names):
            raise ValueError(f"{what} has {len(values)} values for {len(names)} features")
        out = {n: float(v) for n, v in zip(names, values)}
    bad = [n for n, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} has non-finite values for {bad}")
    return out


def _kmeans_plus_plus(points: "np.ndarray", k: int, rng: "np.random.Generator") -> "np.ndarray":
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    centres = [points[rng.integers(len(points))]]
    d2 = ((points - centres[0]) ** 2).sum(axis=1)
    while len(centres) < k:
        total = d2.sum()
        # Fewer distinct points than clusters: duplicates are as good as any.
        pick = rng.integers(len(points)) if total <= 0 else rng.choice(len(points), p=d2 / total)
        centres.append(points[pick])
        d2 = np.minimum(d2, ((points - points[pick]) ** 2).sum(axis=1))
    return np.array(centres)


def _lloyd(points: "np.ndarray", centres: "np.ndarray", iterations: int = 50) -> tuple["np.ndarray", float]:
    """Lloyd's iterations from ``centres``; returns the centres and their inertia (sum of squared distances)."""
    centres = centres.copy()
    for _ in range(iterations):
        d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        nearest = d2.argmin(axis=1)
        moved = centres.copy()
        for c in range(len(centres)):
            members = points[nearest == c]
            if len(members):  # an empty cluster keeps its seed
                moved[c] = members.mean(axis=0)
        if np.allclose(moved, centres):
            break
        centres = moved
    d2 = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    return centres, float(d2.min(axis=1).sum())


class OnlineSegmenter:
    """Online clustering of user feature vectors (see the module docstring).

    Parameters
    ----------
    n_clusters
        Number of centres (k-means family only).
    clusterer
        One of ``CLUSTERERS``; "kmeans" is the default and the only one that
        supports ``seed_centers`` and warm-up seeding.
    halflife
        Fraction of the way a centre moves towards each point it wins.
    warmup
        Observations buffered before the initialization (batch k-means over them).
    init_restarts
        k-means++ seedings tried on the warm-up buffer, each refined by
        Lloyd's iterations; the one of least inertia is kept.
    seed
        Seed of the initialization (deterministic for a given stream).
    scaler_fading
        How fast the scaler forgets (``FadingStandardScaler``): 0.001 weighs
        about the last thousand updates. 0 scales with every update since the
        start.
    feature_names
        Features the distance uses, in order; others in the input are
        ignored, missing ones count 0.
    profile_names
        Features of the cluster profiles the labels are read from (running
        means over each cluster's points; not used for assignment).
    """

    def __init__(self, n_clusters: int = 5, clusterer: str = "kmeans", halflife: float = 0.02,
                 warmup: int = 500, seed: int = 42, feature_names: Sequence[str] = SEGMENT_FEATURES,
                 profile_names: Sequence[str] = FEATURES, init_restarts: int = 10,
                 scaler_fading: float = 0.001):
        if n_clusters < 1:
            raise ValueError("n_clusters must be >= 1")
        if warmup < n_clusters:
            raise ValueError("warmup must be at least n_clusters")
        self.n_clusters = n_clusters
        self.clusterer_name = clusterer
        self.halflife = halflife
        self.warmup = warmup
        self.init_restarts = init_restarts
        self.seed = seed
        self.feature_names = tuple(feature_names)
        self.profile_names = tuple(profile_names)
        # cluster id -> running mean of ``profile_names`` over the points it won, and their count
        self._profiles: dict[int, dict[str, float]] = {}
        self._profile_counts: dict[int, int] = {}
        self._buffer_full: list[dict[str, float]] = []
        self.scaler = FadingStandardScaler(scaler_fading)
        self.clusterer = make_clusterer(clusterer, n_clusters, halflife, seed)
        self._pipeline = compose.Pipeline(("scale", self.scaler), ("cluster", self.clusterer))
        self._kmeans_family = clusterer in ("kmeans", "streamkmeans")
        self._buffer: list[dict[str, float]] = []
        self.ready = not self._kmeans_family
        self.n_learned = 0
        self.seeded = False

    # -- learning and scoring ------------------------------------------------

    def _select(self, x: Mapping[str, float]) -> dict[str, float]:
        return {n: float(x.get(n, 0.0)) for n in self.feature_names}

    def learn_one(self, x: Mapping[str, float], cluster_id: Optional[int] = None) -> None:
        """Learn from one feature vector (``feature_vector`` output).

        ``cluster_id``: what ``predict_one(x)`` just answered, if the caller
        asked (saves a second search for the cluster profile's update).
        """
        full = x
        x = self._select(x)
        self.n_learned += 1
        if not self.ready:
            self.scaler.learn_one(x)
            self._buffer.append(x)
            if self._kmeans_family:
                self._buffer_full.append({n: float(full.get(n, 0.0)) for n in self.profile_names})
            if len(self._buffer) >= self.warmup:
                self._initialize_from_buffer()
            return
        if not self._kmeans_family:
            self._pipeline.learn_one(x)
            return
        if cluster_id is None or cluster_id == UNASSIGNED:
            cluster_id = self.predict_one(full)
        self._pipeline.learn_one(x)
        self._learn_profile(cluster_id, full)

    def _learn_profile(self, cluster_id: int, x: Mapping[str, float]) -> None:
        # A running mean that becomes an exponential one (weight ``halflife``)
        # once the cluster has won 1/halflife points: it follows the centre.
        if cluster_id == UNASSIGNED:
            return
        n = self._profile_counts.get(cluster_id, 0) + 1
        self._profile_counts[cluster_id] = n
        rate = max(1.0 / n, self.halflife)
        profile = self._profiles.setdefault(cluster_id, {})
        for name in self.profile_names:
            value = float(x.get(name, 0.0))
            old = profile.get(name, value)
            profile[name] = old + rate * (value - old)

    def predict_one(self, x: Mapping[str, float]) -> int:
        """The id of the closest cluster, or ``UNASSIGNED`` (-1) before the segmenter is ready."""
        if not self.ready:
            return UNASSIGNED
        if getattr(self.clusterer, "initialized", True) is False:
            # DenStream before its n_samples_init points: it would answer 0 for everyone.
            return UNASSIGNED
        return int(self._pipeline.predict_one(self._select(x)))

    def _initialize_from_buffer(self) -> None:
        # Batch k-means over the warm-up buffer, in the scaling as it is now:
        # ``init_restarts`` k-means++ seedings, each refined by Lloyd
        # iterations, the one of least inertia kept (scikit-learn's n_init).
        names = self.feature_names
        points = np.array([[self.scaler.transform_one(x).get(n, 0.0) for n in names] for x in self._buffer],
                          dtype=float)
        rng = np.random.default_rng(self.seed)
        best, best_inertia = None, math.inf
        for _ in range(max(1, self.init_restarts)):
            centres, inertia = _lloyd(points, _kmeans_plus_plus(points, self.n_clusters, rng))
            if inertia < best_inertia:
                best, best_inertia = centres, inertia
        self._set_centres([{n: float(v) for n, v in zip(names, row)} for row in best])
        self._buffer = []
        self.ready = True
        for full in self._buffer_full:
            self._learn_profile(self.predict_one(full), full)
        self._buffer_full = []

    @staticmethod
    def _sq_dist(a: Mapping[str, float], b: Mapping[str, float]) -> float:
        return sum((a[k] - b.get(k, 0.0)) ** 2 for k in a)

    def _kmeans(self):
        return self.clusterer._kmeans if self.clusterer_name == "streamkmeans" else self.clusterer

    def _set_centres(self, centres: Sequence[Mapping[str, float]]) -> None:
        km = self._kmeans()
        km.centers = {i: collections.defaultdict(float, c) for i, c in enumerate(centres)}
        if self.clusterer_name == "streamkmeans":
            self.clusterer.centers = km.centers

    # -- seeding from the offline bootstrap ----------------------------------

    def seed_centers(self, centers: Sequence[Mapping[str, float]], feature_names: Sequence[str],
                     scaler: Optional[ScalerState] = None,
                     profiles: Optional[Sequence[Mapping[str, float]]] = None) -> None:
        """Replace the clustering with ``centers`` found offline (standardized space, see the module docstring).

        ``scaler``: ``{"mean": ..., "var": ..., "count": n}`` with mean and var
        as mappings by feature name or sequences in ``feature_names`` order.
        ``profiles``: per centre, the mean of ``profile_names`` over its
        members (``feature_vector`` units), for the labels; without them the
        labels come from the centres until the clusters have won points.
        The number of clusters becomes ``len(centers)``.
        """
        if self.clusterer_name != "kmeans":
            raise ValueError("seed_centers needs the kmeans clusterer")
        names = tuple(feature_names)
        if sorted(names) != sorted(self.feature_names) or len(set(names)) != len(names):
            raise ValueError(f"feature_names must be the segmenter's features {self.feature_names}")
        if not centers:
            raise ValueError("need at least one centre")
        centres = [_aligned(c, names, f"centre {i}") for i, c in enumerate(centers)]
        if scaler is not None:
            count = scaler.get("count")
            if isinstance(count, bool) or not isinstance(count, (int, float)) or count < 1:
                raise ValueError("scaler['count'] must be the number of samples the scaler saw (>= 1)")
            means = _aligned(scaler["mean"], names, "scaler mean")
            variances = _aligned(scaler["var"], names, "scaler var")
            if any(v < 0 for v in variances.values()):
                raise ValueError("scaler variances must be >= 0")
            fading = getattr(self.scaler, "fading", 0.0)
            self.scaler = FadingStandardScaler._from_state(
                counts={n: int(count) for n in names}, means=means, vars=variances)
            self.scaler.fading = fading
        elif not self.scaler.counts:
            raise ValueError("the segmenter has seen no data: pass the scaler the centres were computed in")
        self.n_clusters = len(centres)
        self.clusterer = make_clusterer("kmeans", self.n_clusters, self.halflife, self.seed)
        self._pipeline = compose.Pipeline(("scale", self.scaler), ("cluster", self.clusterer))
        self._set_centres(centres)
        self._buffer = []
        self._buffer_full = []
        self._profiles, self._profile_counts = {}, {}
        if profiles is not None:
            if len(profiles) != len(centres):
                raise ValueError(f"{len(profiles)} profiles for {len(centres)} centres")
            for i, profile in enumerate(profiles):
                self._profiles[i] = _aligned(profile, self.profile_names, f"profile {i}")
                # Worth as many points as it takes for new ones to be weighed at ``halflife``.
                self._profile_counts[i] = int(math.ceil(1.0 / self.halflife)) if self.halflife > 0 else 1
        self.ready = True
        self.seeded = True

    # -- reading the model ---------------------------------------------------

    def centres(self, scaled: bool = False) -> dict[int, dict[str, float]]:
        """Cluster id -> centre, in ``feature_vector`` units (or standardized, if ``scaled``)."""
        if not self.ready:
            return {}
        raw = {int(i): {n: float(c.get(n, 0.0)) for n in self.feature_names}
               for i, c in self.clusterer.centers.items()}
        if scaled:
            return raw
        out = {}
        for i, c in raw.items():
            out[i] = {n: self.scaler.means[n] + z * math.sqrt(max(self.scaler.vars[n], 0.0))
                      for n, z in c.items()}
        return out

    def profiles(self) -> dict[int, dict[str, float]]:
        """Cluster id -> mean of ``profile_names`` over the points it won (``feature_vector`` units)."""
        return {i: dict(p) for i, p in sorted(self._profiles.items())}

    def labels(self) -> dict[int, str]:
        """Cluster id -> label; clusters with the same description get " 2", " 3"... in id order.

        Read off the cluster's profile, or off its centre while it has none.
        """
        seen: collections.Counter = collections.Counter()
        out = {}
        for i, centre in sorted(self.centres().items()):
            text = describe_centre(self._profiles.get(i) or centre)
            seen[text] += 1
            out[i] = text if seen[text] == 1 else f"{text} {seen[text]}"
        return out

    def label(self, cluster_id: int) -> str:
        """The human-readable label of ``cluster_id`` ("unassigned" for -1 or an unknown id)."""
        return self.labels().get(cluster_id, "unassigned")

    # -- snapshots -----------------------------------------------------------

    def to_bytes(self) -> bytes:
        return snapshot.dump(SNAPSHOT_KIND, self)

    @classmethod
    def from_bytes(cls, data: bytes) -> "OnlineSegmenter":
        model = snapshot.load(SNAPSHOT_KIND, data)
        if not isinstance(model, cls):
            raise snapshot.SnapshotError(f"snapshot holds a {type(model).__name__}, expected {cls.__name__}")
        return model

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # The pipeline only wraps scaler and clusterer; rebuilt on load so they stay shared.
        del state["_pipeline"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Snapshots from before cluster profiles: labels come from the centres.
        state.setdefault("profile_names", tuple(FEATURES))
        state.setdefault("_profiles", {})
        state.setdefault("_profile_counts", {})
        state.setdefault("_buffer_full", [])
        state.setdefault("init_restarts", 1)
        self.__dict__.update(state)
        self._pipeline = compose.Pipeline(("scale", self.scaler), ("cluster", self.clusterer))
