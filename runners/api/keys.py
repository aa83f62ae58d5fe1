"""API keys of the personalization API: created, listed and revoked by `onboardflow apikeys`, checked per request.

A key is ``obf_<id>_<secret>``: ``id`` 12 hex characters that name the key
(and let a check find it in O(1)), ``secret`` 32 random bytes (URL-safe
base64). Only the SHA-256 of the whole key is stored: a key has 256 bits of
entropy, so no slow hash is needed, and a leaked file gives no key back. The
check compares digests with ``hmac.compare_digest`` (constant time).

The file (``Settings.api_keys_path``, JSON, written atomically with mode 0600)::

    {"version": 1, "keys": [{"id": "3f9a0c1b2d4e", "name": "onboarding-ui",
      "scopes": ["profiles:read"], "sha256": "…", "created_at": "2026-…Z", "revoked_at": null}]}

Revoking keeps the entry (with ``revoked_at``) for audits. A running server
re-reads the file when it changes (``KeyRing.refresh``, at most once a
second), so a revoked key is refused within about a second. Scopes and the
reasoning: docs/api.md.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Optional

#: What a key may do: profiles, decisions and status; segment listings; erasure.
SCOPES = ("profiles:read", "segments:read", "users:erase")
KEY_PREFIX = "obf_"
_KEY_RE = re.compile(r"^obf_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.@-]{0,63}$")
_LOG = logging.getLogger(__name__)


class ApiKeyError(ValueError):
    """A refused key operation (bad name or scope, a name in use, an unreadable file); never names a key."""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """One stored key: its id and name, scopes, the SHA-256 of the key, when it was made and revoked."""

    id: str
    name: str
    scopes: tuple[str, ...]
    sha256: str
    created_at: str
    revoked_at: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "scopes": list(self.scopes)}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_scopes(scopes) -> tuple[str, ...]:
    """``scopes`` as a sorted tuple; ``ApiKeyError`` for an empty list or an unknown scope."""
    scopes = tuple(sorted(set(scopes)))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ApiKeyError(f"scopes must be one or more of {', '.join(SCOPES)}"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return scopes


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KeyFile:
    """The keys file: ``load``, and ``create`` / ``revoke`` that rewrite it atomically (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> list[ApiKey]:
        """Every key in the file, revoked ones included; [] when the file does not exist."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ApiKeyError(f"API keys file {self.path}: cannot read it ({type(exc).__name__})") from None
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("keys"), list):
            raise ApiKeyError(f"API keys file {self.path}: not a version 1 keys file")
        try:
            return [ApiKey(k["id"], k["name"], tuple(k["scopes"]), k["sha256"], k["created_at"], k.get("revoked_at"))
                    for k in doc["keys"]]
        except (KeyError, TypeError):
            raise ApiKeyError(f"API keys file {self.path}: an entry lacks id, name, scopes, sha256 or created_at") \
                from None

    def _save(self, keys: list[ApiKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": 1, "keys": [k.as_json() for k in keys]}, indent=2, sort_keys=True) + "\n"
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, self.path)

    def create(self, name: str, scopes) -> tuple[str, ApiKey]:
        """A new key named ``name`` with ``scopes``: (the plaintext key, shown once; the stored entry)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ApiKeyError("a key name is 1-64 lower-case letters, digits, '_', '.', '@' or '-'")
        scopes = check_scopes(scopes)
        keys = self.load()
        if any(k.name == name and k.active for k in keys):
            raise ApiKeyError(f"an active key named {name!r} exists: revoke it first")
        used = {k.id for k in keys}
        key_id = secrets.token_hex(6)
        while key_id in used:
            key_id = secrets.token_hex(6)
        plaintext = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        entry = ApiKey(key_id, name, scopes, digest(plaintext), _now())
        self._save([*keys, entry])
        return plaintext, entry

    def revoke(self, name: str) -> ApiKey:
        """Mark the active key ``name`` revoked; ``ApiKeyError`` when there is none."""
        keys = self.load()
        for i, k in enumerate(keys):
            if k.name == name and k.active:
                keys[i] = dataclasses.replace(k, revoked_at=_now())
                self._save(keys)
                return keys[i]
        raise ApiKeyError(f"no active key named {name!r}")


class KeyRing:
    """The active keys of a file, by id, for request checks; re-read when the file changes.

    ``authenticate(key)`` returns the ``ApiKey`` a presented key belongs to,
    or None (malformed, unknown, revoked or wrong secret: a caller learns no more).
    """

    def __init__(self, path: Path, refresh_every_s: float = 1.0, clock=time.monotonic) -> None:
        self._file = KeyFile(path)
        self._refresh_every_s = refresh_every_s
        self._clock = clock
        self._checked_at = float("-inf")
        self._stamp: Optional[tuple] = None
        self._by_id: dict[str, ApiKey] = {}
        self.refresh(force=True)

    @property
    def path(self) -> Path:
        return self._file.path

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if its size or mtime changed (at most every ``refresh_every_s`` unless ``force``)."""
        now = self._clock()
        if not force and now - self._checked_at < self._refresh_every_s:
            return
        self._checked_at = now
        try:
            st = self._file.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and not force:
            return
        try:
            keys = self._file.load()
        except ApiKeyError as exc:
            if force:
                raise
            # A running server keeps the keys it had rather than refusing everyone.
            _LOG.error("%s; keeping the %d keys loaded before", exc, len(self._by_id))
            return
        self._by_id = {k.id: k for k in keys if k.active}
        self._stamp = stamp

    def __len__(self) -> int:
        return len(self._by_id)

    def authenticate(self, key: str) -> Optional[ApiKey]:
        self.refresh()
        match = _KEY_RE.match(key or "")
        if match is None:
            return None
        entry = self._by_id.get(match.group(1))
        if entry is None or not hmac.compare_digest(entry.sha256, digest(key)):
            return None
        return entry
