"""``OutboxRelay``: drains one outbox stream to a Kafka topic and/or a warehouse table, exactly once.

In: the stream's entries. Out: Kafka records and warehouse rows, each once;
a ``RelayReport`` of what moved. Per batch, under a lease lock
(``...:lock``, one relay per stream at a time):

1. convert the entries to warehouse rows and Kafka records, each record with
   a deterministic id ``<entry id>/<n>`` (header ``outbox-id``, with header
   ``outbox`` naming the stream);
2. write the rows (``INSERT ... ON CONFLICT DO NOTHING``: idempotent);
3. mark the batch *pending* in the cursor hash (``...:cursor``), send the
   records to explicit partitions with an idempotent, ordered producer, flush;
4. move the cursor past the batch and delete its entries, fenced by the lock.

A relay that dies between 3 and 4 leaves the batch pending; the next one
reads, per partition, the newest ``outbox-id`` this stream put there and
sends only the records after it. Why that is exactly once: docs/reliability.md.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import redis

from .kafka_target import KafkaOutboxTarget
from .keys import Converted, OutboxKeys, parse_record_id
from .retry import KafkaRelayError, LostLease, RelayCancelled, retry_transient

_LOG = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
#: the relay lock's lease; a live holder renews it every third of it, so a
#: killed relay's lock is free again within this long
DEFAULT_LEASE_MS = 10_000
DEFAULT_LOCK_WAIT_S = 300.0
#: the ``operation`` label of the relay's Redis errors in ``onboardflow_redis_errors_total``
REDIS_OPERATION = "outbox_relay"

# KEYS[1] lock, KEYS[2] cursor hash, KEYS[3] stream. ARGV: [1] token, [2] lease ms,
# [3] 'pending' or 'commit', [4] last entry id, [5..] entry ids to delete (commit).
_CURSOR_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[3] == 'pending' then
  redis.call('HSET', KEYS[2], 'pending', ARGV[4])
  return 1
end
redis.call('HSET', KEYS[2], 'cursor', ARGV[4])
redis.call('HDEL', KEYS[2], 'pending', 'failed')
for i = 5, #ARGV, 500 do
  redis.call('XDEL', KEYS[3], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
return 1
"""

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RelayReport(NamedTuple):
    entries: int = 0  # outbox entries moved
    records: int = 0  # Kafka records sent
    rows: int = 0  # warehouse rows inserted (new)
    skipped: int = 0  # records a crashed relay had already sent
    rejected: int = 0  # warehouse rows the database refused for their data


