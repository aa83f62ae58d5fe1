"""The model registry: versioned model snapshots, served from Redis, kept in the warehouse.

Online models (``models.segmentation.Segmenter``, ``models.propensity.PropensityModel``)
and the offline bootstrap (``onboardflow train``) publish serialized snapshots
here; scoring stages load the *current* snapshot of each kind; an operator
rolls a bad model back with one command (``onboardflow models rollback``).

Two stores, two jobs:

* the **warehouse** (``model_versions``, ``model_pointers``, ``model_events``
  from ``schemas/warehouse/V003__models.sql`` and ``V005__model_retention.sql``)
  is the authority: it numbers versions, keeps every version ever published
  (its payload until retention prunes it), where each kind's serving pointer
  is, and every move of that pointer;
* **Redis** is the serving copy (``ModelStore``, key layout below and in
  docs/redis-contract.md): what a scoring worker reads, in one round trip,
  without touching PostgreSQL.

Every change is decided in one PostgreSQL transaction (serialized per kind by
an advisory lock) and then mirrored to Redis by one Lua script that writes the
version hash and moves the pointer atomically, *only if* the pointer's
``generation`` is newer than the one Redis holds. So a reader never sees a
pointer to a missing version, and a slow writer never puts an older pointer
back. If the mirror step fails (Redis down), the warehouse already holds the
decision: retrying the same call, or ``sync``, finishes it.

Idempotence: a version is identified by the SHA-256 of its payload, unique per
kind. Publishing a payload the registry already has returns the existing
version and creates nothing, so a publish retried after a lost reply (or a
batch job retried after a crash, with seeded training) never makes two
versions of one model.

Pointer rules: ``publish`` of a new payload makes it current, unless the kind
is *pinned*. ``rollback`` moves the pointer back (to the newest version older
than the current one, or to ``to_version``) and pins it, so the next
scheduled snapshot of the model that was just rolled back does not silently
undo the rollback; new versions are still recorded while pinned.
``promote`` moves the pointer to any version (default: the newest) and
unpins. Every move is a row in ``model_events``.

Retention: ``prune(kind, keep_last, keep_days)`` drops the payload of old
versions from both stores and keeps their warehouse row (id, SHA-256, counts,
metrics, ``pruned_at``), so the pointer's history stays readable. It never
prunes the version either store serves, the newest ``keep_last`` versions, the
versions the newest ``keep_last`` pointer moves served, nor, with
``keep_days``, versions published or served in the last ``keep_days`` days.
A pruned version cannot be served again (``rollback`` and ``promote`` refuse
it by name, and ``rollback`` without a target steps over it) until its exact
bytes are published again, which restores its payload under the same version.
Pruning takes the same per-kind lock as publish, and is idempotent; the
learner may call it after every publish (docs/models-registry.md#retention).

Redis layout (prefix ``obf`` by default; ``{kind}`` is ``segmentation`` or
``propensity``, ``{n}`` the version number in decimal)::

    obf:model:{kind}:current   hash: version, version_id, generation, pinned (0/1),
                               payload_sha256, updated_at (epoch ms)
    obf:model:{kind}:v:{n}     hash: payload (bytes), payload_sha256, version_id, source,
                               counts (json), metrics (json), created_at (epoch ms)
    obf:model:{kind}:versions  sorted set of the version numbers mirrored (score = n)

Nothing here expires: a model must not vanish from under a scoring worker.
``prune`` deletes the ``v:{n}`` hashes (and zset members) of pruned versions,
never the one ``current`` names, checked inside the same Lua script.
Version ids read ``seg-000012`` / ``prop-000003`` (``ModelVersion.id``).

Example (needs Redis and PostgreSQL with the migrations applied)::

    registry = ModelRegistry(redis_url, warehouse_dsn)
    result = registry.publish("segmentation", segmenter.to_bytes(),
                              counts={"users": 5000}, metrics={"silhouette": 0.52})
    result.version.id                        # 'seg-000001'
    registry.current("segmentation").payload # the bytes scoring workers load
    registry.rollback("segmentation")        # back to the previous version, pinned
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Union

import psycopg
import redis
from psycopg import sql

DEFAULT_KEY_PREFIX = "obf"
DEFAULT_SCHEMA = "warehouse"

#: The model kinds and the prefix of their version ids.
KINDS: dict[str, str] = {"segmentation": "seg", "propensity": "prop"}

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_VERSION_ID_RE = re.compile(r"^(?:(?P<prefix>[a-z]+)-)?0*(?P<n>[1-9][0-9]*)$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class RegistryError(RuntimeError):
    """A registry request that cannot be carried out; the message says why."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RegistryError(f"unknown model kind {kind!r}; known: {', '.join(sorted(KINDS))}")
    return kind


