"""Anonymization: the only stage that reads raw PII, and the consent gate.

Decoded onboarding events (``Event`` in ``schemas/records.py``, the reader
schema ``schemas/onboarding_event.v2.avsc``) carry a raw
account id, a device id, an email, an IP address and a user agent. Everything
downstream (sessionization, scoring, segmentation, the warehouse) works on
*anonymized* events instead:

* ``user_id`` / ``anonymous_id`` become ``user_key``, a keyed pseudonym:
  hex HMAC-SHA256(secret, user_id), or HMAC-SHA256(secret, "anon:" +
  anonymous_id) for visitors who are not identified yet. The "anon:" prefix
  keeps device ids out of the account-id key space. ``anonymous_key`` is the
  device's pseudonym whenever the event carries a device id, identified or
  not: identity stitching links the two (transforms/identity.py), also through
  ``email_key``, HMAC("email:" + the address, lower-cased), which never leaves
  the pipeline (no table or profile field holds it). Keys are stable for a given
  secret (profiles survive restarts) and unlinkable to the raw ids without it.
* ``context.email`` -> ``email_domain`` (lower-cased; invalid -> None),
  ``context.ip`` -> ``ip_prefix`` (IPv4 /24, IPv6 /48; 6to4 and IPv4-mapped
  IPv6 addresses are reduced through their embedded IPv4 address, whose /48
  would otherwise keep all 32 bits), ``context.user_agent`` -> ``device_class``
  (desktop / mobile / tablet / bot / unknown), ``context.locale`` -> ``country``
  (its ISO 3166-1 alpha-2 region subtag, e.g. "en-US" -> "US"; the language
  part is not kept).
* ``properties`` lose every entry whose key names PII (email, phone, name of a
  person, ip, address, password, ...: see ``is_pii_property_key``), whose key or
  value contains an email address or one of the event's raw identifiers.
  Non-string values that are not plain scalars are dropped too, since the
  contract says property values are strings.
* ``referrer`` (reader schema v2) becomes ``referrer_host``: paths and query
  strings routinely carry emails and tokens.
* Fields are allow-listed: a new schema field only reaches downstream stages
  once it is added here, so new PII cannot slip through by default.

The anonymized event shape is flat, as the profile stage and the warehouse
``events`` table read it::

    {"event_id", "event_type", "user_key", "identified": bool,
     "anonymous_key": pseudonym of the device id or None,
     "email_key": pseudonym of the e-mail address or None, "session_id",
     "occurred_at", "received_at", "properties": {str: str},
     "device", "os", "app_version", "country", "email_domain", "ip_prefix",
     "device_class",
     "consent": {"analytics", "personalization", "marketing"},
     "referrer_host": host or None       # only when the input has a referrer
    }

Consent gate (``EventAnonymizer``): events of users with personalization
consent go to ``personalization`` (profiles, segments); events of users with
analytics consent only go to ``analytics_only`` (aggregate analytics, never
profiles); events with neither are dropped *before* anything else is done with
them (``consent_filtered``), so no trace of them is kept, not even in the
dead-letter output. Events that cannot be anonymized (not a mapping, malformed
consent, missing event_id / event_type / occurred_at / identity, ...) go to
``dead_letter`` with the raw event as payload, for replay.

Engine-free; ``pipelines/beam/anonymize.py`` (``AnonymizeEvents``) maps the
routes onto Beam outputs and counters.

The secret never travels in clear through logs or pipeline display data: pass a
``SecretFile`` (only the path is in the pipeline graph; it is read
on the worker) or a ``SecretKey`` (a picklable wrapper whose repr is
redacted). ``load_secret`` is the options layer's way to read one from a file
or an environment variable; ``generate_demo_secret`` makes a throwaway one for
demo mode.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Optional, Protocol, Union
from urllib.parse import urlsplit

from .dead_letter import pipeline_dead_letter

MIN_SECRET_BYTES = 16
ANONYMOUS_KEY_PREFIX = "anon:"
EMAIL_KEY_PREFIX = "email:"

DEVICE_DESKTOP = "desktop"
DEVICE_MOBILE = "mobile"
DEVICE_TABLET = "tablet"
DEVICE_BOT = "bot"
DEVICE_UNKNOWN = "unknown"

# Raw identifiers shorter than this are only matched as whole property values:
# a substring search for user id "42" would strip every amount of "42.00".
_MIN_SUBSTRING_NEEDLE = 4
_PROPERTY_SCALARS = (str, int, float, bool)


class SecretError(ValueError):
    """The pseudonymization secret is missing, unreadable or too short."""


def _cached_when_short(max_chars: int, maxsize: int):
    """``functools.lru_cache`` for arguments up to ``max_chars`` long; longer ones are computed each time.

    A cache keyed by client text is bounded in entries, not bytes: unique
    megabyte-long user agents would otherwise pin up to ``maxsize`` MB of
    worker memory. Real values are short and repeat, long ones are rare.
    """
    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(value):
            if isinstance(value, str) and len(value) > max_chars:
                return fn(value)
            return cached(value)

        call.cache_info, call.cache_clear = cached.cache_info, cached.cache_clear
        return call
    return wrap


# --------------------------------------------------------------------------- secrets


def _check_secret(secret: bytes, source: str) -> bytes:
    if not isinstance(secret, (bytes, bytearray)):
        raise SecretError(f"pseudonymization secret from {source} must be bytes")
    if len(secret) < MIN_SECRET_BYTES:
        # The length is safe to report, the content never is.
        raise SecretError(
            f"pseudonymization secret from {source} is {len(secret)} bytes; "
            f"at least {MIN_SECRET_BYTES} are required"
        )
    return bytes(secret)


def load_secret(path: Union[str, os.PathLike, None] = None, env_var: Optional[str] = None) -> bytes:
    """Read the pseudonymization secret for the pipeline's options layer.

    ``path`` wins when given (a trailing newline, as editors and ``echo`` leave
    it, is not part of the secret); otherwise the environment variable named by
    ``env_var`` is read (UTF-8). Raises ``SecretError`` with a message that
    names the source but never the secret when nothing is configured, the file
    or variable is missing or empty, or the secret is shorter than 16 bytes.
    Called on the driver only: workers get a ``SecretKey`` / ``SecretFile``.
    """
    if path is not None:
        source = f"file {os.fspath(path)!r}"
        try:
            raw = Path(path).read_bytes()
        except FileNotFoundError:
            raise SecretError(f"pseudonymization secret {source} does not exist") from None
        except OSError as exc:
            raise SecretError(f"pseudonymization secret {source} is unreadable: {exc.strerror}") from None
        return _check_secret(raw.rstrip(b"\r\n"), source)
    if env_var:
        source = f"environment variable ${env_var}"
        value = os.environ.get(env_var)
        if not value:
            raise SecretError(f"pseudonymization secret {source} is not set")
        return _check_secret(value.encode("utf-8"), source)
    raise SecretError(
        "no pseudonymization secret configured: give a secret file or an environment "
        "variable, or run in demo mode with a generated secret"
    )


def generate_demo_secret() -> bytes:
    """A random 32-byte secret for demo runs: keys are stable within the run only."""
    return secrets.token_bytes(32)


class SecretKey:
    """A secret held in memory, picklable, whose repr and str never show it.

    It does travel inside the pickled stage (in Beam: compressed, in the pipeline proto),
    so prefer ``SecretFile`` when the pipeline graph is stored or shared.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        self._secret = _check_secret(secret, "SecretKey")

    def resolve(self) -> bytes:
        return self._secret

    @property
    def key_id(self) -> str:
        """A short, non-reversible id of the secret, safe to log, to tell keys apart."""
        return hashlib.sha256(b"onboardflow-key-id\x00" + self._secret).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"SecretKey(<redacted>, key_id={self.key_id})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretKey) and hmac.compare_digest(self._secret, other._secret)

    def __hash__(self) -> int:
        return hash(self.key_id)

    def __getstate__(self):
        return self._secret

    def __setstate__(self, state) -> None:
        self._secret = state


