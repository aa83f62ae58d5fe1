"""The Redis profile store: monotonic profile writes and reads for downstream apps.

The pipeline computes a profile per pseudonymous user (``user_key``) and
downstream services (the onboarding UI, messaging, CRM sync) read it online.
Redis holds only the *latest* profile per user; history goes to the warehouse.
The key layout and encoding are a contract other services rely on:
``docs/redis-contract.md`` is its reference, modelled on Feast's Redis online
store (one hash per entity, a TTL, readers decoding field by field).

Layout (prefix ``obf`` by default)::

    obf:profile:{user_key}   hash, one field per profile field, expires
                             profile_ttl after its last accepted write
    obf:segment:{segment}    set of user_keys currently in the segment

Encoding is generic so a new feature needs no sink change: strings as they
are, ints in decimal, floats as Python's shortest round-trip ``repr``,
booleans as ``true`` / ``false``, maps and lists as compact JSON with sorted
keys; ``None`` leaves the field out. The hash field ``_types`` maps each field
to its type (``str``, ``int``, ``float``, ``bool``, ``json``) so readers decode
without guessing (a ``segment_label`` of ``"7"`` stays a string).

Writes are monotonic. The upsert is one Lua script (loaded once per worker
with SCRIPT LOAD, called with EVALSHA): it compares the stored ``version``
(event-time millis of the newest event folded into the profile) with the
incoming one and writes only when the incoming version is strictly greater.
An equal version is an idempotent replay and a no-op, an older one is stale
and a no-op, so replays and out-of-order deliveries never roll a profile back.
An applied write replaces the whole hash (fields that became ``None`` or were
removed from the profile disappear), refreshes the TTL, and moves the user
between segment sets by diffing the stored ``segments`` with the new ones, all
atomically. Each flush carries a write id, kept in ``_write_id``: when a reply
is lost and the flush is retried, the script recognizes its own earlier write
and reports it applied instead of stale, so counters stay exact.

``WriteProfilesToRedis`` is the Beam sink (model: bigtableio's
``_BigTableWriteFn``): per bundle it keeps the newest profile per user, flushes
through one non-transactional pipeline of EVALSHA calls per batch, retries
transient errors with capped exponential backoff and jitter, and finally
raises so the runner retries the bundle rather than dropping writes.
``ProfileStore`` is the small read client for apps and the
``onboardflow profile`` command; it derives the key from a raw user id with
the anonymization stage's ``Pseudonymizer``, so raw ids never reach Redis.
"""
from __future__ import annotations

import hashlib
import json
import logging
import numbers
import random
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional, Union

import apache_beam as beam
import redis
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue
from redis.backoff import NoBackoff
from redis.retry import Retry

from .anonymize import Pseudonymizer, SecretKey
from .dead_letter import pipeline_dead_letter
from .metrics import PipelineMetrics
from .outbox import PROFILE_SNAPSHOTS, SEGMENT_CHANGES, OutboxKeys
from .progress import EventTimeProgress

METRICS_NAMESPACE = "onboardflow"
STAGE = "profile_store"

DEFAULT_KEY_PREFIX = "obf"
DEFAULT_PROFILE_TTL_S = 90 * 24 * 3600
DEFAULT_BATCH_SIZE = 500
DEFAULT_MAX_ATTEMPTS = 8
#: Transient Redis errors are retried for at least this long (and at least
#: ``max_attempts`` times) before the write fails its bundle. On Prism a failed
#: bundle fails the whole job, so the budget must outlast a Redis restart or
#: failover (tests/integration/test_reliability.py stops Redis for 30 s);
#: longer rides out longer outages, at the cost of a job that stalls (holding
#: its bundle) rather than fails while Redis is away.
DEFAULT_RETRY_BUDGET_S = 120.0
_LOG = logging.getLogger(__name__)

TYPES_FIELD = "_types"
WRITE_ID_FIELD = "_write_id"
# The segments the hash held before the last accepted write (JSON list): lets a
# retried write whose reply was lost still report the store's segment changes.
PREVIOUS_SEGMENTS_FIELD = "_prev_segments"
RESERVED_FIELDS = frozenset({TYPES_FIELD, WRITE_ID_FIELD, PREVIOUS_SEGMENTS_FIELD})

