"""``ModelRegistry``: publish, serve, roll back, promote and prune model versions (the warehouse decides, Redis serves).
"""
from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from typing import Any, Optional, Union

import psycopg
from psycopg import sql

from ...transforms.connections import warehouse_connect
from .retention import check_retention, prunable_versions, retention_cutoff
from .store import ModelStore
from .versions import (
    _SCHEMA_RE,
    DEFAULT_KEY_PREFIX,
    DEFAULT_SCHEMA,
    ModelVersion,
    Pointer,
    PointerEvent,
    PublishResult,
    RegistryError,
    _json,
    check_kind,
    parse_version,
    version_id,
)


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
        return warehouse_connect(self._dsn, application_name="onboardflow-models")

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