class SecretFile:
    """A secret read from a file on the worker: only the path is in the graph."""

    __slots__ = ("path",)

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = os.fspath(path)

    def resolve(self) -> bytes:
        return load_secret(path=self.path)

    def __repr__(self) -> str:
        return f"SecretFile({self.path!r})"

    def __getstate__(self):
        return self.path

    def __setstate__(self, state) -> None:
        self.path = state


class SecretProvider(Protocol):
    def resolve(self) -> bytes: ...


def as_secret_provider(secret: Union[SecretProvider, bytes]) -> SecretProvider:
    """``secret`` as a provider: raw bytes are wrapped in a ``SecretKey``."""
    if isinstance(secret, (bytes, bytearray)):
        return SecretKey(bytes(secret))
    if not callable(getattr(secret, "resolve", None)):
        raise TypeError("secret_provider must be a SecretKey, a SecretFile or bytes")
    return secret


# --------------------------------------------------------------------------- PII reduction

_EMAIL_DOMAIN_RE = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,61}[a-z0-9]$"
)
_WHITESPACE_RE = re.compile(r"\s")
# An address anywhere in free text, in linear time: a match starts only where a run of address
# characters starts (the lookbehind), and the run before "@" is never backtracked into (++).
# Why: docs/security.md "Fuzzing", finding 4.
_EMAIL_CHAR = r"[^\s@<>(),;:\"\[\]]"
_EMAIL_IN_TEXT_RE = re.compile(rf"(?<!{_EMAIL_CHAR}){_EMAIL_CHAR}++@{_EMAIL_CHAR}+\.[A-Za-z]{{2,}}")


