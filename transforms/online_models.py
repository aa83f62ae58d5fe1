"""The online models' stages, engine-free: scoring on every worker, learning in one keyed stage.

Two stages, one job each (docs/architecture.md, docs/models.md)::

    profiles ─► scoring (ProfileScorer) ─► tracks ─► Redis / warehouse
                                                       │ applied writes
                                                       ▼
          model registry ◄── publish ── learning (OnlineLearner) ─► drift events
            (serving)                      │ at event-time marks: refit the segmenter on the
                                           ▼ profile store, publish, re-score every profile
                                    transforms/rescore.py

* ``ProfileScorer`` (with ``ServingModels``) scores each profile with the
  registry's *serving* snapshots of the segmenter and the propensity model,
  read from the registry's Redis copy (``models/model_registry.py``
  ModelStore) into a per-process cache re-checked at most every
  ``refresh_seconds``; a rollback reaches every worker within that time.
  Before any model is published, profiles pass through unscored (model
  fields null); a profile that cannot be scored goes out unscored, counted.

* ``OnlineLearner`` follows the profiles the store accepted, on a single key,
  in batches, with ``LearnerState`` as its keyed state: the propensity model
  (River) stores point-in-time features and trains on delayed labels
  (completion when ``onboarding_progress`` reaches 1, a timeout otherwise,
  both in event time, timeouts on a watermark timer), and ADWIN watches the
  segment mix and the propensity error. The segmenter is refitted at
  **event-time marks** (every ``SegmentSettings.refit_ms``; a watermark timer)
  and at the end of a bounded input, on the population the profile store
  holds (``ProfileSweep``); both models are then published and every stored
  profile is re-scored. A profile scored by an older model than the serving
  one is re-scored on the spot. Batches and timer firings go in; drift events
  and the timers to set come out (``LearnerStep``), so an engine only keeps the
  state and the timers. Nothing depends on bundles or processing time: the
  same input gives the same segments (docs/models.md "Reproducible segments").

``pipelines/beam/online_models.py`` runs both in Beam (``ScoreProfiles``,
``LearnOnlineModels``). Counts go to an injected ``count(name, n)`` callback
(the names are ``COUNTERS``) and the ``PipelineMetrics`` facade.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Optional

from ..models import snapshot
from ..models.drift import PropensityErrorDrift, SegmentMixDrift
from ..models.features import feature_vector, is_activity_update
from ..models.model_registry import ModelRegistry, ModelStore
from ..models.propensity import PropensityModel
from ..models.segmentation import UNASSIGNED, Segmenter, SegmentSettings
from ..models.tracks import TrackPolicy
from ..schemas.records import DriftEvent
from .rescore import ProfileSweep

_LOG = logging.getLogger(__name__)

SEGMENTATION = "segmentation"
PROPENSITY = "propensity"
LEARNER_SNAPSHOT_KIND = "online_learner"
#: The single key of the learning stage.
LEARNER_KEY = "online-models"


def model_version_id(segmentation: Optional[str], propensity: Optional[str]) -> Optional[str]:
    """The profile's ``model_version``: the serving versions that scored it, e.g. ``seg-000003+prop-000002``."""
    parts = [v for v in (segmentation, propensity) if v]
    return "+".join(parts) or None


def completed_onboarding(profile: Mapping[str, Any]) -> bool:
    """The delayed label: the user finished every onboarding step."""
    progress = profile.get("onboarding_progress")
    return isinstance(progress, (int, float)) and progress >= 1.0


# --------------------------------------------------------------------------- scoring


