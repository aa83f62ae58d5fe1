"""Every Kafka client, Redis client and PostgreSQL connection of onboardflow, built from one URL each.

In: the deployment's Kafka bootstrap (``OBF_KAFKA_BOOTSTRAP`` /
``--kafka_bootstrap_servers``), Redis URL (``OBF_REDIS_URL`` / ``--redis_url``)
or warehouse DSN (``OBF_WAREHOUSE_DSN`` / ``--warehouse_dsn``). Out: the
kafka-python settings (``kafka_settings``, ``kafka_config``), a
``redis.Redis`` client (``redis_client``) or a ``psycopg.Connection``
(``warehouse_connect``). Building every client here means TLS and credentials
cannot be forgotten in one place: what the URL asks for, every client gets.

A URL carries only what is not secret; the secret is named, never written:

- Kafka: ``host:port[,host:port]`` is plaintext, as always. Secured:
  ``sasl_ssl://USER@HOST:PORT[,HOST:PORT]?ssl_cafile=CA&password_file=PATH``
  (SCRAM-SHA-512 unless ``sasl_mechanism=`` says otherwise; ``password_env=VAR``
  instead of the file), ``ssl://HOST:PORT?ssl_cafile=CA[&ssl_certfile=CERT&ssl_keyfile=KEY]``
  (TLS, optionally a client certificate) or ``sasl_plaintext://USER@HOST:PORT?password_file=PATH``.

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
users and the secure services: docs/security.md.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

if TYPE_CHECKING:  # imported when a client is built: `onboardflow --help` stays fast
    import psycopg
    import redis

#: URL query parameters onboardflow reads itself (redis-py would refuse them).
REDIS_PASSWORD_FILE = "password_file"
REDIS_PASSWORD_ENV = "password_env"


class CredentialsError(RuntimeError):
    """A URL names a password source that cannot be read (the message names the source, never a secret)."""


def _read_password_file(path: str, service: str = "Redis") -> str:
    try:
        with open(path, encoding="utf-8") as f:
            line = f.readline()
    except OSError as exc:
        raise CredentialsError(f"{service} password file {path}: {exc.strerror or type(exc).__name__}") from None
    password = line.rstrip("\r\n")
    if not password:
        raise CredentialsError(f"{service} password file {path} is empty")
    return password


def _password_from(source: dict[str, str], service: str) -> str:
    if REDIS_PASSWORD_FILE in source:
        return _read_password_file(source[REDIS_PASSWORD_FILE], service)
    name = source[REDIS_PASSWORD_ENV]
    if not os.environ.get(name):
        raise CredentialsError(f"{service} password variable {name} is not set")
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
            _password_from(ours, "registry") if REDIS_PASSWORD_FILE in ours or REDIS_PASSWORD_ENV in ours else "")
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
    return rest, {"password": _password_from(ours, "Redis")}


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A ``redis.Redis`` client for ``url`` (see the module docstring); ``kwargs`` go to redis-py (timeouts...)."""
    import redis

    plain, credentials = redis_settings(url)
    return redis.Redis.from_url(plain, **kwargs, **credentials)


def warehouse_connect(dsn: str, **kwargs: Any) -> psycopg.Connection:
    """A psycopg connection to the warehouse; TLS and the password file are libpq's (``sslmode``, ``passfile``)."""
    import psycopg

    return psycopg.connect(dsn, **kwargs)


#: Kafka security protocols a bootstrap URL may name (its scheme), and the
#: SASL mechanism used when the URL names none (the secure broker's).
KAFKA_PROTOCOLS = ("plaintext", "ssl", "sasl_plaintext", "sasl_ssl")
KAFKA_DEFAULT_SASL_MECHANISM = "SCRAM-SHA-512"
_KAFKA_TLS_PARAMETERS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
_KAFKA_PARAMETERS = (*_KAFKA_TLS_PARAMETERS, "sasl_mechanism", REDIS_PASSWORD_FILE, REDIS_PASSWORD_ENV)


@dataclasses.dataclass(frozen=True)
class KafkaEndpoint:
    """A Kafka bootstrap setting, parsed: where, which protocol, who, and where the password is (never the password).

    ``protocol`` is Kafka's name (``PLAINTEXT``, ``SSL``, ``SASL_SSL``,
    ``SASL_PLAINTEXT``); ``tls`` holds the kafka-python TLS parameters the URL
    gave (``ssl_cafile``, ``ssl_certfile``, ``ssl_keyfile``); exactly one of
    ``password_file`` / ``password_env`` is set for SASL.
    """

    servers: str
    protocol: str = "PLAINTEXT"
    user: str = ""
    sasl_mechanism: str = ""
    tls: tuple[tuple[str, str], ...] = ()
    password_file: str = ""
    password_env: str = ""

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def password(self) -> str:
        """The password, read now from its file or variable (``CredentialsError`` if it cannot be)."""
        source = {REDIS_PASSWORD_FILE: self.password_file} if self.password_file else \
            {REDIS_PASSWORD_ENV: self.password_env}
        return _password_from(source, "Kafka")


