"""``VisitorRetireSink``: a linked visitor's profile retired in Redis, as a ``BatchingSink`` (no engine).

In: ``Stitch`` rows with ``retire`` set (transforms/identity.py: a device's
first link to an account). Out, per row: True when a visitor profile was
there to remove, False when there was none (never written, or retired
before). ``RedisProfileWriter.retire`` runs ``RETIRE_VISITOR_LUA``: the
visitor's stitched marker (its later writes are refused), its profile and its
segment memberships removed, the exits recorded in the segment-change outbox.
Idempotent, so a replayed batch changes nothing. Counters:
``visitor_profiles_retired``, ``redis_retries``.
"""
from __future__ import annotations

from typing import Any, Optional

from ..sinks.base import BatchingSink, Count, RecordRejected, Rejected, SinkBatch
from ..sinks.retry import DEFAULT_MAX_ATTEMPTS
from .keys import DEFAULT_KEY_PREFIX
from .writer import DEFAULT_PROFILE_TTL_S, RedisProfileWriter
from .writer import is_transient as redis_transient

DEFAULT_BATCH_SIZE = 500


class VisitorRetireSink(BatchingSink):
    """Retires visitors' profiles in batches; see the module docstring."""

    stage = "identity_retire"
    dead_letter_key = "event_id"
    dead_letter_counter = "identity_retire_dead_letter"
    retry_counter = "redis_retries"
    description = "Redis visitor retirement"

    def __init__(self, redis_url: str, key_prefix: str = DEFAULT_KEY_PREFIX,
                 profile_ttl_s: Optional[float] = DEFAULT_PROFILE_TTL_S, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS, *, count: Optional[Count] = None) -> None:
        self.writer = RedisProfileWriter(redis_url, key_prefix, profile_ttl_s, max_attempts=max_attempts, count=count)
        # The writer retries itself; one attempt here.
        super().__init__(batch_size, None, count)

    def prepare(self, element: Any) -> tuple[str, str, int]:
        try:
            visitor, account, linked_at = element[0], element[1], element[2]
        except (TypeError, IndexError, KeyError):
            raise RecordRejected("not_a_stitch", f"element is a {type(element).__name__}") from None
        if not (isinstance(visitor, str) and visitor and isinstance(account, str) and account
                and isinstance(linked_at, int) and not isinstance(linked_at, bool)):
            raise RecordRejected("not_a_stitch", "a stitch needs two keys and an integer event time")
        return visitor, account, linked_at

    def is_transient(self, error: BaseException) -> bool:
        return redis_transient(error)

    def write(self, batch: SinkBatch) -> list[Rejected]:
        removed = self.writer.retire(batch.values)
        for record, was_there in zip(batch, removed):
            record.result = was_there
        self.count("visitor_profiles_retired", sum(removed))
        return []

    def close(self) -> None:
        self.writer.close()
