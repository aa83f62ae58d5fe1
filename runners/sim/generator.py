"""Synthetic onboarding journeys: the event stream a collector would send to Kafka.

A ``JourneyGenerator`` invents ``users`` people who sign up for a product over
the first days of a ``horizon`` and then live out an onboarding journey shaped
by their *persona*:

``fast_adopter``
    finishes the whole tutorial within a few days, comes back almost daily for
    the whole horizon, tries most features and usually buys a plan.
``explorer``
    clicks and browses a lot (page views of many features) but works through
    the tutorial slowly, over weeks; sometimes finishes, rarely buys.
``stalled``
    does one or two tutorial steps, a few sessions in the first two weeks,
    then only the odd visit.
``churner``
    a handful of sessions in the first days, then nothing: with the default
    45-day horizon they are dormant for more than 30 days at the end.
``support_seeker``
    steady but light usage, many support messages and forms.

The personas are the ground truth for segmentation, so they differ in the
features a pipeline can compute: sessions per week, events per session,
tutorial completion, breadth of feature adoption, purchases and recency.
``write_ground_truth`` records, per user, the persona and the outcome labels
(``will_complete_onboarding``: all tutorial steps done within the horizon,
``converted``: a purchase) that a propensity model is later trained on. The
labels are planned before the journey is generated and the journey honours
them, so they agree with the events exactly when the stream is read to its end.
``GeneratorConfig.treatment`` simulates an experiment: users in its treatment
arm (the core's assignment of their pseudonym) complete onboarding with a
higher chance (``TreatmentEffect``; docs/experiments.md "Simulated effects").

Journeys are realistic enough to exercise the pipeline: anonymous page views
(``anonymous_id`` only) before ``signup`` assigns the ``user_id``; sessions
separated by more than 30 minutes of event time and made of events seconds to
minutes apart; a ``login`` to start later sessions; ``tutorial_step`` events
with ``step``/``step_total``; ``feature_used`` from a catalogue of twelve
features; ``purchase`` (sent by the billing backend, so without device
context or session) with ``amount`` and ``plan``, and after it, in a few later
sessions, seat add-ons of the same plan (``item: extra_seats``, ``quantity``,
``amount``), drawn from a per-user billing RNG of their own so the rest of the
journey is what it was without them: RFM's frequency and monetary value
(docs/rfm.md). Contexts carry synthetic
PII: unique e-mail addresses, IPv4/IPv6 addresses, desktop/mobile/tablet
user-agent strings, and per-user consent (most users allow personalization).

The stream comes out the way a collector forwards it: ordered by
``received_at``, with a configurable fraction of events delayed by seconds
to minutes (out of order), of late events (hours to days), of re-sent
duplicates (same ``event_id``), and of malformed messages -- each malformation
one of the rejection reasons of ``onboardflow.schemas.wire``.
``messages()`` yields ``GeneratedMessage(key, value, kind)`` so a test knows
exactly what it produced; ``counts`` tallies the kinds.

Determinism: everything is drawn from ``random.Random`` instances seeded from
the configured seed (one per user, one per stream stage), never the global
RNG or the wall clock (except in ``live`` mode, which anchors the timeline at
now), so the same seed and config give byte-identical output.
Memory: users start lazily in signup order and their journeys are iterators
merged through a heap, so only in-flight state is held, not the event list.
"""
from __future__ import annotations

import csv
import functools
import heapq
import ipaddress
import json
import math
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, NamedTuple, Optional

from ...schemas.units import DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS, WEEK_MS

if TYPE_CHECKING:
    from ...transforms.anonymize import Pseudonymizer
    from ...transforms.experiments import Experiment

#: 2026-01-05T00:00:00Z, a Monday: the default, fixed start of the timeline.
DEFAULT_START_MS = 1_767_571_200_000

TUTORIAL_STEPS = (
    "create_workspace",
    "invite_teammate",
    "connect_data_source",
    "build_first_dashboard",
    "share_report",
)
STEP_TOTAL = len(TUTORIAL_STEPS)

FEATURES = (
    "dashboards", "reports", "data_import", "integrations", "automations", "team_invites",
    "templates", "api_keys", "alerts", "export", "comments", "mobile_app",
)

PAGES = (
    "/", "/pricing", "/features", "/docs/getting-started", "/docs/api", "/blog",
    "/dashboard", "/settings", "/integrations", "/templates", "/changelog", "/help",
)
CLICK_TARGETS = (
    "cta_start_trial", "nav_docs", "nav_pricing", "template_card", "invite_button",
    "help_icon", "search_box", "upgrade_banner", "notification_bell", "profile_menu",
)
FORMS = ("profile", "invite_team", "integration_setup", "workspace_settings", "contact_sales", "feedback")
SUPPORT_TOPICS = ("setup", "billing", "bug_report", "how_to", "integrations", "account_access")
SUPPORT_CHANNELS = ("chat", "email", "in_app")
REFERRERS = ("google", "direct", "newsletter", "partner", "linkedin", "producthunt")
SIGNUP_METHODS = ("email", "google", "github", "microsoft")

#: Account (company) plans, for enrichment against an account reference table.
ACCOUNT_PLANS = ("free", "starter", "pro", "team", "enterprise")
ACCOUNT_PLAN_WEIGHTS = (0.45, 0.2, 0.18, 0.12, 0.05)
INDUSTRIES = ("software", "retail", "finance", "healthcare", "education", "manufacturing", "media")
#: What a purchase buys: (plan, monthly price).
PURCHASE_PLANS = (("starter", "19.00"), ("pro", "49.00"), ("team", "99.00"))
#: Seat add-ons after the purchase: the price of a seat per plan, and the chance that a later session
#: buys some (times the user's engagement, at most ADDON_MAX_P).
SEAT_PRICES = {"starter": 5, "pro": 12, "team": 20}
ADDON_SESSION_P = 0.05
ADDON_MAX_P = 0.2