class ServingModels:
    """The registry's serving snapshots, cached per process and re-checked on a schedule."""

    def __init__(self, store: ModelStore, refresh_seconds: float, clock=time.monotonic):
        self._store = store
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._checked_at: Optional[float] = None
        self.segmenter: Optional[Segmenter] = None
        self.propensity: Optional[PropensityModel] = None
        self.versions: dict[str, Optional[str]] = {SEGMENTATION: None, PROPENSITY: None}
        self.numbers: dict[str, Optional[int]] = {SEGMENTATION: None, PROPENSITY: None}

    def refresh(self, force: bool = False) -> list[tuple[str, int]]:
        """Reload the kinds whose serving version changed; returns the (kind, number) loaded."""
        now = self._clock()
        if not force and self._checked_at is not None and now - self._checked_at < self._refresh_seconds:
            return []
        self._checked_at = now
        loaded = []
        for kind, cls in ((SEGMENTATION, Segmenter), (PROPENSITY, PropensityModel)):
            number = self._store.current_version(kind)
            if number is None or number == self.numbers[kind]:
                continue
            version = self._store.get(kind, number)
            if version is None or version.payload is None:
                continue  # the pointer moved between the two reads: next refresh
            model = cls.from_bytes(version.payload)
            if kind == SEGMENTATION:
                self.segmenter = model
            else:
                self.propensity = model
            self.numbers[kind], self.versions[kind] = number, version.id
            loaded.append((kind, number))
        return loaded

    def score(self, profile: Mapping[str, Any]) -> dict:
        """``profile`` with ``cluster_id``, ``segment_label``, ``propensity`` and ``model_version`` set."""
        scored = dict(profile)
        x = feature_vector(profile)
        seg_version = prop_version = None
        if self.segmenter is not None and self.segmenter.ready:
            cluster = self.segmenter.predict_one(x)
            if cluster != UNASSIGNED:
                scored["cluster_id"] = int(cluster)
                scored["segment_label"] = self.segmenter.label(cluster)
                seg_version = self.versions[SEGMENTATION]
        if self.propensity is not None and self.propensity.warm:
            scored["propensity"] = float(self.propensity.score(x))
            prop_version = self.versions[PROPENSITY]
        scored["model_version"] = model_version_id(seg_version, prop_version)
        return scored


class ProfileScorer:
    """The scoring stage on one worker: serving models refreshed on their schedule, each profile scored.

    ``count(name, n)`` receives ``profiles_scored``, ``profiles_unscored``,
    ``model_refresh_failures`` and ``model_score_failures``; ``metrics`` (a
    ``PipelineMetrics``) the serving version numbers.
    """

    def __init__(self, models: ServingModels, metrics=None, count: Optional[Callable[[str, int], None]] = None):
        self.models = models
        self._metrics = metrics
        self._count = count if count is not None else _no_count

    def refresh(self) -> None:
        """Reload the serving models if due; a failed read keeps the models already loaded."""
        try:
            loaded = self.models.refresh()
        except Exception:  # noqa: BLE001 - keep scoring with the models already loaded
            self._count("model_refresh_failures", 1)
            _LOG.warning("refreshing the serving models failed; scoring with the cached ones", exc_info=True)
            return
        for kind, number in loaded:
            _LOG.info("serving %s model version %d", kind, number)
            if self._metrics is not None:
                self._metrics.model_version(kind, number)

    def score(self, profile: Mapping[str, Any]):
        """``profile`` scored by the serving models; the profile itself if scoring fails (never dropped)."""
        try:
            scored = self.models.score(profile)
        except Exception as exc:  # noqa: BLE001 - a profile is never dropped for a scoring failure
            self._count("model_score_failures", 1)
            _LOG.warning("scoring a profile failed (%s); written unscored", type(exc).__name__)
            return profile
        self._count("profiles_scored" if scored.get("model_version") else "profiles_unscored", 1)
        return scored


def _no_count(name: str, n: int) -> None:
    pass


# --------------------------------------------------------------------------- learning


