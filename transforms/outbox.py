"""Outboxes in Redis, relayed exactly once to Kafka and the warehouse (no Beam).

Why: the history of a profile (its segment changes, its snapshots) must
follow exactly what Redis accepted. Deriving it *after* the Redis write loses
it when the process dies between the write and the emission: the replay that
follows finds Redis already up to date and derives nothing. So the profile
upsert script (transforms/profile_store.py) appends the history to a Redis
stream **in the same script** as the write it describes, and this module's
relay moves the stream to its sinks. Dead letters of the Kafka source go the
same way, recorded once per source coordinate, so a replay re-publishes none.
The reasoning and the guarantees, with the tests that hold them:
docs/reliability.md.

Streams (prefix ``obf`` by default)::

    obf:outbox:segment-changes     u, v, at, old, new [, why]: one entry per
                                   applied write whose segments changed (and
                                   per member a sweep removed)
    obf:outbox:profile-snapshots   u, v, f: one entry per applied write (f:
                                   the hash fields as written)
    obf:outbox:dead-letters        id, k, hk, v: one entry per source
                                   coordinate ever dead-lettered
    obf:dead-letters:ids           set of the dead-letter ids recorded

``OutboxRelay.relay()`` drains one stream, in batches, under a lease lock
(``...:lock``, one relay per stream at a time):

1. convert the batch's entries to warehouse rows and Kafka records, each
   record with a deterministic id ``<entry id>/<n>`` (header ``outbox-id``,
   with header ``outbox`` naming the stream);
2. write the rows (``INSERT ... ON CONFLICT DO NOTHING`` on natural keys:
   idempotent);
3. mark the batch *pending* in the cursor hash (``...:cursor``), send the
   records to explicit partitions (the Java client's murmur2 of the key) with
   an idempotent, ordered producer, flush;
4. move the cursor past the batch and delete its entries, fenced by the lock.

A relay that dies between 3 and 4 leaves the batch pending; the next relay
reads, per partition, the newest ``outbox-id`` this stream put there and
sends only the records after it. Per partition the producer keeps the order
(one request in flight), so "id <= the partition's newest" means "already
there". Kafka thus gets every record once, the warehouse every row once.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import redis

_LOG = logging.getLogger(__name__)

SEGMENT_CHANGES = "segment-changes"
PROFILE_SNAPSHOTS = "profile-snapshots"
DEAD_LETTERS = "dead-letters"
STREAMS = (SEGMENT_CHANGES, PROFILE_SNAPSHOTS, DEAD_LETTERS)

OUTBOX_HEADER = "outbox"
OUTBOX_ID_HEADER = "outbox-id"

DEFAULT_BATCH_SIZE = 500
#: the relay lock's lease; a live holder renews it every third of it, so a
#: killed relay's lock is free again within this long
DEFAULT_LEASE_MS = 10_000
DEFAULT_LOCK_WAIT_S = 300.0


@dataclass(frozen=True)
class OutboxKeys:
    """The Redis key names of the outboxes under one key prefix."""

    prefix: str

    def stream(self, name: str) -> str:
        return f"{self.prefix}:outbox:{name}"

    def lock(self, name: str) -> str:
        return f"{self.prefix}:outbox:{name}:lock"

    def cursor(self, name: str) -> str:
        return f"{self.prefix}:outbox:{name}:cursor"

    @property
    def dead_letter_ids(self) -> str:
        return f"{self.prefix}:dead-letters:ids"


# ------------------------------------------------------------------ record ids


def parse_record_id(text: str) -> tuple[int, int, int]:
    """``"<ms>-<seq>/<n>"`` (or a bare stream id) -> a tuple that orders like the ids."""
    entry, _, index = text.partition("/")
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0), int(index or 0)


class OutboxRecord(NamedTuple):
    """One Kafka record of a relay: its deterministic id, key and value.

    No event-time timestamp: the broker stamps the record when it is sent.
    Kafka's retention goes by record timestamps, so a backfill's changes
    stamped with their (weeks-old) event time would be deleted at the next
    retention check; the event time is in the value (``at``).
    """

    record_id: str
    key: Optional[bytes]
    value: bytes


class Converted(NamedTuple):
    """What one outbox entry becomes: Kafka records and warehouse rows."""

    records: list
    rows: list


# ------------------------------------------------------------------ dead letters

# KEYS[1] the set of recorded ids, KEYS[2] the dead-letter stream.
# ARGV: [1] id, [2] framed Avro value, [3] raw key ('' when none), [4] '1' if there is a key.
RECORD_DEAD_LETTER_LUA = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'v', ARGV[2], 'k', ARGV[3], 'hk', ARGV[4])
return 1
"""


