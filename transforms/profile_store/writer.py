"""Monotonic profile upserts: the Lua script and ``RedisProfileWriter``, its pipelined client.

In: ``EncodedProfile``s (at most one per user_key) and a write id. Out: one
``WriteOutcome`` per item: applied, stale (not applied) or rejected by Redis.

Writes are monotonic. The upsert is one Lua script (loaded once per client
with SCRIPT LOAD, called with EVALSHA): it writes only when the incoming
``version`` (``as_of * 1000 + n``: event time, then the number of events folded in)
is strictly greater than the stored one, so replays and out-of-order
deliveries never roll a profile back. An applied write replaces the whole
hash, refreshes the TTL, moves the user between segment sets, and appends
the write's history to the outbox streams, all atomically. A write carries
a write id (``_write_id``): when a reply is lost and the write is sent
again, the script recognizes its own earlier write and reports it applied.
Semantics and layout: docs/redis-contract.md; the outboxes:
docs/reliability.md.
"""
from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..connections import redis_client
from ..outbox.keys import PROFILE_SNAPSHOTS, SEGMENT_CHANGES
from ..sinks.retry import DEFAULT_MAX_ATTEMPTS, RetryPolicy
from .encoding import EncodedProfile
from .keys import DEFAULT_KEY_PREFIX, ProfileKeys

DEFAULT_PROFILE_TTL_S = 90 * 24 * 3600
_LOG = logging.getLogger(__name__)

# Script replies.
_STALE, _APPLIED, _ALREADY_APPLIED = 0, 1, 2

# KEYS[1] profile hash, KEYS[2] the segment-change outbox stream, KEYS[3] the
# profile-snapshot outbox stream (transforms/outbox/; '' for either: none),
# KEYS[4] the set of erased user_keys (transforms/erasure.py): an erased user's
# write is answered as stale, so nothing of it is stored or relayed.
# KEYS[5] the user's stitched marker (a visitor retired into an account,
# RETIRE_VISITOR_LUA): its writes are answered as stale too.
# ARGV: [1] version, [2] write id, [3] ttl ms (0: none),
# [4] segment key prefix, [5] user_key (the set member), [6] n segments,
# [7 .. 6+n] segments, [7+n] the hash fields as one JSON object of strings
# (version and _types included; the script adds _write_id). One JSON argument
# instead of ~70 name/value arguments: packing arguments is the client's
# bottleneck, decoding one object in Lua costs the server a few microseconds.
# Segment keys are built inside the script because the old segments are only
# known once the stored hash is read: this is why the store needs a single
# Redis node (or Sentinel), not Redis Cluster.
UPSERT_PROFILE_LUA = """
local key = KEYS[1]
if redis.call('SISMEMBER', KEYS[4], ARGV[5]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local incoming = tonumber(ARGV[1])
local stored = redis.call('HMGET', key, 'version', '_write_id', 'segments', '_prev_segments')
local stored_version = tonumber(stored[1])
if stored_version then
  if stored_version > incoming then return 0 end
  if stored_version == incoming then
    if stored[2] == ARGV[2] then return {2, stored[4] or '[]'} end
    return 0
  end
end
local old = {}
if stored[3] then
  local ok, decoded = pcall(cjson.decode, stored[3])
  if ok and type(decoded) == 'table' then
    for _, s in ipairs(decoded) do
      if type(s) == 'string' then old[s] = true end
    end
  end
end
local n = tonumber(ARGV[6])
local new = {}
for i = 7, 6 + n do new[ARGV[i]] = true end
local fields = cjson.decode(ARGV[7 + n])
redis.call('DEL', key)
local args = {}
for name, value in pairs(fields) do
  args[#args + 1] = name
  args[#args + 1] = value
  if #args >= 200 then
    redis.call('HSET', key, unpack(args))
    args = {}
  end
end
args[#args + 1] = '_write_id'
args[#args + 1] = ARGV[2]
args[#args + 1] = '_prev_segments'
args[#args + 1] = stored[3] or '[]'
redis.call('HSET', key, unpack(args))
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
local prefix, member = ARGV[4], ARGV[5]
for s, _ in pairs(old) do
  if not new[s] then redis.call('SREM', prefix .. s, member) end
end
for s, _ in pairs(new) do redis.call('SADD', prefix .. s, member) end
-- The history of this write, in the same script: recorded if and only if the write is.
local changed = false
for s, _ in pairs(old) do if not new[s] then changed = true end end
for s, _ in pairs(new) do if not old[s] then changed = true end end
if changed and KEYS[2] ~= '' then
  redis.call('XADD', KEYS[2], '*', 'u', member, 'v', ARGV[1],
             'at', fields['as_of'] or tostring(math.floor(incoming / 1000)),
             'old', stored[3] or '[]', 'new', fields['segments'] or '[]')
end
if KEYS[3] ~= '' then
  redis.call('XADD', KEYS[3], '*', 'u', member, 'v', ARGV[1], 'f', ARGV[7 + n])
end
return {1, stored[3] or '[]'}
"""