@dataclass
class LearnerState:
    """Everything the learning stage keeps between batches: one snapshot (``dump_learner``) in keyed state.

    The segmenter is not here: it is refitted at each mark on the profile
    store's population (``ProfileSweep``), so it needs no per-update state.
    """

    propensity: PropensityModel = field(default_factory=PropensityModel)
    mix_drift: SegmentMixDrift = field(default_factory=SegmentMixDrift)
    error_drift: PropensityErrorDrift = field(default_factory=PropensityErrorDrift)
    profiles_seen: int = 0
    labels_seen: int = 0
    newest_ms: int = 0
    #: event time of the pending expiry timer (None: none set)
    expire_timer_ms: Optional[int] = None
    #: event time of the pending refit mark (None: none set) and of the last mark refitted
    mark_timer_ms: Optional[int] = None
    last_mark_ms: int = 0
    #: outcomes since the last publish: (label, probability at prediction) for its metrics
    recent_outcomes: list = field(default_factory=list)

    def learn(self, profile: Mapping[str, Any]) -> list[DriftEvent]:
        """Fold one scored profile update in; returns the drift events it caused.

        ``profile`` is a write the profile store applied, so it has the
        contract's ``as_of`` (schemas/contract.py) and a ``user_key``; a profile
        without either raises ``ValueError`` rather than enter the learner's
        long-lived state.
        """
        at, user_key = profile.get("as_of"), profile.get("user_key")
        if not isinstance(at, int) or isinstance(at, bool) or not isinstance(user_key, str):
            raise ValueError("profile without user_key or event time")
        x = feature_vector(profile)
        self.profiles_seen += 1
        self.newest_ms = max(self.newest_ms, at)
        events: list[DriftEvent] = []
        cluster = profile.get("cluster_id")
        if isinstance(cluster, int) and not isinstance(cluster, bool) and is_activity_update(profile):
            events += self.mix_drift.update(cluster, at)
        # A completed profile labels the points stored before it and is never
        # stored as a training point itself. Timeouts are not decided here:
        # see ``expire``.
        if completed_onboarding(profile):
            events += self._learned(self.propensity.label(user_key, 1, at))
        else:
            self.propensity.predict(user_key, x, at)
        return events

    def expire(self, watermark_ms: int) -> list[DriftEvent]:
        """Label 0 the stored points whose horizon ended before ``watermark_ms``.

        Called with the *watermark*, not the newest event time seen: a user's
        completion two days after a prediction may be processed after other
        users' newer events (a backlog, one partition ahead of another), and
        only the watermark says that every event before the horizon's end has
        been seen, so no completion can still arrive for the expired points.
        """
        return self._learned(self.propensity.expire(watermark_ms))

    def _learned(self, outcomes) -> list[DriftEvent]:
        events: list[DriftEvent] = []
        for outcome in outcomes:
            self.labels_seen += 1
            self.recent_outcomes.append((outcome.label, outcome.probability))
            events += self.error_drift.update(outcome.label, outcome.probability, outcome.labelled_at)
        del self.recent_outcomes[:-5000]
        return events

    def propensity_metrics(self) -> dict:
        """Prequential figures over the outcomes since the last publish (label vs probability at prediction)."""
        from river import metrics as river_metrics

        auc, loss = river_metrics.ROCAUC(), river_metrics.LogLoss()
        for y, p in self.recent_outcomes:
            auc.update(bool(y), {True: p, False: 1.0 - p})
            loss.update(bool(y), {True: p, False: 1.0 - p})
        labelled = len(self.recent_outcomes)
        both = labelled and 0 < sum(y for y, _ in self.recent_outcomes) < labelled
        return {"labelled": labelled, "roc_auc": float(auc.get()) if both else None,
                "log_loss": float(loss.get()) if labelled else None}


def dump_learner(learner: LearnerState) -> bytes:
    """The learner as snapshot bytes for the engine's keyed state: a format-1 pickle, engine-local.

    Read back only by the same engine's workers with the same dependencies
    (River's ADWIN state has no portable form; docs/models.md "Propensity
    snapshots"). Written after every batch, so at the fastest compression (the
    state backend may compress again); see docs/decisions.md "transforms/online_models.py".
    """
    return snapshot.dump(LEARNER_SNAPSHOT_KIND, learner, level=1)


