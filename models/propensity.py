"""Onboarding-completion propensity, learned online from labels that arrive late.

The model estimates P(the user completes onboarding within N days), N =
``timeout_days`` (3 by default). Whether that happens is known up to N days
after the profile update that was scored, so ``PropensityModel`` keeps
prediction and training apart:

* ``predict(user_key, x, at_ms)`` returns the probability from the model as
  it is and, at fixed *checkpoints* of the user's age (``checkpoints_days``
  after the first prediction: 0, 1, 2, 4, 7, 14, 21, 28 by default), stores a
  copy of ``x`` as it is at that moment, with the probability it was given.
* ``label(user_key, 1, at_ms)`` (the completion event) trains on the user's
  stored points predicted at or before ``at_ms`` as positives -- never on
  features seen later, so nothing the user did after a prediction leaks into
  training.
* ``expire(now_ms)`` is the timeout: every stored point N days old without a
  completion is trained on as a negative.

A horizon per prediction rather than "ever completes": negatives arrive after N
days instead of at the end of a long timeout (docs/decisions.md, models/propensity.py).

Both return the ``Outcome``s they trained on, each with two probabilities,
neither of which has seen the label: ``probability``, the one given at
prediction time (River's delayed-label progressive validation), and
``probability_at_label``, the model's score of the same stored features just
before it learns them (test-then-train when the example becomes available).
Feeding either to a metric is prequential evaluation; the first is the one
an app acted on.

Why checkpoints rather than every prediction or only the latest: every user
contributes points at the same ages, so the sampling itself teaches the model
nothing about age, and the count per user is bounded.

After completion the user is *resolved*: later predictions are scored but not
stored. Memory is bounded: at most ``max_pending`` users have stored points
(past that, the one who started longest ago has their points labelled 0
early, counted in ``evicted``; finding them is O(pending), so size the bound
for the rare case), each with at most ``len(checkpoints_days)`` points, and at
most ``max_resolved`` resolved keys are remembered (oldest forgotten first).

Until it has learned ``min_per_class`` examples of each class the model
answers ``prior`` for everyone: a model that has only seen positives has no
ranking to offer.

The classifier is ``StandardScaler | LogisticRegression`` by default; a
Hoeffding tree is available (``classifier="hoeffding_tree"``); the choice is
explained in docs/models.md.
"""
from __future__ import annotations

import heapq
import math
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from river import compose, linear_model, optim, preprocessing, tree

from ..schemas.units import DAY_MS
from . import snapshot
from .features import FEATURES

SNAPSHOT_KIND = "propensity"
CLASSIFIERS = ("logistic_regression", "hoeffding_tree")
DEFAULT_CHECKPOINTS_DAYS = (0, 1, 2, 4, 7, 14, 21, 28)


def make_classifier(name: str):
    """A River classifier pipeline by name (the two compared in docs/models.md)."""
    if name == "logistic_regression":
        return compose.Pipeline(
            ("scale", preprocessing.StandardScaler()),
            ("logreg", linear_model.LogisticRegression(optimizer=optim.SGD(0.02), l2=1e-4)),
        )
    if name == "hoeffding_tree":
        return tree.HoeffdingTreeClassifier(grace_period=100, delta=1e-5, leaf_prediction="nba")
    raise ValueError(f"unknown classifier {name!r}; known: {CLASSIFIERS}")


class Outcome(NamedTuple):
    """One stored prediction and the label it finally got."""

    user_key: str
    predicted_at: int
    labelled_at: int
    #: probability given when the features were stored (before any label of this user)
    probability: float
    label: int
    #: probability the model gives the same stored features when the label arrives,
    #: just before learning them (test-then-train at label time)
    probability_at_label: float


@dataclass
class _Pending:
    first_at: int
    # (predicted_at, deadline, features, probability), in prediction order;
    # features packed as float64 bytes in the model's ``feature_names`` order
    # (``_pack``): a pending user costs ~140 bytes per point in a checkpoint,
    # not a dict of 17 floats (snapshots from before hold dicts; both load).
    points: list = field(default_factory=list)
    next_checkpoint: int = 0