# Retire a visitor's profile into the account it identified as (transforms/identity.py).
# KEYS[1] the visitor's profile hash, KEYS[2] its stitched marker, KEYS[3] the
# segment-change outbox ('' for none), KEYS[4] the set of erased user_keys (an
# erased visitor is left alone: erasure removed it, transforms/erasure.py). ARGV: [1] segment key prefix, [2] the
# visitor's key (the set member), [3] the account's key, [4] marker ttl ms (0:
# none), [5] the link's event time (ms). Sets the marker first (from then on the
# upsert script refuses the visitor's writes, whatever order they come in), then
# removes the profile and its segment memberships and records the exits, at the
# next version, as one segment change (reason "identity:stitched"). Idempotent: a second
# call finds no profile and returns 0.
RETIRE_VISITOR_LUA = """
if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[3])
local ttl = tonumber(ARGV[4])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
local stored = redis.call('HMGET', KEYS[1], 'version', 'segments', 'as_of')
if not stored[1] then return 0 end
local old = {}
if stored[2] then
  local ok, decoded = pcall(cjson.decode, stored[2])
  if ok and type(decoded) == 'table' then
    for _, s in ipairs(decoded) do
      if type(s) == 'string' then old[#old + 1] = s end
    end
  end
end
for _, s in ipairs(old) do redis.call('SREM', ARGV[1] .. s, ARGV[2]) end
redis.call('DEL', KEYS[1])
if #old > 0 and KEYS[3] ~= '' then
  local at = tonumber(ARGV[5])
  local as_of = tonumber(stored[3])
  if as_of and as_of > at then at = as_of end
  -- %.0f: Lua's tostring writes a 16-digit version in exponent notation.
  redis.call('XADD', KEYS[3], '*', 'u', ARGV[2], 'v', string.format('%.0f', tonumber(stored[1]) + 1),
             'at', string.format('%.0f', at), 'old', stored[2], 'new', '[]', 'why', 'identity:stitched')
end
return 1
"""


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode("utf-8")).hexdigest()


@dataclass
class WriteOutcome:
    """Per-item result of ``RedisProfileWriter.write``: applied, stale or rejected."""

    applied: bool
    rejected: Optional[str] = None  # Redis error text when the server refused the item
    previous_segments: Optional[tuple] = None  # what the store held before an applied write


