"""Online models in the pipeline: scoring in parallel, learning in one keyed stage.

Two transforms, one job each (docs/architecture.md, docs/models.md)::

    profiles ─► ScoreProfiles ─► (AssignOnboardingTracks) ─► Redis / warehouse
                                                                │ applied writes
                                                                ▼
              model registry ◄── publish ── LearnOnlineModels ─► drift events (Kafka + warehouse)
                (serving)                      │ at event-time marks: refit the segmenter on the
                                               ▼ profile store, publish, re-score every profile
                                        transforms/rescore.py

* ``ScoreProfiles`` runs on every worker in parallel. It reads the *serving*
  snapshots of the segmenter and the propensity model from the registry's Redis
  copy (``models/model_registry.py`` ModelStore) and keeps them in a per-process cache
  that re-checks the serving version at most every ``refresh_seconds``: a
  periodically refreshed side input, held by the worker rather than by the
  runner, because Prism rejects triggered global-window side inputs
  (apache/beam#31438; the same choice as the accounts enrichment). A rollback
  (`onboardflow models rollback`) is therefore picked up by every worker within
  ``refresh_seconds``. Before any model is published, profiles pass through
  unscored (model fields null).

* ``LearnOnlineModels`` follows the profiles Redis accepted. One keyed stage on
  a single key, fed by ``GroupIntoBatches``: the propensity model (River)
  stores point-in-time features and trains on delayed labels (completion when
  ``onboarding_progress`` reaches 1, a timeout otherwise, both in event time,
  timeouts on a watermark timer so a completion processed late is never
  pre-empted by a premature negative), and ADWIN watches the segment mix and
  the propensity error. The segmenter is refitted at **event-time marks**
  (every ``SegmentSettings.refit_ms``, multiples since the epoch; a watermark
  timer) and at the end of a bounded input, on the population the profile
  store holds (``ProfileSweep``); both models are then published and every
  stored profile is re-scored, so nobody waits for their next event to get
  a cluster. Nothing depends on bundles or processing time: the same input
  gives the same segments (docs/models.md "Reproducible segments"). A profile
  that reaches the learner scored by an older model than the serving one (a
  worker's cache was behind) is re-scored on the spot. The learner's state
  lives in Beam state, so on Flink it is checkpointed with the rest of the
  job.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from ..models import snapshot
from ..models.drift import DriftEvent, PropensityErrorDrift, SegmentMixDrift
from ..models.features import feature_vector, is_activity_update
from ..models.model_registry import DEFAULT_KEY_PREFIX, ModelRegistry, ModelStore
from ..models.propensity import PropensityModel
from ..models.segmentation import UNASSIGNED, Segmenter, SegmentSettings

_LOG = logging.getLogger(__name__)
_NAMESPACE = "onboardflow.models"

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


def _event_time_ms(profile: Mapping[str, Any]) -> Optional[int]:
    for name in ("as_of", "updated_at", "last_event_at"):
        value = profile.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


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


class _ScoreProfilesFn(beam.DoFn):
    def __init__(self, redis_url: str, key_prefix: str, refresh_seconds: float, metrics=None):
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._refresh_seconds = refresh_seconds
        self._metrics = metrics
        self._scored = Metrics.counter(_NAMESPACE, "profiles_scored")
        self._unscored = Metrics.counter(_NAMESPACE, "profiles_unscored")
        self._refresh_failures = Metrics.counter(_NAMESPACE, "model_refresh_failures")
        self._score_failures = Metrics.counter(_NAMESPACE, "model_score_failures")

    def setup(self):
        if self._metrics is not None:
            self._metrics.setup()
        self._store = ModelStore(self._redis_url, self._key_prefix)
        self._models = ServingModels(self._store, self._refresh_seconds)

    def start_bundle(self):
        try:
            loaded = self._models.refresh()
        except Exception:  # noqa: BLE001 - keep scoring with the models already loaded
            self._refresh_failures.inc()
            _LOG.warning("refreshing the serving models failed; scoring with the cached ones", exc_info=True)
            return
        for kind, number in loaded:
            _LOG.info("serving %s model version %d", kind, number)
            if self._metrics is not None:
                self._metrics.model_version(kind, number)

    def process(self, profile):
        try:
            scored = self._models.score(profile)
        except Exception as exc:  # noqa: BLE001 - a profile is never dropped for a scoring failure
            self._score_failures.inc()
            _LOG.warning("scoring a profile failed (%s); written unscored", type(exc).__name__)
            yield profile
            return
        (self._scored if scored.get("model_version") else self._unscored).inc()
        yield scored

    def teardown(self):
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


class ScoreProfiles(beam.PTransform):
    """Profiles -> the same profiles with the online models' fields.

    In: profile dicts (after rule segments). Out: one dict per input with
    ``cluster_id``, ``segment_label``, ``propensity`` and ``model_version`` set
    from the registry's serving snapshots (null while no model is serving or
    the model is still warming up). Nothing is dropped: a profile that cannot
    be scored goes out unscored and is counted (``model_score_failures``).
    """

    def __init__(self, redis_url: str, key_prefix: str = DEFAULT_KEY_PREFIX, refresh_seconds: float = 60.0,
                 metrics=None, label: Optional[str] = None):
        super().__init__(label)
        if refresh_seconds < 0:
            raise ValueError("refresh_seconds must be >= 0")
        self._fn = _ScoreProfilesFn(redis_url, key_prefix, refresh_seconds, metrics)

    def expand(self, profiles):
        return profiles | "Score" >> beam.ParDo(self._fn)


# --------------------------------------------------------------------------- learning


@dataclass
class LearnerState:
    """Everything the learning stage keeps between batches (one snapshot in Beam state).

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
        """Fold one scored profile update in; returns the drift events it caused."""
        at = _event_time_ms(profile)
        user_key = profile.get("user_key")
        if at is None or not isinstance(user_key, str):
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