def parse_kafka_bootstrap(bootstrap: str) -> KafkaEndpoint:
    """``bootstrap`` (module docstring) as a ``KafkaEndpoint``; ``ValueError`` names what is malformed.

    ``host:port[,host:port]`` -> plaintext. A URL's password is refused (name
    it with ``password_file=`` or ``password_env=``); messages show no query.
    """
    if "://" not in bootstrap:
        return KafkaEndpoint(bootstrap)
    where = redact(bootstrap.partition("?")[0])  # messages show no query: it may hold anything
    scheme, _, rest = bootstrap.partition("://")
    scheme = scheme.lower()
    if scheme not in KAFKA_PROTOCOLS:
        raise ValueError(f"Kafka bootstrap {where!r}: unknown security protocol {scheme!r} "
                         f"(one of {', '.join(KAFKA_PROTOCOLS)})")
    location, _, query_text = rest.partition("?")
    user, _, servers = location.rpartition("@")
    if ":" in user:
        raise ValueError(f"Kafka bootstrap {where!r}: name the password with password_file= "
                         f"or password_env=, not in the URL")
    query = dict(parse_qsl(query_text, keep_blank_values=True))
    unknown = sorted(set(query) - set(_KAFKA_PARAMETERS))
    if unknown or not servers.strip("/"):
        raise ValueError(f"Kafka bootstrap {where!r}: "
                         + (f"unknown parameters {unknown} (known: {', '.join(_KAFKA_PARAMETERS)})"
                            if unknown else "no host:port"))
    servers = servers.strip("/")
    if scheme == "plaintext":
        return KafkaEndpoint(servers)
    tls = tuple((k, query[k]) for k in _KAFKA_TLS_PARAMETERS if query.get(k)) if scheme in ("ssl", "sasl_ssl") else ()
    if not scheme.startswith("sasl_"):
        return KafkaEndpoint(servers, scheme.upper(), tls=tls)
    if not user:
        raise ValueError(f"Kafka bootstrap {where!r}: SASL needs a user (sasl_ssl://USER@HOST:PORT)")
    if not query.get(REDIS_PASSWORD_FILE) and not query.get(REDIS_PASSWORD_ENV):
        raise ValueError(f"Kafka bootstrap {where!r}: SASL needs password_file= or password_env=")
    return KafkaEndpoint(servers, scheme.upper(), user, query.get("sasl_mechanism") or KAFKA_DEFAULT_SASL_MECHANISM,
                         tls, password_file=query.get(REDIS_PASSWORD_FILE, ""),
                         password_env="" if query.get(REDIS_PASSWORD_FILE) else query[REDIS_PASSWORD_ENV])


def kafka_settings(bootstrap: str) -> tuple[str, dict[str, Any]]:
    """The bootstrap servers and the kafka-python keyword arguments a bootstrap setting stands for.

    ``host:port[,host:port]`` (plaintext) -> (itself, ``{}``): the clients
    behave exactly as without this function. A URL (module docstring) ->
    ``("HOST:PORT[,...]", {"security_protocol": "SASL_SSL", "ssl_cafile": CA,
    "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": USER,
    "sasl_plain_password": <read from the file>})``. Raises ``ValueError`` for
    a malformed URL, ``CredentialsError`` for a password source that cannot be read.
    """
    endpoint = parse_kafka_bootstrap(bootstrap)
    if endpoint.protocol == "PLAINTEXT":
        return endpoint.servers, {}
    kwargs: dict[str, Any] = {"security_protocol": endpoint.protocol, **dict(endpoint.tls)}
    if endpoint.sasl:
        kwargs.update(sasl_mechanism=endpoint.sasl_mechanism, sasl_plain_username=endpoint.user,
                      sasl_plain_password=endpoint.password())
    return endpoint.servers, kwargs


class KafkaRefusedError(ConnectionError):
    """Kafka refused the connection for a security reason (credentials, certificate, protocol); no secret in it."""