LOCALES = ("en-US", "en-GB", "en-IN", "de-DE", "fr-FR", "es-ES", "pt-BR", "nl-NL", "ja-JP")
LOCALE_WEIGHTS = (0.38, 0.1, 0.08, 0.1, 0.08, 0.07, 0.08, 0.05, 0.06)
EMAIL_DOMAINS = (
    "gmail.com", "outlook.com", "yahoo.com", "icloud.com", "proton.me",
    "acme.io", "globex.com", "initech.io", "umbrella-corp.com", "example.com",
)
EMAIL_DOMAIN_WEIGHTS = (0.34, 0.12, 0.07, 0.07, 0.04, 0.1, 0.08, 0.07, 0.06, 0.05)
FIRST_NAMES = (
    "ana", "ben", "chen", "dana", "emeka", "farah", "gustav", "hana", "ivan", "julia",
    "kofi", "lena", "mateo", "nora", "omar", "priya", "quinn", "rosa", "sven", "yuki",
)
LAST_NAMES = (
    "almeida", "brown", "costa", "dubois", "eriksen", "fischer", "garcia", "haddad", "ito",
    "jensen", "kowalski", "li", "martin", "nakamura", "okafor", "patel", "rossi", "schmidt",
)

# (device, os, platform, weight, user-agent template; {v} is a browser/OS version)
DEVICE_KINDS = (
    ("desktop", "Windows", "web", 0.32,
     "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/{v}.0.0.0 Safari/537.36"),
    ("desktop", "macOS", "web", 0.2,
     "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/{v}.1 Safari/605.1.15"),
    ("desktop", "Linux", "web", 0.06,
     "Mozilla/5.0 (X11; Linux x86_64; rv:{v}.0) Gecko/20100101 Firefox/{v}.0"),
    ("mobile", "iOS", "ios", 0.18,
     "Mozilla/5.0 (iPhone; CPU iPhone OS {v}_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/{v}.1 Mobile/15E148 Safari/604.1"),
    ("mobile", "Android", "android", 0.16,
     "Mozilla/5.0 (Linux; Android {v}; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Mobile Safari/537.36"),
    ("tablet", "iPadOS", "ios", 0.05,
     "Mozilla/5.0 (iPad; CPU OS {v}_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/{v}.5 Mobile/15E148 Safari/604.1"),
    ("tablet", "Android", "android", 0.03,
     "Mozilla/5.0 (Linux; Android {v}; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"),
)
UA_VERSIONS = {"Windows": (128, 133), "macOS": (16, 18), "Linux": (128, 134), "iOS": (16, 18),
               "Android": (12, 15), "iPadOS": (16, 18)}

# Sessions are built so that one never lasts longer than this...
MAX_SESSION_EVENTS = 40
MAX_EVENT_GAP_MS = 3 * MINUTE_MS
# ...and each session reserves a slot of its maximum length plus more than the
# 30-minute inactivity gap, so consecutive sessions never merge in event time.
SESSION_SLOT_MS = MAX_SESSION_EVENTS * MAX_EVENT_GAP_MS + 31 * MINUTE_MS
MAX_ANONYMOUS_VIEWS = 4
# Anonymous page views precede signup by at most this much.
MAX_PRE_SIGNUP_MS = MAX_ANONYMOUS_VIEWS * MAX_EVENT_GAP_MS

# Cross-device visitors (GeneratorConfig.cross_device_share) browse anonymously on
# another device at most this long before they sign up.
MAX_CROSS_DEVICE_LEAD_MS = 3 * DAY_MS

# Malformation kinds and the rejection reason the decoder gives each.
MALFORMATION_REASONS: dict[str, str] = {
    "garbage": "not_framed",
    "truncated": "avro_decode_error",
    "unknown_schema_id": "unknown_schema_id",
    "missing_identity": "missing_identity",
    "bad_timestamp": "invalid_timestamp",
    "empty_event_id": "invalid_field",
}
MALFORMATION_KINDS = tuple(MALFORMATION_REASONS)
UNKNOWN_SCHEMA_ID = 9999
VALID = "valid"
DUPLICATE = "duplicate"


@dataclass(frozen=True)
class Phase:
    """A stretch of a journey after signup with a steady session rate.

    ``days`` is the stretch's length range (drawn per user); None runs to the
    end of the horizon.
    """

    sessions_per_week: float
    days: Optional[tuple[float, float]] = None


@dataclass(frozen=True)
class Persona:
    """How one kind of user behaves; the generator draws each user from these."""

    name: str
    phases: tuple[Phase, ...]
    events_per_session: float
    #: relative weights of the ordinary in-session events
    event_mix: Mapping[str, float]
    #: chance of finishing the tutorial (scaled by the user's engagement)
    completion_p: float
    #: tutorial steps done by those who do not finish
    partial_steps: tuple[int, int]
    #: tutorial steps happen within this leading fraction of the user's sessions
    tutorial_pace: float
    #: how many distinct features the user adopts
    feature_breadth: tuple[int, int]
    purchase_p: float
    logout_p: float


PERSONAS: dict[str, Persona] = {
    p.name: p
    for p in (
        Persona(
            "fast_adopter", (Phase(8.0),), 13.0,
            {"page_view": 0.2, "click": 0.2, "feature_used": 0.45, "form_submit": 0.12, "support_message": 0.03},
            completion_p=0.93, partial_steps=(3, 4), tutorial_pace=0.08, feature_breadth=(8, 12),
            purchase_p=0.6, logout_p=0.3,
        ),
        Persona(
            "explorer", (Phase(5.0),), 19.0,
            {"page_view": 0.45, "click": 0.32, "feature_used": 0.15, "form_submit": 0.06, "support_message": 0.02},
            completion_p=0.35, partial_steps=(2, 4), tutorial_pace=1.0, feature_breadth=(6, 11),
            purchase_p=0.15, logout_p=0.2,
        ),
        Persona(
            "stalled", (Phase(2.0, (7.0, 14.0)), Phase(0.3)), 5.0,
            {"page_view": 0.45, "click": 0.25, "feature_used": 0.15, "form_submit": 0.1, "support_message": 0.05},
            completion_p=0.0, partial_steps=(1, 2), tutorial_pace=0.5, feature_breadth=(1, 3),
            purchase_p=0.03, logout_p=0.15,
        ),
        Persona(
            "churner", (Phase(8.0, (1.5, 4.0)),), 7.0,
            {"page_view": 0.5, "click": 0.25, "feature_used": 0.1, "form_submit": 0.08, "support_message": 0.07},
            completion_p=0.0, partial_steps=(0, 2), tutorial_pace=1.0, feature_breadth=(0, 2),
            purchase_p=0.01, logout_p=0.1,
        ),
        Persona(
            "support_seeker", (Phase(3.0),), 8.0,
            {"page_view": 0.25, "click": 0.15, "feature_used": 0.15, "form_submit": 0.15, "support_message": 0.3},
            completion_p=0.3, partial_steps=(2, 4), tutorial_pace=0.5, feature_breadth=(3, 5),
            purchase_p=0.2, logout_p=0.25,
        ),
    )
}

