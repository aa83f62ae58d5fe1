"""The horizon of a bounded run: the event time its profiles end at.

In: the offset ranges a bounded run will read (``KafkaPartition`` with stop
offsets, from ``resolve_partitions`` in transforms/kafka/consumer.py) and the
run's decoder. Out: an epoch-millisecond horizon H for
``ProfileConfig.horizon_ms``: the profile stage fires the lifecycle timers due
before H, brings every older profile up to exactly H, and emits nothing later
(transforms/profile.py), so a backfill does not carry profiles weeks past the
wall clock where Redis would refuse every live event that follows.

``--backfill_horizon`` chooses H:

* ``data`` (default): ``min(wall clock, newest event time in the ranges)``,
  where an event's time is ``occurred_at`` clamped to ``received_at``
  (``normalize.event_time_ms``) and records that do not decode do not count.
  The same input gives the same profiles at any later date, and a replay into
  the same Redis is a no-op. ``newest_event_ms`` finds it by reading and
  decoding exactly the ranges the run will read (a second pass over the input);
* ``now``: the wall clock at launch (every timer due by then fires, as in a
  streaming run that caught up; not reproducible across launches);
* an explicit epoch-ms value.

A streaming run has no horizon. Why a horizon, why this H and why a pre-scan
rather than an in-pipeline maximum, and what follows a backfill:
docs/decisions.md (``transforms/backfill_horizon``) and docs/reliability.md.
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
