"""``UserStage``: the keyed per-user stage of the Flink job, and how its writes survive a crash.

In (keyed by ``user_key``; source dead letters by ``dlq:<topic>:<partition>``):
``(EVENT, key, event)`` for events with personalization consent,
``(ANALYTICS, key, event)`` for analytics-only events, ``(DEAD, key, row)``
for dead-letter rows made upstream, and from the identity stage
(pipelines/flink/identity.py) ``(RELEASED, key, event)`` for a visitor's
events moved to the account (profile only: the warehouse has them) and
``(STITCH, device, Stitch)`` for alias rows and visitor retirements. Events
go to the warehouse under the key they arrived with
(``transforms.identity.as_received``), as in the Beam pipeline. Out: ``(APPLIED, profile)`` for every
profile write Redis applied (the learner's input) and ``(MARK, subtask,
subtasks, W)`` after a flush that covers event time W (the sink watermark).

The profile logic is ``ProfileMachine`` (transforms/profile.py); this shell
keeps its state in Flink keyed state (RocksDB) and maps ``SetTimer`` onto
event-time timers (deleting the one a decision replaces: Flink timers do not
replace each other). The machine runs with ``snapshots=False``: the profile is
read from the state when the subtask flushes, so a burst of one user's events
costs one profile write, as one Beam bundle does.

**Writes and checkpoints** (docs/flink.md "Effectively once"). PyFlink gives
a Python function no hook before a checkpoint barrier, so a write buffered in
memory when the barrier passes would be lost by a crash after that
checkpoint: its input is behind the checkpoint's offsets and is not read
again. So every piece of pending work is also written into the user's keyed
state, which the checkpoint holds: a ``dirty`` flag for the profile (in the
user's cell, beside the machine's state), the warehouse rows (events, late
events, dead letters) waiting (in a list state: a row is added once, not
re-serialized with the cell at every event). The subtask
flushes its buffer (``StoreChain``) every ``flush_size`` items, and each user
with pending work gets a processing-time *confirm* timer at the next
``flush_interval_ms`` tick. When it fires, the buffer is flushed (if it is not
empty) and the user's pending work is cleared from state. Pending work this
process never buffered (restored from a checkpoint) is put back into the
buffer the first time the process reads the user's state, by an element or a
timer (the restored confirm timers at the latest), so it is written again
before the user's state changes further. All writes are
idempotent (profile versions, outbox ids, warehouse keys), so writing twice
is harmless and nothing is written zero times. A bounded run flushes at an
event-time timer at the end of input; a streaming run also flushes at each
watermark probe (``transforms/progress.py``), which reports the sink
watermark through ``MARK``.
"""
from __future__ import annotations

import logging
import time
from typing import Iterator, Optional

from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext, TimeDomain
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from ...models.tracks import DEFAULT_TRACKS_PATH, TrackPolicy
from ...transforms.connections import redis_client
from ...transforms.dead_letter import pipeline_dead_letter
from ...transforms.erasure import ErasedUsers
from ...transforms.identity import as_received
from ...transforms.profile import (
    BEYOND_CLOCK,
    ERASED,
    LIFECYCLE,
    OCCURRED_IN_THE_FUTURE,
    ClearState,
    DeadLetter,
    Duplicate,
    Emit,
    LifecycleHeld,
    ProfileMachine,
    SetTimer,
    Store,
    TooLate,
    UserProfileState,
)
from ...transforms.profile_store.keys import ProfileKeys
from ...transforms.progress import next_watermark_probe
from ..configuration import load_experiments, load_rules, profile_config
from .metrics import Counters, flink_pipeline_metrics
from .settings import JobSettings, horizon
from .state_cache import DEFAULT_SIZE, StateCache
from .store import DEAD_LETTERS, EVENTS, IDENTITY_ALIASES, LATE_EVENTS, RETIREMENTS, StoreChain, dead_letter_row

_LOG = logging.getLogger(__name__)

#: Element kinds in: from the decoder, and from the identity stage (pipelines/flink/identity.py):
#: a visitor's event released to the account it identified as, an alias row.
EVENT, ANALYTICS, DEAD = "e", "a", "d"
RELEASED, STITCH = "s", "t"
#: Element kinds out.
APPLIED, MARK = "p", "w"
#: Event time of the end-of-input timer: fires at the final watermark (Long.MAX_VALUE).
END_OF_INPUT_MS = 2**63 - 2


