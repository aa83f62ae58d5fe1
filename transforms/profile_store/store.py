"""``ProfileStore``: reads of the Redis profile store for apps and the CLI, and segment sweeps.

In: a raw user id (or a user_key), a segment name. Out: the typed profile
dict (``decode_profile``), segment members, a ``SweepReport``. ``get``
derives the key from the raw id with the anonymization stage's
``Pseudonymizer``, so raw ids never reach Redis. Layout and TTL semantics:
docs/redis-contract.md.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Union

import redis

from ..anonymize import Pseudonymizer, SecretKey
from ..connections import redis_client
from ..outbox.keys import SEGMENT_CHANGES
from .encoding import decode_profile, now_ms
from .keys import DEFAULT_KEY_PREFIX, ProfileKeys

# KEYS[1] segment set, KEYS[2] the segment-change outbox stream ('' for none).
# ARGV: [1] profile key prefix, [2] segment name, [3] now (ms), [4..] members
# to check. A member stays only if its profile exists and still lists the
# segment; checked and removed atomically so a concurrent upsert cannot be
# undone by the sweep, and each removal is recorded as an exit in the outbox
# (version now * 1000, reason ``expired`` or ``swept``).
SWEEP_SEGMENT_LUA = """
local removed = 0
for i = 4, #ARGV do
  local member = ARGV[i]
  local segs = redis.call('HGET', ARGV[1] .. member, 'segments')
  local keep = false
  if segs then
    local ok, decoded = pcall(cjson.decode, segs)
    if ok and type(decoded) == 'table' then
      for _, s in ipairs(decoded) do
        if s == ARGV[2] then keep = true break end
      end
    end
  end
  if not keep then
    redis.call('SREM', KEYS[1], member)
    removed = removed + 1
    if KEYS[2] ~= '' then
      redis.call('XADD', KEYS[2], '*', 'u', member, 'v', tostring(tonumber(ARGV[3]) * 1000), 'at', ARGV[3],
                 'old', cjson.encode({ARGV[2]}), 'new', '[]', 'why', segs and 'swept' or 'expired')
    end
  end
end
return removed
"""


@dataclass(frozen=True)
class SweepReport:
    segments_scanned: int
    members_checked: int
    members_removed: int


class ProfileStore:
    """Read client for downstream apps: profiles by raw user id, segment members.

    ``secret`` is the pseudonymization secret of the pipeline (bytes or a
    ``SecretKey``); ``get`` derives ``user_key`` from the raw user id with the
    same ``Pseudonymizer`` as the anonymization stage, so callers never handle
    keys and raw ids never reach Redis. ``secret`` may be None for clients
    that only use ``get_by_key``, ``segment_members`` and ``sweep_segments``.
    """

    def __init__(
        self,
        redis_url: str,
        secret: Union[bytes, str, SecretKey, None] = None,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        client: Optional[redis.Redis] = None,
    ) -> None:
        self.keys = ProfileKeys(key_prefix)
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        self._pseudonymizer = Pseudonymizer(secret) if secret is not None else None
        # ``client`` lets an app share its own connection pool.
        self._client = client if client is not None else redis_client(redis_url)
        self._sweep = self._client.register_script(SWEEP_SEGMENT_LUA)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "ProfileStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def user_key(self, user_id: str) -> str:
        if self._pseudonymizer is None:
            raise ValueError("ProfileStore needs the pseudonymization secret to look up raw user ids")
        if not isinstance(user_id, str) or not user_id:
            raise ValueError("user_id must be a non-empty string")
        return self._pseudonymizer.user_key(user_id)

    def get(self, user_id: str) -> Optional[dict[str, Any]]:
        """The profile of a raw user id, or None when there is none (or it expired)."""
        return self.get_by_key(self.user_key(user_id))

    def get_by_key(self, user_key: str) -> Optional[dict[str, Any]]:
        raw = self._client.hgetall(self.keys.profile(user_key))
        return decode_profile(raw) if raw else None

    def get_many(self, user_ids: Iterable[str]) -> list[Optional[dict[str, Any]]]:
        """Profiles of many raw user ids in one round trip, in input order (None: absent)."""
        user_keys = [self.user_key(u) for u in user_ids]
        pipe = self._client.pipeline(transaction=False)
        for key in user_keys:
            pipe.hgetall(self.keys.profile(key))
        return [decode_profile(raw) if raw else None for raw in pipe.execute()]

    def ttl_s(self, user_key: str) -> Optional[int]:
        """Seconds until the profile expires; None if absent or without expiry."""
        ttl = self._client.ttl(self.keys.profile(user_key))
        return ttl if ttl >= 0 else None

    def segment_members(self, segment: str) -> set[str]:
        """user_keys in a segment (may include expired profiles until the next sweep)."""
        return {m.decode("utf-8") for m in self._client.sscan_iter(self.keys.segment(segment), count=1000)}

    def segments(self) -> list[str]:
        prefix = self.keys.segment_prefix
        names = {
            k.decode("utf-8")[len(prefix):]
            for k in self._client.scan_iter(match=prefix + "*", count=1000, _type="set")
        }
        return sorted(names)

    def sweep_segments(self, batch_size: int = 500) -> SweepReport:
        """Remove segment members whose profile expired or no longer lists the segment.

        Safe to run while the pipeline writes: each member is checked and
        removed atomically inside Redis.
        """
        scanned = checked = removed = 0
        for segment in self.segments():
            scanned += 1
            key = self.keys.segment(segment)
            # Members are collected first: removing while SSCAN iterates may skip some.
            members = list(self._client.sscan_iter(key, count=1000))
            for start in range(0, len(members), batch_size):
                batch = members[start:start + batch_size]
                checked += len(batch)
                removed += int(self._sweep(keys=[key, self.keys.outbox(SEGMENT_CHANGES)],
                                           args=[self.keys.profile_prefix, segment, now_ms(), *batch]))
        return SweepReport(scanned, checked, removed)
