"""Beam shell of the profile stage: ``BuildUserProfiles``, anonymized events in, ``ProfileUpdate`` out.

The stage's logic is ``ProfileMachine`` (``transforms/profile.py``); this
module keys events by ``user_key`` and carries out the machine's decisions on
Beam: the user's state in one ``ReadModifyWriteState`` cell (the
``UserProfileState.to_primitive`` tuple, ``FastPrimitivesCoder``), its two
event-time timers, the ``too_late`` and ``dead_letter`` outputs, and one
``ProfileUpdate(previous, current)`` per user touched in a bundle (a burst of
one user's events yields one update), timestamped at the profile's ``as_of``.
Counters (namespace ``onboardflow``): ``duplicates_dropped``,
``too_late_events``, ``profile_dead_letter``, ``future_events``,
``lifecycle_timers_fired``, ``lifecycle_timers_beyond_clock``,
``profile_state_expired``, ``profile_updates_emitted``. Why one keyed stage for
every per-user concern: docs/decisions.md (``transforms/profile.py``).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from ...schemas.records import ProfileUpdate
from ...transforms.connections import redis_client
from ...transforms.dead_letter import pipeline_dead_letter
from ...transforms.erasure import ErasedUsers
from ...transforms.metrics import PipelineMetrics
from ...transforms.profile import (
    BEYOND_CLOCK,
    ERASED,
    LIFECYCLE,
    OCCURRED_IN_THE_FUTURE,
    PROBE,
    ClearState,
    DeadLetter,
    Duplicate,
    Emit,
    LifecycleHeld,
    ProfileConfig,
    ProfileMachine,
    SetTimer,
    Store,
    TooLate,
    UserProfileState,
    unusable,
)
from ...transforms.profile_store.keys import ProfileKeys
from .metrics import beam_pipeline_metrics

#: Output tags of ``BuildUserProfiles``.
TOO_LATE = "too_late"
DEAD_LETTER = "dead_letter"


def _ts(ms: int) -> Timestamp:
    # From integer micros: float seconds would round some millis down by one.
    return Timestamp(micros=ms * 1000)


def _ms(ts: Timestamp) -> int:
    return ts.micros // 1000


def _dead_letter(reason: str, detail: str, event: Any) -> dict:
    return pipeline_dead_letter("profile", reason, detail, event)


class _KeyByUserFn(beam.DoFn):
    """Usable events -> (user_key, event); the rest -> dead letters."""

    def __init__(self):
        self._dead_letters = Metrics.counter("onboardflow", "profile_dead_letter")

    def process(self, event):
        problem = unusable(event)
        if problem is not None:
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, _dead_letter(*problem, event))
            return
        yield event["user_key"], event


class _UserProfileFn(beam.DoFn):
    """(user_key, event) in; the machine's decisions carried out on Beam state, timers and outputs."""

    # The names are the state's identity in a running job: keep them.
    PROFILE_STATE = ReadModifyWriteStateSpec("profile", FastPrimitivesCoder())
    LIFECYCLE_TIMER = TimerSpec(LIFECYCLE, TimeDomain.WATERMARK)
    PROBE_TIMER = TimerSpec(PROBE, TimeDomain.WATERMARK)

    def __init__(self, config: ProfileConfig, metrics: Optional[PipelineMetrics] = None,
                 erased_from: Optional[tuple[str, str]] = None):
        self._config = config
        self._metrics = metrics or beam_pipeline_metrics(prometheus=False)
        self._erased_from = erased_from

    def setup(self):
        self._client = None
        erased = None
        if self._erased_from is not None:
            redis_url, key_prefix = self._erased_from
            self._client = redis_client(redis_url, socket_timeout=30, socket_connect_timeout=10)
            erased = ErasedUsers(self._client, ProfileKeys(key_prefix))
        self._machine = ProfileMachine(self._config, erased=erased)
        self._metrics.setup()
        self._duplicates = Metrics.counter("onboardflow", "duplicates_dropped")
        self._too_late = Metrics.counter("onboardflow", "too_late_events")
        self._dead_letters = Metrics.counter("onboardflow", "profile_dead_letter")
        self._lifecycle = Metrics.counter("onboardflow", "lifecycle_timers_fired")
        self._expired = Metrics.counter("onboardflow", "profile_state_expired")
        self._erased = Metrics.counter("onboardflow", "erased_state_cleared")
        self._emitted = Metrics.counter("onboardflow", "profile_updates_emitted")
        self._future = Metrics.counter("onboardflow", "future_events")
        self._beyond_clock = Metrics.counter("onboardflow", "lifecycle_timers_beyond_clock")

    def start_bundle(self):
        # (user_key, window) -> (previous profile, current profile): one update per user per bundle.
        # Keyed with the window too: state and timers are per key *and* window.
        self._pending: dict[tuple[str, Any], tuple[Optional[dict], dict]] = {}
        # (user_key, window) -> (the primitive last written to the cell, its decoded state):
        # a state is decoded once per bundle, not once per event. Identity with
        # what the cell returns proves the cached state is the cell's value.
        self._decoded: dict[tuple[str, Any], tuple[tuple, UserProfileState]] = {}

    def _load(self, cell, user_key: str, window) -> Optional[UserProfileState]:
        data = cell.read()
        if data is None:
            return None
        cached = self._decoded.get((user_key, window))
        if cached is not None and cached[0] is data:
            return cached[1]
        return self._machine.load(data)

    def _carry_out(self, decisions, user_key: str, window, cell, timers: dict, event=None):
        """Map the machine's decisions onto Beam; yields the tagged outputs."""
        for d in decisions:
            kind = type(d)
            if kind is Store:
                data = d.state.to_primitive()
                cell.write(data)
                self._decoded[(user_key, window)] = (data, d.state)
            elif kind is SetTimer:
                timers[d.timer].set(_ts(d.at_ms))  # a Beam timer replaces its pending firing
            elif kind is Emit:
                if d.cause == LIFECYCLE:
                    self._lifecycle.inc()
                pending = self._pending.get((user_key, window))
                self._pending[(user_key, window)] = (pending[0] if pending else d.previous, d.current)
            elif kind is Duplicate:
                self._duplicates.inc()
                self._metrics.duplicates(1)
            elif kind is TooLate:
                self._too_late.inc()
                self._metrics.late(1)
                yield beam.pvalue.TaggedOutput(TOO_LATE, event)
            elif kind is DeadLetter:
                self._dead_letters.inc()
                if d.reason == OCCURRED_IN_THE_FUTURE:
                    self._future.inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, _dead_letter(d.reason, d.detail, event))
            elif kind is ClearState:
                if d.reason == ERASED:
                    self._erased.inc()
                    self._pending.pop((user_key, window), None)  # nothing of an erased user goes out
                else:
                    self._expired.inc()
                cell.clear()
                self._decoded.pop((user_key, window), None)
            elif kind is LifecycleHeld:
                if d.reason == BEYOND_CLOCK:
                    self._beyond_clock.inc()

    def process(
        self,
        element,
        window=beam.DoFn.WindowParam,
        cell=beam.DoFn.StateParam(PROFILE_STATE),
        lifecycle=beam.DoFn.TimerParam(LIFECYCLE_TIMER),
        probe=beam.DoFn.TimerParam(PROBE_TIMER),
    ):
        user_key, event = element
        decisions = self._machine.on_event(self._load(cell, user_key, window), event)
        yield from self._carry_out(decisions, user_key, window, cell, {LIFECYCLE: lifecycle, PROBE: probe}, event)

    @on_timer(PROBE_TIMER)
    def on_probe(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        cell=beam.DoFn.StateParam(PROFILE_STATE),
        probe=beam.DoFn.TimerParam(PROBE_TIMER),
    ):
        decisions = self._machine.on_probe(self._load(cell, key, window), _ms(fired))
        yield from self._carry_out(decisions, key, window, cell, {PROBE: probe})

    @on_timer(LIFECYCLE_TIMER)
    def on_lifecycle(
        self,
        key=beam.DoFn.KeyParam,
        fired=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        cell=beam.DoFn.StateParam(PROFILE_STATE),
        lifecycle=beam.DoFn.TimerParam(LIFECYCLE_TIMER),
    ):
        decisions = self._machine.on_lifecycle(self._load(cell, key, window), key, _ms(fired))
        yield from self._carry_out(decisions, key, window, cell, {LIFECYCLE: lifecycle})

    def teardown(self):
        if getattr(self, "_client", None) is not None:
            self._client.close()

    def finish_bundle(self):
        for (_, window), (previous, current) in self._pending.items():
            self._emitted.inc()
            yield WindowedValue(ProfileUpdate(previous, current), _ts(current["as_of"]), [window])
        self._pending = {}
        self._decoded = {}