def dead_letter_id(letter: dict) -> str:
    """The deterministic id of a dead letter: ``topic/partition/offset`` of its source record.

    Letters without Kafka coordinates get ``sha256:<hex of the payload>``.
    """
    topic, partition, offset = letter.get("source_topic"), letter.get("source_partition"), letter.get("source_offset")
    if isinstance(topic, str) and topic and isinstance(partition, int) and isinstance(offset, int) and offset >= 0:
        return f"{topic}/{partition}/{offset}"
    import hashlib
    payload = letter.get("value") or b""
    return "sha256:" + hashlib.sha256(payload if isinstance(payload, bytes) else str(payload).encode()).hexdigest()


class DeadLetterOutbox:
    """Records dead letters in the outbox once per id (``write(batch)``; no Beam).

    In: ``(id, key, framed value)`` triples. Returns how many were new; a
    replayed id is recorded again as nothing. Transient Redis errors are
    retried with capped backoff for up to ``retry_s`` seconds, then raised.
    """

    def __init__(self, client: redis.Redis, keys: OutboxKeys, retry_s: float = 300.0):
        self._client, self._keys, self._retry_s = client, keys, retry_s
        self._script = client.register_script(RECORD_DEAD_LETTER_LUA)

    def write(self, batch: Sequence[tuple[str, Optional[bytes], bytes]]) -> int:
        if not batch:
            return 0

        def once() -> int:
            pipe = self._client.pipeline(transaction=False)
            for letter_id, key, value in batch:
                self._script(keys=[self._keys.dead_letter_ids, self._keys.stream(DEAD_LETTERS)],
                             args=[letter_id, value, key or b"", "1" if key is not None else "0"], client=pipe)
            return sum(int(r) for r in pipe.execute())
        return retry_transient(once, self._retry_s, "dead-letter outbox")


def _transient_errors() -> tuple:
    from kafka.errors import KafkaError
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
            KafkaError, KafkaRelayError, LostLease)


def retry_transient(call: Callable[[], Any], budget_s: float, what: str, cap_s: float = 5.0,
                    on_error: Optional[Callable[[], None]] = None):
    """``call()``, retried with capped backoff for ``budget_s`` on errors an outage causes.

    Those are connection-level Redis errors and, for a relay, Kafka errors
    (no broker to bootstrap from, records not acknowledged): each retry is
    logged at WARNING with the error's type only; ``on_error`` runs before
    the wait (e.g. to drop a broken client). Past the budget the error is
    raised.
    """
    transient = _transient_errors()
    deadline = time.monotonic() + budget_s
    delay = 0.1
    while True:
        try:
            return call()
        except transient as exc:
            if on_error is not None:
                on_error()
            if time.monotonic() >= deadline:
                raise
            _LOG.warning("%s: %s, retrying in %.1f s", what, type(exc).__name__, delay)
            time.sleep(delay)
            delay = min(cap_s, delay * 2)


# ------------------------------------------------------------------ Kafka side


class KafkaRelayError(RuntimeError):
    """Kafka did not take a relay's records; the outbox keeps them for the next relay."""