def email_domain(email: Optional[str]) -> Optional[str]:
    """The lower-cased domain of a syntactically valid address, else None.

    Internationalized domains come back in their ASCII (punycode) form so the
    same domain always yields the same value.
    """
    if not isinstance(email, str):
        return None
    local, at, domain = email.strip().rpartition("@")
    if not at or not local or not domain or "@" in local or _WHITESPACE_RE.search(local):
        return None
    domain = domain.rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if len(domain) > 253 or not _EMAIL_DOMAIN_RE.match(domain):
        return None
    return domain


_IPV4_24 = 0xFFFFFF00
_IPV6_48 = ((1 << 48) - 1) << 80


def _strip_ip_decorations(raw: str) -> str:
    text = raw.strip()
    if "," in text:  # X-Forwarded-For style list: the client is first
        text = text.split(",", 1)[0].strip()
    if text.startswith("["):  # "[v6]:port"
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:  # "v4:port"
        text = text.split(":", 1)[0]
    return text.split("%", 1)[0]  # IPv6 zone id


# A plain dotted quad, by ipaddress's rules: decimal octets 0-255, no leading zeros.
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_PLAIN_IPV4_RE = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET})\.{_OCTET}")


# An IPv6 address written out in full (eight groups): its /48 is its first three.
_FULL_IPV6_RE = re.compile(r"([0-9A-Fa-f]{1,4}):([0-9A-Fa-f]{1,4}):([0-9A-Fa-f]{1,4})(?::[0-9A-Fa-f]{1,4}){5}")


def _ipv6_48(first: list[int]) -> str:
    """``ipaddress.IPv6Network`` text of the /48 starting with groups ``first`` (RFC 5952: the longest zero run)."""
    groups = first + [0] * 5
    start = 3
    while start and groups[start - 1] == 0:
        start -= 1  # the zero run of groups 3..7 reaches back over zero groups before it
    head = ":".join(f"{g:x}" for g in groups[:start])
    return f"{head}::/48"