def version_id(kind: str, number: int) -> str:
    """The printable id of version ``number`` of ``kind``: ``seg-000012``."""
    return f"{KINDS[check_kind(kind)]}-{number:06d}"


def parse_version(kind: str, value: Union[int, str]) -> int:
    """A version number from ``12``, ``"12"`` or ``"seg-000012"``; the prefix must match ``kind``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise RegistryError(f"version numbers start at 1, got {value}")
        return value
    match = _VERSION_ID_RE.match(str(value).strip())
    if not match:
        raise RegistryError(f"not a version: {value!r} (expected e.g. {version_id(kind, 12)} or 12)")
    prefix = match.group("prefix")
    if prefix is not None and prefix != KINDS[check_kind(kind)]:
        raise RegistryError(f"{value!r} is not a {kind} version (its ids start with {KINDS[kind]}-)")
    return int(match.group("n"))


def _plain(value: Any) -> Any:
    """numpy scalars and tuples as JSON-able Python values."""
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _json(value: Optional[Mapping[str, Any]], name: str) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, Mapping):
        raise RegistryError(f"{name} must be a mapping, got {type(value).__name__}")
    try:
        return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False, default=_plain)
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{name} must be JSON-serializable with finite numbers: {exc}") from None


def _epoch_ms(value: dt.datetime) -> int:
    return (value - _EPOCH) // dt.timedelta(milliseconds=1)


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ModelVersion:
    """One published model. ``payload`` is None in listings (``payload_size`` says how big).

    A pruned version (``pruned_at`` set) keeps its metadata; its payload is
    gone, so ``payload`` and ``payload_size`` are None.
    """

    kind: str
    number: int
    payload_sha256: str
    created_at: dt.datetime
    source: str = ""
    counts: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    payload: Optional[bytes] = None
    payload_size: Optional[int] = None
    pruned_at: Optional[dt.datetime] = None

    @property
    def id(self) -> str:
        return version_id(self.kind, self.number)

    @property
    def pruned(self) -> bool:
        return self.pruned_at is not None


class Pointer(NamedTuple):
    """Where a kind's serving pointer is. ``generation`` counts its moves."""

    kind: str
    version: int
    generation: int
    pinned: bool
    updated_at: dt.datetime


class PointerEvent(NamedTuple):
    """One move of a serving pointer (``model_events``)."""

    kind: str
    action: str  # publish | rollback | promote
    from_version: Optional[int]
    to_version: int
    generation: int
    reason: str
    at: dt.datetime


class PublishResult(NamedTuple):
    version: ModelVersion
    created: bool  # False: the payload was already registered under this version
    serving: bool  # the version is current after the call


# --------------------------------------------------------------------------- retention