class PropensityModel:
    """Online completion propensity with delayed, point-in-time labels (see the module docstring).

    Parameters
    ----------
    classifier
        One of ``CLASSIFIERS``.
    timeout_days
        The horizon N of the prediction: a stored point is positive if the
        user completes within N days of it, and ``expire`` labels it 0 once N
        days pass without completion.
    checkpoints_days
        User ages (days since first prediction) at which features are stored
        for training; increasing, starting at 0.
    max_pending, max_resolved
        Memory bounds (users awaiting a label; resolved keys remembered).
    min_per_class, prior
        Until it has learned ``min_per_class`` examples of each class the model
        answers ``prior`` for everyone (cold start; see ``warm``).
    feature_names
        Features used; others in the input are ignored, missing ones count 0.
    """

    def __init__(self, classifier: str = "logistic_regression", timeout_days: float = 3.0,
                 checkpoints_days: Sequence[float] = DEFAULT_CHECKPOINTS_DAYS, max_pending: int = 200_000,
                 max_resolved: int = 400_000, min_per_class: int = 50, prior: float = 0.5,
                 feature_names: Sequence[str] = FEATURES):
        checkpoints = [float(d) for d in checkpoints_days]
        if not checkpoints or checkpoints[0] != 0 or any(b <= a for a, b in zip(checkpoints, checkpoints[1:])):
            raise ValueError("checkpoints_days must increase strictly from 0")
        if timeout_days <= 0 or max_pending < 1 or max_resolved < 1:
            raise ValueError("timeout_days, max_pending and max_resolved must be positive")
        self.classifier_name = classifier
        self.model = make_classifier(classifier)
        self.timeout_ms = int(timeout_days * DAY_MS)
        self.checkpoints_ms = [int(d * DAY_MS) for d in checkpoints]
        self.max_pending = max_pending
        self.max_resolved = max_resolved
        self.feature_names = tuple(feature_names)
        self._pending: dict[str, _Pending] = {}
        self._deadlines: list[tuple[int, str]] = []  # heap; stale entries skipped lazily
        self._resolved: OrderedDict[str, None] = OrderedDict()
        self.min_per_class = min_per_class
        self.prior = prior
        self.class_counts = [0, 0]
        self.n_learned = 0
        self.evicted = 0

    def _select(self, x: Mapping[str, float]) -> dict[str, float]:
        return {n: float(x.get(n, 0.0)) for n in self.feature_names}

    @property
    def warm(self) -> bool:
        """Whether the model has learned ``min_per_class`` examples of each class."""
        return min(self.class_counts) >= self.min_per_class

    def _score(self, x: dict[str, float]) -> float:
        if not self.warm:
            # A model that has only seen one class ranks users by noise (and, with
            # delayed negatives, by how late it scored them): the prior is honest.
            return self.prior
        p = self.model.predict_proba_one(x).get(True)
        return 0.0 if p is None else min(1.0, max(0.0, float(p)))

    def score(self, x: Mapping[str, float]) -> float:
        """P(user completes onboarding) for ``x``, storing nothing (what the parallel scorers call)."""
        return self._score(self._select(x))

    @property
    def pending_users(self) -> int:
        return len(self._pending)

    def predict(self, user_key: str, x: Mapping[str, float], at_ms: int) -> float:
        """P(user completes onboarding) now; stores a copy of ``x`` if a checkpoint is due."""
        features = self._select(x)
        p = self._score(features)
        if user_key in self._resolved:
            return p
        pending = self._pending.get(user_key)
        if pending is None:
            while len(self._pending) >= self.max_pending:
                self._evict_one(at_ms)
            pending = self._pending[user_key] = _Pending(first_at=at_ms)
        age = at_ms - pending.first_at
        # One point per checkpoint reached; when several are passed at once, the
        # current features stand for the latest of them.
        reached = pending.next_checkpoint
        while reached < len(self.checkpoints_ms) and self.checkpoints_ms[reached] <= age:
            reached += 1
        if reached > pending.next_checkpoint:
            deadline = at_ms + self.timeout_ms
            pending.points.append((at_ms, deadline, self._pack(features), p))
            pending.next_checkpoint = reached
            heapq.heappush(self._deadlines, (deadline, user_key))
        return p

    def label(self, user_key: str, y: int, at_ms: int) -> list[Outcome]:
        """The user completed (y=1) at ``at_ms``: train on their stored points predicted at or before it.

        The user is resolved: nothing more is stored for them. ``y=0`` resolves
        the user as never completing (all their pending points become negatives).
        """
        pending = self._pending.pop(user_key, None)
        self._resolve(user_key)
        if pending is None:
            return []
        return self._learn(user_key, [pt for pt in pending.points if pt[0] <= at_ms], bool(y), at_ms)

    def _learn(self, user_key: str, points: list, target: bool, at_ms: int) -> list[Outcome]:
        outcomes = []
        for predicted_at, _, packed, p in points:
            features = self._unpack(packed)
            outcomes.append(Outcome(user_key, predicted_at, at_ms, p, int(target), self._score(features)))
            self.model.learn_one(features, target)
            self.n_learned += 1
            self.class_counts[int(target)] += 1
        return outcomes

    def expire(self, now_ms: int) -> list[Outcome]:
        """Label 0 every stored point whose ``timeout_days`` passed by ``now_ms`` without completion."""
        outcomes: list[Outcome] = []
        while self._deadlines and self._deadlines[0][0] <= now_ms:
            deadline, key = heapq.heappop(self._deadlines)
            pending = self._pending.get(key)
            if pending is None:
                continue
            due = [pt for pt in pending.points if pt[1] <= deadline]
            pending.points = [pt for pt in pending.points if pt[1] > deadline]
            outcomes += self._learn(key, due, False, deadline)
            if not pending.points and pending.next_checkpoint >= len(self.checkpoints_ms):
                # Every checkpoint used and labelled: nothing left to learn from this user.
                del self._pending[key]
                self._resolve(key)
        return outcomes

    def _evict_one(self, now_ms: int) -> None:
        # The user who started longest ago goes first; their stored points are
        # labelled 0 early (they have not completed so far).
        key = min(self._pending, key=lambda k: self._pending[k].first_at)
        pending = self._pending.pop(key)
        self._learn(key, pending.points, False, now_ms)
        self.evicted += 1

    def _resolve(self, user_key: str) -> None:
        self._resolved[user_key] = None
        self._resolved.move_to_end(user_key)
        while len(self._resolved) > self.max_resolved:
            self._resolved.popitem(last=False)

    def _pack(self, features: Mapping[str, float]) -> bytes:
        return array("d", [features[n] for n in self.feature_names]).tobytes()

    def _unpack(self, packed) -> dict[str, float]:
        if isinstance(packed, Mapping):  # a point stored by an older snapshot
            return dict(packed)
        values = array("d")
        values.frombytes(packed)
        return dict(zip(self.feature_names, values))

    # -- snapshots -----------------------------------------------------------

    def to_bytes(self, include_pending: bool = True) -> bytes:
        """Snapshot bytes. ``include_pending=False`` leaves out the per-user state
        (stored features awaiting labels, resolved keys): what a scorer or the
        registry's serving copy needs, with no per-user data in it."""
        if include_pending:
            return snapshot.dump(SNAPSHOT_KIND, self)
        state = dict(self.__dict__)
        state.update(_pending={}, _deadlines=[], _resolved=OrderedDict())
        clone = object.__new__(type(self))
        clone.__dict__.update(state)
        return snapshot.dump(SNAPSHOT_KIND, clone)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PropensityModel":
        model = snapshot.load(SNAPSHOT_KIND, data)
        if not isinstance(model, cls):
            raise snapshot.SnapshotError(f"snapshot holds a {type(model).__name__}, expected {cls.__name__}")
        return model


def log_loss(y: int, p: float, eps: float = 1e-6) -> float:
    """Binary log loss of probability ``p`` for label ``y``, with ``p`` clipped to [eps, 1 - eps]."""
    p = min(1.0 - eps, max(eps, p))
    return -math.log(p) if y else -math.log(1.0 - p)
