"""Behaviour segments: k-means over what users do, fitted on the population, with names that stay.

In: feature vectors (``models/features.py``: ``feature_vector`` of a profile).
Out: a cluster id and a segment label per vector (``predict_one``,
``label``), and portable snapshots (``to_bytes``: JSON, no pickle, no
per-user data) that the registry serves to every scorer.

``Segmenter.fit(vectors)`` clusters a *population*: every scorable user's
latest profile, as the profile store holds it at an event-time mark
(``transforms/online_models.py``, ``ProfileSweep``). It is a pure function of
its input -- the vectors in the order given (callers sort them by user key),
the seed, the settings -- so the same input gives the same model, byte for
byte, whatever the runner, its bundles or its speed (issue 14: reproducible
segments). The fit:

1. standardizes ``SEGMENT_FEATURES`` by the population's mean and standard
   deviation (``z = (x - mean) / std``);
2. runs ``restarts`` k-means++ seedings (numpy ``default_rng(seed)``), each
   refined by Lloyd's iterations, and keeps the one of least inertia;
3. records each cluster's *profile*: the mean of the whole ``FEATURES``
   vector over its members (recency, tenure and purchases included, which the
   distance does not use), and names the clusters.

**Names.** ``ARCHETYPES`` is a fixed catalogue of onboarding behaviours, each a
weighting of how far a cluster's profile lies above or below the population
(in standard deviations) on a few features. The clusters get archetypes by
an optimal one-to-one assignment (Hungarian, ``scipy.optimize.
linear_sum_assignment``) that maximizes the total match, so labels are
unique. A cluster's *id* is its archetype's index in the catalogue: the same
kind of cluster keeps its id and its label from one model version to the
next, however the k-means run numbered its centres -- matching new clusters
to old ones through the catalogue rather than through each other, which
would make the names depend on the history of fits. ``DESCRIPTIONS`` gives a
sentence per label (docs/redis-contract.md).

Why a fit on the population rather than River's per-update online k-means:
an online learner's model depends on the order and grouping of the updates
it sees, which on a stream depend on the runner's bundles and timing. Two runs
of the same topic gave opposite pictures (issue 14). Fitting at event-time
marks on the store's population removes that dependence; docs/models.md
"Reproducible segments".

>>> from onboardflow.models.segmentation import Segmenter
>>> rows = [{"a": float(i % 2) * 10 + i * 0.01, "b": float(i % 2) * 10} for i in range(40)]
>>> seg = Segmenter(n_clusters=2, feature_names=("a", "b"), min_users=10).fit(rows)
>>> seg.predict_one({"a": 0.1, "b": 0.0}) != seg.predict_one({"a": 10.0, "b": 9.9})
True
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from ..schemas.units import HOUR_MS
from .features import FEATURES, SEGMENT_FEATURES, feature_vector

UNASSIGNED = -1
SNAPSHOT_KIND = "segmenter"
#: The JSON snapshot's format; ``from_bytes`` refuses others.
SNAPSHOT_FORMAT = 2

#: label -> (description, {feature: weight on the cluster profile's z-score}).
#: A cluster matches an archetype by the weighted sum of its profile's
#: z-scores against the population; order fixes the cluster ids.
ARCHETYPES: dict[str, tuple[str, dict[str, float]]] = {
    "power adopter": (
        "Far through the tutorial, uses many features, often buys a plan.",
        {"onboarding_progress": 1.0, "feature_breadth": 1.0, "feature_use_share": 0.7,
         "purchased": 0.5, "sessions_per_week": 0.3}),
    "daily regular": (
        "Comes back most days; visits are made of steady work in the product.",
        {"active_share_30d": 1.2, "sessions_per_week": 1.0, "feature_use_share": 0.3, "recency_days": -0.3}),
    "explorer": (
        "Browses a lot (page views, clicks) in long visits, tries the product without settling in.",
        {"browse_share": 1.2, "visit_events": 0.6, "visit_minutes": 0.4, "onboarding_progress": -0.3}),
    "team inviter": (
        "Spends visits bringing teammates in: invites are a large part of what they do.",
        {"invite_share": 2.0}),
    "support seeker": (
        "Asks support for help much more than others.",
        {"support_share": 2.0}),
    "setup admin": (
        "Fills in forms (settings, integrations, billing): configures more than uses.",
        {"form_share": 2.0}),
    "dropped off": (
        "Came a few times early on and stopped: few visits for their age, little progress, long silence.",
        {"sessions_per_week": -1.0, "active_share_30d": -0.8, "onboarding_progress": -0.6, "recency_days": 0.8}),
    "casual visitor": (
        "Short, light visits: a glance at a page or two now and then.",
        {"visit_events": -1.0, "visit_minutes": -1.0, "feature_breadth": -0.3}),
    "deep worker": (
        "Long, dense visits with much done in each.",
        {"visit_events": 1.0, "visit_minutes": 1.0, "feature_use_share": 0.3}),
    "tutorial follower": (
        "Works through the tutorial steadily, doing little else yet.",
        {"tutorial_share": 1.5, "onboarding_progress": 0.5}),
}
LABELS: tuple[str, ...] = tuple(ARCHETYPES)
DESCRIPTIONS: dict[str, str] = {label: text for label, (text, _) in ARCHETYPES.items()}
MAX_CLUSTERS = len(ARCHETYPES)
#: Significant digits the model's numbers are kept to (``_rounded``).
DIGITS = 10


def _rounded(value: float) -> float:
    """``value`` to ``DIGITS`` significant digits.

    A profile's decayed scores are sums folded in arrival order, so two runs
    of the same events differ in their last bit or two (transforms/score.py;
    the profile comparisons of the tests allow 1e-9). Kept to ten digits, the
    cluster profiles and statistics of a fit do not carry that noise into the
    snapshot: the same input gives the same bytes (measured: with each user's
    events spread over three partitions, two runs' unrounded fits differed in
    the 16th digit of two profile means).
    """
    return float(f"{value:.{DIGITS}g}")


class SnapshotError(ValueError):
    """The bytes are not a segmenter snapshot this version can read."""


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = points.shape[0]
    centres = [points[int(rng.integers(n))]]
    closest = ((points - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:
            idx = int(rng.integers(n))
        else:
            idx = int(np.searchsorted(np.cumsum(closest), rng.random() * total))
            idx = min(idx, n - 1)
        centres.append(points[idx])
        closest = np.minimum(closest, ((points - points[idx]) ** 2).sum(axis=1))
    return np.array(centres, dtype=float)


def _lloyd(points: np.ndarray, centres: np.ndarray, iterations: int = 100) -> tuple[np.ndarray, float, np.ndarray]:
    """Lloyd's iterations from ``centres``: (centres, inertia, assignment). Empty clusters keep their centre."""
    centres = centres.copy()
    assign = np.full(points.shape[0], -1)
    for _ in range(iterations):
        d = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
        new = d.argmin(axis=1)
        if np.array_equal(new, assign):
            break
        assign = new
        for c in range(centres.shape[0]):
            members = points[assign == c]
            if len(members):
                centres[c] = members.mean(axis=0)
    d = ((points[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2)
    assign = d.argmin(axis=1)
    return centres, float(d.min(axis=1).sum()), assign


def name_clusters(profiles_z: Sequence[Mapping[str, float]]) -> list[str]:
    """One distinct archetype label per cluster profile (z-scores against the population), best total match.

    Raises ValueError for more profiles than archetypes.
    """
    from scipy.optimize import linear_sum_assignment

    if len(profiles_z) > MAX_CLUSTERS:
        raise ValueError(f"at most {MAX_CLUSTERS} clusters can be named")
    score = np.array([[sum(w * float(p.get(f, 0.0)) for f, w in weights.items())
                       for _, weights in ARCHETYPES.values()] for p in profiles_z], dtype=float)
    rows, cols = linear_sum_assignment(-score)
    out = [""] * len(profiles_z)
    for r, c in zip(rows, cols):
        out[int(r)] = LABELS[int(c)]
    return out


class Segmenter:
    """k-means over ``feature_names`` fitted on a population; ids and labels from ``ARCHETYPES``.

    Parameters
    ----------
    n_clusters
        k, at most ``MAX_CLUSTERS`` (every cluster needs a distinct name).
    seed, restarts
        k-means++ seedings (numpy ``default_rng(seed)``), the best of ``restarts`` kept.
    feature_names
        Features the distance uses (default ``SEGMENT_FEATURES``); missing ones count 0.
    min_users
        ``fit`` refuses smaller populations (``ValueError``): k-means on a
        handful of users names clusters after noise.
    max_fit_users
        ``fit`` uses the first this many vectors (callers order them by user
        key, an HMAC: a uniform sample) and the population statistics of all.
    """

    def __init__(self, n_clusters: int = 6, seed: int = 42, restarts: int = 10,
                 feature_names: Sequence[str] = SEGMENT_FEATURES, min_users: int = 50,
                 max_fit_users: int = 50_000):
        if not 1 <= n_clusters <= MAX_CLUSTERS:
            raise ValueError(f"n_clusters must be within 1..{MAX_CLUSTERS}")
        if restarts < 1 or min_users < n_clusters or max_fit_users < min_users:
            raise ValueError("need restarts >= 1 and n_clusters <= min_users <= max_fit_users")
        self.n_clusters = n_clusters
        self.seed = seed
        self.restarts = restarts
        self.feature_names = tuple(feature_names)
        self.min_users = min_users
        self.max_fit_users = max_fit_users
        #: standardization of ``feature_names``: per feature (mean, std)
        self.scaling: dict[str, tuple[float, float]] = {}
        #: population (mean, std) of every ``FEATURES`` entry, for the z-scores of the profiles
        self.population: dict[str, tuple[float, float]] = {}
        #: cluster id -> centre (standardized, ``feature_names`` order)
        self._centres: dict[int, list[float]] = {}
        #: cluster id -> mean ``FEATURES`` vector of its members
        self._profiles: dict[int, dict[str, float]] = {}
        self._sizes: dict[int, int] = {}
        self.fitted_on = 0

    @property
    def ready(self) -> bool:
        return bool(self._centres)

    # -- fitting -------------------------------------------------------------

    def fit(self, vectors: Sequence[Mapping[str, float]]) -> "Segmenter":
        """Cluster ``vectors`` (``feature_vector`` dicts, in a canonical order); returns self."""
        if len(vectors) < self.min_users:
            raise ValueError(f"{len(vectors)} users: need at least {self.min_users} to fit")
        full = np.array([[float(v.get(n, 0.0)) for n in FEATURES] for v in vectors], dtype=float)
        mean, std = full.mean(axis=0), full.std(axis=0)
        self.population = {n: (float(m), float(s)) for n, m, s in zip(FEATURES, mean, std)}
        cols = [FEATURES.index(n) if n in FEATURES else None for n in self.feature_names]
        raw = np.array([[float(v.get(n, 0.0)) for n in self.feature_names] for v in vectors], dtype=float) \
            if None in cols else full[:, cols]
        mu, sd = raw.mean(axis=0), raw.std(axis=0)
        sd = np.where(sd > 1e-9, sd, 1.0)
        self.scaling = {n: (float(m), float(s)) for n, m, s in zip(self.feature_names, mu, sd)}
        z = (raw - mu) / sd
        sample = z[: self.max_fit_users]
        rng = np.random.default_rng(self.seed)
        best: Optional[np.ndarray] = None
        best_inertia = math.inf
        for _ in range(self.restarts):
            centres, inertia, _ = _lloyd(sample, _kmeans_plus_plus(sample, self.n_clusters, rng))
            if inertia < best_inertia - 1e-9:
                best, best_inertia = centres, inertia
        assert best is not None
        assign = ((z[:, None, :] - best[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
        profiles = []
        for c in range(self.n_clusters):
            members = full[assign == c]
            profiles.append(members.mean(axis=0) if len(members) else mean)
        pstd = np.where(std > 1e-9, std, 1.0)
        names = name_clusters([{n: float(v) for n, v in zip(FEATURES, (p - mean) / pstd)} for p in profiles])
        self.population = {n: (_rounded(m), _rounded(s)) for n, (m, s) in self.population.items()}
        self.scaling = {n: (_rounded(m), _rounded(s)) for n, (m, s) in self.scaling.items()}
        self._centres, self._profiles, self._sizes = {}, {}, {}
        for c, label in enumerate(names):
            cid = LABELS.index(label)
            self._centres[cid] = [_rounded(v) for v in best[c]]
            self._profiles[cid] = {n: _rounded(v) for n, v in zip(FEATURES, profiles[c])}
            self._sizes[cid] = int((assign == c).sum())
        self.fitted_on = len(vectors)
        return self

    # -- scoring -------------------------------------------------------------

    def _scaled(self, x: Mapping[str, float]) -> list[float]:
        out = []
        for n in self.feature_names:
            m, s = self.scaling[n]
            v = x.get(n, 0.0)
            out.append(((float(v) if v is not None else 0.0) - m) / s)
        return out

    def predict_one(self, x: Mapping[str, float]) -> int:
        """The id of the closest cluster, or ``UNASSIGNED`` (-1) before the first fit."""
        if not self._centres:
            return UNASSIGNED
        z = self._scaled(x)
        best, best_d = UNASSIGNED, math.inf
        for cid, centre in self._centres.items():
            d = 0.0
            for a, b in zip(z, centre):
                d += (a - b) * (a - b)
            if d < best_d:
                best, best_d = cid, d
        return best

    def distances(self, x: Mapping[str, float]) -> dict[int, float]:
        """Cluster id -> squared standardized distance of ``x`` to its centre."""
        z = self._scaled(x)
        return {cid: sum((a - b) ** 2 for a, b in zip(z, c)) for cid, c in self._centres.items()}

    # -- reading the model ---------------------------------------------------

    def labels(self) -> dict[int, str]:
        """Cluster id -> label (unique: one archetype per cluster)."""
        return {cid: LABELS[cid] for cid in sorted(self._centres)}

    def label(self, cluster_id: int) -> str:
        """The label of ``cluster_id`` ("unassigned" for -1 or an unknown id)."""
        return LABELS[cluster_id] if cluster_id in self._centres else "unassigned"

    def centres(self, scaled: bool = False) -> dict[int, dict[str, float]]:
        """Cluster id -> centre, in ``feature_vector`` units (or standardized, if ``scaled``)."""
        out = {}
        for cid, c in sorted(self._centres.items()):
            out[cid] = {n: (v if scaled else self.scaling[n][0] + v * self.scaling[n][1])
                        for n, v in zip(self.feature_names, c)}
        return out

    def profiles(self) -> dict[int, dict[str, float]]:
        """Cluster id -> mean ``FEATURES`` vector of its members at the fit."""
        return {cid: dict(p) for cid, p in sorted(self._profiles.items())}

    def sizes(self) -> dict[int, int]:
        """Cluster id -> members at the fit."""
        return dict(sorted(self._sizes.items()))

    # -- seeding (``onboardflow train``) ---------------------------------------

    def set_model(self, centres: Sequence[Sequence[float]], scaling: Mapping[str, tuple[float, float]],
                  profiles: Sequence[Mapping[str, float]], population: Mapping[str, tuple[float, float]],
                  sizes: Optional[Sequence[int]] = None) -> list[int]:
        """Install centres found elsewhere (standardized by ``scaling``) and name them from ``profiles``.

        Returns the cluster id each centre got, in the order given.
        """
        if not centres or len(centres) != len(profiles) or len(centres) > MAX_CLUSTERS:
            raise ValueError(f"need 1..{MAX_CLUSTERS} centres with one profile each")
        if set(scaling) != set(self.feature_names):
            raise ValueError(f"scaling must cover exactly {self.feature_names}")
        for c in centres:
            if len(c) != len(self.feature_names) or not all(math.isfinite(float(v)) for v in c):
                raise ValueError("every centre needs one finite value per feature")
        self.scaling = {n: (float(m), float(s) if s > 1e-9 else 1.0) for n, (m, s) in scaling.items()}
        self.population = {n: (float(m), float(s)) for n, (m, s) in population.items()}
        zs = []
        for p in profiles:
            zs.append({n: (float(p.get(n, 0.0)) - m) / (s if s > 1e-9 else 1.0)
                       for n, (m, s) in self.population.items()})
        names = name_clusters(zs)
        self.n_clusters = len(centres)
        self._centres, self._profiles, self._sizes = {}, {}, {}
        for c, label in enumerate(names):
            cid = LABELS.index(label)
            self._centres[cid] = [float(v) for v in centres[c]]
            self._profiles[cid] = {n: float(profiles[c].get(n, 0.0)) for n in FEATURES}
            self._sizes[cid] = int(sizes[c]) if sizes is not None else 0
        return [LABELS.index(label) for label in names]

    # -- snapshots -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": SNAPSHOT_KIND, "format": SNAPSHOT_FORMAT,
            "settings": {"n_clusters": self.n_clusters, "seed": self.seed, "restarts": self.restarts,
                         "feature_names": list(self.feature_names), "min_users": self.min_users,
                         "max_fit_users": self.max_fit_users},
            "scaling": {n: list(v) for n, v in self.scaling.items()},
            "population": {n: list(v) for n, v in self.population.items()},
            "clusters": [{"id": cid, "label": LABELS[cid], "centre": self._centres[cid],
                          "profile": self._profiles.get(cid, {}), "size": self._sizes.get(cid, 0)}
                         for cid in sorted(self._centres)],
            "fitted_on": self.fitted_on,
        }

    def to_bytes(self) -> bytes:
        """A portable snapshot: UTF-8 JSON, readable by any Python (or other) environment."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Segmenter":
        try:
            doc = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, TypeError):
            raise SnapshotError("not a segmenter snapshot (JSON expected; snapshots before 2026-12 were "
                                "pickles: refit with the pipeline or `onboardflow train`)") from None
        if not isinstance(doc, dict) or doc.get("kind") != SNAPSHOT_KIND or doc.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotError(f"not a format {SNAPSHOT_FORMAT} {SNAPSHOT_KIND} snapshot")
        s = doc["settings"]
        seg = cls(n_clusters=s["n_clusters"], seed=s["seed"], restarts=s["restarts"],
                  feature_names=s["feature_names"], min_users=s["min_users"], max_fit_users=s["max_fit_users"])
        seg.scaling = {n: (float(v[0]), float(v[1])) for n, v in doc["scaling"].items()}
        seg.population = {n: (float(v[0]), float(v[1])) for n, v in doc["population"].items()}
        for c in doc["clusters"]:
            cid = int(c["id"])
            if LABELS[cid] != c["label"]:
                raise SnapshotError(f"cluster {cid} is labelled {c['label']!r}, the catalogue says {LABELS[cid]!r}")
            seg._centres[cid] = [float(v) for v in c["centre"]]
            seg._profiles[cid] = {n: float(v) for n, v in c["profile"].items()}
            seg._sizes[cid] = int(c["size"])
        seg.fitted_on = int(doc.get("fitted_on", 0))
        return seg


# -- the population and the schedule (what every engine's learner does at a mark) ----------


def scorable(profile: Mapping[str, Any]) -> bool:
    """Whether a profile joins the population the segmenter is fitted on: an identified user.

    Anonymous visitors' profiles (no signup) are scored but do not shape the
    clusters: a visitor's few page views would otherwise pull a cluster of
    their own.
    """
    return profile.get("signup_at") is not None


class SegmentSettings:
    """How and when the segmenter is refitted (``--model_refit_hours``, ``--segment_clusters``, ...).

    Marks are multiples of ``refit_ms`` of event time since the epoch: every
    engine, and the evaluation, refits at the same instants.
    """

    def __init__(self, refit_ms: int = 24 * HOUR_MS, n_clusters: int = 6, min_users: int = 50, seed: int = 42):
        if refit_ms < 60_000:
            raise ValueError("refit_ms must be at least a minute of event time")
        self.refit_ms, self.n_clusters, self.min_users, self.seed = int(refit_ms), n_clusters, min_users, seed
        self.segmenter()  # validates k against the catalogue and min_users

    def __repr__(self) -> str:
        return (f"SegmentSettings(refit_ms={self.refit_ms}, n_clusters={self.n_clusters}, "
                f"min_users={self.min_users}, seed={self.seed})")

    def segmenter(self) -> Segmenter:
        return Segmenter(n_clusters=self.n_clusters, seed=self.seed, min_users=self.min_users)

    def next_mark(self, after_ms: int) -> int:
        """The first mark strictly after ``after_ms``."""
        return (after_ms // self.refit_ms + 1) * self.refit_ms

    def fit(self, population: Sequence[Mapping[str, Any]]) -> Optional[Segmenter]:
        """A segmenter fitted on the scorable profiles of ``population`` in the order given (callers
        order them by user key), or None while there are fewer than ``min_users``."""
        rows = [feature_vector(p) for p in population if scorable(p)]
        if len(rows) < self.min_users:
            return None
        return self.segmenter().fit(rows)