DEFAULT_PERSONA_MIX: dict[str, float] = {
    "fast_adopter": 0.2, "explorer": 0.25, "stalled": 0.25, "churner": 0.2, "support_seeker": 0.1,
}


@dataclass(frozen=True)
class TreatmentEffect:
    """A simulated experiment effect: users in ``variant`` of ``experiment`` complete onboarding more often.

    A user's arm is the core's assignment (``Experiment.variant``,
    transforms/experiments.py) of the pseudonym the pipeline will compute
    for them: HMAC-SHA256 of the user id under ``secret`` (the deployment's
    pseudonymization key, as ``Pseudonymizer.user_key``). In that arm the
    chance of finishing the tutorial is ``min(1, p + lift)`` instead of
    ``p``, drawn from the same random number, so the other arms' journeys and
    every other attribute are those of a run without the effect. Since a
    persona's ``p`` can come near 1, the realized lift is at most ``lift``
    (``JourneyGenerator.expected_lift`` says how much).
    """

    experiment: "Experiment"
    variant: str
    lift: float
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.variant not in self.experiment.weights:
            raise ValueError(f"variant {self.variant!r} is not one of {sorted(self.experiment.weights)}")
        if not -1.0 <= self.lift <= 1.0:
            raise ValueError("lift must be within [-1, 1]")
        self._pseudonymizer  # noqa: B018 - a secret the anonymization stage would refuse fails here

    @functools.cached_property
    def _pseudonymizer(self) -> "Pseudonymizer":
        from ...transforms.anonymize import Pseudonymizer

        return Pseudonymizer(self.secret)

    def user_key(self, user_id: str) -> str:
        """The pseudonym the anonymization stage gives ``user_id``."""
        return self._pseudonymizer.user_key(user_id)

    def treated(self, user_id: str) -> bool:
        return self.experiment.variant(self.user_key(user_id)) == self.variant


