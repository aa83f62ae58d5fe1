"""The Redis serving copy of the model registry: what scoring workers read in one round trip.

Key layout in models/model_registry/__init__.py and docs/redis-contract.md.
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import Optional

import redis

from ...transforms.connections import redis_client
from .versions import (
    _EPOCH,
    _PREFIX_RE,
    DEFAULT_KEY_PREFIX,
    ModelVersion,
    Pointer,
    RegistryError,
    _epoch_ms,
    _json,
    check_kind,
)

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
        self._client = client if client is not None else redis_client(redis_url)
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

    def pointer(self, kind: str) -> Optional[Pointer]:
        """The serving pointer of ``kind`` as Redis holds it (no payload read), or None before the first publish."""
        fields = self._client.hgetall(self.current_key(kind))
        if not fields:
            return None
        fields = {k.decode(): v.decode() for k, v in fields.items()}
        return Pointer(kind, int(fields["version"]), int(fields.get("generation") or 0), fields.get("pinned") == "1",
                       _EPOCH + dt.timedelta(milliseconds=int(fields.get("updated_at") or 0)))

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