# Lua numbers are doubles: versions above 2**53 would compare inexactly.
MAX_VERSION = 2**53 - 1
_USER_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_KEY_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+$")

# Script replies.
_STALE, _APPLIED, _ALREADY_APPLIED = 0, 1, 2

# KEYS[1] profile hash, KEYS[2] the segment-change outbox stream, KEYS[3] the
# profile-snapshot outbox stream (transforms/outbox.py; '' for either: none).
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


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode("utf-8")).hexdigest()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class ProfileKeys:
    """The key names of the contract for one prefix."""

    prefix: str = DEFAULT_KEY_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not _KEY_PREFIX_RE.match(self.prefix):
            # Glob characters would break SCAN patterns and ':' the layout.
            raise ValueError("key prefix must be non-empty and use only letters, digits, '_', '.', '-'")

    @property
    def profile_prefix(self) -> str:
        return f"{self.prefix}:profile:"

    @property
    def segment_prefix(self) -> str:
        return f"{self.prefix}:segment:"

    def profile(self, user_key: str) -> str:
        return self.profile_prefix + user_key

    def segment(self, segment: str) -> str:
        return self.segment_prefix + segment

    def outbox(self, name: str) -> str:
        """The outbox stream ``name`` (transforms/outbox.py) under this prefix."""
        return OutboxKeys(self.prefix).stream(name)


# --------------------------------------------------------------------------- encoding


