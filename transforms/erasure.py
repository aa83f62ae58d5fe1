"""The right to erasure: remove one user from every store and keep them out.

In: an ``ErasureRequest`` (the user's pseudonym, who asked, when, where the
request came from). Out: an ``ErasureReport`` with how many items each store
removed; the same report is the audit row. The raw user id never reaches
this module: callers pseudonymize it first (runners/cli/erase.py), so
nothing here can log or store it.

What one erasure does, in this order (docs/security.md, "Right to erasure"):

1. **Suppress** the pseudonym: ``{prefix}:erased`` in Redis and
   ``erased_users`` in the warehouse. From then on the profile upsert script
   answers every write of this user as stale (transforms/profile_store/writer.py)
   and warehouse inserts leave the user's rows out
   (transforms/warehouse/writer.py), whichever engine writes and whatever it
   replays: the streaming state cannot bring the user back.
2. **Redis**: the profile hash, the user's membership of every segment set,
   and the outbox entries not yet relayed that name the user (segment changes,
   profile snapshots).
3. **Warehouse**, in one transaction: the user's rows in ``events``,
   ``late_events``, ``profile_snapshots``, ``segment_changes`` and
   ``experiment_exposures``, their ``identity_aliases`` links, and the audit
   row (``erasure_audit``).

The devices identity stitching linked to the account (transforms/identity.py)
are erased with it: each device pseudonym is suppressed and removed as above
(its visitor profile, memberships, stitched marker and its anonymous events).

Every step is idempotent, and the audit row is keyed by the request's id: a
request erased twice (a retried command, a replayed request topic) removes
nothing more and keeps its first audit row.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import redis
from psycopg import sql

from .connections import warehouse_connect
from .outbox.keys import PROFILE_SNAPSHOTS, SEGMENT_CHANGES
from .profile_store.keys import ProfileKeys
from .warehouse.schema import DEFAULT_SCHEMA, check_schema

#: Warehouse tables holding rows keyed by ``user_key``.
USER_TABLES = ("events", "late_events", "profile_snapshots", "segment_changes", "experiment_exposures")
#: Outbox streams whose entries name a user (field ``u``).
USER_OUTBOXES = (SEGMENT_CHANGES, PROFILE_SNAPSHOTS)
_SCAN_COUNT = 1000
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErasureRequest:
    """Erase ``user_key`` (the pseudonym). ``source``: ``cli`` or ``topic:<topic>:<partition>:<offset>``;
    ``erasure_id`` keys the audit row (a topic request's coordinates make a replay recognisable)."""

    user_key: str
    requested_by: str
    source: str = "cli"
    requested_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    erasure_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        if not self.user_key or not self.requested_by:
            raise ValueError("an erasure needs the user's pseudonym and who requested it")


@dataclass(frozen=True)
class ErasureReport:
    """What one erasure removed, by store; ``already_audited``: the request had been carried out before."""

    erasure_id: str
    user_key: str
    removed: dict[str, int]
    completed_at: dt.datetime
    already_audited: bool = False

    @property
    def total(self) -> int:
        return sum(self.removed.values())


class UserEraser:
    """Carries out ``ErasureRequest``s against one deployment's Redis (``client``, ``keys``) and warehouse."""

    def __init__(self, client: redis.Redis, keys: ProfileKeys, warehouse_dsn: str,
                 warehouse_schema: str = DEFAULT_SCHEMA, connect_timeout_s: int = 10):
        self._redis = client
        self._keys = keys
        self._dsn = warehouse_dsn
        self._schema = check_schema(warehouse_schema)
        self._connect_timeout_s = connect_timeout_s

    def erase(self, request: ErasureRequest) -> ErasureReport:
        """Suppress, then remove (module docstring); the report is also the audit row.

        The devices stitched into the account (``identity_aliases``, transforms/identity.py) are the
        user's too: each is suppressed and removed the same way, with its alias rows and markers."""
        removed: dict[str, int] = {}
        with warehouse_connect(self._dsn, connect_timeout=self._connect_timeout_s,
                               application_name="onboardflow-erasure") as conn:
            devices = [row[0] for row in conn.execute(
                sql.SQL("SELECT DISTINCT anonymous_key FROM {} WHERE user_key = %s AND status = 'linked'")
                .format(self._table("identity_aliases")), (request.user_key,))]
        keys = [request.user_key, *devices]
        removed["identity.devices"] = len(devices)
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(self._keys.erased, *keys)
        pipe.incr(self._keys.erased_version)
        pipe.execute()
        for key in keys:
            for name, n in self._erase_redis(key).items():
                removed[name] = removed.get(name, 0) + n
        removed["redis.stitched_markers"] = int(self._redis.delete(*(self._keys.stitched(d) for d in devices))
                                                if devices else 0)
        with warehouse_connect(self._dsn, connect_timeout=self._connect_timeout_s,
                               application_name="onboardflow-erasure") as conn:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(sql.SQL("INSERT INTO {} (user_key, erased_at) VALUES (%s, %s) ON CONFLICT DO NOTHING")
                                .format(self._table("erased_users")), [(k, request.requested_at) for k in keys])
                for table in USER_TABLES:
                    cur.execute(sql.SQL("DELETE FROM {} WHERE user_key = ANY(%s)").format(self._table(table)),
                                (keys,))
                    removed[f"warehouse.{table}"] = cur.rowcount
                cur.execute(sql.SQL("DELETE FROM {} WHERE user_key = %s OR anonymous_key = ANY(%s)")
                            .format(self._table("identity_aliases")), (request.user_key, devices))
                removed["warehouse.identity_aliases"] = cur.rowcount
                completed_at = dt.datetime.now(dt.timezone.utc)
                cur.execute(
                    sql.SQL("INSERT INTO {} (erasure_id, user_key, requested_by, source, requested_at, completed_at,"
                            " removed) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (erasure_id) DO NOTHING")
                    .format(self._table("erasure_audit")),
                    (request.erasure_id, request.user_key, request.requested_by, request.source,
                     request.requested_at, completed_at, json.dumps(removed, sort_keys=True)))
                first = cur.rowcount == 1
        return ErasureReport(request.erasure_id, request.user_key, removed, completed_at, already_audited=not first)

    def is_erased(self, user_key: str) -> bool:
        """Whether ``user_key`` is suppressed in Redis."""
        return bool(self._redis.sismember(self._keys.erased, user_key))

    # -- Redis -------------------------------------------------------------------

    def _erase_redis(self, user_key: str) -> dict[str, int]:
        keys = self._keys
        memberships = 0
        for segment_key in self._redis.scan_iter(match=keys.segment_prefix + "*", count=_SCAN_COUNT):
            memberships += int(self._redis.srem(segment_key, user_key))
        removed = {
            "redis.profile": int(self._redis.delete(keys.profile(user_key))),
            "redis.segment_memberships": memberships,
        }
        for name in USER_OUTBOXES:
            removed[f"redis.outbox.{name}"] = self._erase_stream_entries(keys.outbox(name), user_key)
        return removed

    def _erase_stream_entries(self, stream: str, user_key: str) -> int:
        """Delete the entries of ``stream`` whose user field ``u`` is ``user_key``; how many."""
        removed, start = 0, "-"
        target = user_key.encode()
        while True:
            entries = self._redis.xrange(stream, min=start, max="+", count=_SCAN_COUNT)
            if not entries:
                return removed
            ids = [entry_id for entry_id, fields in entries if fields.get(b"u") == target]
            if ids:
                removed += int(self._redis.xdel(stream, *ids))
            if len(entries) < _SCAN_COUNT:
                return removed
            start = "(" + _text(entries[-1][0])

    def _table(self, name: str) -> sql.Identifier:
        return sql.Identifier(self._schema, name)


class ErasedUsers:
    """``erased(user_key)``: whether the user is erased, from an in-process copy of ``{prefix}:erased``.

    For the engines' user stages (``ProfileMachine(erased=...)``): a set
    lookup per event. The copy is checked against ``{prefix}:erased:version``
    (one GET) at most every ``refresh_s`` and reloaded when an erasure changed
    it, so a new erasure reaches a running stage within ``refresh_s``. Redis
    unreachable: the last copy is kept (the write script refuses the user's
    writes anyway) and the next check tries again.
    """

    def __init__(self, client: redis.Redis, keys: ProfileKeys, refresh_s: float = 5.0, clock=time.monotonic):
        self._redis = client
        self._keys = keys
        self._refresh_s = refresh_s
        self._clock = clock
        self._members: frozenset = frozenset()
        self._version: Optional[bytes] = None
        self._check_at = float("-inf")

    def __call__(self, user_key: str) -> bool:
        if self._clock() >= self._check_at:
            self.refresh()
        return user_key in self._members

    def refresh(self) -> None:
        """Reload the copy if the set changed since the last load."""
        self._check_at = self._clock() + self._refresh_s
        try:
            version = self._redis.get(self._keys.erased_version)
            if version != self._version or version is None and self._members:
                members = self._redis.smembers(self._keys.erased)
                self._members = frozenset(_text(m) for m in members)
                self._version = version
        except redis.RedisError:
            _LOG.warning("the erased users could not be read; the last copy (%d users) stays", len(self._members))


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def erasure_request_from_message(value: bytes, topic: str, partition: int, offset: int,
                                 pseudonymize) -> Optional[ErasureRequest]:
    """An ``ErasureRequest`` from one record of the erasure-request topic, or None when malformed.

    The record's value is JSON: ``{"user_id": "...", "requested_by": "...",
    "requested_at": "<ISO 8601>"}`` (``requested_at`` optional). ``pseudonymize``
    turns the raw user id into the pseudonym; the raw id goes no further. The
    request's id is its coordinates, so a replayed topic erases nothing twice.
    """
    try:
        body = json.loads(value)
        user_id, requested_by = body["user_id"], body["requested_by"]
        if not isinstance(user_id, str) or not user_id or not isinstance(requested_by, str) or not requested_by:
            return None
        at = body.get("requested_at")
        requested_at = dt.datetime.fromisoformat(at.replace("Z", "+00:00")) if isinstance(at, str) else \
            dt.datetime.now(dt.timezone.utc)
        if requested_at.tzinfo is None:
            requested_at = requested_at.replace(tzinfo=dt.timezone.utc)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    source = f"topic:{topic}:{partition}:{offset}"
    return ErasureRequest(pseudonymize(user_id), requested_by[:200], source=source, requested_at=requested_at,
                          erasure_id=source)