def check_retention(keep_last: int, keep_days: Optional[float]) -> None:
    """Refuse a retention that would keep nothing or cannot be read as a time span."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        # The newest version is what the learner just published and what
        # ``promote`` serves by default: it always stays.
        raise RegistryError(f"keep_last must be a whole number >= 1, got {keep_last!r}")
    if keep_days is not None:
        if isinstance(keep_days, bool) or not isinstance(keep_days, (int, float)) or not keep_days >= 0 \
                or keep_days == float("inf"):
            raise RegistryError(f"keep_days must be a finite number of days >= 0, got {keep_days!r}")


def retention_cutoff(now: dt.datetime, keep_days: Optional[float]) -> Optional[dt.datetime]:
    """The creation (or pointer move) time before which ``keep_days`` no longer protects; None without it."""
    if keep_days is None:
        return None
    try:
        return now - dt.timedelta(days=keep_days)
    except OverflowError:  # more days than the calendar holds: everything is recent
        return _EPOCH


def prunable_versions(kept: Mapping[int, dt.datetime], newest: int, protected: Iterable[int], keep_last: int,
                      cutoff: Optional[dt.datetime] = None) -> list[int]:
    """The versions a prune removes, oldest first.

    ``kept`` maps each version that still holds a payload to its creation
    time; ``newest`` is the kind's highest version number (numbers count up
    without gaps, so the newest ``keep_last`` are those above
    ``newest - keep_last``, pruned or not); ``protected`` are versions that
    stay whatever their age (served now, or by a recent pointer move);
    ``cutoff`` (``retention_cutoff``): versions created at or after it stay.

    >>> t = dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc)
    >>> kept = {n: t + dt.timedelta(hours=n) for n in range(1, 8)}
    >>> prunable_versions(kept, newest=7, protected={2}, keep_last=3)
    [1, 3, 4]
    >>> prunable_versions(kept, newest=7, protected={2}, keep_last=3, cutoff=t + dt.timedelta(hours=3))
    [1]
    """
    check_retention(keep_last, None)
    protected = set(protected)
    return sorted(
        n for n, created_at in kept.items()
        if n <= newest - keep_last and n not in protected and (cutoff is None or created_at < cutoff)
    )


# --------------------------------------------------------------------------- Redis: the serving copy

# KEYS: version hash, versions zset, current hash.
# ARGV: n, payload, sha, version_id, source, counts, metrics, created_at_ms,
#       generation, pinned, updated_at_ms.
# The version hash is written before the pointer, in the same script, so the
# pointer never names a version Redis does not hold; the pointer moves only
# for a newer generation (a slow or retried writer cannot move it backwards).
_MIRROR_LUA = """
redis.call('HSET', KEYS[1], 'payload', ARGV[2], 'payload_sha256', ARGV[3], 'version_id', ARGV[4],
           'source', ARGV[5], 'counts', ARGV[6], 'metrics', ARGV[7], 'created_at', ARGV[8])
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]), ARGV[1])
if ARGV[9] == '' then return 0 end
local stored = tonumber(redis.call('HGET', KEYS[3], 'generation') or '0')
if tonumber(ARGV[9]) <= stored then return 0 end
redis.call('HSET', KEYS[3], 'version', ARGV[1], 'version_id', ARGV[4], 'generation', ARGV[9],
           'pinned', ARGV[10], 'payload_sha256', ARGV[3], 'updated_at', ARGV[11])
