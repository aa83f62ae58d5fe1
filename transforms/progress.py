"""Pipeline progress markers in Redis: ``{prefix}:pipeline:progress``.

* ``EventTimeProgress``: the newest event time the profile sink has written
  (read by the lag exporter, runners/cli/lag.py);
* ``SinkWatermark``: how far event time has got *through* the profile sink
  (written by ``PublishSinkWatermark``, pipelines/beam/metrics.py; read by the
  demo to decide "settled"), and ``next_watermark_probe``, where its probe
  looks next.

Both are fields of one hash, raised max-only by one Lua script so concurrent
workers never move them back; the hash never expires. Contract:
docs/redis-contract.md ("Pipeline progress").
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

# Max-only update: a slower worker that flushes an older batch later must not
# move the progress back.
_PROGRESS_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[3]))
local incoming = tonumber(ARGV[1])
if current == nil or incoming > current then
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[1], ARGV[4], ARGV[2])
  return 1
end
return 0
"""
# ARGV: [1] value, [2] wall clock, [3] the field to raise, [4] the field for the wall clock.


class Progress(NamedTuple):
    event_time_ms: int
    written_at_ms: int


class EventTimeProgress:
    """The newest event time written to Redis: ``{prefix}:pipeline:progress``.

    A hash with ``event_time_ms`` (the largest ``last_event_at``, i.e. the
    newest ``occurred_at``, of any profile write Redis applied) and
    ``written_at_ms`` (wall clock of the write that set it). Updated by the
    profile sink once per flushed batch, max-only and atomically (a Lua
    script), so concurrent workers never move it back. Never expires.

    The lag exporter reads it: event-time lag = now - ``event_time_ms``. It is
    the freshness of the freshest profile, not a low watermark: one stuck
    partition shows in the offset lag, not here.
    """

    def __init__(self, key_prefix: str = "obf"):
        self.key = f"{key_prefix}:pipeline:progress"

    def record(self, client, event_time_ms: int, written_at_ms: int) -> bool:
        """Raise the recorded event time to ``event_time_ms``; True when it moved."""
        return bool(client.eval(_PROGRESS_LUA, 1, self.key, int(event_time_ms), int(written_at_ms),
                                "event_time_ms", "written_at_ms"))

    def read(self, client) -> Optional[Progress]:
        values: Mapping = client.hgetall(self.key)
        if not values:
            return None
        decoded = {(k.decode() if isinstance(k, bytes) else k): v for k, v in values.items()}
        try:
            return Progress(int(decoded["event_time_ms"]), int(decoded.get("written_at_ms", 0)))
        except (KeyError, ValueError):
            return None


class SinkWatermark:
    """How far event time has got *through* the profile sink: fields of ``{prefix}:pipeline:progress``.

    ``sink_watermark_ms`` = W means: every profile update stamped before W (an
    event's, or a lifecycle timer's: refreshes, time marks, dormancy) has been
    through ``WriteProfilesToRedis``, so every timer due before W has fired
    and its write is in Redis. ``sink_watermark_at_ms``: wall clock when it
    was recorded. Max-only and atomic like ``EventTimeProgress``, in the same
    hash; never expires. Written by ``PublishSinkWatermark``; read by the demo
    (runners/cli/demo.py) to decide "settled" from the pipeline's own progress.
    """

    def __init__(self, key_prefix: str = "obf"):
        self.key = f"{key_prefix}:pipeline:progress"

    def record(self, client, watermark_ms: int, written_at_ms: int) -> bool:
        """Raise the recorded watermark to ``watermark_ms``; True when it moved."""
        return bool(client.eval(_PROGRESS_LUA, 1, self.key, int(watermark_ms), int(written_at_ms),
                                "sink_watermark_ms", "sink_watermark_at_ms"))

    def read(self, client) -> Optional[int]:
        """The recorded watermark (epoch ms), or None before the first record."""
        value = client.hget(self.key, "sink_watermark_ms")
        try:
            return None if value is None else int(value)
        except ValueError:
            return None


def next_watermark_probe(fired_at_ms: int, newest_ms: Optional[int], now_ms: int, lag_ms: int,
                         min_step_ms: int = 1000) -> int:
    """Event time to set the probe's next timer to, after it fired at ``fired_at_ms``.

    While updates newer than the last firing keep coming (a backlog), the
    next stop is the newest one seen, so progress is recorded as the backlog
    drains. Once none is newer, it is the highest watermark the source can
    reach now (wall clock − ``lag_ms``, the max out-of-orderness): idle
    partitions move the watermark there, so the timers due by then fire and
    the probe records it. An update stamped in the future (a skewed device
    clock) is capped the same way, so it cannot park the probe. Always at
    least ``min_step_ms`` after the last firing (at most one record per step).

    >>> next_watermark_probe(1_000, newest_ms=50_000, now_ms=900_000, lag_ms=60_000)
    50000
    >>> next_watermark_probe(50_000, newest_ms=50_000, now_ms=900_000, lag_ms=60_000)
    840000
    >>> next_watermark_probe(840_000, newest_ms=50_000, now_ms=840_500, lag_ms=60_000)
    841000
    """
    reachable = now_ms - lag_ms
    target = min(newest_ms, reachable) if newest_ms is not None and newest_ms > fired_at_ms else reachable
    return max(target, fired_at_ms + min_step_ms)