def ip_prefix(ip: Optional[str]) -> Optional[str]:
    """The network an address belongs to: IPv4 -> /24, IPv6 -> /48; invalid -> None."""
    if not isinstance(ip, str) or not ip:
        return None
    plain = _PLAIN_IPV4_RE.fullmatch(ip)
    if plain is not None:  # the common case: nothing to strip
        return plain.group(1) + ".0/24"
    full = _FULL_IPV6_RE.fullmatch(ip)
    if full is not None:
        groups = [int(g, 16) for g in full.groups()]
        if groups[0] not in (0, 0x2002):  # neither IPv4-mapped/compatible nor 6to4: no embedded IPv4
            return _ipv6_48(groups)
    text = _strip_ip_decorations(ip)
    plain = _PLAIN_IPV4_RE.fullmatch(text)  # a dotted quad with a port, a list, spaces around it
    if plain is not None:
        return plain.group(1) + ".0/24"
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 6:
        embedded = addr.ipv4_mapped or addr.sixtofour
        if embedded is None:
            network = ipaddress.IPv6Address(int(addr) & _IPV6_48)
            return f"{network.compressed}/48"
        addr = embedded
    return f"{ipaddress.IPv4Address(int(addr) & _IPV4_24)}/24"


_BOT_UA_RE = re.compile(
    # "cubot" is a phone brand, not a robot.
    r"(?<!cu)bot\b|bot/|crawl|spider|slurp|scrapy|headless|phantomjs|lighthouse|pingdom|"
    r"uptimerobot|facebookexternalhit|curl/|wget/|python-requests|python-urllib|aiohttp|"
    r"go-http-client|java/|libwww|httpclient|postmanruntime|insomnia/"
)
_TABLET_UA_RE = re.compile(r"ipad|tablet|kindle|silk/|playbook|nexus (?:7|9|10)\b|sm-t\d")
_MOBILE_UA_RE = re.compile(
    r"mobi|iphone|ipod|windows phone|blackberry|bb10|opera mini|iemobile|android.+mobile"
)
_DESKTOP_UA_RE = re.compile(r"windows nt|macintosh|mac os x|x11|linux|cros|freebsd|openbsd")


@_cached_when_short(512, maxsize=4096)
def device_class(user_agent: Optional[str]) -> str:
    """desktop / mobile / tablet / bot / unknown from a user agent string.

    Checked in that order of trust: bots first (they often claim a desktop
    browser), then tablets (Android tablets are "Android" without "Mobile",
    iPads say "iPad"), then phones, then desktop operating systems. iPadOS 13+
    in desktop mode announces itself as a Mac and is counted as desktop; the
    device class is a coarse personalization hint, not a fingerprint.
    Cached up to 512 characters: user agents repeat heavily, the cache lives
    in worker memory only.
    """
    if not isinstance(user_agent, str) or not user_agent.strip():
        return DEVICE_UNKNOWN
    ua = user_agent.lower()
    if _BOT_UA_RE.search(ua):
        return DEVICE_BOT
    if _TABLET_UA_RE.search(ua) or ("android" in ua and "mobile" not in ua):
        return DEVICE_TABLET
    if _MOBILE_UA_RE.search(ua):
        return DEVICE_MOBILE
    if _DESKTOP_UA_RE.search(ua):
        return DEVICE_DESKTOP
    return DEVICE_UNKNOWN


_LOCALE_SPLIT_RE = re.compile(r"[-_.@]")


@_cached_when_short(64, maxsize=1024)
def country_from_locale(locale: Optional[str]) -> Optional[str]:
    """The ISO 3166-1 alpha-2 region of a BCP 47 / POSIX locale: "en-US",
    "en_us.UTF-8" -> "US", "zh-Hant-TW" -> "TW"; no region ("fr") or a
    numeric UN M.49 region ("es-419", not a country) -> None."""
    if not isinstance(locale, str):
        return None
    parts = _LOCALE_SPLIT_RE.split(locale.strip())
    for part in parts[1:]:
        if len(part) == 2 and part.isascii() and part.isalpha():
            return part.upper()
    return None


def referrer_host(referrer: Optional[str]) -> Optional[str]:
    """Host name of a referrer URL (lower-cased), without path, query or credentials."""
    if not isinstance(referrer, str) or not referrer.strip():
        return None
    text = referrer.strip()
    if "//" not in text:
        text = "//" + text
    try:
        host = urlsplit(text).hostname
    except ValueError:
        return None
    return host or None