class KafkaOutboxTarget:
    """One Kafka topic an outbox is relayed to: explicit partitions, ordered, idempotent sends.

    ``send`` raises ``KafkaRelayError`` unless Kafka acknowledged every
    record. ``newest_ids`` reads, per partition, the newest ``outbox-id``
    that stream ``stream_key`` wrote there (scanning back from the end).
    """

    def __init__(self, bootstrap_servers: str, topic: str, delivery_timeout_ms: int = 300_000):
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self._delivery_timeout_ms = delivery_timeout_ms
        self._producer = None
        self._partitions: Optional[list[int]] = None

    @property
    def producer(self):
        if self._producer is None:
            from kafka import KafkaProducer
            self._producer = KafkaProducer(
                bootstrap_servers=self.bootstrap_servers, client_id="onboardflow-outbox-relay",
                acks="all", enable_idempotence=True, max_in_flight_requests_per_connection=1,
                retries=2**31 - 1, retry_backoff_ms=200, delivery_timeout_ms=self._delivery_timeout_ms,
                linger_ms=5, request_timeout_ms=30_000,
            )
        return self._producer

    def partitions(self) -> list[int]:
        if self._partitions is None:
            found = None
            deadline = time.monotonic() + 60
            while not found:
                found = self.producer.partitions_for(self.topic)
                if not found and time.monotonic() > deadline:
                    raise KafkaRelayError(f"topic {self.topic!r} has no partitions")
            self._partitions = sorted(found)
        return self._partitions

    def partition_for(self, record: OutboxRecord) -> int:
        """The Java client's default partition for the key; a keyless record by its id."""
        from kafka.partitioner.default import murmur2
        parts = self.partitions()
        if record.key is not None:
            return parts[(murmur2(record.key) & 0x7FFFFFFF) % len(parts)]
        return parts[zlib.crc32(record.record_id.encode()) % len(parts)]

    def send(self, records: Sequence[OutboxRecord], stream_key: str) -> list[OutboxRecord]:
        """Send and flush ``records``; returns those Kafka did not acknowledge (none on success)."""
        futures = []
        for record in records:
            headers = [(OUTBOX_HEADER, stream_key.encode()), (OUTBOX_ID_HEADER, record.record_id.encode())]
            futures.append(self.producer.send(
                self.topic, key=record.key, value=record.value, headers=headers,
                partition=self.partition_for(record)))
        self.producer.flush()
        return [record for record, future in zip(records, futures) if future.failed()]

    def newest_ids(self, stream_key: str, window: int = 1000) -> dict[int, tuple[int, int, int]]:
        from kafka import KafkaConsumer, TopicPartition
        newest: dict[int, tuple[int, int, int]] = {}
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap_servers, enable_auto_commit=False,
                                 client_id="onboardflow-outbox-recovery", consumer_timeout_ms=10_000)
        try:
            wanted = stream_key.encode()
            for p in self.partitions():
                tp = TopicPartition(self.topic, p)
                consumer.assign([tp])
                begin, end = consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
                upper = end
                while upper > begin and p not in newest:
                    lower = max(begin, upper - window)
                    consumer.seek(tp, lower)
                    for message in _read_until(consumer, tp, upper):
                        headers = dict(message.headers or ())
                        if headers.get(OUTBOX_HEADER) == wanted and OUTBOX_ID_HEADER in headers:
                            rid = parse_record_id(headers[OUTBOX_ID_HEADER].decode())
                            newest[p] = max(newest.get(p, rid), rid)
                    upper = lower
        finally:
            consumer.close()
        return newest

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close()
            self._producer = None


def _read_until(consumer, tp, upper: int):
    while consumer.position(tp) < upper:
        batch = consumer.poll(timeout_ms=1000).get(tp, [])
        for message in batch:
            if message.offset >= upper:
                return
            yield message


# ------------------------------------------------------------------ the relay

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


class LostLease(RuntimeError):
    """Another relay took the stream's lock: this one stops before writing its cursor."""


class RelayReport(NamedTuple):
    entries: int = 0  # outbox entries moved
    records: int = 0  # Kafka records sent
    rows: int = 0  # warehouse rows inserted (new)
    skipped: int = 0  # records a crashed relay had already sent
    rejected: int = 0  # warehouse rows the database refused for their data