#: The stage's own counters (Flink metric group ``onboardflow``), registered at open.
STAGE_COUNTERS = (
    "flushes", "profile_updates_emitted", "pending_writes_restored", "duplicates_dropped", "too_late_events",
    "future_events", "profile_dead_letter", "profile_state_expired", "erased_state_cleared", "lifecycle_timers_fired",
    "lifecycle_timers_beyond_clock",
)


class UserStage(KeyedProcessFunction):
    """See the module docstring."""

    def __init__(self, settings: JobSettings):
        self._settings = settings

    # -- lifecycle ---------------------------------------------------------------

    def open(self, runtime_context: RuntimeContext):
        s = self._settings
        rules = load_rules(s)
        tracks = TrackPolicy.from_yaml(s.tracks_file or DEFAULT_TRACKS_PATH, rules)
        # An erased user's next event or lifecycle timer clears their state (transforms/erasure.py).
        self._erased_client = redis_client(s.redis_url, socket_timeout=30, socket_connect_timeout=10)
        self._machine = ProfileMachine(profile_config(s, horizon(s), rules), snapshots=False,
                                       erased=ErasedUsers(self._erased_client, ProfileKeys(s.redis_key_prefix)))
        # (primitive, dirty, queued): the machine's state, whether the profile waits to be
        # written, whether ``_rows`` holds rows (a tuple of rows in cells of older versions).
        self._cell = runtime_context.get_state(ValueStateDescriptor("user", Types.PICKLED_BYTE_ARRAY()))
        self._rows = runtime_context.get_list_state(ListStateDescriptor("rows", Types.PICKLED_BYTE_ARRAY()))
        self._count = Counters(runtime_context)
        self._count.register(*STAGE_COUNTERS)
        self._metrics = flink_pipeline_metrics(self._count, s)
        self._chain = StoreChain(s, rules, tracks, self._metrics, self._count,
                                 experiments=load_experiments(s, rules, tracks))
        self._chain.open()
        self._subtask, self._subtasks = subtask_of(runtime_context)
        self._flush_size = int(s.flush_size)
        self._interval = max(1, int(s.flush_interval_ms))
        self._lag_ms = int(float(s.kafka_max_out_of_orderness) * 1000)
        self._bounded = not s.streaming()
        self._erased_cleared = 0
        # Users whose profile goes out at the next flush: the live state objects.
        self._dirty: dict[str, UserProfileState] = {}
        # Decoded states of recently seen users (``_read``), and the confirm tick's keys.
        self._cache = StateCache(s.get("state_cache_size") or DEFAULT_SIZE)
        self._tick, self._ticked = -1, set()
        # Users with pending work in the buffer, and those flushed since this process started.
        self._buffered: set[str] = set()
        self._flushed: set[str] = set()
        # The watermark probe this process set (None: none yet), whether it waits for the wall
        # clock (no newer event had been seen), when one last fired, and the newest event time seen.
        self._probe_at: Optional[int] = None
        self._probe_waits_for_clock = False
        self._probe_fired = -(2**62)
        self._end_set = False
        self._newest_ms: Optional[int] = None

    def close(self):
        chain = getattr(self, "_chain", None)
        if chain is not None:
            chain.close()
            self._count.push()
        client = getattr(self, "_erased_client", None)
        if client is not None:
            client.close()
            if self._erased_cleared:
                _LOG.info("onboardflow user stage of job %s, subtask %d: %d erased user state(s) cleared "
                          "(one per event or timer)", self._settings.job_name, self._subtask, self._erased_cleared)

    # -- the user's state: Flink's cell, behind a cache of decoded states -------------

    def _read(self, key: str) -> tuple:
        """(primitive, dirty, queued, decoded state or None) of ``key``, through the subtask's
        ``StateCache`` (a hit skips the cell read and the decoding)."""
        return self._cache.read(key, lambda: self._load(key))

    def _load(self, key: str) -> tuple:
        stored = self._cell.value()
        primitive, dirty, queued = stored if stored is not None else (None, False, False)
        state = self._machine.load(primitive) if primitive is not None else None
        if (dirty or queued) and key not in self._buffered and key not in self._flushed:
            self._adopt(key, dirty, queued, state)
        return primitive, dirty, queued, state

    def _adopt(self, key: str, dirty: bool, queued, state) -> None:
        """Pending work of ``key`` this process never wrote (restored from a checkpoint) into the
        buffer, before anything else touches the key: it is written at the next flush."""
        self._count("pending_writes_restored", 1)
        if dirty and state is not None:
            self._dirty[key] = state
        for table, element in (*(queued if type(queued) is tuple else ()), *self._rows.get()):
            self._chain.add_row(table, element)
        self._buffered.add(key)

    def _write(self, key: str, primitive, dirty: bool, queued, state) -> None:
        self._cell.update((primitive, dirty, queued))
        self._cache.put(key, (primitive, dirty, queued, state if primitive is not None else None))

    def _confirm_at_next_tick(self, key: str, timers) -> None:
        """A processing-time confirm timer for ``key`` at the next tick (once per key and tick)."""
        # Flink's processing time is the wall clock: read here, not through a call into the JVM.
        tick = (_now_ms() // self._interval + 1) * self._interval
        if tick != self._tick:
            self._tick, self._ticked = tick, set()
        if key not in self._ticked:
            self._ticked.add(key)
            timers.register_processing_time_timer(tick)

    # -- elements ----------------------------------------------------------------

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        kind, key, payload = value
        timers = ctx.timer_service()
        primitive, dirty, queued, state = self._read(key)
        now_flush = False
        if kind == DEAD:
            queued = self._queue(queued, DEAD_LETTERS, payload)
        elif kind == STITCH:
            queued = self._queue(queued, IDENTITY_ALIASES, payload)
            if payload.retire:
                queued = self._queue(queued, RETIREMENTS, payload)
        else:
            row = as_received(payload)
            if row is not None:
                queued = self._queue(queued, EVENTS, row)
            if kind == EVENT or kind == RELEASED:
                t = payload["occurred_at"]
                self._newest_ms = t if self._newest_ms is None or t > self._newest_ms else self._newest_ms
                decisions = self._machine.on_event(state, payload)
                if state is None:
                    state = _stored_state(decisions)
                primitive, dirty, queued, now_flush = self._carry_out(decisions, key, primitive, dirty, queued,
                                                                      timers, payload)
        self._write(key, primitive, dirty, queued, state)
        self._buffered.add(key)
        self._confirm_at_next_tick(key, timers)
        self._watch_progress(timers)
        if now_flush or self._chain.pending >= self._flush_size:
            yield from self._flush()

    def _queue(self, queued, table: str, row: dict):
        """``row`` into the buffer and the current key's pending rows; the key's new ``queued``."""
        self._rows.add((table, row))
        self._chain.add_row(table, row)
        return queued or True

    def _carry_out(self, decisions, key: str, primitive, dirty: bool, queued, timers, event=None):
        """The machine's decisions onto Flink state, timers and the buffer; the new (primitive, dirty, queued)."""
        now_flush = False
        for d in decisions:
            kind = type(d)
            if kind is Store:
                primitive = d.state.to_primitive()
                if key in self._dirty:
                    self._dirty[key] = d.state
            elif kind is SetTimer:
                if d.replaces_ms is not None:
                    timers.delete_event_time_timer(d.replaces_ms)
                timers.register_event_time_timer(d.at_ms)
            elif kind is Emit:
                if d.cause == LIFECYCLE:
                    self._count("lifecycle_timers_fired", 1)
                dirty = True
                self._dirty[key] = self._emitted_state(decisions)
                self._buffered.add(key)
            elif kind is Duplicate:
                self._count("duplicates_dropped", 1)
                self._metrics.duplicates(1)
            elif kind is TooLate:
                self._count("too_late_events", 1)
                self._metrics.late(1)
                queued = self._queue(queued, LATE_EVENTS, event)
            elif kind is DeadLetter:
                self._count("profile_dead_letter", 1)
                if d.reason == OCCURRED_IN_THE_FUTURE:
                    self._count("future_events", 1)
                self._metrics.dead_lettered("profile", d.reason)
                row = dead_letter_row(pipeline_dead_letter("profile", d.reason, d.detail, event))
                queued = self._queue(queued, DEAD_LETTERS, row)
            elif kind is ClearState and d.reason == ERASED:
                self._count("erased_state_cleared", 1)
                self._erased_cleared += 1
                primitive, dirty = None, False
                self._dirty.pop(key, None)  # nothing of an erased user goes out
            elif kind is ClearState:
                self._count("profile_state_expired", 1)
                primitive = None
                if key in self._dirty:
                    # Its last profile must go out before the state that makes it is gone.
                    self._chain.add_profile(self._dirty.pop(key).snapshot(key))
                    now_flush = True
                dirty = False
            elif kind is LifecycleHeld:
                if d.reason == BEYOND_CLOCK:
                    self._count("lifecycle_timers_beyond_clock", 1)
        return primitive, dirty, queued, now_flush

    @staticmethod
    def _emitted_state(decisions) -> UserProfileState:
        state = _stored_state(decisions)
        if state is None:
            raise AssertionError("the profile machine emitted without storing the state")
        return state

    # -- timers ------------------------------------------------------------------

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        key = ctx.get_current_key()
        timers = ctx.timer_service()
        if ctx.time_domain() == TimeDomain.PROCESSING_TIME:
            yield from self._confirm(key)
            return
        primitive, dirty, queued, state = self._read(key)
        if state is not None:
            probe_due, lifecycle_due = state.probe_at == timestamp, state.lifecycle_at == timestamp
            now_flush = False
            if probe_due:
                primitive, dirty, queued, now_flush = self._carry_out(
                    self._machine.on_probe(state, timestamp), key, primitive, dirty, queued, timers)
            if lifecycle_due and primitive is not None:
                primitive, dirty, queued, flush_too = self._carry_out(
                    self._machine.on_lifecycle(state, key, timestamp), key, primitive, dirty, queued, timers)
                now_flush = now_flush or flush_too
            if probe_due or lifecycle_due:
                self._write(key, primitive, dirty, queued, state)
                if dirty or queued:
                    self._buffered.add(key)
                    self._confirm_at_next_tick(key, timers)
            if now_flush:
                yield from self._flush()
        if timestamp == END_OF_INPUT_MS or timestamp == self._probe_at:
            # The watermark passed the probe: every timer due before it has fired.
            yield from self._flush()
            yield MARK, self._subtask, self._subtasks, min(timestamp, END_OF_INPUT_MS)
            if timestamp == self._probe_at and not self._bounded:
                self._probe_fired = timestamp
                self._set_probe(timers, next_watermark_probe(timestamp, self._newest_ms, _now_ms(), self._lag_ms))

    def _watch_progress(self, timers) -> None:
        if self._bounded:
            if not self._end_set:
                timers.register_event_time_timer(END_OF_INPUT_MS)
                self._end_set = True
            return
        if self._probe_at is None:
            watermark = timers.current_watermark()
            fired = watermark if watermark is not None and watermark > 0 else (self._newest_ms or 0) - 1
            self._set_probe(timers, next_watermark_probe(fired, self._newest_ms, _now_ms(), self._lag_ms))
        elif (self._probe_waits_for_clock and self._newest_ms is not None
              and self._probe_fired < self._newest_ms < self._probe_at):
            # Events came after the probe was set to wait for the wall clock (a backlog
            # arriving): follow them, so progress is recorded as it drains.
            self._set_probe(timers, self._newest_ms)

    def _set_probe(self, timers, at_ms: int) -> None:
        self._probe_at = at_ms
        self._probe_waits_for_clock = self._newest_ms is None or at_ms > self._newest_ms
        timers.register_event_time_timer(at_ms)

    def _confirm(self, key: str) -> Iterator:
        """A confirm tick of ``key``: flush the buffer; clear the key's pending work, rewriting it if restored."""
        primitive, dirty, queued, state = self._read(key)  # restored work adopted into the buffer
        if self._chain.pending:
            yield from self._flush()
        if not dirty and not queued:
            return
        self._flushed.discard(key)
        if queued:
            self._rows.clear()
        self._write(key, primitive, False, False, state)

    def _flush(self) -> Iterator:
        for key, state in self._dirty.items():
            self._chain.add_profile(state.snapshot(key))
        self._count("profile_updates_emitted", len(self._dirty))
        self._dirty = {}
        applied = self._chain.flush()
        self._flushed |= self._buffered
        self._buffered = set()
        self._count("flushes", 1)
        self._count.push()
        for profile in applied:
            yield APPLIED, profile


def _stored_state(decisions) -> Optional[UserProfileState]:
    for d in decisions:
        if type(d) is Store:
            return d.state
    return None


def subtask_of(runtime_context: RuntimeContext) -> tuple[int, int]:
    """(index of this subtask, parallelism). PyFlink 2.2's thread-mode context still calls the
    RuntimeContext methods Flink 2 moved to ``TaskInfo``, so ask ``TaskInfo`` where they fail."""
    try:
        return runtime_context.get_index_of_this_subtask(), runtime_context.get_number_of_parallel_subtasks()
    except Exception:  # noqa: BLE001 - pemja raises its own AttributeError type
        info = runtime_context._runtime_context.getTaskInfo()
        return info.getIndexOfThisSubtask(), info.getNumberOfParallelSubtasks()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