class ProfileEncodingError(ValueError):
    """A profile that cannot be stored; ``reason`` is a short code for dead letters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EncodedProfile(NamedTuple):
    """A profile ready for the upsert script."""

    user_key: str
    version: int
    segments: tuple[str, ...]
    fields: bytes  # UTF-8 JSON object: hash field name -> encoded string value


def _compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False)


def _encode_value(name: str, value: Any) -> tuple[str, str]:
    """(type, text) for one non-None field value."""
    # Exact-type fast paths first: ABC checks (numbers.Integral) cost more
    # than the whole encoding of a plain field, and profiles are mostly plain.
    kind = type(value)
    if kind is str:
        return "str", value
    if kind is float:
        return "float", repr(value)
    if kind is int:
        return "int", str(value)
    if isinstance(value, bool):
        return "bool", "true" if value else "false"
    if isinstance(value, str):
        return "str", value
    if isinstance(value, numbers.Integral):
        return "int", str(int(value))
    if isinstance(value, numbers.Real):
        return "float", repr(float(value))
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, (Mapping, list, tuple)):
        try:
            return "json", _compact_json(value)
        except (TypeError, ValueError) as exc:
            # Names the field, never its value (house rule: no data in logs).
            raise ProfileEncodingError("unencodable_field", f"field {name!r}: {type(exc).__name__}") from None
    raise ProfileEncodingError("unencodable_field", f"field {name!r} has type {type(value).__name__}")


def _decode_value(kind: Optional[str], text: str) -> Any:
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "bool":
        return text == "true"
    if kind == "json":
        return json.loads(text)
    return text  # "str", and fields written by someone else without a type


def encode_profile(profile: Any, *, default_updated_at: Optional[int] = None) -> EncodedProfile:
    """Validate one profile dict and encode it for the hash (see module docstring).

    Raises ``ProfileEncodingError`` for: not a mapping, ``user_key`` that is
    not a 64-hex HMAC pseudonym (a raw id must never become a Redis key),
    ``version`` that is not an int in [0, 2**53), ``segments`` that is not a
    list of non-empty strings, a reserved or non-string field name, or a value
    of a type the encoding does not cover.
    """
    if not isinstance(profile, Mapping):
        raise ProfileEncodingError("not_a_mapping", f"profile is a {type(profile).__name__}")
    user_key = profile.get("user_key")
    if not isinstance(user_key, str) or not _USER_KEY_RE.match(user_key):
        raise ProfileEncodingError("invalid_user_key", "user_key must be a 64-character lower-case hex pseudonym")
    version = profile.get("version")
    if (
        not isinstance(version, numbers.Integral)
        or isinstance(version, bool)
        or not 0 <= int(version) <= MAX_VERSION
    ):
        raise ProfileEncodingError("invalid_version", "version must be an int in [0, 2**53)")
    version = int(version)
    raw_segments = profile.get("segments")
    if raw_segments is None:
        raw_segments = []
    if not isinstance(raw_segments, (list, tuple, set, frozenset)) or not all(
        isinstance(s, str) and s for s in raw_segments
    ):
        raise ProfileEncodingError("invalid_segments", "segments must be a list of non-empty strings")
    ordered = sorted(raw_segments) if isinstance(raw_segments, (set, frozenset)) else raw_segments
    segments = tuple(dict.fromkeys(ordered))

    values: dict[str, Any] = dict(profile)
    values["version"] = version
    values["segments"] = list(segments)
    if values.get("updated_at") is None:
        values["updated_at"] = now_ms() if default_updated_at is None else default_updated_at
    types: dict[str, str] = {}
    encoded: dict[str, str] = {}
    if not all(isinstance(name, str) and name for name in values):
        raise ProfileEncodingError("invalid_field_name", "field names must be non-empty strings")
    for name in sorted(values):
        if name in RESERVED_FIELDS:
            raise ProfileEncodingError("reserved_field", f"field {name!r} is reserved by the profile store")
        value = values[name]
        if value is None:
            continue  # absent = null, see the contract
        kind, encoded[name] = _encode_value(name, value)
        types[name] = kind
    encoded[TYPES_FIELD] = _compact_json(types)
    try:
        fields = json.dumps(encoded, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate in some string: not representable in UTF-8, hence not in Redis.
        raise ProfileEncodingError("unencodable_field", "a string is not valid Unicode (lone surrogate)") from None
    return EncodedProfile(user_key, version, segments, fields)


def decode_profile(raw: Mapping[Union[bytes, str], Union[bytes, str]]) -> dict[str, Any]:
    """The typed profile dict from an HGETALL reply (bytes or str), sink fields removed."""
    fields = {
        (k.decode("utf-8") if isinstance(k, bytes) else k): (v.decode("utf-8") if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
    try:
        types = json.loads(fields.get(TYPES_FIELD) or "{}")
    except ValueError:
        types = {}
    if not isinstance(types, dict):
        types = {}
    return {
        name: _decode_value(types.get(name), text)
        for name, text in sorted(fields.items())
        if name not in RESERVED_FIELDS
    }


# --------------------------------------------------------------------------- writer


class ProfileWriteResult(NamedTuple):
    """What happened to one profile: ``applied`` False means stale or a replay.

    For an applied write, ``previous_segments`` are the segments the store held
    just before it and ``profile`` the profile written, so downstream stages
    can report exactly the changes apps saw (and a replay, applying nothing,
    reports none). Both are None when not applied.
    """

    user_key: str
    applied: bool
    version: int
    written_at: int
    previous_segments: Optional[tuple] = None
    profile: Optional[dict] = None


@dataclass
class WriteOutcome:
    """Per-item result of ``RedisProfileWriter.write``: applied, stale or rejected."""

    applied: bool
    rejected: Optional[str] = None  # Redis error text when the server refused the item
    previous_segments: Optional[tuple] = None  # what the store held before an applied write


# Replies (per pipelined command) that are worth retrying rather than rejecting.
_TRANSIENT_REPLY_PREFIXES = ("BUSY", "LOADING", "OOM", "READONLY", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def _is_transient_reply(error: Exception) -> bool:
    if isinstance(error, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
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
    """Monotonic, pipelined profile upserts with bounded retries (no Beam).

    One client per writer, created on first use; ``write`` sends a batch as one
    non-transactional pipeline of EVALSHA calls. Transient failures (lost
    connection, timeouts, LOADING / BUSY / OOM replies, NOSCRIPT after a Redis
    restart, which reloads the script) are retried with exponential backoff
    and full jitter, ``max_attempts`` attempts in all; then the last error is
    raised. Replays are harmless: a resent item is either already applied (same
    write id, reported applied) or stale (reported not applied).
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
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.keys = ProfileKeys(key_prefix)
        # Each applied write records its segment changes and its snapshot in
        # these streams, in the same script (transforms/outbox.py).
        self._outboxes = ((self.keys.outbox(SEGMENT_CHANGES), self.keys.outbox(PROFILE_SNAPSHOTS)) if outbox
                          else ("", ""))
        self._redis_url = redis_url
        self._ttl_ms = int(profile_ttl_s * 1000) if profile_ttl_s else 0
        self._max_attempts = max_attempts
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._socket_timeout_s = socket_timeout_s
        self._client: Optional[redis.Redis] = None
        self._script_loaded = False
        self._sha = _sha1(UPSERT_PROFILE_LUA)
        self.retries = 0
        self._retries_counter = Metrics.counter(METRICS_NAMESPACE, "redis_retries")

    @property
    def client_name(self) -> str:
        # Shows up in CLIENT LIST: which writer holds which connection.
        return f"onboardflow-profiles-{self.keys.prefix}"

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
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

    #: seconds a failing write keeps retrying (see DEFAULT_RETRY_BUDGET_S)
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    _failing_since: float = 0.0

    def _backoff(self, attempt: int, error: Exception) -> None:
        """Sleep before retry number ``attempt`` (1-based), or raise ``error`` when out of budget.

        Out of budget: ``max_attempts`` attempts made *and* ``retry_budget_s``
        seconds since this write first failed. Each retry is logged (error
        type and Redis' message: addresses, never profile data).
        """
        now = time.monotonic()
        if attempt == 1:
            self._failing_since = now
        failing_s = now - self._failing_since
        if attempt >= self._max_attempts and failing_s >= self.retry_budget_s:
            _LOG.error("Redis profile write gave up after %d attempts over %.1f s: %s: %s",
                       attempt, failing_s, type(error).__name__, str(error)[:200])
            raise error
        self.retries += 1
        self._retries_counter.inc()
        delay = random.uniform(0, min(self._backoff_cap_s, self._backoff_base_s * (2 ** (attempt - 1))))
        _LOG.warning("Redis profile write failed (attempt %d, failing for %.1f s): %s: %s; retrying in %.2f s",
                     attempt, failing_s, type(error).__name__, str(error)[:200], delay)
        time.sleep(delay)

    def write(self, items: Sequence[EncodedProfile], write_id: Optional[str] = None) -> list[WriteOutcome]:
        """Upsert ``items`` (at most one per user_key); one outcome per item, in order."""
        write_id = write_id or uuid.uuid4().hex
        outcomes: list[Optional[WriteOutcome]] = [None] * len(items)
        pending = list(range(len(items)))
        attempt = 0
        while pending:
            attempt += 1
            try:
                if not self._script_loaded:
                    loaded = self.client.script_load(UPSERT_PROFILE_LUA)
                    if loaded != self._sha:
                        raise RuntimeError("Redis returned an unexpected SHA for the upsert script")
                    self._script_loaded = True
                pipe = self.client.pipeline(transaction=False)
                for index in pending:
                    item = items[index]
                    pipe.evalsha(self._sha, 3, self.keys.profile(item.user_key), *self._outboxes,
                                 *self._args(item, write_id))
                replies = pipe.execute(raise_on_error=False)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                # The connection is dropped by redis-py; the next attempt reconnects.
                self._script_loaded = False
                self._backoff(attempt, exc)
                continue
            retry: list[int] = []
            last_error: Optional[Exception] = None
            for index, reply in zip(pending, replies):
                if isinstance(reply, redis.exceptions.NoScriptError):
                    self._script_loaded = False  # Redis restarted or SCRIPT FLUSH
                    retry.append(index)
                    last_error = reply
                elif isinstance(reply, redis.exceptions.NoPermissionError):
                    raise reply  # a deployment problem (ACL), not this profile's fault
                elif isinstance(reply, Exception):
                    if _is_transient_reply(reply):
                        retry.append(index)
                        last_error = reply
                    else:
                        outcomes[index] = WriteOutcome(applied=False, rejected=str(reply)[:500])
                elif isinstance(reply, list):  # applied now, or by an earlier try of this write
                    previous = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
                    outcomes[index] = WriteOutcome(applied=True, previous_segments=_segments_json(previous))
                else:
                    outcomes[index] = WriteOutcome(applied=int(reply) in (_APPLIED, _ALREADY_APPLIED))
            pending = retry
            if pending:
                self._backoff(attempt, last_error)
        return outcomes  # every index was settled: applied, stale or rejected