def load_learner(data: bytes) -> LearnerState:
    return snapshot.load(LEARNER_SNAPSHOT_KIND, data)


class LearnerStep(NamedTuple):
    """What the engine does after a batch or a timer firing.

    ``drift_events``: to emit. ``expire_at`` / ``mark_at``: event time (ms) at
    which to set the label-timeout / refit-mark watermark timer (None: leave
    it). ``watch_end``: set the end-of-input timer (the end of the window).
    """

    drift_events: list
    expire_at: Optional[int] = None
    mark_at: Optional[int] = None
    watch_end: bool = False


@dataclass(frozen=True)
class LearnerSettings:
    """Where the learner's resources are and how it keeps versions (picklable configuration)."""

    redis_url: str
    warehouse_dsn: str
    warehouse_schema: str
    key_prefix: str
    segments: SegmentSettings = field(default_factory=SegmentSettings)
    keep_versions: int = 0
    keep_days: Optional[float] = None


class OnlineLearner:
    """The learning stage's decisions on one ``LearnerState``: batches and timer firings in, ``LearnerStep`` out.

    ``registry`` is a ``ModelRegistry`` (its ``store``, ``publish``, ``prune``),
    ``sweep`` a ``ProfileSweep`` (``population``, ``rescore``), ``serving`` the
    ``ServingModels`` read from the registry's store; ``tracks`` the policy
    re-applied when profiles are re-scored. ``count(name, n)`` receives the
    names of ``COUNTERS``; ``metrics`` (a ``PipelineMetrics``)
    versions, drift alarms and the unscored share.
    """

    def __init__(self, registry, sweep, serving: ServingModels, segments: SegmentSettings, tracks: TrackPolicy,
                 metrics=None, count: Optional[Callable[[str, int], None]] = None,
                 keep_versions: int = 0, keep_days: Optional[float] = None):
        self.registry = registry
        self.sweep = sweep
        self.serving = serving
        self.segments = segments
        self.tracks = tracks
        self._metrics = metrics
        self._count = count if count is not None else _no_count
        self._keep_versions = keep_versions
        self._keep_days = keep_days

    @classmethod
    def connect(cls, settings: LearnerSettings, tracks: TrackPolicy, metrics=None,
                count: Optional[Callable[[str, int], None]] = None) -> "OnlineLearner":
        """A learner on the real registry and profile store of ``settings``."""
        registry = ModelRegistry(settings.redis_url, settings.warehouse_dsn, settings.warehouse_schema,
                                 settings.key_prefix)
        return cls(registry, ProfileSweep(settings.redis_url, settings.key_prefix),
                   ServingModels(registry.store, refresh_seconds=0.0), settings.segments, tracks, metrics, count,
                   settings.keep_versions, settings.keep_days)

    def close(self) -> None:
        for resource in (self.registry, self.sweep):
            if resource is not None:
                resource.close()

    def fresh(self) -> LearnerState:
        """A learner with no state yet continues the registry's serving propensity model, if any."""
        learner = LearnerState()
        try:
            version = self.registry.store.current(PROPENSITY)
            if version is not None and version.payload is not None:
                learner.propensity = PropensityModel.from_bytes(version.payload)
                _LOG.info("the propensity learner starts from the serving version %s", version.id)
        except Exception:  # noqa: BLE001 - an unreadable registry must not stop learning
            _LOG.warning("could not start the propensity learner from the serving version; starting cold",
                         exc_info=True)
        return learner

    def learn_batch(self, learner: LearnerState, profiles) -> LearnerStep:
        """Fold a batch of applied profile writes in; re-score the ones a stale model scored."""
        watch_end = learner.profiles_seen == 0
        events: list = []
        stale = []
        self._refresh_serving()
        serving_id = model_version_id(self.serving.versions[SEGMENTATION], self.serving.versions[PROPENSITY])
        for profile in profiles:
            try:
                found = learner.learn(profile)
            except (ValueError, TypeError, KeyError) as exc:
                # Malformed updates are not learned from; the profile itself was already written.
                self._count("profiles_not_learnable", 1)
                _LOG.warning("a profile update was not learnable (%s)", type(exc).__name__)
                continue
            self._count("profiles_learned", 1)
            if serving_id is not None and profile.get("model_version") != serving_id:
                # Scored by a worker whose model cache predates the serving
                # version (or before any): written after the last sweep, so
                # re-scored here, or it would keep the old cluster until its
                # next event.
                stale.append(profile)
            events += self._drifted(found)
        if stale:
            self._rescore(stale, "stale")
        expire_at = mark_at = None
        if learner.expire_timer_ms is None and learner.newest_ms:
            # Timeouts follow the watermark (LearnerState.expire). One pending
            # timer, moved on when it fires, rather than one per batch.
            learner.expire_timer_ms = expire_at = learner.newest_ms
        if learner.mark_timer_ms is None and learner.newest_ms:
            learner.mark_timer_ms = mark_at = self.segments.next_mark(max(learner.newest_ms, learner.last_mark_ms))
        return LearnerStep(events, expire_at, mark_at, watch_end)

    def on_expire(self, learner: LearnerState, watermark_ms: int) -> LearnerStep:
        """The label-timeout timer fired at ``watermark_ms``: expire, and move the timer on if needed."""
        events = self._drifted(learner.expire(watermark_ms))
        learner.expire_timer_ms = None
        if learner.newest_ms > watermark_ms:
            learner.expire_timer_ms = learner.newest_ms
        return LearnerStep(events, expire_at=learner.expire_timer_ms)

    def on_mark(self, learner: LearnerState, at_ms: int) -> LearnerStep:
        """The watermark passed the mark ``at_ms``: every event before it is in the store.

        Refit, publish, re-score everyone; the next mark is set once events past
        this one arrive (``learn_batch``), or right away if they already have.
        A mark the input has already run a whole interval past (a backlog being
        read) is skipped once a model serves: the store is moving faster than a
        refit could describe it, and the next mark (or the end of a bounded
        input) refits on more of it.
        """
        learner.mark_timer_ms = None
        behind = learner.newest_ms >= at_ms + self.segments.refit_ms and self.serving.segmenter is not None
        if at_ms > learner.last_mark_ms and not behind:
            learner.last_mark_ms = at_ms
            self._refit_and_publish(learner, f"mark {at_ms}")
        if learner.newest_ms >= at_ms:
            learner.mark_timer_ms = self.segments.next_mark(learner.newest_ms)
        return LearnerStep([], mark_at=learner.mark_timer_ms)

    def on_end(self, learner: LearnerState) -> LearnerStep:
        """A bounded input ended: settle every horizon that ended by the newest event, then the last refit.

        Every event has been seen, so every horizon that ended by the newest
        event time is final (an expiry timer re-set in the same final watermark
        step may not have fired yet; later horizons stay open: censored, not
        negative). The store holds every user's final profile, so this fit is
        the same on every run of the same input.
        """
        events = self._drifted(learner.expire(learner.newest_ms))
        self._refit_and_publish(learner, "end of input")
        return LearnerStep(events)

    def rescore_one(self, profile: Mapping[str, Any]) -> dict:
        return self.tracks.with_track(self.serving.score(profile))

    def _drifted(self, events: list) -> list:
        for event in events:
            self._count("drift_events", 1)
            if self._metrics is not None:
                self._metrics.drift_alarm(f"adwin_{event['model_name']}")
        return events

    def _refresh_serving(self) -> None:
        try:
            for kind, number in self.serving.refresh(force=True):
                if self._metrics is not None:
                    self._metrics.model_version(kind, number)
        except Exception:  # noqa: BLE001 - keep the cached models; the next batch retries
            _LOG.warning("reading the serving model versions failed", exc_info=True)

    def _refit_and_publish(self, learner: LearnerState, reason: str) -> None:
        try:
            population = self.sweep.population()
        except Exception:  # noqa: BLE001 - learning goes on; the next mark retries
            self._count("rescore_failures", 1)
            _LOG.warning("reading the profile store for a refit failed; retried at the next mark", exc_info=True)
            return
        segmenter = self.segments.fit(population)
        self._publish(learner, segmenter, reason, len(population))
        self._refresh_serving()
        self._rescore(population, "sweep")

    def _rescore(self, profiles: list, why: str) -> None:
        if self.serving.segmenter is None and self.serving.propensity is None:
            return
        try:
            counts = self.sweep.rescore(profiles, self.rescore_one)
        except Exception:  # noqa: BLE001 - the next sweep (or the profile's next write) catches up
            self._count("rescore_failures", 1)
            _LOG.warning("re-scoring profiles (%s) failed", why, exc_info=True)
            return
        self._count("profiles_rescored", counts.rescored)
        if why == "sweep":
            _LOG.info("sweep: %d profiles, %d re-scored, %d current, %d moved on, %d without a cluster",
                      counts.profiles, counts.rescored, counts.current, counts.moved_on, counts.unscored)
            if self._metrics is not None:
                self._metrics.profiles_unscored(counts.unscored)

    def _publish(self, learner: LearnerState, segmenter: Optional[Segmenter], reason: str, population: int) -> None:
        counts = {"profiles": learner.profiles_seen, "labels": learner.labels_seen, "population": population}
        candidates = []
        if segmenter is not None:
            candidates.append((SEGMENTATION, segmenter.to_bytes(),
                               {"clusters": len(segmenter.labels()), "fitted_on": segmenter.fitted_on,
                                "sizes": {segmenter.label(c): n for c, n in segmenter.sizes().items()}}))
        if learner.propensity.warm and learner.propensity.portable:
            candidates.append((PROPENSITY, learner.propensity.to_bytes(include_pending=False),
                               learner.propensity_metrics()))
        elif learner.propensity.warm:
            # No portable snapshot (the Hoeffding tree): it keeps learning in this
            # state, and the scorers keep the version they have (docs/models.md).
            _LOG.warning("the %s propensity model has no portable snapshot; not published",
                         learner.propensity.classifier_name)
        for kind, payload, metrics in candidates:
            try:
                result = self.registry.publish(kind, payload, counts=counts, metrics=metrics,
                                               source="online", reason=reason)
            except Exception:  # noqa: BLE001 - learning goes on; the next publish retries
                self._count("model_publish_failures", 1)
                _LOG.warning("publishing the %s model failed; retried at the next publish", kind, exc_info=True)
                continue
            if result.created:
                self._count("model_versions_published", 1)
                _LOG.info("published %s model %s (serving: %s)", kind, result.version.id, result.serving)
                self._apply_retention(kind)
        learner.recent_outcomes.clear()

    def _apply_retention(self, kind: str) -> None:
        # Old versions' payloads go (models/model_registry.py ``prune``: never the
        # serving or a pinned one); a failure only delays it to the next publish.
        if self._keep_versions < 1:
            return
        try:
            pruned = self.registry.prune(kind, keep_last=self._keep_versions, keep_days=self._keep_days)
        except Exception:  # noqa: BLE001 - retention is housekeeping; learning goes on
            _LOG.warning("pruning old %s model versions failed; retried after the next publish", kind,
                         exc_info=True)
            return
        if pruned:
            self._count("model_versions_pruned", len(pruned))


#: Every name the stages pass to ``count``: the scorer's, then the learner's.
COUNTERS = (
    "profiles_scored", "profiles_unscored", "model_refresh_failures", "model_score_failures",
    "profiles_learned", "profiles_not_learnable", "model_versions_published", "model_publish_failures",
    "model_versions_pruned", "drift_events", "profiles_rescored", "rescore_failures",
)