return 1
"""

# KEYS: current hash. ARGV: key prefix of version hashes ("obf:model:{kind}:v:").
# Pointer and version in one round trip, from one consistent view.
_READ_CURRENT_LUA = """
local pointer = redis.call('HGETALL', KEYS[1])
if #pointer == 0 then return {} end
local version = redis.call('HGET', KEYS[1], 'version')
return {pointer, redis.call('HGETALL', ARGV[1] .. version)}
"""


# KEYS: current hash, versions zset. ARGV[1]: key prefix of version hashes
# ("obf:model:{kind}:v:"); ARGV[2..]: version numbers to drop.
# The served version is checked in the same script that deletes, so a pointer
# moved by a concurrent mirror can never be left naming a deleted hash.
_DROP_LUA = """
local serving = redis.call('HGET', KEYS[1], 'version')
local dropped = {}
for i = 2, #ARGV do
  if ARGV[i] ~= serving then
    redis.call('DEL', ARGV[1] .. ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
    dropped[#dropped + 1] = ARGV[i]
  end
end
return dropped
"""

#: Versions dropped per script call: a first prune of a long history must not
#: block Redis for long.
_DROP_BATCH = 500


def _pairs(flat: list) -> dict[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


class ModelStore:
    """The Redis side of the registry: what scoring workers read (no PostgreSQL needed).

    ``current(kind)`` returns the serving ``ModelVersion`` with its payload in
    one round trip; ``current_version(kind)`` is the cheap check a periodically
    refreshed side input makes before reloading a model.
    """

    def __init__(self, redis_url: str, key_prefix: str = DEFAULT_KEY_PREFIX,
                 client: Optional[redis.Redis] = None) -> None:
        if not _PREFIX_RE.match(key_prefix):
            raise RegistryError("key_prefix must be 1-64 letters, digits, '_', '.' or '-'")
        self.key_prefix = key_prefix
        self._client = client if client is not None else redis.Redis.from_url(redis_url)
        self._mirror = self._client.register_script(_MIRROR_LUA)
        self._read_current = self._client.register_script(_READ_CURRENT_LUA)
        self._drop = self._client.register_script(_DROP_LUA)

    # keys -------------------------------------------------------------------

    def current_key(self, kind: str) -> str:
        return f"{self.key_prefix}:model:{check_kind(kind)}:current"

    def version_key(self, kind: str, number: int) -> str:
        return f"{self.key_prefix}:model:{check_kind(kind)}:v:{number}"

    def versions_key(self, kind: str) -> str:
        return f"{self.key_prefix}:model:{check_kind(kind)}:versions"

    # reads --------------------------------------------------------------------

    def current_version(self, kind: str) -> Optional[int]:
        raw = self._client.hget(self.current_key(kind), "version")
        return None if raw is None else int(raw)

    def current(self, kind: str) -> Optional[ModelVersion]:
        """The serving version of ``kind`` with its payload, or None before the first publish."""
        reply = self._read_current(keys=[self.current_key(kind)], args=[f"{self.key_prefix}:model:{kind}:v:"])
        if not reply:
            return None
        pointer, version = _pairs(reply[0]), _pairs(reply[1])
        return self._version(kind, int(pointer["version"]), version)

    def get(self, kind: str, number: int) -> Optional[ModelVersion]:
        """A mirrored version with its payload, or None when Redis does not hold it."""
        fields = self._client.hgetall(self.version_key(kind, number))
        return self._version(kind, number, {k.decode(): v for k, v in fields.items()}) if fields else None

    def mirrored_versions(self, kind: str) -> list[int]:
        return [int(m) for m in self._client.zrange(self.versions_key(kind), 0, -1)]

    def mirror_state(self, kind: str) -> tuple[Optional[int], list[int]]:
        """(the version ``current`` names or None, every mirrored version), in one round trip."""
        pipe = self._client.pipeline(transaction=True)
        pipe.hget(self.current_key(kind), "version")
        pipe.zrange(self.versions_key(kind), 0, -1)
        serving, members = pipe.execute()
        return (None if serving is None else int(serving)), [int(m) for m in members]

    @staticmethod
    def _version(kind: str, number: int, fields: Mapping[str, bytes]) -> ModelVersion:
        payload = fields["payload"]
        return ModelVersion(
            kind=kind,
            number=number,
            payload_sha256=fields["payload_sha256"].decode(),
            created_at=_EPOCH + dt.timedelta(milliseconds=int(fields["created_at"])),
            source=fields.get("source", b"").decode(),
            counts=json.loads(fields.get("counts", b"{}")),
            metrics=json.loads(fields.get("metrics", b"{}")),
            payload=payload,
            payload_size=len(payload),
        )

    # writes -----------------------------------------------------------------

    def mirror(self, version: ModelVersion, pointer: Optional[Pointer] = None) -> bool:
        """Write ``version`` (with payload) and, if given and newer, ``pointer``; True if the pointer moved."""
        if version.payload is None:
            raise RegistryError("mirror needs the version's payload")
        if pointer is not None and pointer.version != version.number:
            raise RegistryError("the pointer must name the version mirrored with it")
        kind = version.kind
        moved = self._mirror(
            keys=[self.version_key(kind, version.number), self.versions_key(kind), self.current_key(kind)],
            args=[
                version.number, version.payload, version.payload_sha256, version.id, version.source,
                _json(version.counts, "counts"), _json(version.metrics, "metrics"), _epoch_ms(version.created_at),
                "" if pointer is None else pointer.generation,
                "" if pointer is None else int(pointer.pinned),
                "" if pointer is None else _epoch_ms(pointer.updated_at),
            ],
        )
        return bool(moved)

    def drop(self, kind: str, numbers: Iterable[int]) -> list[int]:
        """Delete the mirrored ``numbers`` of ``kind``, except the one ``current`` names; returns those deleted.

        Deleting a version Redis does not hold is a no-op (it is still
        reported), so a retried drop is harmless.
        """
        numbers = sorted(set(numbers))
        prefix = f"{self.key_prefix}:model:{check_kind(kind)}:v:"
        dropped: list[int] = []
        for start in range(0, len(numbers), _DROP_BATCH):
            batch = numbers[start:start + _DROP_BATCH]
            reply = self._drop(keys=[self.current_key(kind), self.versions_key(kind)], args=[prefix, *batch])
            dropped.extend(int(n) for n in reply)
        return dropped

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------- the registry


class ModelRegistry:
    """Versioned model snapshots: history in the warehouse, serving copy in Redis.

    Parameters
    ----------
    redis_url
        Redis holding the serving copy (``ModelStore``).
    warehouse_dsn
        PostgreSQL with ``schemas/warehouse`` migrations up to V005 applied.
    schema
        Warehouse schema (``warehouse``; tests use a private one).
    key_prefix
        Redis key prefix (``obf``), as for profiles.
    """

    def __init__(self, redis_url: str, warehouse_dsn: str, schema: str = DEFAULT_SCHEMA,
                 key_prefix: str = DEFAULT_KEY_PREFIX, store: Optional[ModelStore] = None) -> None:
        if not _SCHEMA_RE.match(schema):
            raise RegistryError("schema must be a lower-case SQL identifier")
        self.schema = schema
        self._dsn = warehouse_dsn
        self.store = store if store is not None else ModelStore(redis_url, key_prefix)

    # -- SQL plumbing ------------------------------------------------------------

    def _table(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self._dsn, application_name="onboardflow-models")

    def _lock(self, conn: psycopg.Connection, kind: str) -> None:
        # One writer per kind at a time: version numbers and pointer moves are
        # read-modify-write. Transaction-scoped, so a crash releases it.
        digest = hashlib.sha256(f"onboardflow.models.{self.schema}.{kind}".encode()).digest()
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [int.from_bytes(digest[:8], "big", signed=True)])

    _VERSION_COLUMNS = "kind, version, payload_sha256, created_at, source, counts, metrics, pruned_at"

    def _select_version(self, conn, kind: str, where: str, params: list, with_payload: bool) -> Optional[ModelVersion]:
        columns = self._VERSION_COLUMNS + (", payload" if with_payload else ", octet_length(payload)")
        row = conn.execute(
            sql.SQL(f"SELECT {columns} FROM {{}} WHERE kind = %s AND {where}").format(self._table("model_versions")),
            [kind, *params],
        ).fetchone()
        return None if row is None else self._row_version(row, with_payload)

    @staticmethod
    def _row_version(row: tuple, with_payload: bool) -> ModelVersion:
        kind, number, sha, created_at, source, counts, metrics, pruned_at, last = row
        payload = bytes(last) if with_payload and last is not None else None
        size = (None if payload is None else len(payload)) if with_payload else last
        return ModelVersion(kind, number, sha, created_at, source, counts, metrics, payload, size, pruned_at)

    @staticmethod
    def _refuse_pruned(version: ModelVersion) -> None:
        if version.pruned:
            raise RegistryError(
                f"{version.id} was pruned on {version.pruned_at.astimezone(dt.timezone.utc):%Y-%m-%d %H:%M} UTC "
                "(retention): its payload is no longer kept, so it cannot be served; `onboardflow models list` "
                "shows the versions that can")

    def _servable(self, conn, kind: str, number: int) -> ModelVersion:
        """Version ``number`` without payload; RegistryError if it does not exist or was pruned."""
        found = self._select_version(conn, kind, "version = %s", [number], with_payload=False)
        if found is None:
            raise RegistryError(f"{version_id(kind, number)} does not exist")
        self._refuse_pruned(found)
        return found

    def _pointer(self, conn, kind: str, lock: bool = False) -> Optional[Pointer]:
        row = conn.execute(
            sql.SQL("SELECT kind, version, generation, pinned, updated_at FROM {} WHERE kind = %s"
                    + (" FOR UPDATE" if lock else "")).format(self._table("model_pointers")),
            [kind],
        ).fetchone()
        return None if row is None else Pointer(*row)

    def _move(self, conn, kind: str, action: str, previous: Optional[Pointer], to: int, pinned: bool,
              reason: str) -> Pointer:
        generation = (previous.generation if previous else 0) + 1
        row = conn.execute(
            sql.SQL(
                "INSERT INTO {} (kind, version, generation, pinned, updated_at) VALUES (%s, %s, %s, %s, now()) "
                "ON CONFLICT (kind) DO UPDATE SET version = EXCLUDED.version, generation = EXCLUDED.generation, "
                "pinned = EXCLUDED.pinned, updated_at = EXCLUDED.updated_at "
                "RETURNING kind, version, generation, pinned, updated_at"
            ).format(self._table("model_pointers")),
            [kind, to, generation, pinned],
        ).fetchone()
        conn.execute(
            sql.SQL("INSERT INTO {} (kind, action, from_version, to_version, generation, reason) "
                    "VALUES (%s, %s, %s, %s, %s, %s)").format(self._table("model_events")),
            [kind, action, previous.version if previous else None, to, generation, reason],
        )
        return Pointer(*row)

    def _mirror(self, kind: str, pointer: Optional[Pointer], known: Optional[ModelVersion] = None) -> None:
        """Mirror the pointer with its version, and ``known`` (a version with payload) if it is another one."""
        if pointer is not None:
            if known is not None and known.number == pointer.version:
                served = known
            else:
                with self._connect() as conn:
                    served = self._select_version(conn, kind, "version = %s", [pointer.version], with_payload=True)
            self.store.mirror(served, pointer)
        if known is not None and (pointer is None or known.number != pointer.version):
            self.store.mirror(known)

    # -- writes ----------------------------------------------------------------

    def publish(self, kind: str, payload: bytes, counts: Optional[Mapping[str, Any]] = None,
                metrics: Optional[Mapping[str, Any]] = None, source: str = "", reason: str = "") -> PublishResult:
        """Register ``payload`` as a new version of ``kind`` and serve it (unless pinned).

        A payload already registered (same SHA-256) returns its existing
        version with ``created=False`` and changes nothing in the warehouse;
        the Redis mirror is re-run, so a publish that failed after its
        warehouse commit is completed by retrying it. If that version was
        pruned, its payload is restored (same version, not served unless the
        pointer is already on it; ``promote`` or ``rollback`` can serve it).
        """
        check_kind(kind)
        if not isinstance(payload, (bytes, bytearray)) or not payload:
            raise RegistryError("payload must be non-empty bytes")
        payload = bytes(payload)
        counts_json, metrics_json = _json(counts, "counts"), _json(metrics, "metrics")
        sha = hashlib.sha256(payload).hexdigest()
        with self._connect() as conn, conn.transaction():
            self._lock(conn, kind)
            existing = self._select_version(conn, kind, "payload_sha256 = %s", [sha], with_payload=True)
            if existing is not None and existing.pruned:
                conn.execute(
                    sql.SQL("UPDATE {} SET payload = %s, pruned_at = NULL WHERE kind = %s AND version = %s").format(
                        self._table("model_versions")),
                    [payload, kind, existing.number],
                )
                existing = self._select_version(conn, kind, "version = %s", [existing.number], with_payload=True)
            created = existing is None
            if created:
                row = conn.execute(
                    sql.SQL(
                        "INSERT INTO {0} (kind, version, payload_sha256, payload, source, counts, metrics) "
                        "SELECT %s, COALESCE(MAX(version), 0) + 1, %s, %s, %s, %s::jsonb, %s::jsonb FROM {0} "
                        "WHERE kind = %s RETURNING version"
                    ).format(self._table("model_versions")),
                    [kind, sha, payload, source, counts_json, metrics_json, kind],
                ).fetchone()
                version = self._select_version(conn, kind, "version = %s", [row[0]], with_payload=True)
            else:
                version = existing
            pointer = self._pointer(conn, kind, lock=True)
            if pointer is None or (created and not pointer.pinned):
                pointer = self._move(conn, kind, "publish", pointer, version.number, False, reason)
        self._mirror(kind, pointer, known=version)
        return PublishResult(version, created, pointer.version == version.number)

    def rollback(self, kind: str, to_version: Union[int, str, None] = None, reason: str = "") -> Pointer:
        """Serve an earlier version and pin the pointer there.

        ``to_version`` None: the newest version older than the current one
        that was not pruned (each call steps back one more). With
        ``to_version`` the call is idempotent: rolling back to the version
        already served only re-runs the Redis mirror. Raises RegistryError
        when nothing is published, there is nothing older (or every older
        version was pruned), the version does not exist or was pruned, or it
        is newer than the current one (that is ``promote``).
        """
        check_kind(kind)
        target = None if to_version is None else parse_version(kind, to_version)
        with self._connect() as conn, conn.transaction():
            self._lock(conn, kind)
            pointer = self._pointer(conn, kind, lock=True)
            if pointer is None:
                raise RegistryError(f"no {kind} model has been published yet")
            if target is None:
                older, servable = conn.execute(
                    sql.SQL("SELECT MAX(version), MAX(version) FILTER (WHERE pruned_at IS NULL) FROM {} "
                            "WHERE kind = %s AND version < %s").format(self._table("model_versions")),
                    [kind, pointer.version],
                ).fetchone()
                if older is None:
                    raise RegistryError(
                        f"{version_id(kind, pointer.version)} is the oldest {kind} version: nothing to roll back to")
                if servable is None:
                    raise RegistryError(
                        f"every {kind} version older than {version_id(kind, pointer.version)} was pruned "
                        "(retention): nothing to roll back to")
                target = servable
            else:
                self._servable(conn, kind, target)
            if target > pointer.version:
                raise RegistryError(
                    f"{version_id(kind, target)} is newer than the current {version_id(kind, pointer.version)}: "
                    "use promote")
            if target != pointer.version or not pointer.pinned:
                pointer = self._move(conn, kind, "rollback", pointer, target, True, reason)
        self._mirror(kind, pointer)
        return pointer

    def promote(self, kind: str, to_version: Union[int, str, None] = None, reason: str = "") -> Pointer:
        """Serve ``to_version`` (default: the newest) and unpin, so publishes move the pointer again.

        Raises RegistryError when nothing is published, or the version does not
        exist or was pruned (retention never prunes the newest version).
        """
        check_kind(kind)
        target = None if to_version is None else parse_version(kind, to_version)
        with self._connect() as conn, conn.transaction():
            self._lock(conn, kind)
            pointer = self._pointer(conn, kind, lock=True)
            if target is None:
                row = conn.execute(
                    sql.SQL("SELECT MAX(version) FROM {} WHERE kind = %s").format(self._table("model_versions")),
                    [kind],
                ).fetchone()
                if row[0] is None:
                    raise RegistryError(f"no {kind} model has been published yet")
                target = row[0]
            self._servable(conn, kind, target)
            if pointer is None or target != pointer.version or pointer.pinned:
                pointer = self._move(conn, kind, "promote", pointer, target, False, reason)
        self._mirror(kind, pointer)
        return pointer

    def sync(self, kind: str) -> int:
        """Re-mirror every kept version and the pointer of ``kind`` to Redis (after Redis lost data).

        Returns how many versions were mirrored. Pruned versions are not
        mirrored, and any Redis still holds are deleted.
        """
        check_kind(kind)
        _, mirrored = self.store.mirror_state(kind)
        with self._connect() as conn:
            pointer = self._pointer(conn, kind)
            rows = conn.execute(
                sql.SQL("SELECT version, pruned_at IS NOT NULL FROM {} WHERE kind = %s ORDER BY version").format(
                    self._table("model_versions")), [kind]).fetchall()
            mirrored_now = 0
            for number in (n for n, pruned in rows if not pruned):
                version = self._select_version(conn, kind, "version = %s", [number], with_payload=True)
                if version.pruned:  # a prune ran since the listing
                    continue
                self.store.mirror(version, pointer if pointer and pointer.version == number else None)
                mirrored_now += 1
        self.store.drop(kind, {n for n, pruned in rows if pruned}.intersection(mirrored))
        return mirrored_now

    def prune(self, kind: str, keep_last: int, keep_days: Optional[float] = None,
              dry_run: bool = False) -> list[int]:
        """Drop the payloads of old versions of ``kind`` from the warehouse and Redis; returns their numbers.

        Kept whatever their age: the version the warehouse pointer serves and
        the one Redis serves (they differ only while a mirror is pending; a
        pinned pointer is one of them), the newest ``keep_last`` versions
        (>= 1), the versions the newest ``keep_last`` pointer moves served
        (after rollbacks these are not the newest), and with ``keep_days``:
        versions created, or served at any time, in the last ``keep_days``
        days. A pruned version keeps its warehouse row (metadata,
        ``pruned_at``), so ``versions``, ``events`` and ``models list`` still
        show it.

        ``dry_run`` returns what would be pruned and changes nothing.
        Otherwise the warehouse change is one transaction under the kind's
        writer lock (publish, rollback and promote wait for it, and it for
        them); then Redis drops the pruned versions, plus any pruned version
        it still holds from an earlier prune (whose Redis step failed, or
        raced a slow publisher's mirror), never the one its pointer names.
        Idempotent: a second call prunes nothing and returns []. Cheap when
        there is nothing to prune (one Redis round trip, a few indexed
        queries), so the learner can call it after every publish.
        """
        check_kind(kind)
        check_retention(keep_last, keep_days)
        served_by_redis, mirrored = self.store.mirror_state(kind)
        versions = self._table("model_versions")
        with self._connect() as conn, conn.transaction():
            self._lock(conn, kind)
            pointer = self._pointer(conn, kind)
            now, newest = conn.execute(
                sql.SQL("SELECT now(), MAX(version) FROM {} WHERE kind = %s").format(versions), [kind]).fetchone()
            if newest is None:
                return []
            kept = dict(conn.execute(
                sql.SQL("SELECT version, created_at FROM {} WHERE kind = %s AND pruned_at IS NULL "
                        "AND version <= %s").format(versions),
                [kind, newest - keep_last],
            ).fetchall())
            cutoff = retention_cutoff(now, keep_days)
            doomed: list[int] = []
            if kept:
                protected = self._recently_served(conn, kind, keep_last, cutoff)
                protected.update(n for n in (served_by_redis, pointer.version if pointer else None) if n is not None)
                doomed = prunable_versions(kept, newest, protected, keep_last, cutoff)
            if dry_run:
                return doomed
            if doomed:
                conn.execute(
                    sql.SQL("UPDATE {} SET payload = NULL, pruned_at = now() "
                            "WHERE kind = %s AND version = ANY(%s)").format(versions),
                    [kind, doomed],
                )
            stale = [n for (n,) in conn.execute(
                sql.SQL("SELECT version FROM {} WHERE kind = %s AND version = ANY(%s) "
                        "AND pruned_at IS NOT NULL").format(versions),
                [kind, mirrored],
            ).fetchall()] if mirrored else []
        if doomed or stale:
            self.store.drop(kind, set(doomed).union(stale))
        return doomed

    def _recently_served(self, conn, kind: str, keep_last: int, cutoff: Optional[dt.datetime]) -> set[int]:
        """Versions the newest ``keep_last`` pointer moves served, and every version served at/after ``cutoff``.

        A move's ``to_version`` was served from the move on; its
        ``from_version`` until the move, so a move after ``cutoff`` names two
        versions served since then.
        """
        events = self._table("model_events")
        query = sql.SQL("SELECT to_version, NULL::integer FROM "
                        "(SELECT to_version FROM {} WHERE kind = %s ORDER BY id DESC LIMIT %s) recent"
                        ).format(events)
        params: list = [kind, keep_last]
        if cutoff is not None:
            query = sql.SQL("{} UNION SELECT to_version, from_version FROM {} WHERE kind = %s AND at >= %s").format(
                query, events)
            params += [kind, cutoff]
        served: set[int] = set()
        for to_version, from_version in conn.execute(query, params).fetchall():
            served.add(to_version)
            if from_version is not None:
                served.add(from_version)
        return served

    # -- reads -----------------------------------------------------------------

    def current(self, kind: str) -> Optional[ModelVersion]:
        """The version scoring workers serve now (from Redis), with its payload; None before any publish."""
        return self.store.current(check_kind(kind))

    def get(self, kind: str, version: Union[int, str]) -> ModelVersion:
        """Any version not pruned, with its payload (from the warehouse); RegistryError if missing or pruned."""
        found = self.describe(kind, version, with_payload=True)
        self._refuse_pruned(found)
        return found

    def describe(self, kind: str, version: Union[int, str], with_payload: bool = False) -> ModelVersion:
        """Any version ever published, pruned or not; without its payload unless asked for."""
        number = parse_version(check_kind(kind), version)
        with self._connect() as conn:
            found = self._select_version(conn, kind, "version = %s", [number], with_payload=with_payload)
        if found is None:
            raise RegistryError(f"{version_id(kind, number)} does not exist")
        return found

    def versions(self, kind: str) -> list[ModelVersion]:
        """Every version of ``kind``, oldest first, without payloads (pruned ones included, ``pruned_at`` set)."""
        check_kind(kind)
        with self._connect() as conn:
            rows = conn.execute(
                sql.SQL(f"SELECT {self._VERSION_COLUMNS}, octet_length(payload) FROM {{}} "
                        "WHERE kind = %s ORDER BY version").format(self._table("model_versions")),
                [kind],
            ).fetchall()
        return [self._row_version(row, with_payload=False) for row in rows]

    def pointer(self, kind: str) -> Optional[Pointer]:
        """The serving pointer as the warehouse records it (None before any publish)."""
        with self._connect() as conn:
            return self._pointer(conn, check_kind(kind))

    def events(self, kind: str) -> list[PointerEvent]:
        """Every pointer move of ``kind``, oldest first."""
        check_kind(kind)
        with self._connect() as conn:
            rows = conn.execute(
                sql.SQL("SELECT kind, action, from_version, to_version, generation, reason, at FROM {} "
                        "WHERE kind = %s ORDER BY id").format(self._table("model_events")),
                [kind],
            ).fetchall()
        return [PointerEvent(*row) for row in rows]

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "ModelRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