# --------------------------------------------------------------------------- Beam


def _dead_letter(reason: str, detail: str, profile: Any) -> dict:
    return pipeline_dead_letter(STAGE, reason, detail, profile, key_field="user_key")


class _Held(NamedTuple):
    encoded: EncodedProfile
    profile: Any
    timestamp: Any
    window: Any


class _WriteProfilesFn(beam.DoFn):
    """Buffers the newest profile per user_key and flushes it through the writer."""

    def __init__(
        self,
        redis_url: str,
        key_prefix: str,
        profile_ttl_s: Optional[float],
        batch_size: int,
        max_attempts: int,
        metrics: Optional[PipelineMetrics] = None,
        future_tolerance_s: float = 600.0,
        outbox: bool = True,
    ) -> None:
        self._metrics = metrics or PipelineMetrics(prometheus=False)
        self._future_tolerance_ms = int(future_tolerance_s * 1000)
        self._outbox = outbox
        self._progress = EventTimeProgress(key_prefix)
        self._redis_url = redis_url
        self._key_prefix = key_prefix
        self._profile_ttl_s = profile_ttl_s
        self._batch_size = batch_size
        self._max_attempts = max_attempts
        self._writer: Optional[RedisProfileWriter] = None
        self._held: dict[str, _Held] = {}
        self._written = Metrics.counter(METRICS_NAMESPACE, "profiles_written")
        self._stale = Metrics.counter(METRICS_NAMESPACE, "profiles_stale_skipped")
        self._dead_letters = Metrics.counter(METRICS_NAMESPACE, "profile_store_dead_letter")

    def setup(self) -> None:
        self._metrics.setup()
        # The client itself connects on the first flush (lazily).
        self._writer = RedisProfileWriter(
            self._redis_url, self._key_prefix, self._profile_ttl_s, max_attempts=self._max_attempts,
            outbox=self._outbox,
        )

    def start_bundle(self) -> None:
        self._held = {}

    def process(self, profile, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        try:
            encoded = encode_profile(profile)
        except ProfileEncodingError as exc:
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(WriteProfilesToRedis.DEAD_LETTER,
                                           _dead_letter(exc.reason, exc.detail, profile))
            return
        if encoded.version // 1000 > now_ms() + self._future_tolerance_ms:
            # A profile as of a time that has not come yet (a producer's clock
            # ahead, or a timer fired past the wall clock) would freeze the
            # user: every real event would then look older than it.
            self._dead_letters.inc()
            yield beam.pvalue.TaggedOutput(WriteProfilesToRedis.DEAD_LETTER, _dead_letter(
                "version_in_future", f"profile as of more than {self._future_tolerance_ms} ms after the wall clock",
                profile))
            return
        held = self._held.get(encoded.user_key)
        if held is not None:
            # Only the newest version per user in a bundle goes to Redis; the
            # script would skip the older one anyway, this saves the round trip.
            if held.encoded.version >= encoded.version:
                self._stale.inc()
                yield ProfileWriteResult(encoded.user_key, False, encoded.version, now_ms())
                return
            self._stale.inc()
            yield WindowedValue(
                ProfileWriteResult(held.encoded.user_key, False, held.encoded.version, now_ms()),
                held.timestamp,
                (held.window,),
            )
        self._held[encoded.user_key] = _Held(encoded, profile, timestamp, window)
        if len(self._held) >= self._batch_size:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self):
        if not self._held:
            return
        held = list(self._held.values())
        self._held = {}
        # Raises after the retry budget: the runner then retries the bundle.
        retries_before = self._writer.retries
        started = time.perf_counter()
        try:
            outcomes = self._writer.write([h.encoded for h in held])
        except Exception:
            self._metrics.redis_error("profile_write", self._writer.retries - retries_before + 1)
            raise
        self._metrics.redis_write_seconds(time.perf_counter() - started)
        self._metrics.redis_error("profile_write", self._writer.retries - retries_before)
        written_at = now_ms()
        self._record_applied(held, outcomes, written_at)
        for h, outcome in zip(held, outcomes):
            windows = (h.window,)
            if outcome.rejected is not None:
                self._dead_letters.inc()
                letter = _dead_letter("redis_rejected", outcome.rejected, h.profile)
                yield beam.pvalue.TaggedOutput(
                    WriteProfilesToRedis.DEAD_LETTER, WindowedValue(letter, h.timestamp, windows)
                )
                continue
            if outcome.applied:
                self._written.inc()
            else:
                self._stale.inc()
            if outcome.applied:
                result = ProfileWriteResult(h.encoded.user_key, True, h.encoded.version, written_at,
                                            outcome.previous_segments, h.profile)
            else:
                result = ProfileWriteResult(h.encoded.user_key, False, h.encoded.version, written_at)
            yield WindowedValue(result, h.timestamp, windows)

    def _record_applied(self, held, outcomes, written_at: int) -> None:
        """Metrics of the applied writes, and the event-time progress key."""
        newest = None
        applied = 0
        for h, outcome in zip(held, outcomes):
            if not outcome.applied:
                continue
            applied += 1
            last_event_at = h.profile.get("last_event_at") if isinstance(h.profile, Mapping) else None
            if not isinstance(last_event_at, int) or isinstance(last_event_at, bool):
                continue
            newest = last_event_at if newest is None else max(newest, last_event_at)
            # Only updates an event caused: a timer's update (dormancy) would
            # measure how long the user has been away.
            if h.profile.get("as_of") == last_event_at:
                self._metrics.event_to_redis_seconds((written_at - last_event_at) / 1000)
        self._metrics.profiles_written(applied)
        if newest is not None:
            try:
                self._progress.record(self._writer.client, newest, written_at)
            except redis.exceptions.RedisError:
                # A monitoring marker: a missed update only makes freshness look
                # older until the next flush; never fail the bundle for it.
                self._metrics.redis_error("progress")

    def teardown(self) -> None:
        if self._writer is not None:
            self._writer.close()


