"""``WriteProfilesToRedis``: profiles -> the Redis profile store, through ``ProfileSink`` and the sink driver.

In: profile dicts (``user_key``, ``version``, ``updated_at``, ``segments``
and any feature fields; the encoding: docs/redis-contract.md). Out: a dict
of two PCollections:

* ``written``: one ``ProfileWriteResult(user_key, applied, version,
  written_at, previous_segments, profile)`` per valid input profile;
  ``applied`` is False for profiles that were stale (Redis already held this
  or a newer version) or superseded by a newer version of the same user in
  the same bundle.
* ``dead_letter``: ``{"stage": "profile_store", "reason", "detail",
  "user_key", "payload"}`` for profiles that cannot be stored, that Redis
  refused, or whose ``version`` is as of more than ``future_tolerance_s``
  after the wall clock (``version_in_future``).

With ``outbox`` (the default) every applied write also appends its segment
changes and its snapshot to the outbox streams, atomically with the write;
``RelayOutboxes`` publishes them. What is retried and counted:
transforms/profile_store/sink.py.
"""
from __future__ import annotations

import functools
from typing import Optional

from ...transforms.metrics import PipelineMetrics
from ...transforms.profile_store.keys import DEFAULT_KEY_PREFIX, ProfileKeys
from ...transforms.profile_store.sink import DEFAULT_BATCH_SIZE, DEFAULT_FUTURE_TOLERANCE_S, ProfileSink
from ...transforms.profile_store.writer import DEFAULT_PROFILE_TTL_S
from ...transforms.progress import EventTimeProgress
from ...transforms.sinks.retry import DEFAULT_MAX_ATTEMPTS
from .metrics import beam_pipeline_metrics
from .sinks import DEAD_LETTER, WRITTEN, WriteToSink


class WriteProfilesToRedis(WriteToSink):
    """Write profiles to the Redis profile store, monotonically by ``version`` (see the module docstring)."""

    WRITTEN = WRITTEN
    DEAD_LETTER = DEAD_LETTER

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        profile_ttl_s: Optional[float] = DEFAULT_PROFILE_TTL_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        label: Optional[str] = None,
        metrics: Optional[PipelineMetrics] = None,
        future_tolerance_s: float = DEFAULT_FUTURE_TOLERANCE_S,
        outbox: bool = True,
    ) -> None:
        ProfileKeys(key_prefix)  # fail at construction, not on the workers
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        super().__init__(functools.partial(
            ProfileSink, redis_url, key_prefix, profile_ttl_s, batch_size, max_attempts,
            future_tolerance_s=future_tolerance_s, outbox=outbox,
            metrics=metrics or beam_pipeline_metrics(prometheus=False), progress=EventTimeProgress(key_prefix),
        ), step="UpsertProfiles", label=label)