@dataclass(frozen=True)
class GeneratorConfig:
    """What to generate. Fractions are of valid events unless said otherwise."""

    seed: int = 42
    users: int = 1000
    #: epoch ms of the timeline's start; ignored when ``live`` (then: now)
    start_ms: int = DEFAULT_START_MS
    live: bool = False
    horizon_days: float = 45.0
    #: users sign up uniformly over this many days from the start
    signup_window_days: float = 10.0
    persona_mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_PERSONA_MIX))
    #: events delayed by up to ``max_out_of_order_ms`` behind later ones
    out_of_order_fraction: float = 0.05
    max_out_of_order_ms: int = 2 * MINUTE_MS
    #: events delayed by ``min_lateness_ms``..``max_lateness_ms`` (offline clients)
    late_fraction: float = 0.01
    min_lateness_ms: int = HOUR_MS
    max_lateness_ms: int = 3 * DAY_MS
    #: events re-sent with the same event_id (client retries)
    duplicate_fraction: float = 0.01
    #: malformed messages as a fraction of all messages
    malformed_fraction: float = 0.0
    #: which malformations to deal (default: all of MALFORMATION_KINDS)
    malformation_kinds: tuple[str, ...] = MALFORMATION_KINDS
    personalization_consent_rate: float = 0.95
    analytics_consent_rate: float = 0.9
    marketing_consent_rate: float = 0.4
    #: a simulated experiment effect on onboarding completion (None: no experiment changes anything)
    treatment: Optional[TreatmentEffect] = None
    #: users who also browse anonymously on another device before signing up (identity stitching) ...
    cross_device_share: float = 0.0
    #: ... and of those, the share who later log in on that device (a deterministic link)
    cross_device_login_share: float = 0.8

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError("users must be at least 1")
        if self.horizon_days <= 0 or self.signup_window_days < 0:
            raise ValueError("horizon_days must be positive and signup_window_days non-negative")
        for name in ("out_of_order_fraction", "late_fraction", "duplicate_fraction", "cross_device_share",
                     "cross_device_login_share",
                     "personalization_consent_rate", "analytics_consent_rate", "marketing_consent_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.out_of_order_fraction + self.late_fraction > 1.0:
            raise ValueError("out_of_order_fraction + late_fraction must not exceed 1")
        if not 0.0 <= self.malformed_fraction < 1.0:
            raise ValueError("malformed_fraction must be within [0, 1)")
        if not 0 < self.min_lateness_ms <= self.max_lateness_ms or self.max_out_of_order_ms < SECOND_MS:
            raise ValueError("need 0 < min_lateness_ms <= max_lateness_ms and max_out_of_order_ms >= 1000")
        if not self.malformation_kinds or set(self.malformation_kinds) - set(MALFORMATION_KINDS):
            raise ValueError(f"malformation_kinds must be a non-empty subset of {MALFORMATION_KINDS}")
        unknown = set(self.persona_mix) - set(PERSONAS)
        if unknown:
            raise ValueError(f"unknown personas in persona_mix: {sorted(unknown)}; known: {sorted(PERSONAS)}")
        if any(w < 0 for w in self.persona_mix.values()) or sum(self.persona_mix.values()) <= 0:
            raise ValueError("persona_mix weights must be non-negative and not all zero")


class GeneratedMessage(NamedTuple):
    """One Kafka record to produce. ``kind`` is "valid", "duplicate" or a malformation kind."""

    key: Optional[bytes]
    value: bytes
    kind: str


@dataclass(frozen=True)
class UserProfile:
    """Who a synthetic user is and how their journey will turn out (the ground truth)."""

    index: int
    user_id: str
    account_id: str
    account_plan: str
    persona: str
    signup_ms: int
    engagement: float
    tutorial_steps: int
    purchase_plan: Optional[str]
    email: str
    locale: str
    consent: Mapping[str, bool]

    @property
    def will_complete_onboarding(self) -> bool:
        return self.tutorial_steps == STEP_TOTAL

    @property
    def converted(self) -> bool:
        return self.purchase_plan is not None


@dataclass(frozen=True)
class AccountProfile:
    """One row of the account reference table the enrichment stage joins against."""

    account_id: str
    plan: str
    industry: str
    company_size: int


GROUND_TRUTH_FIELDS = (
    "user_id", "account_id", "persona", "signup_at", "signup_ms", "will_complete_onboarding",
    "converted", "tutorial_steps_planned", "purchase_plan", "account_plan", "consent_personalization",
)

Serializer = Callable[[dict], bytes]
Framer = Callable[[int, bytes], bytes]


def merge_journeys(upcoming: Iterable[tuple[int, int, Callable[[], Iterator[dict]]]]) -> Iterator[dict]:
    """Many users' journeys merged into one stream in ``occurred_at`` order.

    ``upcoming``: per user, (the earliest time their journey can start, a
    tie-break index, a function that starts the journey: an iterator of event
    dicts in event-time order), ordered by that earliest time. A journey is
    started only when the merge reaches its earliest time, so only the
    journeys in flight are held. Ties go to the lower index, then to the
    journey's own order.
    """
    upcoming = iter(upcoming)
    following = next(upcoming, None)
    heap: list[tuple[int, int, dict, Iterator[dict]]] = []
    while True:
        while following is not None and (not heap or following[0] <= heap[0][0]):
            _, index, start = following
            journey = start()
            first = next(journey, None)
            if first is not None:
                heapq.heappush(heap, (first["occurred_at"], index, first, journey))
            following = next(upcoming, None)
        if not heap:
            return
        _, index, event, journey = heap[0]
        after = next(journey, None)
        if after is None:
            heapq.heappop(heap)
        else:
            heapq.heapreplace(heap, (after["occurred_at"], index, after, journey))
        yield event


def iso_utc(epoch_ms: int) -> str:
    """Epoch milliseconds as an ISO-8601 UTC string with millisecond precision."""
    dt = datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def message_key(event: Mapping) -> Optional[bytes]:
    """Kafka key: the user id, else the anonymous id, so one user stays in one partition."""
    ident = event.get("user_id") or event.get("anonymous_id")
    return ident.encode("utf-8") if ident else None


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 60:  # normal approximation; Knuth's product loop gets slow and underflows
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _uuid4(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _public_ipv4(rng: random.Random) -> str:
    while True:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            return str(address)


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.25:
        # IPv6 from the documentation prefix: realistic shape, nobody's real address.
        return str(ipaddress.IPv6Address((0x20010DB8 << 96) | rng.getrandbits(96)))
    return _public_ipv4(rng)


class _Device:
    """A browser or app install: its anonymous id and what its events say about it."""

    __slots__ = ("anonymous_id", "device", "os", "app_version", "user_agent", "ip")

    def __init__(self, rng: random.Random):
        device, os_name, platform, _, ua = rng.choices(DEVICE_KINDS, weights=[d[3] for d in DEVICE_KINDS])[0]
        lo, hi = UA_VERSIONS[os_name]
        self.anonymous_id = f"anon-{_uuid4(rng)}"
        self.device = device
        self.os = os_name
        self.app_version = f"{platform}-4.{rng.randint(8, 14)}.{rng.randint(0, 9)}"
        self.user_agent = ua.format(v=rng.randint(lo, hi))
        self.ip = _ip(rng)


class _Journey:
    """Lazily yields one user's events in event-time order, honouring the profile's plan."""

    def __init__(self, profile: UserProfile, persona: Persona, rng: random.Random, horizon_end_ms: int):
        self.profile = profile
        self.persona = persona
        self.rng = rng
        devices = [_Device(rng)]
        if rng.random() < 0.35:
            devices.append(_Device(rng))
        self.devices = devices
        self.consent = dict(profile.consent)

        # Sessions after the signup session: per phase, how many and in which
        # stretch of time (their times are drawn lazily, in order).
        self.phases: list[tuple[int, int, int]] = []  # (start, free span, count)
        cursor = profile.signup_ms + SESSION_SLOT_MS
        for phase in persona.phases:
            end = horizon_end_ms
            if phase.days is not None:
                end = min(end, profile.signup_ms + int(rng.uniform(*phase.days) * DAY_MS))
            span = end - cursor
            if span <= 0:
                continue
            wanted = _poisson(rng, phase.sessions_per_week * profile.engagement * span / WEEK_MS)
            count = min(wanted, span // SESSION_SLOT_MS)
            self.phases.append((cursor, span - count * SESSION_SLOT_MS, count))
            cursor = end
        self.n_sessions = 1 + sum(c for _, _, c in self.phases)

        # Which session each tutorial step and the purchase fall into.
        eligible = max(1, math.ceil(self.n_sessions * persona.tutorial_pace))
        step_sessions = sorted([0] + [rng.randrange(eligible) for _ in range(profile.tutorial_steps - 1)])
        self.steps_by_session: dict[int, list[int]] = {}
        for step, session in zip(range(1, profile.tutorial_steps + 1), step_sessions):
            self.steps_by_session.setdefault(session, []).append(step)
        self.purchase_session = -1
        if profile.purchase_plan is not None:
            earliest = step_sessions[-1] if profile.tutorial_steps else 0
            self.purchase_session = rng.randint(earliest, self.n_sessions - 1)
        # Add-ons draw from their own RNG: without them every other draw is the same.
        self.billing = random.Random(f"{profile.user_id}/billing")

        breadth = rng.randint(*persona.feature_breadth)
        self.features = rng.sample(FEATURES, breadth)
        self.features_used = 0
        self.event_types = list(persona.event_mix)
        self.event_weights = list(persona.event_mix.values())

    def session_starts(self) -> Iterator[int]:
        yield self.profile.signup_ms
        rng = self.rng
        for start, free, count in self.phases:
            u = 0.0
            for k in range(count):
                # next of `count` sorted uniforms on [0, 1), drawn in order
                u = 1.0 - (1.0 - u) * rng.random() ** (1.0 / (count - k))
                yield start + int(u * free) + k * SESSION_SLOT_MS

    def __iter__(self) -> Iterator[dict]:
        for index, start in enumerate(self.session_starts()):
            yield from self._session(index, start)

    # -- one session ---------------------------------------------------------

    def _gap(self) -> int:
        return min(MAX_EVENT_GAP_MS, max(2 * SECOND_MS, int(self.rng.lognormvariate(9.9, 0.9))))

    def _session(self, index: int, start: int) -> Iterator[dict]:
        rng, profile, persona = self.rng, self.profile, self.persona
        device = self.devices[0] if len(self.devices) == 1 or rng.random() < 0.75 else self.devices[1]
        if device.device == "mobile" and rng.random() < 0.5:
            device.ip = _ip(rng)  # phones move between networks
        session_id = f"sess-{rng.getrandbits(64):016x}"
        context = {
            "device": device.device, "os": device.os, "app_version": device.app_version,
            "locale": profile.locale, "ip": device.ip, "user_agent": device.user_agent,
            "email": profile.email,
        }

        steps = self.steps_by_session.get(index, [])
        purchase = index == self.purchase_session
        addon = (0 <= self.purchase_session < index
                 and self.billing.random() < min(ADDON_MAX_P, ADDON_SESSION_P * profile.engagement))
        room = MAX_SESSION_EVENTS - 2 - len(steps) - (2 if purchase else 0) - addon
        mean = persona.events_per_session * profile.engagement
        body_count = min(room, max(1, _poisson(rng, rng.gammavariate(4.0, mean / 4.0))))
        body: list[tuple[str, dict]] = [self._body_event(index) for _ in range(body_count)]
        positions = sorted(rng.randint(0, len(body)) for _ in steps)
        for offset, (position, step) in enumerate(zip(positions, steps)):
            body.insert(position + offset, ("tutorial_step", {
                "step": str(step), "step_total": str(STEP_TOTAL), "step_name": TUTORIAL_STEPS[step - 1],
            }))
        if purchase:
            body.append(("form_submit", {"form": "billing", "page": "/billing"}))
            body.append(("purchase", None))

        t = start
        if index == 0:
            views = rng.randint(1, MAX_ANONYMOUS_VIEWS)
            gaps = [self._gap() for _ in range(views)]
            t = start - sum(gaps)
            referrer = rng.choice(REFERRERS)
            for gap in gaps:
                props = {"page": rng.choice(("/", "/pricing", "/features", "/signup")), "referrer": referrer}
                yield self._event("page_view", t, None, device.anonymous_id, session_id, props, context, anonymous=True)
                t += gap
            yield self._event("signup", t, profile.user_id, device.anonymous_id, session_id, {
                "account_id": profile.account_id, "plan": profile.account_plan,
                "signup_method": rng.choice(SIGNUP_METHODS), "referrer": referrer,
            }, context)
        else:
            yield self._event("login", t, profile.user_id, device.anonymous_id, session_id,
                              {"method": rng.choice(("password", "sso", "magic_link"))}, context)

        for event_type, props in body:
            t += self._gap()
            if event_type == "purchase":
                plan, amount = next(p for p in PURCHASE_PLANS if p[0] == profile.purchase_plan)
                yield self._event("purchase", t, profile.user_id, None, None,
                                  {"plan": plan, "amount": amount, "currency": "USD",
                                   "account_id": profile.account_id}, self._backend(profile))
            else:
                yield self._event(event_type, t, profile.user_id, device.anonymous_id, session_id, props, context)
        if addon:
            t += min(MAX_EVENT_GAP_MS, max(2 * SECOND_MS, int(self.billing.lognormvariate(9.9, 0.9))))
            seats = self.billing.randint(1, 5)
            yield self._event("purchase", t, profile.user_id, None, None,
                              {"plan": profile.purchase_plan, "item": "extra_seats", "quantity": str(seats),
                               "amount": f"{seats * SEAT_PRICES[profile.purchase_plan]:.2f}", "currency": "USD",
                               "account_id": profile.account_id}, self._backend(profile))
        if rng.random() < persona.logout_p:
            t += self._gap()
            yield self._event("logout", t, profile.user_id, device.anonymous_id, session_id, {}, context)

    @staticmethod
    def _backend(profile) -> dict:
        """The context of an event the billing backend sends: no device and no client session."""
        return {"device": None, "os": None, "app_version": "billing-svc-2.3.1",
                "locale": profile.locale, "ip": None, "user_agent": None, "email": profile.email}

    def _body_event(self, session_index: int) -> tuple[str, dict]:
        rng = self.rng
        event_type = rng.choices(self.event_types, weights=self.event_weights)[0]
        if event_type == "feature_used":
            if not self.features:
                event_type = "page_view"
            else:
                # Breadth unlocks over the journey; a newly unlocked feature is tried soon.
                unlocked = max(1, math.ceil(len(self.features) * min(1.0, 3 * (session_index + 1) / self.n_sessions)))
                if self.features_used < unlocked and rng.random() < 0.6:
                    feature = self.features[self.features_used]
                    self.features_used += 1
                else:
                    feature = self.features[rng.randrange(unlocked)]
                    self.features_used = max(self.features_used, 1)
                return "feature_used", {"feature": feature,
                                        "source": rng.choice(("menu", "shortcut", "tutorial", "search"))}
        if event_type == "page_view":
            if self.features and rng.random() < 0.3:
                return "page_view", {"page": f"/features/{rng.choice(self.features)}"}
            return "page_view", {"page": rng.choice(PAGES)}
        if event_type == "click":
            return "click", {"element": rng.choice(CLICK_TARGETS), "page": rng.choice(PAGES)}
        if event_type == "form_submit":
            return "form_submit", {"form": rng.choice(FORMS)}
        return "support_message", {"topic": rng.choice(SUPPORT_TOPICS), "channel": rng.choice(SUPPORT_CHANNELS)}

    def _event(self, event_type: str, t: int, user_id: Optional[str], anonymous_id: Optional[str],
               session_id: Optional[str], properties: dict, context: dict, anonymous: bool = False) -> dict:
        ctx = dict(context)
        if anonymous:
            ctx["email"] = None  # not known before signup
        return {
            "event_id": _uuid4(self.rng),
            "event_type": event_type,
            "user_id": user_id,
            "anonymous_id": anonymous_id,
            "session_id": session_id,
            "occurred_at": t,
            "received_at": t,  # stamped by the collector stage of the stream
            "properties": dict(properties),
            "context": ctx,
            "consent": dict(self.consent),
        }


class JourneyGenerator:
    """Synthetic onboarding journeys as a received-time-ordered stream of Kafka messages.

    ``serializer`` turns a valid event dict into framed Avro (default: the
    registry's v1 ``AvroSerializer``); ``framer(schema_id, avro)`` frames a
    payload (default: ``onboardflow.schemas.wire.frame``); the malformations
    need both. ``clock`` (epoch seconds) is read once, in ``live`` mode only.
    """

    def __init__(self, config: GeneratorConfig, serializer: Optional[Serializer] = None,
                 framer: Optional[Framer] = None, clock: Callable[[], float] = time.time):
        self.config = config
        self.start_ms = int(clock() * 1000) if config.live else config.start_ms
        self.horizon_end_ms = self.start_ms + int(config.horizon_days * DAY_MS)
        self._serializer = serializer
        self._framer = framer
        self._persona_names = [n for n, w in config.persona_mix.items() if w > 0]
        self._persona_weights = [config.persona_mix[n] for n in self._persona_names]
        self._n_accounts = max(1, math.ceil(config.users * 0.6))
        #: messages yielded by the latest ``messages()`` run, by kind
        self.counts: Counter[str] = Counter()
        #: deliberate stream perturbations of the latest run: out_of_order, late, duplicate
        self.perturbations: Counter[str] = Counter()

    # -- who the users are ---------------------------------------------------

    def users(self) -> Iterator[UserProfile]:
        """Every user's profile, in signup order (cheap: no journeys are generated)."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}/signups")
        window = int(min(cfg.signup_window_days, cfg.horizon_days) * DAY_MS)
        u, n = 0.0, cfg.users
        for index in range(n):
            u = 1.0 - (1.0 - u) * rng.random() ** (1.0 / (n - index))
            yield self._profile(index, self.start_ms + int(u * window))

    def _profile(self, index: int, signup_ms: int) -> UserProfile:
        cfg = self.config
        rng = random.Random(f"{cfg.seed}/user/{index}")
        persona, engagement = self._persona(rng)
        # More engaged users are likelier to finish and to buy, within each persona,
        # so the labels are predictable from early behaviour and not only the persona.
        completion_p = self._completion_p(persona, engagement)
        user_id = f"usr-{index + 1:06d}"
        treatment = cfg.treatment
        if treatment is not None and treatment.treated(user_id):
            completion_p = min(1.0, max(0.0, completion_p + treatment.lift))
        completes = rng.random() < completion_p
        steps = STEP_TOTAL if completes else rng.randint(*persona.partial_steps)
        buy_p = min(0.95, persona.purchase_p * engagement ** 1.5 * (1.4 if completes else 0.7))
        purchase_plan = rng.choice(PURCHASE_PLANS)[0] if rng.random() < buy_p else None
        # Skewed so that some accounts have several users.
        account = int(self._n_accounts * rng.random() ** 1.6)
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        domain = rng.choices(EMAIL_DOMAINS, weights=EMAIL_DOMAIN_WEIGHTS)[0]
        return UserProfile(
            index=index,
            user_id=user_id,
            account_id=f"acct-{account + 1:05d}",
            account_plan=self.account(account).plan,
            persona=persona.name,
            signup_ms=signup_ms,
            engagement=round(engagement, 4),
            tutorial_steps=steps,
            purchase_plan=purchase_plan,
            email=f"{first}.{last}{index + 1}@{domain}",
            locale=rng.choices(LOCALES, weights=LOCALE_WEIGHTS)[0],
            consent={
                "analytics": rng.random() < cfg.analytics_consent_rate,
                "personalization": rng.random() < cfg.personalization_consent_rate,
                "marketing": rng.random() < cfg.marketing_consent_rate,
            },
        )

    def _persona(self, rng: random.Random) -> tuple[Persona, float]:
        """A user's persona and engagement: the first draws of the user's ``rng``."""
        persona = PERSONAS[rng.choices(self._persona_names, weights=self._persona_weights)[0]]
        return persona, min(2.0, max(0.4, rng.lognormvariate(0.0, 0.3)))

    @staticmethod
    def _completion_p(persona: Persona, engagement: float) -> float:
        return min(0.98, persona.completion_p * engagement ** 1.5)

    def expected_lift(self) -> float:
        """The treatment's expected lift in completion over this population: the mean of
        ``min(1, p + lift) - p`` over every user's completion chance ``p`` (0 without a treatment)."""
        treatment = self.config.treatment
        if treatment is None:
            return 0.0
        total = 0.0
        for index in range(self.config.users):
            p = self._completion_p(*self._persona(random.Random(f"{self.config.seed}/user/{index}")))
            total += min(1.0, max(0.0, p + treatment.lift)) - p
        return total / self.config.users

    def account(self, account_index: int) -> AccountProfile:
        """The reference-table row of account ``acct-{account_index + 1:05d}``."""
        rng = random.Random(f"{self.config.seed}/account/{account_index}")
        plan = rng.choices(ACCOUNT_PLANS, weights=ACCOUNT_PLAN_WEIGHTS)[0]
        size = {"free": 3, "starter": 10, "pro": 40, "team": 120, "enterprise": 2000}[plan]
        return AccountProfile(f"acct-{account_index + 1:05d}", plan, rng.choice(INDUSTRIES),
                              max(1, int(size * rng.uniform(0.3, 3.0))))

    def accounts(self) -> Iterator[AccountProfile]:
        """The whole account reference table (every account a user may belong to)."""
        return (self.account(i) for i in range(self._n_accounts))

    def write_ground_truth(self, path: str | Path) -> int:
        """Write one row per user (CSV if ``path`` ends in .csv, else JSON lines); returns rows."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = 0
        with path.open("w", encoding="utf-8", newline="") as out:
            writer = csv.DictWriter(out, GROUND_TRUTH_FIELDS) if path.suffix == ".csv" else None
            if writer:
                writer.writeheader()
            for profile in self.users():
                row = {
                    "user_id": profile.user_id, "account_id": profile.account_id, "persona": profile.persona,
                    "signup_at": iso_utc(profile.signup_ms), "signup_ms": profile.signup_ms,
                    "will_complete_onboarding": profile.will_complete_onboarding,
                    "converted": profile.converted, "tutorial_steps_planned": profile.tutorial_steps,
                    "purchase_plan": profile.purchase_plan, "account_plan": profile.account_plan,
                    "consent_personalization": profile.consent["personalization"],
                }
                if writer:
                    writer.writerow({k: (str(v).lower() if isinstance(v, bool) else ("" if v is None else v))
                                     for k, v in row.items()})
                else:
                    out.write(json.dumps(row, sort_keys=False) + "\n")
                rows += 1
        return rows

    # -- the stream ------------------------------------------------------------

    def journey(self, profile: UserProfile) -> Iterator[dict]:
        """One user's events in event-time order (``received_at`` not yet stamped)."""
        rng = random.Random(f"{self.config.seed}/journey/{profile.index}")
        journey = _Journey(profile, PERSONAS[profile.persona], rng, self.horizon_end_ms)
        other = self._cross_device_events(profile, journey.consent)
        if not other:
            return iter(journey)
        return heapq.merge(journey, other, key=lambda e: e["occurred_at"])

    def _cross_device_events(self, profile: UserProfile, consent: Mapping[str, bool]) -> list[dict]:
        """A cross-device visitor's other device (``cross_device_share`` of users, drawn from an RNG of
        its own, so the rest of the stream is what it is without them): one to three anonymous visits
        in the days before signup; for ``cross_device_login_share`` of them a login on that device
        within three days after signup (if before the horizon), which links it to the account."""
        cfg = self.config
        if cfg.cross_device_share <= 0:
            return []
        rng = random.Random(f"{cfg.seed}/cross-device/{profile.index}")
        if rng.random() >= cfg.cross_device_share:
            return []
        device = _Device(rng)
        context = {"device": device.device, "os": device.os, "app_version": device.app_version,
                   "locale": profile.locale, "ip": device.ip, "user_agent": device.user_agent, "email": None}

        def event(event_type, t, user_id, session_id, properties, email=None):
            return {"event_id": _uuid4(rng), "event_type": event_type, "user_id": user_id,
                    "anonymous_id": device.anonymous_id, "session_id": session_id, "occurred_at": t,
                    "received_at": t, "properties": properties, "context": {**context, "email": email},
                    "consent": dict(consent)}

        events = []
        for _ in range(rng.randint(1, 3)):
            t = profile.signup_ms - rng.randint(2 * HOUR_MS, MAX_CROSS_DEVICE_LEAD_MS)
            session_id = f"sess-{rng.getrandbits(64):016x}"
            for _ in range(rng.randint(1, 5)):
                page = rng.choice(("/", "/pricing", "/features", "/blog", "/customers"))
                events.append(event("page_view", t, None, session_id, {"page": page}))
                t += 2 * SECOND_MS + rng.randrange(MAX_EVENT_GAP_MS)
        if rng.random() < 0.5:
            # A demo request, still anonymous, with the address the account will have: a link by
            # e-mail (transforms/identity.py EmailMatcher), whether or not the device logs in later.
            events.append(event("form_submit", t, None, session_id, {"form": "demo_request", "page": "/demo"},
                                profile.email))
        if rng.random() < cfg.cross_device_login_share:
            t = profile.signup_ms + rng.randint(HOUR_MS, 3 * DAY_MS)
            session_id = f"sess-{rng.getrandbits(64):016x}"
            if t + 4 * MAX_EVENT_GAP_MS < self.horizon_end_ms:
                events.append(event("login", t, profile.user_id, session_id, {"method": "password"},
                                    profile.email))
                for _ in range(rng.randint(1, 3)):
                    t += 2 * SECOND_MS + rng.randrange(MAX_EVENT_GAP_MS)
                    events.append(event("page_view", t, profile.user_id, session_id, {"page": "/app"},
                                        profile.email))
        return sorted(events, key=lambda e: e["occurred_at"])

    def identity_truth(self) -> Iterator[dict]:
        """Per (user, device) that carried a device id: ``{"user_id", "anonymous_id", "deterministic",
        "match", "anonymous_events"}``. ``deterministic``: an event carried both ids (a signup or login on
        the device: ``match`` "id"), or an anonymous event of the device gave the account's e-mail
        address ("email"), so a pipeline can link them for certain (``match`` None: it cannot);
        ``anonymous_events``: the device's events without the account id (which stitching should move
        to the account). From the journeys themselves, before the stream's perturbations."""
        for profile in self.users():
            devices: dict[str, list] = {}
            for e in self.journey(profile):
                if e["anonymous_id"]:
                    seen = devices.setdefault(e["anonymous_id"], [None, 0])
                    if e["user_id"]:
                        seen[0] = "id"
                    else:
                        seen[1] += 1
                        if e["context"].get("email") == profile.email and seen[0] is None:
                            seen[0] = "email"
            for anonymous_id, (match, anonymous_events) in devices.items():
                yield {"user_id": profile.user_id, "anonymous_id": anonymous_id, "deterministic": match is not None,
                       "match": match, "anonymous_events": anonymous_events}

    def _earliest_start(self, profile: UserProfile) -> int:
        """The earliest time ``profile``'s journey can start (the merge's key; the same offset for everyone)."""
        lead = MAX_CROSS_DEVICE_LEAD_MS if self.config.cross_device_share > 0 else MAX_PRE_SIGNUP_MS
        return profile.signup_ms - max(lead, MAX_PRE_SIGNUP_MS)

    def events_in_event_time(self) -> Iterator[dict]:
        """Every user's journey merged by event time (``received_at`` not yet stamped).

        Users join lazily as their first event nears, so only the journeys in
        flight are held.
        """
        return merge_journeys((self._earliest_start(u), u.index, functools.partial(self.journey, u))
                              for u in self.users())

    def events(self) -> Iterator[tuple[str, dict]]:
        """(kind, event) for every valid event and duplicate, in the order a collector sends them.

        Journeys are merged by event time through a heap, users joining as
        their signup approaches; the collector stage then stamps
        ``received_at`` (a small delay, larger for the out-of-order and late
        fractions) and releases events in ``received_at`` order.
        """
        cfg = self.config
        rng = random.Random(f"{cfg.seed}/stream")
        self.perturbations = Counter()
        pending: list[tuple[int, int, str, dict]] = []  # (received_at, seq, kind, event)
        seq = 0
        ooo_cut = cfg.out_of_order_fraction
        late_cut = ooo_cut + cfg.late_fraction
        merged = self.events_in_event_time()
        event = next(merged, None)
        while event is not None:
            occurred = event["occurred_at"]
            following = next(merged, None)
            # Anything received before this event occurred can no longer be overtaken.
            while pending and pending[0][0] <= occurred:
                _, _, kind, ready = heapq.heappop(pending)
                yield kind, ready

            draw = rng.random()
            if draw < ooo_cut:
                delay = rng.randint(5 * SECOND_MS, cfg.max_out_of_order_ms)
                if following is not None:
                    # Make sure at least the next event overtakes it (past its
                    # own collector delay), or it would not be out of order at
                    # all when the stream is sparse.
                    overtaken = following["occurred_at"] - occurred + 2 * SECOND_MS + 1
                    delay = max(delay, min(overtaken, cfg.max_out_of_order_ms))
                self.perturbations["out_of_order"] += 1
            elif draw < late_cut:
                delay = rng.randint(cfg.min_lateness_ms, cfg.max_lateness_ms)
                self.perturbations["late"] += 1
            else:
                delay = min(2 * SECOND_MS, max(5, int(rng.lognormvariate(4.8, 0.8))))  # ~120 ms
            event["received_at"] = occurred + delay
            seq += 1
            heapq.heappush(pending, (event["received_at"], seq, VALID, event))
            if cfg.duplicate_fraction and rng.random() < cfg.duplicate_fraction:
                again = dict(event)
                again["received_at"] = event["received_at"] + rng.randint(500, 30 * SECOND_MS)
                seq += 1
                heapq.heappush(pending, (again["received_at"], seq, DUPLICATE, again))
                self.perturbations["duplicate"] += 1
            event = following
        while pending:
            _, _, kind, ready = heapq.heappop(pending)
            yield kind, ready

    def messages(self, max_messages: Optional[int] = None) -> Iterator[GeneratedMessage]:
        """The Kafka messages: valid events and duplicates as framed Avro, plus malformed ones.

        Malformed messages follow the event they were derived from; they are
        spread evenly (an accumulator, not coin flips) so that their share of
        all messages is ``malformed_fraction`` to within one message, and
        their kinds are dealt from a shuffled deck so every kind appears.
        Stops after ``max_messages`` messages if given. ``counts`` holds the
        tally of the run by kind.
        """
        cfg = self.config
        serialize = self._serializer or v1_serializer()
        framer = self._framer or _default_framer()
        rng = random.Random(f"{cfg.seed}/malformed")
        counts = self.counts = Counter()
        ratio = cfg.malformed_fraction / (1.0 - cfg.malformed_fraction)
        owed = rng.random() * ratio if ratio else 0.0  # random phase, same long-run share
        deck: list[str] = []
        emitted = 0
        for kind, event in self.events():
            if max_messages is not None and emitted >= max_messages:
                return
            value = serialize(event)
            counts[kind] += 1
            emitted += 1
            yield GeneratedMessage(message_key(event), value, kind)
            owed += ratio
            while owed >= 1.0:
                owed -= 1.0
                if max_messages is not None and emitted >= max_messages:
                    return
                if not deck:
                    deck = list(cfg.malformation_kinds)
                    rng.shuffle(deck)
                bad = deck.pop()
                counts[bad] += 1
                emitted += 1
                yield _malform(bad, event, value, rng, serialize, framer)


def _malform(kind: str, event: dict, value: bytes, rng: random.Random,
             serialize: Serializer, framer: Framer) -> GeneratedMessage:
    """A message of malformation ``kind`` derived from a valid ``event`` and its bytes."""
    key = message_key(event)
    if kind == "garbage":
        # Never starts with the magic byte 0, so it is never mistaken for a frame.
        junk = bytes([rng.randint(1, 255)]) + rng.randbytes(rng.randint(4, 60))
        body = rng.choice((junk, b'{"type":"page_view","note":"json from a legacy SDK"}', b"ping"))
        return GeneratedMessage(None, body, kind)
    if kind == "truncated":
        return GeneratedMessage(key, value[: rng.randint(5, len(value) - 1)], kind)
    if kind == "unknown_schema_id":
        return GeneratedMessage(key, framer(UNKNOWN_SCHEMA_ID, value[5:]), kind)
    broken = dict(event)
    broken["event_id"] = _uuid4(rng)
    if kind == "missing_identity":
        broken["user_id"] = broken["anonymous_id"] = None
        key = None
    elif kind == "bad_timestamp":
        if rng.random() < 0.5:
            broken["occurred_at"] = rng.randint(0, 365 * DAY_MS)  # 1970
        else:
            broken["occurred_at"] = 4_102_444_800_000 + rng.randint(0, 365 * DAY_MS)  # 2100
    elif kind == "empty_event_id":
        broken["event_id"] = ""
    else:
        raise ValueError(f"unknown malformation kind {kind!r}")
    return GeneratedMessage(key, serialize(broken), kind)


def v1_serializer(registry=None) -> Serializer:
    """Serialize events as onboarding_event v1 under the events subject of ``registry``.

    ``registry`` defaults to the shipped file registry; any
    ``onboardflow.schemas.schema_registry.SchemaRegistry`` works (e.g. from
    ``registry_from_url``).
    """
    from ...schemas import EVENTS_SUBJECT, default_registry, load_schema
    from ...schemas.wire import AvroSerializer

    schema = load_schema("onboarding_event", 1)
    return AvroSerializer(registry or default_registry(), EVENTS_SUBJECT, schema).serialize


def _default_framer() -> Framer:
    from ...schemas.wire import frame

    return frame
