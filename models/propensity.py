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

``to_bytes`` / ``from_bytes``: a portable snapshot (models/snapshot.py format
2, JSON, no pickle) with the classifier's parameters spelled out, so what the
Beam worker's River 0.26 writes the Flink job's River 0.23 loads, and the other
way round, scoring and learning on exactly alike (docs/models.md "Propensity
snapshots"). The Hoeffding tree has none (``portable`` is False).
"""
from __future__ import annotations

import binascii
import heapq
import math
import sys
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from river import compose, linear_model, optim, preprocessing, tree, utils

from ..schemas.units import DAY_MS
from . import snapshot
from .features import FEATURES

SNAPSHOT_KIND = "propensity"
#: The portable snapshot's format (the JSON document's ``format``; models/snapshot.py format 2).
SNAPSHOT_FORMAT = 2
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

    @property
    def portable(self) -> bool:
        """Whether ``to_bytes`` can write this model (the Hoeffding tree has no portable snapshot)."""
        return self.classifier_name == "logistic_regression"

    def to_dict(self, include_pending: bool = True) -> dict:
        """The model as a JSON document (``SNAPSHOT_FORMAT``; layout in docs/models.md "Propensity snapshots")."""
        if not self.portable:
            raise ValueError(
                f"the {self.classifier_name} propensity model has no portable snapshot: River's Hoeffding tree "
                "keeps its state in node and splitter objects whose layout changes between River versions, "
                "so it is not written at all rather than as a pickle only one dependency set can read; it "
                "learns and scores in-process (docs/models.md)")
        doc = {
            "kind": SNAPSHOT_KIND, "format": SNAPSHOT_FORMAT,
            "settings": {"classifier": self.classifier_name, "timeout_ms": self.timeout_ms,
                         "checkpoints_ms": list(self.checkpoints_ms), "max_pending": self.max_pending,
                         "max_resolved": self.max_resolved, "min_per_class": self.min_per_class,
                         "prior": self.prior, "feature_names": list(self.feature_names)},
            "counters": {"class_counts": list(self.class_counts), "n_learned": self.n_learned,
                         "evicted": self.evicted},
            "classifier": _logreg_state(self.model),
        }
        if include_pending:
            doc["pending"] = self._pending_state()
        return doc

    def _pending_state(self) -> dict:
        keys, first_at, next_checkpoint, counts = [], [], [], []
        predicted_at, deadlines, probabilities, features = [], [], [], []
        for key, pending in self._pending.items():
            keys.append(key)
            first_at.append(pending.first_at)
            next_checkpoint.append(pending.next_checkpoint)
            counts.append(len(pending.points))
            for at, deadline, packed, p in pending.points:
                predicted_at.append(at)
                deadlines.append(deadline)
                probabilities.append(p)
                features.append(packed if isinstance(packed, bytes) else self._pack(self._unpack(packed)))
        values = array("d")
        values.frombytes(b"".join(features))
        return {
            "users": {"keys": keys, "first_at": snapshot.pack_ints(first_at),
                      "next_checkpoint": snapshot.pack_ints(next_checkpoint),
                      "points": snapshot.pack_ints(counts)},
            # one row per stored point, users in the order above, their points in prediction order
            "points": {"predicted_at": snapshot.pack_ints(predicted_at), "deadline": snapshot.pack_ints(deadlines),
                       "probability": snapshot.pack_floats(probabilities),
                       "features": snapshot.pack_floats(values)},
            # the deadline heap as a list, in heap order (stale entries included)
            "deadlines": {"at": snapshot.pack_ints(d for d, _ in self._deadlines),
                          "keys": [k for _, k in self._deadlines]},
            "resolved": list(self._resolved),  # oldest first
        }

    def to_bytes(self, include_pending: bool = True) -> bytes:
        """A portable snapshot (models/snapshot.py format 2: zlib'd JSON, no pickle).

        ``include_pending=False`` leaves out the per-user state (stored
        features awaiting labels, the deadline heap, resolved keys): what a
        scorer or the registry's serving copy needs, with no per-user data in
        it. Raises ValueError for a model that is not ``portable``.
        """
        return snapshot.dump_json(SNAPSHOT_KIND, self.to_dict(include_pending))

    @classmethod
    def from_dict(cls, doc: Mapping) -> "PropensityModel":
        """The model ``to_dict`` described; SnapshotError if ``doc`` is not a format-2 propensity document."""
        if not isinstance(doc, Mapping) or doc.get("kind") != SNAPSHOT_KIND or doc.get("format") != SNAPSHOT_FORMAT:
            raise snapshot.SnapshotError(f"not a format {SNAPSHOT_FORMAT} {SNAPSHOT_KIND} snapshot")
        try:
            s = doc["settings"]
            if s["classifier"] != "logistic_regression":
                raise ValueError(f"classifier {s['classifier']!r}")
            model = cls(classifier=s["classifier"], max_pending=int(s["max_pending"]),
                        max_resolved=int(s["max_resolved"]), min_per_class=int(s["min_per_class"]),
                        prior=float(s["prior"]), feature_names=[str(n) for n in s["feature_names"]])
            model.timeout_ms = int(s["timeout_ms"])
            model.checkpoints_ms = [int(v) for v in s["checkpoints_ms"]]
            counters = doc["counters"]
            model.class_counts = [int(v) for v in counters["class_counts"]]
            model.n_learned, model.evicted = int(counters["n_learned"]), int(counters["evicted"])
            if len(model.class_counts) != 2 or not model.checkpoints_ms or model.checkpoints_ms[0] != 0:
                raise ValueError("class_counts or checkpoints_ms")
            model.model = _logreg_from_state(doc["classifier"])
            if doc.get("pending") is not None:
                model._load_pending(doc["pending"])
        except (KeyError, TypeError, ValueError, IndexError, binascii.Error) as exc:
            raise snapshot.SnapshotError(f"corrupt {SNAPSHOT_KIND} snapshot: {type(exc).__name__} {exc}") from None
        return model

    def _load_pending(self, state: Mapping) -> None:
        users, points = state["users"], state["points"]
        keys = [str(k) for k in users["keys"]]
        first_at = snapshot.unpack_ints(users["first_at"])
        next_checkpoint = snapshot.unpack_ints(users["next_checkpoint"])
        counts = snapshot.unpack_ints(users["points"])
        predicted_at, deadlines = snapshot.unpack_ints(points["predicted_at"]), snapshot.unpack_ints(points["deadline"])
        probabilities = snapshot.unpack_floats(points["probability"])
        values = snapshot.unpack_floats(points["features"])
        n, width = sum(counts), len(self.feature_names)
        if not len(keys) == len(first_at) == len(next_checkpoint) == len(counts) \
                or not n == len(predicted_at) == len(deadlines) == len(probabilities) \
                or len(values) != n * width:
            raise ValueError("pending arrays of different lengths")
        if sys.byteorder == "big":
            values.byteswap()  # back to the native order ``_unpack`` reads
        raw, size = values.tobytes(), width * values.itemsize
        i = 0
        for key, first, nxt, count in zip(keys, first_at, next_checkpoint, counts):
            pts = []
            for j in range(i, i + count):
                pts.append((predicted_at[j], deadlines[j], raw[j * size:(j + 1) * size], probabilities[j]))
            i += count
            self._pending[key] = _Pending(first_at=first, points=pts, next_checkpoint=nxt)
        heap = state["deadlines"]
        at = snapshot.unpack_ints(heap["at"])
        if len(at) != len(heap["keys"]):
            raise ValueError("deadline arrays of different lengths")
        self._deadlines = [(int(d), str(k)) for d, k in zip(at, heap["keys"])]
        heapq.heapify(self._deadlines)  # already a heap when written by to_dict; cheap to make sure
        self._resolved = OrderedDict((str(k), None) for k in state["resolved"])

    @classmethod
    def from_bytes(cls, data: bytes) -> "PropensityModel":
        """The model in snapshot ``data``: format 2 (portable), or a format-1 pickle published before it
        (read by unpickling, so only with the River version that wrote it; docs/models.md)."""
        state = snapshot.load(SNAPSHOT_KIND, data)
        if isinstance(state, dict):
            return cls.from_dict(state)
        if not isinstance(state, cls):
            raise snapshot.SnapshotError(f"snapshot holds a {type(state).__name__}, expected {cls.__name__}")
        return state


def _logreg_state(model) -> dict:
    """``StandardScaler | LogisticRegression`` (``make_classifier``) as explicit parameters.

    Everything that affects later predictions and learning: the scaler's
    running count, mean and variance per feature, the weights and intercept,
    the optimizer's step count (SGD with a constant rate does not use it, a
    schedule would) and the hyperparameters the objects are rebuilt with.
    Anything else (another optimizer, L1's cumulative penalties, a loss with
    class weights) is refused rather than silently dropped.
    """
    scaler, logreg = model["scale"], model["logreg"]
    optimizer = logreg.optimizer
    if type(optimizer) is not optim.SGD or not isinstance(optimizer.lr, optim.schedulers.Constant) \
            or not isinstance(logreg.intercept_lr, optim.schedulers.Constant) or logreg.l1 != 0 \
            or type(logreg.loss) is not optim.losses.Log or getattr(scaler, "window_size", None) is not None \
            or (logreg.loss.weight_pos, logreg.loss.weight_neg) != (1.0, 1.0):
        raise ValueError("only StandardScaler | LogisticRegression(SGD with a constant rate, log loss, no L1) "
                         "has a portable propensity snapshot")
    names = list(scaler.counts)
    weights = logreg._weights.to_dict()
    return {
        "type": "StandardScaler|LogisticRegression",
        "scaler": {"with_std": bool(scaler.with_std), "names": names,
                   "counts": [int(scaler.counts[n]) for n in names],
                   "means": [float(scaler.means.get(n, 0.0)) for n in names],
                   "vars": [float(scaler.vars.get(n, 0.0)) for n in names]},
        "logreg": {"names": list(weights), "weights": [float(w) for w in weights.values()],
                   "intercept": float(logreg.intercept), "intercept_init": float(logreg.intercept_init),
                   "intercept_lr": float(logreg.intercept_lr.learning_rate), "l2": float(logreg.l2),
                   "clip_gradient": float(logreg.clip_gradient),
                   "optimizer": {"type": "SGD", "lr": float(optimizer.lr.learning_rate),
                                 "n_iterations": int(optimizer.n_iterations)}},
    }


def _logreg_from_state(state: Mapping):
    """The pipeline ``_logreg_state`` described, rebuilt through River's constructors (any River >= 0.21)."""
    if state["type"] != "StandardScaler|LogisticRegression":
        raise ValueError(f"classifier type {state['type']!r}")
    sc, lr, opt = state["scaler"], state["logreg"], state["logreg"]["optimizer"]
    if opt["type"] != "SGD":
        raise ValueError(f"optimizer {opt['type']!r}")
    scaler = preprocessing.StandardScaler(with_std=bool(sc["with_std"]))
    if not len(sc["names"]) == len(sc["counts"]) == len(sc["means"]) == len(sc["vars"]):
        raise ValueError("scaler arrays of different lengths")
    for name, count, mean, var in zip(sc["names"], sc["counts"], sc["means"], sc["vars"]):
        scaler.counts[name] = int(count)
        scaler.means[name] = float(mean)
        scaler.vars[name] = float(var)
    sgd = optim.SGD(float(opt["lr"]))
    sgd.n_iterations = int(opt["n_iterations"])
    logreg = linear_model.LogisticRegression(
        optimizer=sgd, l2=float(lr["l2"]), intercept_init=float(lr["intercept_init"]),
        intercept_lr=float(lr["intercept_lr"]), clip_gradient=float(lr["clip_gradient"]))
    if len(lr["names"]) != len(lr["weights"]):
        raise ValueError("weight arrays of different lengths")
    logreg._weights = utils.VectorDict({str(n): float(w) for n, w in zip(lr["names"], lr["weights"])})
    logreg.intercept = float(lr["intercept"])
    return compose.Pipeline(("scale", scaler), ("logreg", logreg))


def log_loss(y: int, p: float, eps: float = 1e-6) -> float:
    """Binary log loss of probability ``p`` for label ``y``, with ``p`` clipped to [eps, 1 - eps]."""
    p = min(1.0 - eps, max(eps, p))
    return -math.log(p) if y else -math.log(1.0 - p)