class ProfileOutputs(NamedTuple):
    """The outputs of ``BuildUserProfiles``, by attribute or by tag (``outputs[TOO_LATE]``)."""

    profiles: Any
    too_late: Any
    dead_letter: Any

    def __getitem__(self, key):
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


class BuildUserProfiles(beam.PTransform):
    """Anonymized events in; ``ProfileUpdate(previous, current)`` out (``transforms/profile.py``).

    Input events carry ``user_key`` (AnonymizeEvents). Duplicates are dropped
    (counted ``duplicates_dropped``); events later than the allowed lateness go
    to the ``too_late`` output (counted ``too_late_events``); events without a
    usable ``user_key``, ``event_id``, ``event_type``, integer ``occurred_at``
    or mapping ``properties``, or stamped later than the wall clock +
    ``max_future_ms`` (reason ``occurred_in_the_future``, also counted
    ``future_events``), go to ``dead_letter`` as
    ``{"stage": "profile", "reason", "detail", "event_id", "payload"}``
    (counted ``profile_dead_letter``). With ``config.horizon_ms`` (bounded
    runs) no update is as of later than the horizon. With ``erased_from``
    (Redis URL, key prefix) an erased user's next event or lifecycle timer
    clears their state and drops any update pending for them (counted
    ``erased_state_cleared``; transforms/erasure.py). Returns ``ProfileOutputs(profiles,
    too_late, dead_letter)``.
    """

    def __init__(self, config: ProfileConfig = ProfileConfig(), metrics: Optional[PipelineMetrics] = None,
                 erased_from: Optional[tuple[str, str]] = None):
        super().__init__()
        self._config = config
        self._metrics = metrics
        self._erased_from = erased_from

    def expand(self, events):
        keyed = (
            events
            # Typed, so runners pick a deterministic key coder for the state.
            | "KeyByUser" >> beam.ParDo(_KeyByUserFn()).with_output_types(tuple[str, dict])
            .with_outputs(DEAD_LETTER, main="keyed")
        )
        built = keyed.keyed | "UpdateProfileState" >> beam.ParDo(
            _UserProfileFn(self._config, self._metrics, self._erased_from)).with_outputs(
                TOO_LATE, DEAD_LETTER, main="profiles")
        dead_letters = (keyed[DEAD_LETTER], built[DEAD_LETTER]) | "MergeDeadLetters" >> beam.Flatten()
        return ProfileOutputs(built.profiles, built[TOO_LATE], dead_letters)
