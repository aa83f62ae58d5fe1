"""Drift detection on the online models: River ADWIN, reported as DriftEvent records.

Two things can drift, and each has its detector here:

* ``SegmentMixDrift`` watches the *segment mix*: for every assignment it feeds
  each cluster's ADWIN a 1 (this cluster) or a 0 (another), so each detector
  tracks that cluster's share of the stream and fires when the share changes
  significantly (a new kind of user arriving, a cohort going dormant, or the
  centres themselves moving). Metric ``segment_share:<cluster_id>``.
* ``PropensityErrorDrift`` watches the propensity model's *error*: the log
  loss (clipped at ``log_loss_cap``) of each prediction once its label is
  known. Metric ``error:log_loss``. A rise means the model no longer fits
  who is onboarding.

``update(...)`` returns a list of ``DriftEvent`` dicts (``schemas/records.py``;
empty when nothing fired). ``drift_id`` is a
UUID derived from model, metric and the detection's event time and count, so
replaying the same stream yields the same ids (idempotent writes downstream).
``value`` is ADWIN's estimate of the monitored mean after the change;
``threshold`` is ADWIN's confidence ``delta``; ``window_events`` counts the
observations since that detector last fired. The detectors only report:
``action`` is what the caller says it will do ("none" by default).

Aggregates only: nothing per-user enters a detector or an event.
"""
from __future__ import annotations

import math
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from river import drift

from ..schemas.records import DriftEvent

#: Namespace of the deterministic drift ids.
DRIFT_NAMESPACE = uuid.UUID("6f1b8d0e-4a53-4c1e-9a57-0b9e5f1c2d11")
ACTIONS = ("none", "reset", "retrain")


def _adwin(delta: float) -> "drift.ADWIN":
    # Imported on first use: river.drift's package imports its datasets and
    # with them scikit-learn (~0.8 s), which a run without models never needs.
    from river.drift import ADWIN

    return ADWIN(delta=delta)


class _AdwinDrift:
    def __init__(self, model_name: str, model_version: str, delta: float, action: str):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}")
        if not 0 < delta < 1:
            raise ValueError("delta must be in (0, 1)")
        self.model_name = model_name
        self.model_version = model_version
        self.delta = delta
        self.action = action
        self.fired = 0

    def _event(self, metric: str, detector: drift.ADWIN, window_events: int, at_ms: int) -> DriftEvent:
        self.fired += 1
        name = f"{self.model_name}/{self.model_version}/{metric}/{at_ms}/{window_events}"
        return DriftEvent(
            drift_id=str(uuid.uuid5(DRIFT_NAMESPACE, name)),
            model_name=self.model_name,
            model_version=self.model_version,
            detector="ADWIN",
            metric=metric,
            value=float(detector.estimation),
            threshold=self.delta,
            window_events=window_events,
            action=self.action,
            detected_at=int(at_ms),
            version=int(at_ms),
        )


class SegmentMixDrift(_AdwinDrift):
    """One ADWIN per cluster over that cluster's share of assignments (see the module docstring)."""

    def __init__(self, model_name: str = "clustering", model_version: str = "unversioned",
                 delta: float = 0.002, action: str = "none"):
        super().__init__(model_name, model_version, delta, action)
        self._detectors: dict[int, drift.ADWIN] = {}
        self._since: dict[int, int] = {}
        self._seen = 0

    def update(self, cluster_id: int, at_ms: int) -> list[DriftEvent]:
        """One assignment of ``cluster_id`` at event time ``at_ms``; negative ids (unassigned) are ignored."""
        if cluster_id < 0:
            return []
        if cluster_id not in self._detectors:
            detector = _adwin(self.delta)
            # A cluster born mid-stream had share 0 until now: say so, compactly,
            # or its first assignments would look like its whole history.
            for _ in range(min(self._seen, 1000)):
                detector.update(0.0)
            self._detectors[cluster_id] = detector
            self._since[cluster_id] = 0
        self._seen += 1
        events = []
        for cid, detector in self._detectors.items():
            detector.update(1.0 if cid == cluster_id else 0.0)
            self._since[cid] += 1
            if detector.drift_detected:
                events.append(self._event(f"segment_share:{cid}", detector, self._since[cid], at_ms))
                self._since[cid] = 0
        return events


class PropensityErrorDrift(_AdwinDrift):
    """ADWIN over the clipped log loss of labelled propensity predictions."""

    def __init__(self, model_name: str = "propensity", model_version: str = "unversioned",
                 delta: float = 0.002, log_loss_cap: float = 5.0, action: str = "none"):
        super().__init__(model_name, model_version, delta, action)
        self.log_loss_cap = log_loss_cap
        self._detector = _adwin(delta)
        self._since = 0

    def update(self, y: int, probability: float, at_ms: int) -> list[DriftEvent]:
        """One labelled prediction (label ``y``, predicted ``probability``) known at event time ``at_ms``."""
        p = min(1.0 - 1e-6, max(1e-6, float(probability)))
        loss = min(self.log_loss_cap, -math.log(p if y else 1.0 - p))
        self._detector.update(loss)
        self._since += 1
        if self._detector.drift_detected:
            event = self._event("error:log_loss", self._detector, self._since, at_ms)
            self._since = 0
            return [event]
        return []