class _LearnFn(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("learner", BytesCoder())
    END = TimerSpec("end_of_input", TimeDomain.WATERMARK)
    EXPIRE = TimerSpec("label_timeouts", TimeDomain.WATERMARK)
    MARK = TimerSpec("refit_mark", TimeDomain.WATERMARK)

    def __init__(self, redis_url: str, warehouse_dsn: str, warehouse_schema: str, key_prefix: str,
                 segments: SegmentSettings, tracks: tuple, metrics=None,
                 keep_versions: int = 0, keep_days: Optional[float] = None):
        self._keep_versions = keep_versions
        self._keep_days = keep_days
        self._redis_url = redis_url
        self._dsn = warehouse_dsn
        self._schema = warehouse_schema
        self._key_prefix = key_prefix
        self._segments = segments
        # The tracks policy travels as its text (models/tracks.py policy_source), re-assigned on re-scoring.
        self._tracks_source = tracks
        self._metrics = metrics
        self._learned = Metrics.counter(_NAMESPACE, "profiles_learned")
        self._rejected = Metrics.counter(_NAMESPACE, "profiles_not_learnable")
        self._published = Metrics.counter(_NAMESPACE, "model_versions_published")
        self._publish_failures = Metrics.counter(_NAMESPACE, "model_publish_failures")
        self._pruned = Metrics.counter(_NAMESPACE, "model_versions_pruned")
        self._drifts = Metrics.counter(_NAMESPACE, "drift_events")
        self._rescored = Metrics.counter(_NAMESPACE, "profiles_rescored")
        self._sweep_failures = Metrics.counter(_NAMESPACE, "rescore_failures")

    def setup(self):
        from ..models.tracks import TrackPolicy
        from .rescore import ProfileSweep

        if self._metrics is not None:
            self._metrics.setup()
        self._registry = ModelRegistry(self._redis_url, self._dsn, self._schema, self._key_prefix)
        self._serving = ServingModels(self._registry.store, refresh_seconds=0.0)
        self._sweep = ProfileSweep(self._redis_url, self._key_prefix)
        self._tracks = TrackPolicy.from_text(*self._tracks_source)
        # (bytes last written to state, the state they encode): decode once per bundle, not per batch.
        self._decoded: Optional[tuple[bytes, LearnerState]] = None

    def _load(self, cell) -> LearnerState:
        data = cell.read()
        if data is None:
            return self._fresh()
        if self._decoded is not None and self._decoded[0] is data:
            return self._decoded[1]
        return snapshot.load(LEARNER_SNAPSHOT_KIND, data)

    def _fresh(self) -> LearnerState:
        """A learner with no state yet continues the registry's serving propensity model, if any."""
        learner = LearnerState()
        try:
            version = self._registry.store.current(PROPENSITY)
            if version is not None and version.payload is not None:
                learner.propensity = PropensityModel.from_bytes(version.payload)
                _LOG.info("the propensity learner starts from the serving version %s", version.id)
        except Exception:  # noqa: BLE001 - an unreadable registry must not stop learning
            _LOG.warning("could not start the propensity learner from the serving version; starting cold",
                         exc_info=True)
        return learner

    def _store(self, cell, learner: LearnerState) -> None:
        # Written after every batch: the fastest compression (the state
        # backend may compress again). With 50,000 users awaiting labels the
        # checkpoint is ~15 MB and takes ~0.8 s to write at level 1 vs ~1.4 s
        # at level 6 (tests/benchmarks/bench_models.py): at that scale the
        # learner's throughput is bounded by this, see docs/models.md.
        data = snapshot.dump(LEARNER_SNAPSHOT_KIND, learner, level=1)
        cell.write(data)
        self._decoded = (data, learner)

    def _rescore_one(self, profile: Mapping[str, Any]) -> dict:
        return self._tracks.with_track(self._serving.score(profile))

    def process(self, batch, window=beam.DoFn.WindowParam, cell=beam.DoFn.StateParam(STATE),
                end=beam.DoFn.TimerParam(END), expire=beam.DoFn.TimerParam(EXPIRE),
                mark=beam.DoFn.TimerParam(MARK)):
        _, profiles = batch
        learner = self._load(cell)
        if learner.profiles_seen == 0:
            end.set(window.max_timestamp())
        stale = []
        self._refresh_serving()
        serving_id = model_version_id(self._serving.versions[SEGMENTATION], self._serving.versions[PROPENSITY])
        for profile in profiles:
            try:
                events = learner.learn(profile)
            except (ValueError, TypeError, KeyError) as exc:
                # Malformed updates are not learned from; the profile itself was already written.
                self._rejected.inc()
                _LOG.warning("a profile update was not learnable (%s)", type(exc).__name__)
                continue
            self._learned.inc()
            if serving_id is not None and profile.get("model_version") != serving_id:
                # Scored by a worker whose model cache predates the serving
                # version (or before any): written after the last sweep, so
                # re-scored here, or it would keep the old cluster until its
                # next event.
                stale.append(profile)
            for event in events:
                self._drift(event)
                yield event
        if stale:
            self._rescore(stale, "stale")
        if learner.expire_timer_ms is None and learner.newest_ms:
            # Timeouts follow the watermark (LearnerState.expire). One pending
            # timer, moved on when it fires, rather than one per batch.
            learner.expire_timer_ms = learner.newest_ms
            expire.set(Timestamp(micros=learner.newest_ms * 1000))
        if learner.mark_timer_ms is None and learner.newest_ms:
            learner.mark_timer_ms = self._segments.next_mark(max(learner.newest_ms, learner.last_mark_ms))
            mark.set(Timestamp(micros=learner.mark_timer_ms * 1000))
        self._store(cell, learner)

    @on_timer(EXPIRE)
    def on_expire(self, fired=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(STATE),
                  expire=beam.DoFn.TimerParam(EXPIRE)):
        data = cell.read()
        if data is None:
            return
        learner = self._load(cell)
        watermark_ms = fired.micros // 1000
        for event in learner.expire(watermark_ms):
            self._drift(event)
            yield event
        learner.expire_timer_ms = None
        if learner.newest_ms > watermark_ms:
            learner.expire_timer_ms = learner.newest_ms
            expire.set(Timestamp(micros=learner.newest_ms * 1000))
        self._store(cell, learner)

    @on_timer(MARK)
    def on_mark(self, fired=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(STATE),
                mark=beam.DoFn.TimerParam(MARK)):
        # The watermark passed a mark: every event before it is in the store.
        # Refit, publish, re-score everyone; the next mark is set once events
        # past this one arrive (process), or right away if they already have.
        data = cell.read()
        if data is None:
            return
        learner = self._load(cell)
        at = fired.micros // 1000
        learner.mark_timer_ms = None
        # A mark the input has already run a whole interval past (a backlog
        # being read) is skipped once a model serves: the store is moving
        # faster than a refit could describe it, and the next mark (or the end
        # of a bounded input) refits on more of it.
        behind = learner.newest_ms >= at + self._segments.refit_ms and self._serving.segmenter is not None
        if at > learner.last_mark_ms and not behind:
            learner.last_mark_ms = at
            self._refit_and_publish(learner, f"mark {at}")
        if learner.newest_ms >= at:
            learner.mark_timer_ms = self._segments.next_mark(learner.newest_ms)
            mark.set(Timestamp(micros=learner.mark_timer_ms * 1000))
        self._store(cell, learner)

    @on_timer(END)
    def on_end(self, cell=beam.DoFn.StateParam(STATE)):
        # The input is bounded and ended: every event has been seen, so every
        # horizon that ended by the newest event time is final (an expiry timer
        # re-set in the same final watermark step may not have fired yet; later
        # horizons stay open: censored, not negative). Then the last mark: the
        # store holds every user's final profile, so this fit is the same on
        # every run of the same input.
        data = cell.read()
        if data is None:
            return
        learner = self._load(cell)
        for event in learner.expire(learner.newest_ms):
            self._drift(event)
            yield event
        self._refit_and_publish(learner, "end of input")
        self._store(cell, learner)

    def _drift(self, event: DriftEvent) -> None:
        self._drifts.inc()
        if self._metrics is not None:
            self._metrics.drift_alarm(f"adwin_{event['model_name']}")

    def _refresh_serving(self) -> None:
        try:
            for kind, number in self._serving.refresh(force=True):
                if self._metrics is not None:
                    self._metrics.model_version(kind, number)
        except Exception:  # noqa: BLE001 - keep the cached models; the next batch retries
            _LOG.warning("reading the serving model versions failed", exc_info=True)

    def _refit_and_publish(self, learner: LearnerState, reason: str) -> None:
        try:
            population = self._sweep.population()
        except Exception:  # noqa: BLE001 - learning goes on; the next mark retries
            self._sweep_failures.inc()
            _LOG.warning("reading the profile store for a refit failed; retried at the next mark", exc_info=True)
            return
        segmenter = self._segments.fit(population)
        self._publish(learner, segmenter, reason, len(population))
        self._refresh_serving()
        self._rescore(population, "sweep")

    def _rescore(self, profiles: list, why: str) -> None:
        if self._serving.segmenter is None and self._serving.propensity is None:
            return
        try:
            counts = self._sweep.rescore(profiles, self._rescore_one)
        except Exception:  # noqa: BLE001 - the next sweep (or the profile's next write) catches up
            self._sweep_failures.inc()
            _LOG.warning("re-scoring profiles (%s) failed", why, exc_info=True)
            return
        self._rescored.inc(counts.rescored)
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
        if learner.propensity.warm:
            candidates.append((PROPENSITY, learner.propensity.to_bytes(include_pending=False),
                               learner.propensity_metrics()))
        for kind, payload, metrics in candidates:
            try:
                result = self._registry.publish(kind, payload, counts=counts, metrics=metrics,
                                                source="online", reason=reason)
            except Exception:  # noqa: BLE001 - learning goes on; the next publish retries
                self._publish_failures.inc()
                _LOG.warning("publishing the %s model failed; retried at the next publish", kind, exc_info=True)
                continue
            if result.created:
                self._published.inc()
                _LOG.info("published %s model %s (serving: %s)", kind, result.version.id, result.serving)
                self._apply_retention(kind)
        learner.recent_outcomes.clear()

    def _apply_retention(self, kind: str) -> None:
        # Old versions' payloads go (models/model_registry.py ``prune``: never the
        # serving or a pinned one); a failure only delays it to the next publish.
        if self._keep_versions < 1:
            return
        try:
            pruned = self._registry.prune(kind, keep_last=self._keep_versions, keep_days=self._keep_days)
        except Exception:  # noqa: BLE001 - retention is housekeeping; learning goes on
            _LOG.warning("pruning old %s model versions failed; retried after the next publish", kind,
                         exc_info=True)
            return
        if pruned:
            self._pruned.inc(len(pruned))

    def teardown(self):
        for name in ("_registry", "_sweep"):
            resource = getattr(self, name, None)
            if resource is not None:
                resource.close()


class LearnOnlineModels(beam.PTransform):
    """Applied profile writes -> drift events; refits, publishes and re-scores as side effects.

    In: profile dicts as the Redis writer applied them (``user_key``, an event
    time in ``as_of``, the features of ``models/features.py``; ``cluster_id``
    when a segmenter is serving). Out: ``DriftEvent`` dicts
    (``schemas/drift_event.avsc``) when ADWIN detects a change in the segment
    mix or in the propensity error. At every event-time mark
    (``segments.refit_ms``) and at the end of a bounded input the segmenter
    is refitted on the profile store, both models are published, and every
    stored profile is re-scored (``transforms/rescore.py``). Updates without a
    user key or event time are counted (``profiles_not_learnable``) and not
    learned from; they were written to Redis before this stage, so nothing is
    lost.
    """

    def __init__(self, redis_url: str, warehouse_dsn: str, warehouse_schema: str,
                 key_prefix: str = DEFAULT_KEY_PREFIX, segments: SegmentSettings = SegmentSettings(),
                 tracks_path=None, rules_path: Optional[str] = None, batch_size: int = 500,
                 max_batch_seconds: float = 2.0, metrics=None, keep_versions: int = 0,
                 keep_days: Optional[float] = None, label: Optional[str] = None):
        from ..models.tracks import TrackPolicy, policy_source

        super().__init__(label)
        if batch_size < 1 or max_batch_seconds <= 0 or keep_versions < 0:
            raise ValueError("batch_size >= 1, max_batch_seconds > 0 and keep_versions >= 0 required")
        self._batch_size = batch_size
        self._max_batch_seconds = max_batch_seconds
        tracks = policy_source(tracks_path, rules_path)
        TrackPolicy.from_text(*tracks)  # a bad policy fails here, at construction, not on a worker
        self._fn = _LearnFn(redis_url, warehouse_dsn, warehouse_schema, key_prefix, segments, tracks, metrics,
                            keep_versions, keep_days)

    def expand(self, profiles):
        return (
            profiles
            | "OneLearner" >> beam.Map(lambda p: (LEARNER_KEY, p)).with_output_types(Tuple[str, Any])
            | "Batch" >> beam.GroupIntoBatches(self._batch_size, max_buffering_duration_secs=self._max_batch_seconds)
            | "Learn" >> beam.ParDo(self._fn)
        )