# Key tokens that name PII on their own. Keys are split on separators and
# camelCase, so "userEmail", "billing-address", "ip_addr" all match.
_PII_KEY_TOKENS = frozenset({
    "email", "emails", "mail", "e-mail", "phone", "phonenumber", "telephone", "tel", "msisdn",
    "fax", "ip", "ipv4", "ipv6", "ipaddress", "address", "addr", "street", "zip", "zipcode",
    "postcode", "postal", "ssn", "passport", "dob", "birthday", "birthdate", "password",
    "passwd", "secret", "token", "iban", "creditcard", "cardnumber", "firstname", "lastname",
    "fullname", "surname", "username", "displayname", "nickname", "userid", "uid", "useragent",
    "ua", "anonymousid", "deviceid", "geo", "latitude", "longitude", "lat", "lon", "lng",
})
# "name" names a person unless it qualifies a product thing ("feature_name").
_PERSON_NAME_QUALIFIERS = frozenset({
    "first", "last", "full", "given", "family", "middle", "user", "display", "contact",
    "customer", "person", "real", "nick", "sur", "account", "billing", "shipping", "maiden",
})
# Two-token spellings of single PII tokens ("user_id", "user_agent", ...).
_PII_KEY_PAIRS = frozenset({
    ("user", "id"), ("anonymous", "id"), ("device", "id"), ("user", "agent"), ("phone", "number"),
    ("credit", "card"), ("card", "number"), ("social", "security"), ("birth", "date"),
    ("date", "of"), ("ip", "address"), ("zip", "code"), ("post", "code"),
})
_KEY_TOKEN_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


@_cached_when_short(128, maxsize=2048)
def is_pii_property_key(key: str) -> bool:
    """Whether a property key suggests its value is PII (documented above)."""
    tokens = [t.lower() for t in _KEY_TOKEN_RE.findall(key)]
    if not tokens:
        return False
    joined = "".join(tokens)
    if joined in _PII_KEY_TOKENS:
        return True
    for i, token in enumerate(tokens):
        if token in _PII_KEY_TOKENS:
            return True
        if token == "name" and (i == 0 or tokens[i - 1] in _PERSON_NAME_QUALIFIERS):
            return True
        if i and (tokens[i - 1], token) in _PII_KEY_PAIRS:
            return True
    return False


# --------------------------------------------------------------------------- pseudonymizer


