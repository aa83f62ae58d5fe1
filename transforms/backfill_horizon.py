"""The horizon of a bounded run: the event time its profiles end at.

In: the offset ranges a bounded run will read (``KafkaPartition`` with stop
offsets, from ``resolve_partitions`` in transforms/kafka/consumer.py) and the run's decoder. Out: an
epoch-millisecond horizon H for ``ProfileConfig.horizon_ms``.

Why a horizon. When a bounded input ends, the watermark jumps to +infinity
and every event-time timer fires. The profile stage's lifecycle timer (daily
refreshes, the new-user window, rule time marks, dormancy at last event + 30
days) would then carry every user's profile to their dormancy, weeks after
the wall clock, and Redis, whose writes are monotonic by version, would refuse
every live event that follows as older. With H the profile stage fires the
timers due before H as a streaming run would, brings every older profile up to
exactly H, and emits nothing later (transforms/profile.py).

Which H. ``min(wall clock, newest event time in the ranges read)``:

* the newest event time, not the wall clock, so the result depends on the
  input only: a backfill run today and the same backfill run next week end
  with the same profiles and versions (as long as every event is in the
  past), and a replay into the same Redis is a no-op;
* capped at the wall clock, so no profile is as of the future even when some
  producer's clock runs ahead;
* an event's time is what the profile stage folds in: ``occurred_at`` clamped
  to ``received_at`` (``normalize.event_time_ms``); records that do not decode
  are dead letters, not events, and do not count.

How it is found: ``newest_event_ms`` reads the same offset ranges the run will
read (the launcher resolves them once and passes the very same
``KafkaPartition``s to ``ReadFromKafka(partitions=...)``, so records appended
meanwhile are in neither) and decodes every record. That is a second pass over
the input, measured at roughly the source's own decode rate; the alternative,
an in-pipeline maximum handed to the profile stage as a side input, would hold
every profile back until the whole input is read and is not supported with
state and timers on every runner. A streaming run has no horizon: its
watermark never passes the wall clock (the Kafka source caps it there).

What follows a backfill: a streaming run from the earliest offsets rebuilds
the same profiles (its writes at or before H carry versions Redis already
holds, so they are no-ops), then moves on from H with the wall clock and live
events, whose profiles are newer than H and are written.

``--backfill_horizon`` chooses: ``data`` (default, the above), ``now`` (the
wall clock at launch: every timer due by then fires, as in a streaming run
that caught up; not reproducible across launches) or an explicit epoch-ms
value.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from kafka import KafkaConsumer, TopicPartition

from .kafka.consumer import source_consumer_config
from .kafka.records import KafkaPartition, KafkaRecord
from .normalize import event_time_ms

_LOG = logging.getLogger(__name__)

#: Values of ``--backfill_horizon`` besides an epoch-ms integer.
HORIZON_DATA, HORIZON_NOW = "data", "now"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def newest_event_ms(
    bootstrap_servers: str,
    partitions: Sequence[KafkaPartition],
    decode: Callable[[KafkaRecord], dict],
    consumer_config: Optional[Mapping[str, Any]] = None,
    timeout_s: float = 600.0,
) -> Optional[int]:
    """The newest event time among the records of ``partitions`` (``[start, stop)`` each).

    ``decode(record) -> event`` raises for a record that is not an event
    (such records are skipped, as the run dead-letters them). None when the
    ranges hold no event. Raises TimeoutError when a range cannot be read to
    its stop offset within ``timeout_s``.
    """
    newest: Optional[int] = None
    todo = [p for p in partitions if p.stop_offset is not None and p.stop_offset > p.start_offset]
    if not todo:
        return None
    consumer = KafkaConsumer(**source_consumer_config(bootstrap_servers, consumer_config, max_poll_records=2000,
                                                       client_id="onboardflow-backfill-horizon"))
    deadline = time.monotonic() + timeout_s
    try:
        for part in todo:
            tp = TopicPartition(part.topic, part.partition)
            consumer.assign([tp])
            consumer.seek(tp, part.start_offset)
            position = part.start_offset
            while position < part.stop_offset:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{part.topic}/{part.partition}: not read to offset {part.stop_offset} "
                                       f"within {timeout_s} s")
                batch = consumer.poll(timeout_ms=500).get(tp, [])
                if not batch and consumer.position(tp) >= part.stop_offset:
                    break  # a gap (compaction, transaction markers) up to the stop offset
                for rec in batch:
                    if rec.offset >= part.stop_offset:
                        position = part.stop_offset
                        break
                    position = rec.offset + 1
                    try:
                        t = event_time_ms(decode(KafkaRecord(rec.topic, rec.partition, rec.offset, rec.timestamp,
                                                             rec.key, rec.value)))
                    except Exception:  # noqa: BLE001 - not an event: the run dead-letters it
                        continue
                    if newest is None or t > newest:
                        newest = t
    finally:
        consumer.close(autocommit=False)
    return newest


def backfill_horizon(
    setting: str,
    bootstrap_servers: str,
    partitions: Sequence[KafkaPartition],
    decode: Callable[[KafkaRecord], dict],
    consumer_config: Optional[Mapping[str, Any]] = None,
    now_ms: Optional[int] = None,
) -> int:
    """H for a bounded run reading ``partitions``, per ``--backfill_horizon`` (see the module docstring).

    ``data``: min(now, newest event in the ranges), now when they hold no
    event; ``now``: the wall clock; digits: that epoch-ms value.
    """
    now = _now_ms() if now_ms is None else now_ms
    value = str(setting).strip().lower()
    if value == HORIZON_NOW:
        return now
    if value.isdigit():
        return int(value)
    if value != HORIZON_DATA:
        raise ValueError(f"--backfill_horizon must be {HORIZON_DATA!r}, {HORIZON_NOW!r} or epoch milliseconds, "
                         f"got {setting!r}")
    started = time.monotonic()
    newest = newest_event_ms(bootstrap_servers, partitions, decode, consumer_config)
    horizon = now if newest is None else min(now, newest)
    _LOG.info("backfill horizon %d (newest event %s, wall clock %d), found in %.1f s over %d records", horizon,
              newest, now, time.monotonic() - started,
              sum((p.stop_offset or 0) - p.start_offset for p in partitions))
    return horizon