# Replies (per pipelined command) that are worth retrying rather than rejecting.
_TRANSIENT_REPLY_PREFIXES = ("BUSY", "LOADING", "OOM", "READONLY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def is_transient(error: BaseException) -> bool:
    """A Redis error worth retrying: lost connection, timeout, NOSCRIPT, LOADING / BUSY / OOM / READONLY ..."""
    if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                          redis.exceptions.NoScriptError)):
        return True
    if isinstance(error, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
        return True
    return str(error).upper().startswith(_TRANSIENT_REPLY_PREFIXES)


def _segments_json(text) -> tuple:
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return ()
    return tuple(s for s in value if isinstance(s, str)) if isinstance(value, list) else ()


class RedisProfileWriter:
    """Monotonic, pipelined profile upserts with bounded retries.

    One client per writer, created on first use. ``send`` is one attempt: a
    batch as one non-transactional pipeline of EVALSHA calls. ``write`` retries
    the items an attempt left unsettled (lost connection, timeouts, LOADING /
    BUSY / OOM replies, NOSCRIPT after a Redis restart, which reloads the
    script) under ``RetryPolicy`` (``max_attempts`` attempts and the retry
    budget, exponential backoff with full jitter); then the last error is
    raised. Replays are harmless: a resent item is either already applied
    (same write id, reported applied) or stale (reported not applied).
    ``count(name, n)`` receives the ``redis_retries`` counter.
    """

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        profile_ttl_s: Optional[float] = DEFAULT_PROFILE_TTL_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 5.0,
        socket_timeout_s: float = 10.0,
        outbox: bool = True,
        count: Optional[Callable[[str, int], None]] = None,
    ) -> None:
        self.keys = ProfileKeys(key_prefix)
        self.retry = RetryPolicy(max_attempts=max_attempts, base_s=backoff_base_s, cap_s=backoff_cap_s)
        # Each applied write records its segment changes and its snapshot in
        # these streams, in the same script (transforms/outbox/).
        self._outboxes = ((self.keys.outbox(SEGMENT_CHANGES), self.keys.outbox(PROFILE_SNAPSHOTS)) if outbox
                          else ("", ""))
        self._redis_url = redis_url
        self._ttl_ms = int(profile_ttl_s * 1000) if profile_ttl_s else 0
        self._socket_timeout_s = socket_timeout_s
        self._count = count
        self._client: Optional[redis.Redis] = None
        self._script_loaded = False
        self._sha = _sha1(UPSERT_PROFILE_LUA)
        self.retries = 0

    @property
    def client_name(self) -> str:
        # Shows up in CLIENT LIST: which writer holds which connection.
        return f"onboardflow-profiles-{self.keys.prefix}"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis_client(
                self._redis_url,
                client_name=self.client_name,
                socket_timeout=self._socket_timeout_s,
                socket_connect_timeout=self._socket_timeout_s,
                # Retries are ours: counted, bounded, and with NOSCRIPT handling.
                retry=Retry(NoBackoff(), 0),
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self._script_loaded = False

    def _args(self, item: EncodedProfile, write_id: str) -> list:
        return [
            str(item.version), write_id, str(self._ttl_ms), self.keys.segment_prefix, item.user_key,
            str(len(item.segments)), *item.segments, item.fields,
        ]

    def send(self, items: Sequence[EncodedProfile],
             write_id: str) -> tuple[list[Optional[WriteOutcome]], Optional[Exception]]:
        """One attempt: ``(outcomes, error)``; an outcome is None where a transient ``error`` left the item.

        Raises on connection errors and timeouts (nothing settled) and on
        NOPERM (a deployment problem, not this profile's fault).
        """
        try:
            if not self._script_loaded:
                loaded = self.client.script_load(UPSERT_PROFILE_LUA)
                if loaded != self._sha:
                    raise RuntimeError("Redis returned an unexpected SHA for the upsert script")
                self._script_loaded = True
            pipe = self.client.pipeline(transaction=False)
            for item in items:
                pipe.evalsha(self._sha, 5, self.keys.profile(item.user_key), *self._outboxes, self.keys.erased,
                             self.keys.stitched(item.user_key), *self._args(item, write_id))
            replies = pipe.execute(raise_on_error=False)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            # The connection is dropped by redis-py; the next attempt reconnects.
            self._script_loaded = False
            raise
        outcomes: list[Optional[WriteOutcome]] = []
        error: Optional[Exception] = None
        for reply in replies:
            outcome = None
            if isinstance(reply, redis.exceptions.NoScriptError):
                self._script_loaded = False  # Redis restarted or SCRIPT FLUSH
                error = reply
            elif isinstance(reply, redis.exceptions.NoPermissionError):
                raise reply
            elif isinstance(reply, Exception):
                if is_transient(reply):
                    error = reply
                else:
                    outcome = WriteOutcome(applied=False, rejected=str(reply)[:500])
            elif isinstance(reply, list):  # applied now, or by an earlier try of this write
                previous = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
                outcome = WriteOutcome(applied=True, previous_segments=_segments_json(previous))
            else:
                outcome = WriteOutcome(applied=int(reply) in (_APPLIED, _ALREADY_APPLIED))
            outcomes.append(outcome)
        return outcomes, error

    def write(self, items: Sequence[EncodedProfile], write_id: Optional[str] = None) -> list[WriteOutcome]:
        """Upsert ``items`` (at most one per user_key); one outcome per item, in order."""
        write_id = write_id or uuid.uuid4().hex
        outcomes: list[Optional[WriteOutcome]] = [None] * len(items)
        pending = list(range(len(items)))

        def attempt() -> None:
            nonlocal pending
            got, error = self.send([items[i] for i in pending], write_id)
            for index, outcome in zip(pending, got):
                outcomes[index] = outcome
            pending = [index for index, outcome in zip(pending, got) if outcome is None]
            if error is not None:
                raise error

        if items:
            self.retry.run(attempt, transient=is_transient, what="Redis profile write", log=_LOG,
                           on_retry=self.retried)
        return outcomes  # every index was settled: applied, stale or rejected

    def retire(self, visitors: Sequence[tuple[str, str, int]]) -> list[bool]:
        """Retire each ``(visitor key, account key, linked_at ms)`` (``RETIRE_VISITOR_LUA``); per item,
        whether a profile was there to remove. Retried as ``write`` is; idempotent."""
        replies: list = []

        def attempt() -> None:
            nonlocal replies
            pipe = self.client.pipeline(transaction=False)
            for visitor, account, linked_at in visitors:
                pipe.eval(RETIRE_VISITOR_LUA, 4, self.keys.profile(visitor), self.keys.stitched(visitor),
                          self._outboxes[0], self.keys.erased, self.keys.segment_prefix, visitor, account,
                          str(self._ttl_ms), str(int(linked_at)))
            replies = pipe.execute()

        if visitors:
            self.retry.run(attempt, transient=is_transient, what="Redis visitor retirement", log=_LOG,
                           on_retry=self.retried)
        return [bool(int(r)) for r in replies]

    def retried(self, error: BaseException) -> None:
        """Count one retry (``retries`` and the ``redis_retries`` counter)."""
        self.retries += 1
        if self._count is not None:
            self._count("redis_retries", 1)