class Pseudonymizer:
    """Keyed pseudonyms and the PII reduction of one event."""

    def __init__(self, secret: Union[bytes, SecretKey]) -> None:
        raw = secret.resolve() if isinstance(secret, SecretKey) else _check_secret(secret, "Pseudonymizer")
        # Keyed once; copying a keyed HMAC is cheaper than re-keying per event.
        self._keyed = hmac.new(raw, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "Pseudonymizer(<redacted>)"

    def _hmac_hex(self, value: str) -> str:
        mac = self._keyed.copy()
        mac.update(value.encode("utf-8"))
        return mac.hexdigest()

    def user_key(self, user_id: Optional[str], anonymous_id: Optional[str] = None) -> str:
        """HMAC of the account id, or of "anon:" + the device id before identification."""
        if user_id:
            return self._hmac_hex(user_id)
        if anonymous_id:
            return self._hmac_hex(ANONYMOUS_KEY_PREFIX + anonymous_id)
        raise ValueError("event has neither user_id nor anonymous_id")

    def email_key(self, email: Optional[str]) -> Optional[str]:
        """HMAC of "email:" + the address (local part and domain lower-cased), None for no valid address:
        the e-mail pseudonym identity stitching matches devices and accounts on (transforms/identity.py)."""
        domain = email_domain(email)
        if domain is None:
            return None
        return self._hmac_hex(EMAIL_KEY_PREFIX + email.strip().rpartition("@")[0].lower() + "@" + domain)

    def anonymize(self, event: Mapping[str, Any]) -> tuple[dict, int]:
        """The anonymized form of a validated event, and how many properties were stripped."""
        user_id = event.get("user_id") or None
        anonymous_id = event.get("anonymous_id") or None
        context = event.get("context") or {}
        raw_email = context.get("email")
        raw_ip = context.get("ip")
        raw_ua = context.get("user_agent")
        needles = _needles((user_id, anonymous_id, raw_email, raw_ip, raw_ua, *_address_needles(raw_ip)))
        properties, stripped = _scrub_properties(event.get("properties") or {}, needles)
        session_id = event.get("session_id")
        if session_id is not None and (not isinstance(session_id, str) or _leaks(session_id, needles)):
            session_id = None
        consent = event.get("consent") or {}
        out = {
            "event_id": event["event_id"],
            "event_type": event["event_type"],
            "user_key": self.user_key(user_id, anonymous_id),
            "identified": user_id is not None,
            # The device's pseudonym, for identity stitching (transforms/identity.py).
            "anonymous_key": self._hmac_hex(ANONYMOUS_KEY_PREFIX + anonymous_id) if anonymous_id else None,
            "email_key": self.email_key(raw_email),
            "session_id": session_id,
            "occurred_at": event["occurred_at"],
            "received_at": event.get("received_at"),
            "properties": properties,
            "device": _clean_context_value(context.get("device"), needles),
            "os": _clean_context_value(context.get("os"), needles),
            "app_version": _clean_context_value(context.get("app_version"), needles),
            "country": country_from_locale(context.get("locale")),
            "email_domain": email_domain(raw_email),
            "ip_prefix": ip_prefix(raw_ip),
            "device_class": device_class(raw_ua),
            "consent": {
                "analytics": consent.get("analytics") is True,
                "personalization": consent.get("personalization") is True,
                "marketing": consent.get("marketing") is True,
            },
        }
        if "referrer" in event:
            out["referrer_host"] = referrer_host(event["referrer"])
        return out, stripped


def _needles(identifiers) -> list[tuple[str, bool]]:
    """Raw identifiers to look for in free-text values: (lower-cased, substring match?)."""
    return [(n.lower(), len(n) >= _MIN_SUBSTRING_NEEDLE) for n in identifiers if isinstance(n, str) and n]


@_cached_when_short(64, maxsize=4096)
def _address_needles(raw_ip: Any) -> tuple[str, ...]:
    """The address in an IP field other than as sent: without port, list, brackets, zone or
    spaces, and in canonical form ("[2001:0db8::7]:443" -> "2001:0db8::7", "2001:db8::7").
    Cached as ``device_class`` is: parsing an IPv6 address costs more than the rest of the event."""
    if not isinstance(raw_ip, str) or not raw_ip or _PLAIN_IPV4_RE.fullmatch(raw_ip):
        return ()  # the common case: the address is the field
    text = _strip_ip_decorations(raw_ip)
    try:
        canonical = str(ipaddress.ip_address(text))
    except ValueError:
        canonical = text
    return tuple({text, canonical} - {raw_ip})


def _leaks(value: str, needles: list[tuple[str, bool]]) -> bool:
    lowered = value.lower()
    for needle, as_substring in needles:
        if needle in lowered if as_substring else lowered == needle:
            return True
    return False


def _clean_context_value(value: Any, needles: list[tuple[str, bool]]) -> Optional[str]:
    if not isinstance(value, str) or _leaks(value, needles):
        return None
    return value


def _scrub_properties(properties: Mapping[str, Any], needles: list[tuple[str, bool]]) -> tuple[dict, int]:
    if not isinstance(properties, Mapping):
        return {}, 1
    kept = {}
    stripped = 0
    for key, value in properties.items():
        if (
            not isinstance(key, str)
            or is_pii_property_key(key)
            or not isinstance(value, _PROPERTY_SCALARS)
        ):
            stripped += 1
            continue
        text = value if isinstance(value, str) else str(value)
        # The key is client text too: a raw identifier or an address used as a key is stripped.
        if (_leaks(text, needles) or _EMAIL_IN_TEXT_RE.search(text)
                or _leaks(key, needles) or _EMAIL_IN_TEXT_RE.search(key)):
            stripped += 1
            continue
        kept[key] = value
    return kept, stripped


# --------------------------------------------------------------------------- the stage


def _dead_letter(reason: str, detail: str, event: Any) -> dict:
    # The raw event is kept so it can be replayed once fixed (see transforms/dead_letter.py).
    return pipeline_dead_letter("anonymize", reason, detail, event)


def _consent_flag(consent: Mapping[str, Any], name: str) -> Optional[bool]:
    value = consent.get(name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    return None  # malformed


def _is_millis(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validation_error(event: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """(reason, detail) of why an event cannot be anonymized, or None."""
    for field in ("event_id", "event_type"):
        value = event.get(field)
        if not isinstance(value, str) or not value:
            return f"missing_{field}", f"{field} is missing or not a non-empty string"
    if not _is_millis(event.get("occurred_at")):
        return "missing_occurred_at", "occurred_at is missing or not epoch millis"
    received_at = event.get("received_at")
    if received_at is not None and not _is_millis(received_at):
        return "bad_received_at", "received_at is not epoch millis"
    user_id, anonymous_id = event.get("user_id"), event.get("anonymous_id")
    for field, value in (("user_id", user_id), ("anonymous_id", anonymous_id)):
        if value is not None and not isinstance(value, str):
            return f"bad_{field}", f"{field} is not a string"
    if not user_id and not anonymous_id:
        return "missing_identity", "neither user_id nor anonymous_id is set"
    context = event.get("context")
    if context is not None and not isinstance(context, Mapping):
        return "bad_context", "context is not a mapping"
    return None


#: Reason codes of the dead letters ``EventAnonymizer.anonymize`` writes.
ANONYMIZE_REASONS = frozenset({
    "not_a_mapping", "bad_consent", "missing_event_id", "missing_event_type", "missing_occurred_at",
    "bad_received_at", "bad_user_id", "bad_anonymous_id", "missing_identity", "bad_context",
})

PERSONALIZATION = "personalization"
ANALYTICS_ONLY = "analytics_only"
DEAD_LETTER = "dead_letter"
CONSENT_FILTERED = "consent_filtered"


class Anonymized(NamedTuple):
    """Where one event goes, and with what.

    ``route`` is ``personalization`` / ``analytics_only`` (``record``: the
    anonymized event, ``stripped``: PII properties removed), ``dead_letter``
    (``record``: the dead-letter dict, raw event as payload) or
    ``consent_filtered`` (``record`` None: nothing of the event is kept).
    """

    route: str
    record: Optional[dict]
    stripped: int = 0


class EventAnonymizer:
    """The anonymization stage on one event: consent gate, validation, then the pseudonymizer."""

    def __init__(self, pseudonymizer: Pseudonymizer) -> None:
        self.pseudonymizer = pseudonymizer

    def __repr__(self) -> str:
        return "EventAnonymizer(<redacted>)"

    def anonymize(self, event: Any) -> Anonymized:
        """Route one decoded event (module docstring, "Consent gate")."""
        if not isinstance(event, Mapping):
            return Anonymized(DEAD_LETTER, _dead_letter("not_a_mapping", f"event is a {type(event).__name__}", event))
        consent = event.get("consent")
        if consent is None:
            consent = {}  # the contract's default: no consent at all
        if not isinstance(consent, Mapping):
            return Anonymized(DEAD_LETTER, _dead_letter("bad_consent", "consent is not a mapping", event))
        personalization = _consent_flag(consent, "personalization")
        analytics = _consent_flag(consent, "analytics")
        if personalization is None or analytics is None:
            return Anonymized(DEAD_LETTER, _dead_letter(
                "bad_consent", "consent.analytics / consent.personalization is not a boolean", event))
        if not personalization and not analytics:
            # Decided before validation so nothing of a non-consenting user is
            # kept anywhere, dead letters included.
            return Anonymized(CONSENT_FILTERED, None)
        error = _validation_error(event)
        if error is not None:
            return Anonymized(DEAD_LETTER, _dead_letter(*error, event))
        anonymized, stripped = self.pseudonymizer.anonymize(event)
        return Anonymized(PERSONALIZATION if personalization else ANALYTICS_ONLY, anonymized, stripped)
