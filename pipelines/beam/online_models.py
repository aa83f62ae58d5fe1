"""``ScoreProfiles`` and ``LearnOnlineModels``: the online models' stages in Beam.

The decisions are ``transforms/online_models.py``'s (``ProfileScorer``,
``OnlineLearner``); these shells keep Beam's side of them:

* ``ScoreProfiles`` (every worker, in parallel): profiles in, the same
  profiles out with ``cluster_id``, ``segment_label``, ``propensity`` and
  ``model_version`` from the registry's serving snapshots (null while no model
  serves). Nothing is dropped. The serving cache is re-checked at bundle start,
  at most every ``refresh_seconds``: a worker-held refreshed side input,
  because Prism rejects triggered global-window side inputs (docs/decisions.md
  "transforms/online_models.py").
* ``LearnOnlineModels``: applied profile writes in, ``DriftEvent`` dicts
  (``schemas/drift_event.avsc``) out; refits, publishes and re-scores the
  store as side effects. One key (``LEARNER_KEY``) fed by ``GroupIntoBatches``;
  the ``LearnerState`` lives in Beam state (checkpointed with the job on
  Flink), and the learner's ``LearnerStep`` decisions become watermark timers:
  label timeouts, refit marks and the end of a bounded input.

Counters are in the ``onboardflow.models`` namespace (``COUNTERS``).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import BytesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from ...models.model_registry import DEFAULT_KEY_PREFIX, ModelStore
from ...models.segmentation import SegmentSettings
from ...models.tracks import TrackPolicy
from ...transforms.online_models import (
    LEARNER_KEY,
    LearnerSettings,
    LearnerState,
    LearnerStep,
    OnlineLearner,
    ProfileScorer,
    ServingModels,
    dump_learner,
    load_learner,
)

NAMESPACE = "onboardflow.models"


class _Counters:
    """``count(name, n)`` onto Beam counters of ``NAMESPACE``, each looked up once."""

    def __init__(self) -> None:
        self._counters: dict[str, Any] = {}

    def __call__(self, name: str, n: int) -> None:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
        counter.inc(n)


class _ScoreProfilesFn(beam.DoFn):
    def __init__(self, redis_url: str, key_prefix: str, refresh_seconds: float, metrics=None):
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._refresh_seconds = refresh_seconds
        self._metrics = metrics

    def setup(self):
        if self._metrics is not None:
            self._metrics.setup()
        self._store = ModelStore(self._redis_url, self._key_prefix)
        self._scorer = ProfileScorer(ServingModels(self._store, self._refresh_seconds), self._metrics, _Counters())

    def start_bundle(self):
        self._scorer.refresh()

    def process(self, profile):
        yield self._scorer.score(profile)

    def teardown(self):
        store = getattr(self, "_store", None)
        if store is not None:
            store.close()


class ScoreProfiles(beam.PTransform):
    """Profiles -> the same profiles with the online models' fields (module docstring)."""

    def __init__(self, redis_url: str, key_prefix: str = DEFAULT_KEY_PREFIX, refresh_seconds: float = 60.0,
                 metrics=None, label: Optional[str] = None):
        super().__init__(label)
        if refresh_seconds < 0:
            raise ValueError("refresh_seconds must be >= 0")
        self._fn = _ScoreProfilesFn(redis_url, key_prefix, refresh_seconds, metrics)

    def expand(self, profiles):
        return profiles | "Score" >> beam.ParDo(self._fn)


