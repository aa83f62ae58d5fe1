"""Who may use ``onboardflow registry serve``: HTTP basic authentication and two roles.

In: a users file (JSON, written by ``onboardflow registry user``), and each
request's method, path and ``Authorization`` header. Out: None (let it
through) or the ``(status, error_code, message)`` to refuse it with:

* 401 / 40101: no credentials, an unknown user or a wrong password (with
  ``WWW-Authenticate: Basic``, as Confluent's registry answers);
* 403 / 40301: a ``read`` user asking to change something (register a
  schema, set or delete a compatibility level).

Roles: ``read`` may do every GET, look a schema up (``POST /subjects/{s}``)
and test compatibility (``POST /compatibility/...``): what serializers,
deserializers and CI checks need. ``write`` may also register and change
levels: producers' deploy pipelines and operators.

The file holds, per user, the role and a salted PBKDF2-SHA256 hash of the
password, never the password; a verified password is remembered in memory
(by its SHA-256) so a client is not charged the key derivation per request.
The password reaches ``add_user`` from a file or stdin, never argv.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import threading
from pathlib import Path
from typing import Optional

ROLES = ("read", "write")
_ITERATIONS = 200_000
Refusal = tuple[int, int, str]


def _derive(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, _ITERATIONS)


def add_user(path: Path, name: str, role: str, password: str) -> None:
    """Add or replace ``name`` in the users file at ``path`` (created 0600 when missing)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not name or ":" in name:
        raise ValueError("a user name is non-empty and has no ':'")
    if len(password) < 12:
        raise ValueError("a password has at least 12 characters")
    users = json.loads(path.read_text()) if path.exists() else {"users": {}}
    salt = os.urandom(16)
    users["users"][name] = {"role": role, "salt": salt.hex(), "pbkdf2_sha256": _derive(password, salt).hex(),
                            "iterations": _ITERATIONS}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(users, f, indent=2, sort_keys=True)


def is_write(method: str, parts: list[str]) -> bool:
    """Whether a request changes the registry (the ``write`` role's)."""
    if method in ("PUT", "DELETE"):
        return True
    return method == "POST" and len(parts) == 3 and parts[0] == "subjects" and parts[2] == "versions"


class RegistryUsers:
    """The users file at ``path``, read once; ``check(method, parts, authorization)`` per request."""

    def __init__(self, path: Path):
        self._users = json.loads(Path(path).read_text())["users"]
        self._verified: set[tuple[str, bytes]] = set()
        self._lock = threading.Lock()

    def check(self, method: str, parts: list[str], authorization: Optional[str]) -> Optional[Refusal]:
        user = self._authenticate(authorization)
        if user is None:
            return 401, 40101, "Unauthorized: valid credentials are required"
        if is_write(method, parts) and self._users[user]["role"] != "write":
            return 403, 40301, f"User {user} is denied this operation: it needs the write role"
        return None

    def _authenticate(self, authorization: Optional[str]) -> Optional[str]:
        if not authorization or not authorization.startswith("Basic "):
            return None
        try:
            name, _, password = base64.b64decode(authorization[6:], validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        entry = self._users.get(name)
        if entry is None:
            return None
        remembered = (name, hashlib.sha256(password.encode("utf-8")).digest())
        with self._lock:
            if remembered in self._verified:
                return name
        derived = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), bytes.fromhex(entry["salt"]),
                                      int(entry.get("iterations", _ITERATIONS)))
        if not hmac.compare_digest(derived, bytes.fromhex(entry["pbkdf2_sha256"])):
            return None
        with self._lock:
            self._verified.add(remembered)
        return name