class _KafkaRefusals(logging.Handler):
    """Keeps the last security refusal kafka-python logged.

    kafka-python retries a refused connection until its timeout and then
    raises only "Unable to bootstrap" / ``NoBrokersAvailable``; the reason
    (a SASL failure, an unverified certificate, a plaintext client on a TLS
    port) is only logged on the way. ``kafka_refusal`` puts it back.
    """

    PATTERNS = (
        (re.compile(r"SaslAuthenticationFailedError: .*?(Authentication failed[^)\n]*)"),
         "Kafka refused the credentials: {0} (docs/security.md)"),
        (re.compile(r"(\[SSL: CERTIFICATE_VERIFY_FAILED\][^(\n]*)"),
         "Kafka's certificate was not verified: {0} (name the CA with ssl_cafile=, docs/security.md)"),
        (re.compile(r"(Invalid frame length: \d+)"),
         "Kafka answered in TLS to a plaintext client ({0}): use sasl_ssl:// with its CA (docs/security.md)"),
        (re.compile(r"UnsupportedSaslMechanismError: ([^\n]*)"),
         "Kafka refused the SASL mechanism: {0} (set sasl_mechanism=, docs/security.md)"),
    )

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: Optional[tuple[float, str]] = None

    @classmethod
    def word(cls, text: str) -> Optional[str]:
        """The refusal ``text`` (a kafka-python log line, or the login probe's answer) reports, in our words."""
        for pattern, message in cls.PATTERNS:
            found = pattern.search(text)
            if found:
                return message.format(found.group(1).strip())
        return None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            worded = self.word(record.getMessage())
        except Exception:  # noqa: BLE001 - a log record must never break the client
            return
        if worded is not None:
            self.last = (time.monotonic(), worded)


_REFUSALS = _KafkaRefusals()


class _HideKafkaPassword(logging.Filter):
    """Masks ``sasl_plain_password`` in a configuration kafka-python logs (``KafkaAdminClient`` does, at DEBUG)."""

    @staticmethod
    def _masked(value: Any) -> Any:
        if isinstance(value, dict) and value.get("sasl_plain_password"):
            return {**value, "sasl_plain_password": "***"}
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self._masked(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = self._masked(record.args)
        return True


_HIDE_PASSWORD = _HideKafkaPassword()
_CONFIG_LOGGERS = ("kafka.admin.client", "kafka.producer.kafka", "kafka.consumer.group", "kafka.net.manager")


def _watch_kafka_refusals() -> None:
    kafka_logger = logging.getLogger("kafka")
    if _REFUSALS not in kafka_logger.handlers:
        kafka_logger.addHandler(_REFUSALS)
        for name in _CONFIG_LOGGERS:
            logging.getLogger(name).addFilter(_HIDE_PASSWORD)


def kafka_refusal(exc: BaseException, within_s: float = 600.0, since: Optional[float] = None,
                  bootstrap: Optional[str] = None) -> Optional[KafkaRefusedError]:
    """A ``KafkaRefusedError`` naming why ``exc`` (a bootstrap timeout, no broker available) happened, or None.

    In order: a security refusal kafka-python logged in the last ``within_s`` seconds (and at or
    after ``since``, a ``time.monotonic()`` taken when the failed client started: another client's
    refusal is not this one's); else, when ``bootstrap`` is given, the broker's own answer: for a
    secured setting its refusal of the same TLS and SASL login replayed on one socket
    (transforms/kafka_login.py), for a plaintext one that its first server completes a TLS
    handshake (a TLS listener). The log alone is not enough: a broker that refuses closes at once,
    and a busy client may see only the close."""
    if isinstance(exc, KafkaRefusedError):
        return exc
    name = type(exc).__name__
    if name not in ("KafkaTimeoutError", "NoBrokersAvailable", "KafkaConnectionError"):
        return None
    if _REFUSALS.last is not None:
        when, message = _REFUSALS.last
        if time.monotonic() - when <= within_s and (since is None or when >= since):
            return KafkaRefusedError(message)
    if bootstrap is None:
        return None
    from .kafka_login import login_refusal, speaks_tls

    if kafka_is_secured(bootstrap):
        answer = login_refusal(bootstrap)
        worded = _KafkaRefusals.word(answer) if answer else None
        return KafkaRefusedError(worded) if worded else None
    server = bootstrap.split(",")[0].strip()
    if speaks_tls(server):
        return KafkaRefusedError(f"Kafka answered in TLS to a plaintext client (TLS handshake on {server}): "
                                 "use sasl_ssl:// with its CA (docs/security.md)")
    return None


def kafka_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """kafka-python client settings for ``bootstrap`` (``bootstrap_servers`` and security), then ``overrides``.

    Every ``KafkaProducer``/``KafkaConsumer``/``KafkaAdminClient`` of onboardflow is
    built from this: ``KafkaProducer(**kafka_config(bootstrap, acks="all"))``.
    """
    _watch_kafka_refusals()
    servers, security = kafka_settings(bootstrap)
    return {"bootstrap_servers": servers, **security, **overrides}


def kafka_is_secured(bootstrap: str) -> bool:
    """True when ``bootstrap`` asks for TLS or SASL (a URL whose scheme is not ``plaintext``)."""
    scheme, sep, _ = bootstrap.partition("://")
    return bool(sep) and scheme.lower() != "plaintext"


_USERINFO_PASSWORD = re.compile(r"(//[^:@/]*):[^@/]*@")
_PASSWORD_PARAMETER = re.compile(r"(\bpassword\s*=\s*)('[^']*'|[^&\s]*)")


def redact(url: str) -> str:
    """``url`` for logs and messages: a password written into it replaced by ``***``."""
    return _PASSWORD_PARAMETER.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1:***@", url))