class OutboxRelay:
    """Drains one outbox stream to a Kafka topic and/or a warehouse table, exactly once.

    ``convert(entry_id, fields)`` turns one stream entry (fields as str ->
    bytes) into ``Converted(records, rows)``; ``kafka`` is a
    ``KafkaOutboxTarget`` or None, ``warehouse`` a writer with
    ``write(rows) -> WriteReport`` (transforms/warehouse.py) or None.
    ``relay()`` returns a ``RelayReport``; it raises (keeping the entries)
    when a sink fails past its retries.
    """

    def __init__(self, client: redis.Redis, keys: OutboxKeys, name: str,
                 convert: Callable[[str, dict], Converted], *, kafka: Optional[KafkaOutboxTarget] = None,
                 warehouse: Any = None, batch_size: int = DEFAULT_BATCH_SIZE, lease_ms: int = DEFAULT_LEASE_MS,
                 lock_wait_s: float = DEFAULT_LOCK_WAIT_S, redis_retry_s: float = 300.0):
        self._client, self._keys, self.name = client, keys, name
        self._convert, self._kafka, self._warehouse = convert, kafka, warehouse
        self._batch_size, self._lease_ms, self._lock_wait_s = batch_size, lease_ms, lock_wait_s
        self._redis_retry_s = redis_retry_s
        self._cursor = client.register_script(_CURSOR_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self.stream_key = keys.stream(name)

    # -- lock ------------------------------------------------------------------

    def _acquire(self) -> str:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self._lock_wait_s
        while not self._client.set(self._keys.lock(self.name), token, nx=True, px=self._lease_ms):
            if time.monotonic() > deadline:
                raise TimeoutError(f"outbox {self.name}: lock still held by another relay after {self._lock_wait_s} s")
            time.sleep(0.05)
        return token

    def _fenced(self, token: str, step: str, last: str, ids: Sequence[str] = ()) -> None:
        keys = [self._keys.lock(self.name), self._keys.cursor(self.name), self.stream_key]
        if not int(self._cursor(keys=keys, args=[token, self._lease_ms, step, last, *ids])):
            raise LostLease(f"outbox {self.name}: lease lost before {step}")

    # -- relay -----------------------------------------------------------------

    def relay(self) -> RelayReport:
        """Drain the stream; outages of Redis, Kafka or the warehouse are ridden out for ``retry_s``."""
        return retry_transient(self._relay_once, self._redis_retry_s, f"outbox {self.name}",
                               on_error=self._reset_kafka)

    def _reset_kafka(self) -> None:
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
        token = self._acquire()
        stop = threading.Event()
        threading.Thread(target=self._keep_alive, args=(token, stop), daemon=True,
                         name=f"outbox-lease-{self.name}").start()
        try:
            total = RelayReport()
            while True:
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


# ------------------------------------------------------------------ converters


def _text(value: bytes) -> str:
    return value.decode("utf-8")


class SegmentChangeConverter:
    """Segment-change entries -> ``SegmentChange`` records (Avro, keyed by user_key) and warehouse rows.

    ``rules`` (a ``RuleSet``) names each change's reason; ``serialize`` maps a
    SegmentChange dict to the framed Avro value.
    """

    def __init__(self, rules, serialize: Callable[[dict], bytes]):
        self._rules, self._serialize = rules, serialize

    def __call__(self, entry_id: str, fields: dict) -> Converted:
        from .warehouse import segment_change_row
        user_key, version, at = _text(fields["u"]), int(fields["v"]), int(fields["at"])
        reason = _text(fields["why"]) if "why" in fields else None
        changes = self._rules.diff(_segments(fields.get("old")), _segments(fields.get("new")), at,
                                   reason=reason, user_key=user_key, version=version)
        records, rows = [], []
        for n, change in enumerate(changes):
            change = dict(change)
            records.append(OutboxRecord(f"{entry_id}/{n}", user_key.encode("ascii"), self._serialize(change)))
            rows.append(segment_change_row(change))
        return Converted(records, rows)


def _segments(raw: Optional[bytes]) -> list[str]:
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [s for s in value if isinstance(s, str)] if isinstance(value, list) else []


def profile_snapshot_converter(entry_id: str, fields: dict) -> Converted:
    """Profile-snapshot entries -> ``profile_snapshots`` rows (the profile as the hash holds it)."""
    from .profile_store import decode_profile
    from .warehouse import profile_snapshot_row
    profile = decode_profile(json.loads(fields["f"]))
    return Converted([], [profile_snapshot_row(profile)])


def dead_letter_converter(entry_id: str, fields: dict) -> Converted:
    """Dead-letter entries -> the DLQ topic's records, keyed by the source record's raw key."""
    key = fields["k"] if fields.get("hk") == b"1" else None
    return Converted([OutboxRecord(f"{entry_id}/0", key, fields["v"])], [])


# ------------------------------------------------------------------ wiring


@dataclass(frozen=True)
class RelaySettings:
    """Where the outboxes of one deployment go (one object for the pipeline and the CLI).

    A topic or ``warehouse_dsn`` of None leaves that sink out (its entries are
    still moved, so the stream does not grow).
    """

    redis_url: str
    key_prefix: str
    bootstrap_servers: Optional[str] = None
    segment_changes_topic: Optional[str] = None
    dead_letter_topic: Optional[str] = None
    warehouse_dsn: Optional[str] = None
    warehouse_schema: str = "onboardflow"
    rules_file: Optional[str] = None
    registry_url: Optional[str] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    #: how long a sink outage is ridden out before the relay raises (the entries stay)
    retry_s: float = 300.0


def make_relays(settings: RelaySettings, client: Optional[redis.Redis] = None,
                on_warehouse_retry: Optional[Callable[[str], None]] = None) -> dict[str, OutboxRelay]:
    """One ``OutboxRelay`` per outbox stream of ``settings`` (names: ``STREAMS``).

    ``on_warehouse_retry(table)`` is called on every failed warehouse write attempt (metrics).
    """
    from ..schemas import SEGMENT_CHANGES_SUBJECT, load_schema
    from ..schemas.schema_registry import registry_from_url
    from ..schemas.wire import AvroSerializer
    from .segment import DEFAULT_RULES_PATH, RuleSet
    from .warehouse import PROFILE_SNAPSHOTS as SNAPSHOT_TABLE
    from .warehouse import SEGMENT_CHANGES as CHANGE_TABLE
    from .warehouse import WarehouseWriter

    client = client or redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=10)
    keys = OutboxKeys(settings.key_prefix)

    def kafka(topic: Optional[str]) -> Optional[KafkaOutboxTarget]:
        return KafkaOutboxTarget(settings.bootstrap_servers, topic) if topic and settings.bootstrap_servers else None

    def warehouse(spec) -> Any:
        if not settings.warehouse_dsn:
            return None
        # Attempts sized so a database outage of ``retry_s`` is ridden out (backoff capped at 5 s).
        return WarehouseWriter(settings.warehouse_dsn, spec, settings.warehouse_schema,
                               max_attempts=max(8, int(settings.retry_s / 2.5)), on_retry=on_warehouse_retry)

    serializer = AvroSerializer(registry_from_url(settings.registry_url), SEGMENT_CHANGES_SUBJECT,
                                load_schema("segment_change"))
    rules = RuleSet.load(settings.rules_file or DEFAULT_RULES_PATH)
    common = dict(batch_size=settings.batch_size, redis_retry_s=settings.retry_s)
    return {
        SEGMENT_CHANGES: OutboxRelay(client, keys, SEGMENT_CHANGES,
                                     SegmentChangeConverter(rules, serializer.serialize),
                                     kafka=kafka(settings.segment_changes_topic),
                                     warehouse=warehouse(CHANGE_TABLE), **common),
        PROFILE_SNAPSHOTS: OutboxRelay(client, keys, PROFILE_SNAPSHOTS, profile_snapshot_converter,
                                       warehouse=warehouse(SNAPSHOT_TABLE), **common),
        DEAD_LETTERS: OutboxRelay(client, keys, DEAD_LETTERS, dead_letter_converter,
                                  kafka=kafka(settings.dead_letter_topic), **common),
    }
