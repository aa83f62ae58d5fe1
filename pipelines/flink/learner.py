"""``LearnerStage``: the online models' learning stage on Flink, and the sink watermark.

In (one key, parallelism 1): the user stage's ``(APPLIED, profile)`` for each
profile write Redis applied, and its ``(MARK, subtask, subtasks, W)`` after
each flush that covers event time W. Out: nothing; drift events go to the
warehouse's ``drift_events`` table and the model-events topic from here.

The decisions are ``OnlineLearner``'s (transforms/online_models.py), as in
Beam's ``LearnOnlineModels``: profiles are folded in batches of
``model_batch_size`` (kept in a ``ListState`` until learnt, so a checkpoint
holds them; a processing-time timer learns a partial batch after
``max_batch_seconds``), the ``LearnerState`` is one ``ValueState`` snapshot
written after every batch and timer, and the learner's ``LearnerStep``
timers become event-time timers (label timeouts, refit marks, the end of a
bounded input). A pending batch is learnt before any of those timers acts.

The sink watermark: the minimum of the newest W each user-stage subtask
reported, recorded in Redis (``SinkWatermark``, transforms/progress.py)
once every subtask has reported, capped at a bounded run's horizon.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext, TimeDomain
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from ...models.segmentation import SegmentSettings
from ...models.tracks import DEFAULT_TRACKS_PATH, TrackPolicy
from ...transforms.connections import redis_client
from ...transforms.kafka.sink import KafkaSink, sink_producer_config
from ...transforms.online_models import (
    LearnerSettings,
    LearnerState,
    LearnerStep,
    OnlineLearner,
    dump_learner,
    load_learner,
)
from ...transforms.progress import SinkWatermark
from ...transforms.warehouse import rows
from ...transforms.warehouse.sink import WarehouseSink
from ..configuration import drift_event_kv, load_rules
from .metrics import Counters, flink_pipeline_metrics
from .settings import JobSettings, horizon
from .users import APPLIED, END_OF_INPUT_MS

_LOG = logging.getLogger(__name__)
MAX_BATCH_SECONDS = 2.0


class LearnerStage(KeyedProcessFunction):
    """See the module docstring."""

    def __init__(self, settings: JobSettings):
        self._settings = settings

    def open(self, runtime_context: RuntimeContext):
        s = self._settings
        self._count = Counters(runtime_context, "models")
        self._metric_counts = Counters(runtime_context)
        self._metrics = flink_pipeline_metrics(self._metric_counts, s)
        self._enabled = not s.disable_online_models
        self._state = runtime_context.get_state(ValueStateDescriptor("learner", Types.PICKLED_BYTE_ARRAY()))
        self._batch = runtime_context.get_list_state(ListStateDescriptor("batch", Types.PICKLED_BYTE_ARRAY()))
        self._batched: Optional[int] = None  # profiles in ``_batch``; read from state once after a restore
        self._batch_size = int(s.model_batch_size)
        self._learner: Optional[LearnerState] = None
        self._client = redis_client(s.redis_url, socket_timeout=30, socket_connect_timeout=10)
        self._sink_watermark = SinkWatermark(s.redis_key_prefix)
        self._marks: dict[int, int] = {}
        self._cap = horizon(s)
        if not self._enabled:
            return
        rules = load_rules(s)
        tracks = TrackPolicy.from_yaml(s.tracks_file or DEFAULT_TRACKS_PATH, rules)
        segments = SegmentSettings(refit_ms=int(s.model_refit_hours * 3_600_000), n_clusters=s.segment_clusters,
                                   min_users=s.segment_min_users)
        self._online = OnlineLearner.connect(
            LearnerSettings(s.redis_url, s.warehouse_dsn, s.warehouse_schema, s.redis_key_prefix, segments,
                            s.model_keep_versions, s.model_keep_days or None),
            tracks, self._metrics, self._count)
        self._drift_rows = WarehouseSink(s.warehouse_dsn, rows.DRIFT_EVENTS, s.warehouse_schema, 1000,
                                         metrics=self._metrics, count=self._count)
        self._drift_topic = KafkaSink(s.kafka_bootstrap_servers, s.model_events_topic, sink_producer_config(),
                                      count=self._count)
        self._encode_drift = drift_event_kv(s.registry_url)
        for sink in (self._drift_rows, self._drift_topic):
            sink.open()

    def close(self):
        if getattr(self, "_enabled", False):
            for sink in (self._drift_rows, self._drift_topic):
                sink.close()
            self._online.close()
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()
            self._count.push()
            self._metric_counts.push()

    # -- elements ----------------------------------------------------------------

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        if value[0] != APPLIED:
            self._mark(*value[1:])
            return
        if not self._enabled:
            return
        self._batch.add(value[1])
        if self._batched is None:
            self._batched = sum(1 for _ in self._batch.get())
        else:
            self._batched += 1
        if self._batched == 1:
            timers = ctx.timer_service()
            timers.register_processing_time_timer(timers.current_processing_time() + int(MAX_BATCH_SECONDS * 1000))
        if self._batched >= self._batch_size:
            self._learn_batch(ctx.timer_service())

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        if not self._enabled:
            return
        timers = ctx.timer_service()
        self._learn_batch(timers)
        if ctx.time_domain() == TimeDomain.PROCESSING_TIME:
            return
        learner = self._load()
        if learner is None:
            return
        if timestamp == END_OF_INPUT_MS:
            self._apply(self._online.on_end(learner), learner, timers)
            return
        if learner.expire_timer_ms == timestamp:
            self._apply(self._online.on_expire(learner, timestamp), learner, timers)
        if learner.mark_timer_ms == timestamp:
            self._apply(self._online.on_mark(learner, timestamp), learner, timers)

    # -- learning ----------------------------------------------------------------

    def _load(self) -> Optional[LearnerState]:
        if self._learner is None:
            data = self._state.value()
            self._learner = load_learner(data) if data is not None else None
        return self._learner

    def _learn_batch(self, timers) -> None:
        profiles = list(self._batch.get() or ())
        if not profiles:
            return
        learner = self._load() or self._online.fresh()
        self._learner = learner
        step = self._online.learn_batch(learner, profiles)
        self._batch.clear()
        self._batched = 0
        if step.watch_end and not self._settings.streaming():
            timers.register_event_time_timer(END_OF_INPUT_MS)
        self._apply(step, learner, timers)

    def _apply(self, step: LearnerStep, learner: LearnerState, timers) -> None:
        if step.expire_at is not None:
            timers.register_event_time_timer(step.expire_at)
        if step.mark_at is not None:
            timers.register_event_time_timer(step.mark_at)
        self._state.update(dump_learner(learner))
        if step.drift_events:
            self._publish(step.drift_events)

    def _publish(self, events: list) -> None:
        """Drift events to the warehouse and the model-events topic, before the next checkpoint can pass."""
        for event in events:
            self._drift_rows.add(event)
            self._drift_topic.add(self._encode_drift(event))
        for sink in (self._drift_rows, self._drift_topic):
            for record in sink.flush():
                if record.rejection is not None:
                    self._count("drift_events_refused", 1)
                    _LOG.error("a drift event was refused by %s (%s)", sink.stage, record.rejection[0])

    # -- the sink watermark ------------------------------------------------------------

    def _mark(self, subtask: int, subtasks: int, watermark_ms: int) -> None:
        self._marks[subtask] = max(self._marks.get(subtask, watermark_ms), watermark_ms)
        if len(self._marks) < subtasks:
            return
        low = min(self._marks.values())
        if self._cap is not None:
            low = min(low, self._cap)
        elif low >= END_OF_INPUT_MS:
            return
        self._sink_watermark.record(self._client, low, time.time_ns() // 1_000_000)