def _at(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


class _LearnFn(beam.DoFn):
    STATE = ReadModifyWriteStateSpec("learner", BytesCoder())
    END = TimerSpec("end_of_input", TimeDomain.WATERMARK)
    EXPIRE = TimerSpec("label_timeouts", TimeDomain.WATERMARK)
    MARK = TimerSpec("refit_mark", TimeDomain.WATERMARK)

    def __init__(self, settings: LearnerSettings, tracks: TrackPolicy, metrics=None):
        self._settings = settings
        self._tracks = tracks
        self._metrics = metrics

    def setup(self):
        if self._metrics is not None:
            self._metrics.setup()
        self._learner = OnlineLearner.connect(self._settings, self._tracks, self._metrics, _Counters())
        # (bytes last written to state, the state they encode): decode once per bundle, not per batch.
        self._decoded: Optional[tuple[bytes, LearnerState]] = None

    def _load(self, cell) -> Optional[LearnerState]:
        data = cell.read()
        if data is None:
            return None
        if self._decoded is not None and self._decoded[0] is data:
            return self._decoded[1]
        return load_learner(data)

    def _store(self, cell, learner: LearnerState) -> None:
        data = dump_learner(learner)
        cell.write(data)
        self._decoded = (data, learner)

    def process(self, batch, window=beam.DoFn.WindowParam, cell=beam.DoFn.StateParam(STATE),
                end=beam.DoFn.TimerParam(END), expire=beam.DoFn.TimerParam(EXPIRE),
                mark=beam.DoFn.TimerParam(MARK)):
        _, profiles = batch
        learner = self._load(cell) or self._learner.fresh()
        step = self._learner.learn_batch(learner, profiles)
        if step.watch_end:
            end.set(window.max_timestamp())
        self._set_timers(step, expire=expire, mark=mark)
        self._store(cell, learner)
        yield from step.drift_events

    @on_timer(EXPIRE)
    def on_expire(self, fired=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(STATE),
                  expire=beam.DoFn.TimerParam(EXPIRE)):
        learner = self._load(cell)
        if learner is None:
            return
        step = self._learner.on_expire(learner, fired.micros // 1000)
        self._set_timers(step, expire=expire)
        self._store(cell, learner)
        yield from step.drift_events

    @on_timer(MARK)
    def on_mark(self, fired=beam.DoFn.TimestampParam, cell=beam.DoFn.StateParam(STATE),
                mark=beam.DoFn.TimerParam(MARK)):
        learner = self._load(cell)
        if learner is None:
            return
        step = self._learner.on_mark(learner, fired.micros // 1000)
        self._set_timers(step, mark=mark)
        self._store(cell, learner)
        yield from step.drift_events

    @on_timer(END)
    def on_end(self, cell=beam.DoFn.StateParam(STATE)):
        learner = self._load(cell)
        if learner is None:
            return
        step = self._learner.on_end(learner)
        self._store(cell, learner)
        yield from step.drift_events

    @staticmethod
    def _set_timers(step: LearnerStep, expire=None, mark=None) -> None:
        if step.expire_at is not None:
            expire.set(_at(step.expire_at))
        if step.mark_at is not None:
            mark.set(_at(step.mark_at))

    def teardown(self):
        learner = getattr(self, "_learner", None)
        if learner is not None:
            learner.close()


class LearnOnlineModels(beam.PTransform):
    """Applied profile writes -> drift events; refits, publishes and re-scores as side effects.

    In: profile dicts as the Redis writer applied them (``user_key``, an event
    time in ``as_of``, the features of ``models/features.py``; ``cluster_id``
    when a segmenter is serving). Out: ``DriftEvent`` dicts when ADWIN detects
    a change in the segment mix or in the propensity error. Updates without a
    user key or event time are counted (``profiles_not_learnable``) and not
    learned from; they were written to Redis before this stage, so nothing is
    lost. ``tracks``: the compiled tracks policy re-applied on re-scoring
    (default: the packaged one).
    """

    def __init__(self, redis_url: str, warehouse_dsn: str, warehouse_schema: str,
                 key_prefix: str = DEFAULT_KEY_PREFIX, segments: SegmentSettings = SegmentSettings(),
                 tracks: Optional[TrackPolicy] = None, batch_size: int = 500,
                 max_batch_seconds: float = 2.0, metrics=None, keep_versions: int = 0,
                 keep_days: Optional[float] = None, label: Optional[str] = None):
        super().__init__(label)
        if batch_size < 1 or max_batch_seconds <= 0 or keep_versions < 0:
            raise ValueError("batch_size >= 1, max_batch_seconds > 0 and keep_versions >= 0 required")
        self._batch_size = batch_size
        self._max_batch_seconds = max_batch_seconds
        settings = LearnerSettings(redis_url, warehouse_dsn, warehouse_schema, key_prefix, segments,
                                   keep_versions, keep_days)
        self._fn = _LearnFn(settings, tracks if tracks is not None else TrackPolicy.from_yaml(), metrics)

    def expand(self, profiles):
        return (
            profiles
            | "OneLearner" >> beam.Map(lambda p: (LEARNER_KEY, p)).with_output_types(Tuple[str, Any])
            | "Batch" >> beam.GroupIntoBatches(self._batch_size, max_buffering_duration_secs=self._max_batch_seconds)
            | "Learn" >> beam.ParDo(self._fn)
        )