class OutboxRelay:
    """Drains one outbox stream (see the module docstring).

    ``convert(entry_id, fields)`` turns one stream entry (fields as str ->
    bytes) into ``Converted(records, rows)``; ``kafka`` is a
    ``KafkaOutboxTarget`` or None, ``warehouse`` a writer with
    ``write(rows) -> WriteReport`` (transforms/warehouse/writer.py) or None.
    ``relay()`` returns a ``RelayReport``; it raises (keeping the entries)
    when a sink fails past its retries. ``on_redis_error(operation)`` is
    called (operation ``"outbox_relay"``) after every attempt Redis failed:
    the ``onboardflow_redis_errors_total`` counter.
    """

    def __init__(self, client: redis.Redis, keys: OutboxKeys, name: str,
                 convert: Callable[[str, dict], Converted], *, kafka: Optional[KafkaOutboxTarget] = None,
                 warehouse: Any = None, batch_size: int = DEFAULT_BATCH_SIZE, lease_ms: int = DEFAULT_LEASE_MS,
                 lock_wait_s: float = DEFAULT_LOCK_WAIT_S, redis_retry_s: float = 300.0,
                 on_redis_error: Optional[Callable[[str], None]] = None):
        self._client, self._keys, self.name = client, keys, name
        self._on_redis_error = on_redis_error
        self._convert, self._kafka, self._warehouse = convert, kafka, warehouse
        self._batch_size, self._lease_ms, self._lock_wait_s = batch_size, lease_ms, lock_wait_s
        self._redis_retry_s = redis_retry_s
        self._cursor = client.register_script(_CURSOR_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self.stream_key = keys.stream(name)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Give up (any thread): the round in progress stops at its next batch, wait or retry with
        ``RelayCancelled``, before writing its cursor; the outbox keeps what it did not relay."""
        self._cancelled.set()
        if self._kafka is not None:
            self._kafka.cancel()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise RelayCancelled(f"outbox {self.name}: relay cancelled")

    # -- lock ------------------------------------------------------------------

    def _acquire(self) -> str:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self._lock_wait_s
        while not self._client.set(self._keys.lock(self.name), token, nx=True, px=self._lease_ms):
            if time.monotonic() > deadline:
                raise TimeoutError(f"outbox {self.name}: lock still held by another relay after {self._lock_wait_s} s")
            if self._cancelled.wait(0.05):
                self._check_cancelled()
        return token

    def _fenced(self, token: str, step: str, last: str, ids: Sequence[str] = ()) -> None:
        keys = [self._keys.lock(self.name), self._keys.cursor(self.name), self.stream_key]
        if not int(self._cursor(keys=keys, args=[token, self._lease_ms, step, last, *ids])):
            raise LostLease(f"outbox {self.name}: lease lost before {step}")

    # -- relay -----------------------------------------------------------------

    def relay(self) -> RelayReport:
        """Drain the stream; outages of Redis, Kafka or the warehouse are ridden out for ``retry_s``."""
        return retry_transient(self._relay_once, self._redis_retry_s, f"outbox {self.name}",
                               on_error=self._failed, log=_LOG)

    def _failed(self, error: BaseException) -> None:
        """After a failed attempt: count a Redis error, end the retries if cancelled, drop the producer."""
        if self._on_redis_error is not None and isinstance(error, redis.exceptions.RedisError):
            self._on_redis_error(REDIS_OPERATION)
        self._check_cancelled()  # not transient: the retries end here
        if self._kafka is not None:
            self._kafka.close()  # a producer made while the broker was down is not reused

    def _keep_alive(self, token: str, stop: threading.Event) -> None:
        """Renew the lease every third of it until ``stop``: the lock lives exactly as long as its holder."""
        while not stop.wait(self._lease_ms / 3000):
            try:
                self._renew(keys=[self._keys.lock(self.name)], args=[token, self._lease_ms])
            except redis.exceptions.RedisError:
                pass  # Redis is down: the fenced steps will find out

    def _relay_once(self) -> RelayReport:
        if not self._client.xlen(self.stream_key):
            # Nothing to drain (a commit deletes what it relayed, so an
            # interrupted batch still has its entries): no lock, no lease thread.
            return RelayReport()
        token = self._acquire()
        stop = threading.Event()
        threading.Thread(target=self._keep_alive, args=(token, stop), daemon=True,
                         name=f"outbox-lease-{self.name}").start()
        try:
            total = RelayReport()
            while True:
                self._check_cancelled()
                report = self._batch(token)
                if report is None:
                    return total
                total = RelayReport(*(a + b for a, b in zip(total, report)))
        finally:
            stop.set()
            try:
                self._release(keys=[self._keys.lock(self.name)], args=[token])
            except redis.exceptions.RedisError:
                pass  # the lease expires by itself

    def _batch(self, token: str) -> Optional[RelayReport]:
        state = {k.decode(): v.decode() for k, v in self._client.hgetall(self._keys.cursor(self.name)).items()}
        start = "(" + state["cursor"] if "cursor" in state else "-"
        entries = self._client.xrange(self.stream_key, min=start, max="+", count=self._batch_size)
        if not entries:
            return None
        ids = [entry_id.decode() for entry_id, _ in entries]
        records, rows = [], []
        for entry_id, (_raw_id, fields) in zip(ids, entries):
            converted = self._convert(entry_id, {k.decode(): v for k, v in fields.items()})
            records.extend(converted.records)
            rows.extend(converted.rows)
        inserted = rejected = 0
        if self._warehouse is not None and rows:
            written = self._warehouse.write(rows)
            inserted, rejected = written.inserted, len(written.rejected)
            for _index, why in written.rejected:
                # The database refuses the row for its data: retrying cannot help. Counted, never quoted.
                _LOG.error("outbox %s: warehouse refused a row (%s)", self.name, why)
        skipped = 0
        if self._kafka is not None and records:
            unsent_before = set(json.loads(state.get("failed", "[]")))
            if "pending" in state:
                # A relay died (or failed) between sending and moving the
                # cursor: skip what Kafka already has.
                newest = self._kafka.newest_ids(self.stream_key)
                pending = parse_record_id(state["pending"] + "/999999999")
                kept = []
                for record in records:
                    rid = parse_record_id(record.record_id)
                    if (rid <= pending and record.record_id not in unsent_before
                            and rid <= newest.get(self._kafka.partition_for(record), (-1, -1, -1))):
                        skipped += 1
                    else:
                        kept.append(record)
                records = kept
            self._fenced(token, "pending", ids[-1])
            failed = self._kafka.send(records, self.stream_key)
            if failed:
                # Later records of a partition may have landed after a failed
                # one: name the failed ones, so the next relay sends them
                # although a newer id is already in their partition.
                self._client.hset(self._keys.cursor(self.name), "failed",
                                  json.dumps(sorted({r.record_id for r in failed} | unsent_before)))
                raise KafkaRelayError(f"outbox {self.name}: {len(failed)} of {len(records)} records to "
                                      f"{self._kafka.topic!r} not acknowledged; kept for the next relay")
        self._fenced(token, "commit", ids[-1], ids)
        return RelayReport(len(ids), len(records), inserted, skipped, rejected)

    def backlog(self) -> int:
        """Entries waiting in the stream."""
        return int(self._client.xlen(self.stream_key))

    def close(self) -> None:
        for sink in (self._kafka, self._warehouse):
            if sink is not None:
                sink.close()