class WriteProfilesToRedis(beam.PTransform):
    """Write profiles to the Redis profile store, monotonically by ``version``.

    In: profile dicts (``user_key``, ``version``, ``updated_at``, ``segments``
    and any feature fields; see ``docs/redis-contract.md`` for the encoding).
    Out: a dict of two PCollections:

    * ``written``: one ``ProfileWriteResult(user_key, applied, version,
      written_at)`` per valid input profile. ``applied`` is False for profiles
      that were stale (Redis already held this or a newer version) or
      superseded by a newer version of the same user in the same bundle.
    * ``dead_letter``: ``{"stage": "profile_store", "reason", "detail",
      "user_key", "payload"}`` for profiles that cannot be stored (not a
      mapping, user_key that is not a hex pseudonym, bad version or segments,
      reserved or unencodable fields), that Redis refused outright, or whose
      ``version`` is as of more than ``future_tolerance_s`` after the wall
      clock (``version_in_future``).

    With ``outbox`` (the default) every applied write also appends its
    segment changes and its snapshot to the outbox streams, atomically with
    the write; ``RelayOutboxes`` (transforms/relay.py) publishes them.

    Counters (namespace ``onboardflow``): ``profiles_written``,
    ``profiles_stale_skipped``, ``redis_retries``,
    ``profile_store_dead_letter``. Nothing is dropped silently: transient
    Redis failures are retried (``max_attempts``), then the bundle fails and
    the runner retries it, which the monotonic script makes harmless.
    """

    WRITTEN = "written"
    DEAD_LETTER = "dead_letter"

    def __init__(
        self,
        redis_url: str,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        profile_ttl_s: Optional[float] = DEFAULT_PROFILE_TTL_S,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        label: Optional[str] = None,
        metrics: Optional[PipelineMetrics] = None,
        future_tolerance_s: float = 600.0,
        outbox: bool = True,
    ) -> None:
        super().__init__(label)
        ProfileKeys(key_prefix)  # fail at construction, not on the workers
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._fn = _WriteProfilesFn(redis_url, key_prefix, profile_ttl_s, batch_size, max_attempts, metrics,
                                    future_tolerance_s, outbox)

    def expand(self, profiles):
        outputs = profiles | "UpsertProfiles" >> beam.ParDo(self._fn).with_outputs(
            self.DEAD_LETTER, main=self.WRITTEN
        )
        return {self.WRITTEN: outputs[self.WRITTEN], self.DEAD_LETTER: outputs[self.DEAD_LETTER]}


# --------------------------------------------------------------------------- reads


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
        self._client = client if client is not None else redis.Redis.from_url(redis_url)
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
