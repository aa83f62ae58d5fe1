"""Normalize decoded onboarding events, and recognise duplicates: pure functions, no engine.

``normalize_event(event) -> (normalized event, clock skew clamped?)``; the Beam
step that applies it is ``NormalizeEvents`` (``pipelines/beam/normalize.py``).
Validation happens earlier, in the decoder (``transforms/decode.py``), because
only there are the raw bytes at hand for the dead-letter record: an event that
reaches normalization is valid, and normalization never drops one. The rules,
applied in this order:

* **Time.** ``occurred_at`` and ``received_at`` are epoch milliseconds, UTC by
  definition of the Avro ``timestamp-millis`` type. A client clock ahead of the
  collector (``occurred_at > received_at``) is clamped to ``received_at``: an
  event cannot be received before it happened.
* **Labels.** ``context.os`` maps to a closed vocabulary (``ios``, ``android``,
  ``macos``, ``windows``, ``linux``, ``chromeos``, else ``other``);
  ``context.device`` is lower-cased; ``context.locale`` becomes a BCP 47 tag
  (``en_us`` -> ``en-US``). Property keys are lower-cased and stripped, and the
  ``feature``, ``page`` and ``plan`` properties lower-cased, so ``"Reports "``
  and ``"reports"`` count as one feature.
* **Missing values.** A missing device/os/app_version becomes ``"unknown"``, a
  missing locale ``"und"`` (BCP 47's "undetermined"), a missing
  ``properties`` map ``{}``. ``session_id`` stays ``None``: sessions are
  derived from event time, not from the client's id.

Duplicates (the same ``event_id`` sent twice) are recognised per user by
:class:`RecentEventIds`, part of the profile stage's per-user state
(``transforms/profile.py``); ids are forgotten once they are too late to matter.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..schemas.records import Event

_OS_ALIASES = {
    "ios": "ios", "iphone os": "ios", "ipados": "ios",
    "android": "android",
    "mac os x": "macos", "macos": "macos", "os x": "macos", "mac": "macos",
    "windows": "windows", "win": "windows", "windows nt": "windows",
    "linux": "linux", "ubuntu": "linux", "debian": "linux",
    "chrome os": "chromeos", "chromeos": "chromeos", "cros": "chromeos",
}
_LOWERCASE_PROPERTIES = ("feature", "page", "plan")


def normalize_os(value: str | None) -> str:
    if not value:
        return "unknown"
    key = value.strip().lower()
    if key in _OS_ALIASES:
        return _OS_ALIASES[key]
    first = key.split(" ")[0]
    return _OS_ALIASES.get(first, "other")


def normalize_locale(value: str | None) -> str:
    if not value or not value.strip():
        return "und"
    parts = value.strip().replace("_", "-").split("-")
    lang = parts[0].lower()
    if len(parts) > 1 and parts[1]:
        return f"{lang}-{parts[1].upper()}"
    return lang


def event_time_ms(event: Event) -> int:
    """The event time the pipeline uses for a decoded event: ``occurred_at``, clamped to ``received_at``."""
    return min(event["occurred_at"], event["received_at"])


def normalize_event(event: Event) -> tuple[Event, bool]:
    """Return the normalized event (an ``Event``, schemas/records.py) and whether its clock skew was clamped."""
    out = dict(event)
    clamped = False
    if out["occurred_at"] > out["received_at"]:
        out["occurred_at"] = event_time_ms(out)
        clamped = True
    ctx = dict(out.get("context") or {})
    ctx["os"] = normalize_os(ctx.get("os"))
    ctx["device"] = (ctx.get("device") or "unknown").strip().lower() or "unknown"
    ctx["app_version"] = (ctx.get("app_version") or "unknown").strip() or "unknown"
    ctx["locale"] = normalize_locale(ctx.get("locale"))
    out["context"] = ctx
    props = {}
    for key, value in (out.get("properties") or {}).items():
        k = key.strip().lower()
        v = value.strip() if isinstance(value, str) else value
        if k in _LOWERCASE_PROPERTIES and isinstance(v, str):
            v = v.lower()
        props[k] = v
    out["properties"] = props
    return out, clamped


@dataclass
class RecentEventIds:
    """Event ids of one user that a duplicate could still be compared against.

    Ids are kept as 8-byte digests with their event time. They are forgotten
    only through ``forget_before(floor)``, which the keyed profile stage calls
    with *watermark - allowed lateness*: anything older is rejected as too late
    before it reaches the dedup check, so forgetting it can never let a
    duplicate through. That keeps dedup exact whatever the arrival order (a
    streaming run and a bounded replay drop the same duplicates).
    ``horizon_ms`` is the minimum time an id is kept even when the watermark
    races ahead (e.g. an idle partition following the wall clock).
    """

    horizon_ms: int
    seen: dict[bytes, int] = field(default_factory=dict)
    max_ms: int = 0
    prune_at: int = 64

    def add(self, event_id: str, t: int) -> bool:
        """Record ``event_id``; True if it is new, False for a duplicate."""
        digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest()
        if digest in self.seen:
            return False
        self.seen[digest] = t
        if t > self.max_ms:
            self.max_ms = t
        return True

    def forget_before(self, floor: int) -> None:
        """Forget ids older than ``floor`` (and than the horizon behind the newest id)."""
        floor = min(floor, self.max_ms - self.horizon_ms)
        # Only once the dict has doubled since the last prune: O(1) amortized.
        if len(self.seen) >= self.prune_at:
            self.seen = {d: ts for d, ts in self.seen.items() if ts >= floor}
            self.prune_at = max(64, 2 * len(self.seen))
