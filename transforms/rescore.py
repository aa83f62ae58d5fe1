"""The profile store as the segmenter's population, and re-scoring it in place when a model is published.

Engine-free (plain Redis client); the learning stage (``OnlineLearner`` in ``transforms/
online_models.py``) calls it at each event-time mark:

* ``ProfileSweep.population()`` reads every profile hash of the store
  (``SCAN`` over ``{prefix}:profile:*`` and pipelined ``HGETALL``), decoded
  and ordered by user key: what ``Segmenter.fit`` is fitted on. At the end of
  a bounded run the store holds every user's final profile, so the fit -- and
  every cluster -- is the same run after run (docs/models.md "Reproducible
  segments").
* ``ProfileSweep.rescore(profiles, score)`` writes the model fields
  (``MODEL_FIELDS``: cluster, label, propensity, model version, track) that
  ``score(profile)`` gives back into each hash whose values differ -- with a
  compare-and-set on the profile's ``version`` in one Lua script, so a
  profile the pipeline rewrote meanwhile (a newer version, scored by its own
  writer) is left alone. Users who send no event after a publish are scored
  all the same ("everyone scored"). The fields are written in the
  store's encoding (``transforms/profile_store/encoding.py``), ``_types`` updated, and
  the hash keeps its TTL. The history (warehouse snapshots, outbox) records
  the new fields with the user's next profile write, not the sweep.

Counts (``SweepCounts``) say how many profiles were read, re-scored, already
current, overtaken by a newer write, and left without a cluster: the share of
unscored profiles is the ``onboardflow_profiles_unscored`` gauge.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import redis

from ..schemas.contract import MODEL_FIELDS
from .connections import redis_client
from .profile_store.encoding import decode_profile
from .profile_store.encoding import encode_value as _encode_value
from .profile_store.keys import ProfileKeys

_LOG = logging.getLogger(__name__)

# KEYS[1] profile hash. ARGV[1] the version the new fields were computed from,
# ARGV[2] JSON {field: encoded value}, ARGV[3] JSON {field: type},
# ARGV[4] JSON [fields to remove]. Applied only while the stored version is
# still ARGV[1]; returns 1 if written, 0 if the profile moved on or is gone.
RESCORE_LUA = """
local stored = redis.call('HMGET', KEYS[1], 'version', '_types')
if not stored[1] or stored[1] ~= ARGV[1] then return 0 end
local ok, types = pcall(cjson.decode, stored[2] or '{}')
if not ok or type(types) ~= 'table' then types = {} end
local args = {}
for name, value in pairs(cjson.decode(ARGV[2])) do
  args[#args + 1] = name
  args[#args + 1] = value
end
for name, kind in pairs(cjson.decode(ARGV[3])) do types[name] = kind end
for _, name in ipairs(cjson.decode(ARGV[4])) do
  redis.call('HDEL', KEYS[1], name)
  types[name] = nil
end
args[#args + 1] = '_types'
args[#args + 1] = cjson.encode(types)
redis.call('HSET', KEYS[1], unpack(args))
return 1
"""


@dataclass
class SweepCounts:
    """What one ``rescore`` did."""

    profiles: int = 0      # profiles looked at
    rescored: int = 0      # model fields rewritten
    current: int = 0       # already carried what the model says
    moved_on: int = 0      # rewritten by the pipeline meanwhile (or expired): left alone
    unscored: int = 0      # without a cluster after the sweep (the model could not assign one)


class ProfileSweep:
    """Reads the store's profiles and re-scores them (module docstring)."""

    def __init__(self, redis_url: str, key_prefix: str, page: int = 500,
                 client: Optional[redis.Redis] = None) -> None:
        if page < 1:
            raise ValueError("page must be >= 1")
        self.keys = ProfileKeys(key_prefix)
        self._page = page
        self._client = client if client is not None else redis_client(redis_url)
        self._script = self._client.register_script(RESCORE_LUA)

    def population(self) -> list[dict]:
        """Every profile in the store, decoded, ordered by ``user_key``."""
        prefix = self.keys.profile_prefix
        names = sorted(self._client.scan_iter(match=prefix + "*", count=1000, _type="hash"))
        out = []
        for start in range(0, len(names), self._page):
            pipe = self._client.pipeline(transaction=False)
            for name in names[start:start + self._page]:
                pipe.hgetall(name)
            for name, raw in zip(names[start:start + self._page], pipe.execute()):
                if not raw:
                    continue  # expired between SCAN and HGETALL
                profile = decode_profile(raw)
                profile.setdefault("user_key", name.decode("utf-8")[len(prefix):])
                out.append(profile)
        out.sort(key=lambda p: p["user_key"])
        return out

    def rescore(self, profiles: Iterable[Mapping[str, Any]],
                score: Callable[[Mapping[str, Any]], Mapping[str, Any]]) -> SweepCounts:
        """Write ``score(profile)``'s ``MODEL_FIELDS`` into each stored profile that differs (compare-and-set)."""
        counts = SweepCounts()
        batch: list[tuple[str, list]] = []
        for profile in profiles:
            counts.profiles += 1
            scored = score(profile)
            if scored.get("cluster_id") is None:
                counts.unscored += 1
            changed = {n: scored.get(n) for n in MODEL_FIELDS if scored.get(n) != profile.get(n)}
            version = profile.get("version")
            if not changed or not isinstance(version, int):
                counts.current += 1
                continue
            values, types, removed = {}, {}, []
            for name, value in changed.items():
                if value is None:
                    removed.append(name)
                else:
                    types[name], values[name] = _encode_value(name, value)
            batch.append((self.keys.profile(profile["user_key"]),
                          [str(version), json.dumps(values), json.dumps(types), json.dumps(removed)]))
            if len(batch) >= self._page:
                self._flush(batch, counts)
        self._flush(batch, counts)
        return counts

    def _flush(self, batch: list, counts: SweepCounts) -> None:
        if not batch:
            return
        pipe = self._client.pipeline(transaction=False)
        for key, args in batch:
            self._script(keys=[key], args=args, client=pipe)
        for written in pipe.execute():
            if written:
                counts.rescored += 1
            else:
                counts.moved_on += 1
        batch.clear()

    def close(self) -> None:
        self._client.close()
