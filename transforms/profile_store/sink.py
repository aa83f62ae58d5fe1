"""``ProfileSink``: the Redis profile writer as a ``BatchingSink`` (no engine).

In: profile dicts. Out, per profile: a ``ProfileWriteResult`` (applied, or
not: stale in Redis or superseded by a newer version of the same user in the
same batch), or a dead letter (stage ``profile_store``): reasons of
``encode_profile`` (``invalid_user_key``, ``invalid_version``, ...),
``version_in_future`` (as of more than ``future_tolerance_s`` after the wall
clock), ``redis_rejected`` (Redis refused the write).

Only the newest version per user in a batch goes to Redis (the script would
skip the older one anyway; this saves the round trip). A failed attempt's
settled writes are not sent again; the rest are, with the same write id, so
counters stay exact. Counters: ``profiles_written``,
``profiles_stale_skipped``, ``profile_store_dead_letter``, ``redis_retries``;
the ``PipelineMetrics`` facade gets write latency, event-to-Redis latency
and Redis errors; ``progress`` (``EventTimeProgress``) the newest event time
written. The Beam shell: pipelines/beam/profile_store.py.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

import redis

from ..sinks.base import BatchingSink, Count, RecordRejected, Rejected, SinkBatch, SinkRecord
from ..sinks.retry import DEFAULT_MAX_ATTEMPTS
from .encoding import EncodedProfile, encode_profile, now_ms
from .keys import DEFAULT_KEY_PREFIX
from .writer import DEFAULT_PROFILE_TTL_S, RedisProfileWriter
from .writer import is_transient as redis_transient

STAGE = "profile_store"
DEFAULT_BATCH_SIZE = 500
DEFAULT_FUTURE_TOLERANCE_S = 600.0
_LOG = logging.getLogger(__name__)


class ProfileWriteResult(NamedTuple):
    """What happened to one profile: ``applied`` False means stale, superseded or a replay.

    For an applied write, ``previous_segments`` are the segments the store held
    just before it and ``profile`` the profile written, so downstream stages
    can report exactly the changes apps saw (and a replay, applying nothing,
    reports none). Both are None when not applied.
    """

    user_key: str
    applied: bool
    version: int
    written_at: int
    previous_segments: Optional[tuple] = None
    profile: Optional[dict] = None


class _NoMetrics:
    """Stands in for ``PipelineMetrics`` when none is given: every report is dropped."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class ProfileSink(BatchingSink):
    """Monotonic profile writes to Redis in batches; see the module docstring."""

    stage = STAGE
    dead_letter_key = "user_key"
    dead_letter_counter = "profile_store_dead_letter"
    retry_counter = "redis_retries"
    description = "Redis profile write"
    log = _LOG

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        profile_ttl_s: Optional[float] = DEFAULT_PROFILE_TTL_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        *,
        future_tolerance_s: float = DEFAULT_FUTURE_TOLERANCE_S,
        outbox: bool = True,
        metrics: Any = None,
        progress: Any = None,
        count: Optional[Count] = None,
    ) -> None:
        self.writer = RedisProfileWriter(redis_url, key_prefix, profile_ttl_s, max_attempts=max_attempts,
                                         outbox=outbox)
        super().__init__(batch_size, self.writer.retry, count)
        self._future_tolerance_ms = int(future_tolerance_s * 1000)
        self._metrics = metrics if metrics is not None else _NoMetrics()
        self._progress = progress

    # -- configuration ----------------------------------------------------------

    def prepare(self, element: Any) -> EncodedProfile:
        encoded = encode_profile(element)
        if encoded.version // 1000 > now_ms() + self._future_tolerance_ms:
            # A profile as of a time that has not come yet (a producer's clock
            # ahead, or a timer fired past the wall clock) would freeze the
            # user: every real event would then look older than it.
            raise RecordRejected("version_in_future",
                                 f"profile as of more than {self._future_tolerance_ms} ms after the wall clock")
        return encoded

    def compact_key(self, value: EncodedProfile) -> str:
        return value.user_key

    def newest(self, held: SinkRecord, new: SinkRecord) -> SinkRecord:
        return held if held.value.version >= new.value.version else new

    def superseded(self, record: SinkRecord) -> ProfileWriteResult:
        self.count("profiles_stale_skipped", 1)
        return ProfileWriteResult(record.value.user_key, False, record.value.version, now_ms())

    def is_transient(self, error: BaseException) -> bool:
        return redis_transient(error)

    def write(self, batch: SinkBatch) -> list[Rejected]:
        # The batch id is the write id: a retried attempt recognizes its own earlier writes.
        outcomes, error = self.writer.send(batch.values, batch.id)
        written_at = now_ms()
        rejected, applied, stale = [], 0, 0
        for record, outcome in zip(batch, outcomes):
            if outcome is None:
                continue  # left by a transient error: sent again
            value = record.value
            if outcome.rejected is not None:
                rejected.append(Rejected(record, "redis_rejected", outcome.rejected))
            elif outcome.applied:
                applied += 1
                record.result = ProfileWriteResult(value.user_key, True, value.version, written_at,
                                                   outcome.previous_segments, record.element)
            else:
                stale += 1
                record.result = ProfileWriteResult(value.user_key, False, value.version, written_at)
        self.count("profiles_written", applied)
        self.count("profiles_stale_skipped", stale)
        if error is not None:
            raise error
        return rejected

    def attempt_failed(self, error: BaseException) -> None:
        self._metrics.redis_error("profile_write")

    def flushed(self, records: list[SinkRecord], seconds: float) -> None:
        """Metrics of the applied writes, and the event-time progress key."""
        self._metrics.redis_write_seconds(seconds)
        newest = None
        applied = 0
        written_at = now_ms()
        for record in records:
            result = record.result
            if result is None or not result.applied:
                continue
            applied += 1
            profile = record.element  # applied, so encode_profile accepted it: a mapping
            last_event_at = profile.get("last_event_at")
            if not isinstance(last_event_at, int) or isinstance(last_event_at, bool):
                continue
            newest = last_event_at if newest is None else max(newest, last_event_at)
            # Only updates an event caused: a timer's update (dormancy) would
            # measure how long the user has been away.
            if profile.get("as_of") == last_event_at:
                self._metrics.event_to_redis_seconds((result.written_at - last_event_at) / 1000)
        self._metrics.profiles_written(applied)
        if newest is not None and self._progress is not None:
            try:
                self._progress.record(self.writer.client, newest, written_at)
            except redis.exceptions.RedisError:
                # A monitoring marker: a missed update only makes freshness look
                # older until the next flush; never fail the bundle for it.
                self._metrics.redis_error("progress")

    def open(self) -> None:
        self._metrics.setup()  # the client itself connects on the first flush (lazily)

    def close(self) -> None:
        self.writer.close()

