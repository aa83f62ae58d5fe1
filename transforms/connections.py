"""Every Redis client and PostgreSQL connection of onboardflow, built from one URL each.

In: the deployment's Redis URL (``OBF_REDIS_URL`` / ``--redis_url``) or
warehouse DSN (``OBF_WAREHOUSE_DSN`` / ``--warehouse_dsn``). Out: a
``redis.Redis`` client (``redis_client``) or a ``psycopg.Connection``
(``warehouse_connect``). Building every client here means TLS and credentials
cannot be forgotten in one place: what the URL asks for, every client gets.

A URL carries only what is not secret; the secret is named, never written:

- Redis: ``rediss://USER@HOST:PORT/DB?ssl_ca_certs=CA&ssl_certfile=CERT&ssl_keyfile=KEY&password_file=PATH``.
  ``rediss`` turns TLS on (the server certificate is verified against
  ``ssl_ca_certs``; ``ssl_certfile``/``ssl_keyfile`` present a client
  certificate). The password is read from ``password_file`` (its first line)
  or from the environment variable named by ``password_env``; both are
  onboardflow's, stripped before redis-py sees the URL.
- PostgreSQL: libpq's own parameters, e.g.
  ``postgresql://ROLE@HOST:PORT/DB?sslmode=verify-full&sslrootcert=CA&passfile=PGPASS``
  (or ``PGPASSWORD`` in the environment).
- The schema registry (HTTP): ``https://USER@HOST:PORT?cafile=CA&password_file=PATH``
  (``http_settings``): TLS verified against ``cafile``, basic authentication.

A password written into the URL still works, but then it shows wherever the
URL does (``ps``, shell history); ``redact`` strips it for display. Roles, ACL
users and the secure services: docs/security.md. Kafka clients (SSL/SASL) are
not built here yet; they are to follow the same rule: one setting that names
the CA and the password file, read in one place.
"""
from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:  # imported when a client is built: `onboardflow --help` stays fast
    import psycopg
    import redis

#: URL query parameters onboardflow reads itself (redis-py would refuse them).
REDIS_PASSWORD_FILE = "password_file"
REDIS_PASSWORD_ENV = "password_env"


class CredentialsError(RuntimeError):
    """A URL names a password source that cannot be read (the message names the source, never a secret)."""


def _read_password_file(path: str, what: str = "Redis") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as exc:
        raise CredentialsError(f"{what} password file {path}: {exc.strerror or type(exc).__name__}") from None
    password = line.rstrip("\r\n")
    if not password:
        raise CredentialsError(f"{what} password file {path} is empty")
    return password


def _password(params: dict[str, str], what: str) -> str:
    """The password ``params`` name (``password_file`` or ``password_env``), for ``what``."""
    if REDIS_PASSWORD_FILE in params:
        return _read_password_file(params[REDIS_PASSWORD_FILE], what)
    name = params[REDIS_PASSWORD_ENV]
    if not os.environ.get(name):
        raise CredentialsError(f"{what} password variable {name} is not set")
    return os.environ[name]


def http_settings(url: str) -> tuple[str, Any, dict[str, str]]:
    """An HTTP(S) service's URL (the schema registry) as ``(plain URL, SSL context or None, headers)``.

    ``https://USER@HOST:PORT?cafile=CA&password_file=PATH`` (or ``password_env``):
    the server certificate is verified against ``cafile`` (else the system's
    CAs) and requests carry HTTP basic authentication, as Confluent's
    ``basic.auth.user.info``. The plain URL has no user and none of these
    parameters; the password is read here, at each call, never stored with the URL.
    """
    import base64
    import ssl

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in (REDIS_PASSWORD_FILE, REDIS_PASSWORD_ENV, "cafile")}
    netloc = parts.netloc.rsplit("@", 1)[-1]
    plain = urlunsplit(parts._replace(netloc=netloc, query=urlencode([(k, v) for k, v in query if k not in ours])))
    context = None
    if parts.scheme == "https":
        context = ssl.create_default_context(cafile=ours.get("cafile"))
    headers: dict[str, str] = {}
    user = parts.username
    if user is not None:
        password = parts.password if parts.password is not None else (
            _password(ours, "registry") if REDIS_PASSWORD_FILE in ours or REDIS_PASSWORD_ENV in ours else "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    return plain, context, headers


def redis_settings(url: str) -> tuple[str, dict[str, Any]]:
    """``url`` without onboardflow's own parameters, and the keyword arguments they stand for (``password``)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in (REDIS_PASSWORD_FILE, REDIS_PASSWORD_ENV)}
    if not ours:
        return url, {}
    rest = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k not in ours])))
    if REDIS_PASSWORD_FILE in ours:
        return rest, {"password": _read_password_file(ours[REDIS_PASSWORD_FILE])}
    name = ours[REDIS_PASSWORD_ENV]
    if not os.environ.get(name):
        raise CredentialsError(f"Redis password variable {name} is not set")
    return rest, {"password": os.environ[name]}


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A ``redis.Redis`` client for ``url`` (see the module docstring); ``kwargs`` go to redis-py (timeouts...)."""
    import redis

    plain, credentials = redis_settings(url)
    return redis.Redis.from_url(plain, **kwargs, **credentials)


def warehouse_connect(dsn: str, **kwargs: Any) -> psycopg.Connection:
    """A psycopg connection to the warehouse; TLS and the password file are libpq's (``sslmode``, ``passfile``)."""
    import psycopg

    return psycopg.connect(dsn, **kwargs)


_USERINFO_PASSWORD = re.compile(r"(//[^:@/]*):[^@/]*@")
_PASSWORD_PARAMETER = re.compile(r"(\bpassword\s*=\s*)('[^']*'|[^&\s]*)")


def redact(url: str) -> str:
    """``url`` for logs and messages: a password written into it replaced by ``***``."""
    return _PASSWORD_PARAMETER.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1:***@", url))
