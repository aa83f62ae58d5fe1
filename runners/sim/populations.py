"""Population designs: ground-truth users whose journeys the default generator would never invent.

The segmentation models are otherwise judged only on ``runners/sim/generator.py``'s
five personas. A *population design* is a second, independent opinion: its own
persona set, in unequal shares, with its own session shapes and noise, written
without any of that generator's persona code (only its time constants and the
tutorial/feature catalogues are shared, because the pipeline knows those).

``saas_teams`` (12 days)
    browse_and_leave 0.25, team_inviter 0.10, support_heavy 0.15,
    drop_off 0.30, daily_worker 0.20: a team product, sessions of a few to
    twenty events, invites as a behaviour of their own.
``mobile_consumer`` (10 days)
    snacker 0.35, binge_then_quit 0.15, weekend_user 0.20, completer 0.10,
    lurker 0.20: short app sessions (1-4 events, a minute or two), several a
    day, except the bingers' long ones; weekend users come back only on
    Saturdays and Sundays (UTC).
``b2b_trial`` (14 days)
    admin_setup 0.20, evaluator 0.30, champion 0.15, ghost 0.25,
    power_user 0.10: a sales-led trial with long working sessions (20-60
    events, 20-90 minutes) in office hours.

Each user has exactly one persona (``PopulationUser.persona``). Per user the
persona's numbers are perturbed: an activity factor (gamma) scales how many
days have sessions and how many sessions such a day has (Poisson), the mean
session length is drawn within the persona's bounds and each session's length
around it (gamma-Poisson), and the in-session event mix is a Dirichlet draw
around the persona's mix. Users sign up uniformly over the first 40% of the
horizon; their first event is ``signup``, later sessions open with ``login``,
events in a session are 2 s to a few minutes apart and sessions more than 30
minutes apart; ``purchase`` comes from the billing backend (no device, no
session). Every event lies within ``[start_ms, start_ms + days]``.

Events are the dicts the collector sends (``received_at == occurred_at``) and
``messages()`` frames them as Avro with version 2 of the events subject (the
only version that has ``invite_sent``).

    >>> from onboardflow.runners.sim.populations import population
    >>> pop = population("b2b_trial", users=3, seed=1)
    >>> [u.persona for u in pop.users()]
    ['evaluator', 'evaluator', 'ghost']
    >>> next(pop.events())["event_type"]
    'signup'

Determinism: every draw comes from a ``random.Random`` seeded with the design
name, the seed and the user's index, never the global RNG or the clock. A
user's identity (devices, e-mail, consent) depends on design and index only,
so ``live_login`` can rebuild it from the user id.
"""
from __future__ import annotations

import functools
import ipaddress
import math
import random
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

from .generator import (
    DAY_MS,
    DEFAULT_START_MS,
    FEATURES,
    HOUR_MS,
    MINUTE_MS,
    SECOND_MS,
    STEP_TOTAL,
    TUTORIAL_STEPS,
    merge_journeys,
    message_key,
)

#: Later sessions start at least this long after the previous one ended.
SESSION_GAP_MS = 31 * MINUTE_MS
#: Users sign up uniformly over this leading share of the horizon.
SIGNUP_SHARE = 0.4
INVITE_CHANNELS = ("email", "link", "slack")
SUPPORT_CHANNELS = ("chat", "email", "in_app")
CONSENT_RATES = {"analytics": 0.9, "marketing": 0.4}
LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "es-MX", "pt-BR", "ja-JP", "hi-IN")


@dataclass(frozen=True)
class PersonaSpec:
    """How one persona of a design behaves (numbers are means; users vary around them).

    ``events``: bounds of in-session events after signup/login; a user's mean
    is drawn between them. ``mix``: relative weights of those events' types.
    ``day_p``: chance that a calendar day of the active window has sessions;
    ``per_day``: mean sessions on such a day. ``window_days``: later sessions
    fall this many days (drawn) after signup; None runs to the horizon.
    ``max_sessions``: cap on sessions after the signup session. ``weekdays``:
    later sessions only on these days (0 = Monday, UTC). The tutorial is
    finished with ``complete_p``, else ``partial_steps`` are done, all in
    sessions within ``tutorial_days`` of signup. ``breadth``: distinct
    features the user adopts. ``pages``: overrides the design's pages.
    """

    name: str
    share: float
    events: tuple[int, int]
    mix: Mapping[str, float]
    day_p: float
    per_day: float = 1.0
    window_days: Optional[tuple[float, float]] = None
    max_sessions: Optional[int] = None
    weekdays: Optional[frozenset[int]] = None
    complete_p: float = 0.0
    partial_steps: tuple[int, int] = (0, 0)
    tutorial_days: Optional[float] = None
    breadth: tuple[int, int] = (0, 0)
    purchase_p: float = 0.0
    logout_p: float = 0.1
    pages: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class DesignSpec:
    """A population design: its personas and the product they use.

    ``gap_s``: (median, max) seconds between events of a session.
    ``hours``: UTC hours of the day in which later sessions start.
    ``devices``: (device, os, app_version, user_agent, weight); ``{v}`` in the
    strings is filled with a version number per device.
    """

    name: str
    description: str
    days: float
    personas: tuple[PersonaSpec, ...]
    gap_s: tuple[float, float]
    hours: tuple[float, float]
    devices: tuple[tuple[str, str, str, str, float], ...]
    email_tld: str
    plans: Mapping[str, float]
    signup_methods: tuple[str, ...]
    login_methods: tuple[str, ...]
    pages: tuple[str, ...]
    elements: tuple[str, ...]
    forms: tuple[str, ...]
    support_topics: tuple[str, ...]
    #: Dirichlet concentration of a user's event mix around the persona's
    mix_concentration: float = 40.0
    purchase_plans: tuple[tuple[str, str], ...] = (("starter", "19.00"), ("pro", "49.00"), ("team", "99.00"))
    by_name: Mapping[str, PersonaSpec] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if abs(sum(p.share for p in self.personas) - 1.0) > 1e-9:
            raise ValueError(f"{self.name}: persona shares must sum to 1")
        object.__setattr__(self, "by_name", {p.name: p for p in self.personas})


@dataclass(frozen=True)
class PopulationUser:
    """One ground-truth user: who, which persona, when they signed up (epoch ms)."""

    user_id: str
    persona: str
    signup_ms: int


@dataclass
class _Identity:
    email: str
    locale: str
    consent: dict
    devices: list[dict]  # anonymous_id + context fields


@dataclass
class _Session:
    start: int
    body: int                  # in-session events after signup/login (tutorial steps included)
    steps: list[int] = field(default_factory=list)
    purchase: bool = False
    logout: bool = False
    gaps: list[int] = field(default_factory=list)


class Population:
    """``users`` users of design ``spec`` and their journeys, from ``start_ms`` for ``spec.days``.

    ``users()`` is cheap (no journeys); ``events()`` builds journeys lazily,
    a user joining when their signup comes up, so memory holds only the
    users in flight, not the event list.
    """

    def __init__(self, spec: DesignSpec, users: int = 2000, seed: int = 7, start_ms: int = DEFAULT_START_MS):
        if users < 1:
            raise ValueError("users must be at least 1")
        self.spec = spec
        self.name = spec.name
        self.description = spec.description
        self.days = spec.days
        self.start_ms = int(start_ms)
        self.end_ms = self.start_ms + int(spec.days * DAY_MS)
        self.size = users
        self.seed = seed

    def persona_shares(self) -> dict[str, float]:
        """The configured persona mix: persona name -> share (sums to 1)."""
        return {p.name: p.share for p in self.spec.personas}

    def users(self) -> list[PopulationUser]:
        """Every user, in signup order (ties by user id)."""
        return [user for _, user in sorted(self._indexed_users(), key=lambda iu: (iu[1].signup_ms, iu[0]))]

    def _indexed_users(self) -> Iterator[tuple[int, PopulationUser]]:
        names = [p.name for p in self.spec.personas]
        weights = [p.share for p in self.spec.personas]
        window = int(self.spec.days * SIGNUP_SHARE * DAY_MS)
        for index in range(self.size):
            rng = random.Random(f"{self.name}/{self.seed}/user/{index}")
            persona = rng.choices(names, weights=weights)[0]
            yield index, PopulationUser(_user_id(self.name, index), persona, self.start_ms + rng.randrange(window))

    def events(self) -> Iterator[dict]:
        """Every event of every user in ``occurred_at`` order (ties: user index, then the user's order)."""
        users = sorted(self._indexed_users(), key=lambda iu: (iu[1].signup_ms, iu[0]))
        return merge_journeys((user.signup_ms, index, functools.partial(self._journey, index, user))
                              for index, user in users)

    def messages(self, serializer: Optional[Callable[[dict], bytes]] = None) -> Iterator[tuple[Optional[bytes], bytes]]:
        """(key, value) Kafka messages in ``events()`` order: ``message_key`` and framed Avro v2."""
        serialize = serializer or v2_serializer()
        for event in self.events():
            yield message_key(event), serialize(event)

    # -- one user's journey --------------------------------------------------

    def _journey(self, index: int, user: PopulationUser) -> Iterator[dict]:
        spec, persona = self.spec, self.spec.by_name[user.persona]
        rng = random.Random(f"{self.name}/{self.seed}/journey/{index}")
        identity = _identity(spec, index)
        sessions = self._plan(persona, user.signup_ms, rng)
        mix = _dirichlet(rng, persona.mix, spec.mix_concentration)
        types, weights = list(mix), list(mix.values())
        features = rng.sample(FEATURES, rng.randint(*persona.breadth))
        invite_weights = [rng.random() + 0.2 for _ in INVITE_CHANNELS]
        primary = 0.8 if len(identity.devices) > 1 else 1.0
        for number, session in enumerate(sessions):
            device = identity.devices[0 if rng.random() < primary else 1]
            context = {k: device[k] for k in ("device", "os", "app_version", "user_agent", "ip")}
            context.update(locale=identity.locale, email=identity.email)
            if device["device"] != "desktop" and rng.random() < 0.3:
                context["ip"] = _public_ipv4(rng)  # phones move between networks
            make = _EventMaker(rng, user.user_id, device["anonymous_id"], f"sess-{rng.getrandbits(64):016x}",
                               context, identity.consent)
            times = iter(_cumulative(session.start, session.gaps))
            if number == 0:
                yield make("signup", next(times), {"plan": _pick(rng, spec.plans),
                                                   "signup_method": rng.choice(spec.signup_methods)})
            else:
                yield make("login", next(times), {"method": rng.choice(spec.login_methods)})
            step_slots = set(rng.sample(range(session.body), len(session.steps)))
            steps = iter(session.steps)
            for slot in range(session.body):
                if slot in step_slots:
                    step = next(steps)
                    yield make("tutorial_step", next(times), {
                        "step": str(step), "step_total": str(STEP_TOTAL), "step_name": TUTORIAL_STEPS[step - 1]})
                    continue
                kind, properties = self._content(rng, persona, rng.choices(types, weights=weights)[0], features,
                                                 invite_weights)
                yield make(kind, next(times), properties)
            if session.purchase:
                plan, amount = rng.choice(spec.purchase_plans)
                yield make("form_submit", next(times), {"form": "billing", "plan": plan})
                backend = dict(context, device=None, os=None, app_version="billing-svc-3.1.0", ip=None,
                               user_agent=None)
                yield make("purchase", next(times), {"plan": plan, "amount": amount, "currency": "USD"},
                           context=backend, backend=True)
            if session.logout:
                yield make("logout", next(times), {})

    def _plan(self, persona: PersonaSpec, signup_ms: int, rng: random.Random) -> list[_Session]:
        """The user's sessions: when, how long, which tutorial steps, where the purchase is."""
        spec = self.spec
        activity = rng.gammavariate(6.0, 1.0 / 6.0)
        window_end = self.end_ms
        if persona.window_days is not None:
            window_end = min(window_end, signup_ms + int(rng.uniform(*persona.window_days) * DAY_MS))
        starts = [signup_ms]
        day_p = min(0.97, persona.day_p * activity)
        for day in range(signup_ms // DAY_MS, window_end // DAY_MS + 1):
            if persona.weekdays is not None and (day + 3) % 7 not in persona.weekdays:
                continue  # 1970-01-01 was a Thursday: (day + 3) % 7 is 0 on Mondays
            if rng.random() >= day_p:
                continue
            for _ in range(1 + _poisson(rng, max(0.0, persona.per_day - 1.0) * activity)):
                t = day * DAY_MS + int(rng.uniform(*spec.hours) * HOUR_MS)
                if signup_ms + SESSION_GAP_MS < t < window_end:
                    starts.append(t)
        later = sorted(starts[1:])
        if persona.max_sessions is not None:
            later = later[: persona.max_sessions]
        lo, hi = persona.events
        mean = rng.uniform(lo, hi)
        sessions = [_Session(t, min(hi, max(lo, _poisson(rng, rng.gammavariate(4.0, mean / 4.0)))))
                    for t in [signup_ms] + later]

        # Tutorial steps, in order, in sessions within tutorial_days of signup.
        n_steps = STEP_TOTAL if rng.random() < persona.complete_p else rng.randint(*persona.partial_steps)
        horizon = persona.tutorial_days
        eligible = [i for i, s in enumerate(sessions)
                    if horizon is None or s.start - signup_ms < horizon * DAY_MS]
        homes = sorted([0] + [rng.choice(eligible) for _ in range(n_steps - 1)])[:n_steps]
        for step, home in enumerate(homes, start=1):
            sessions[home].steps.append(step)
        for session in sessions:
            session.body = max(session.body, len(session.steps))
            session.logout = rng.random() < persona.logout_p
        if rng.random() < persona.purchase_p:
            sessions[rng.randint(homes[-1] if homes else 0, len(sessions) - 1)].purchase = True

        # Lay sessions out: push each past the previous one's end, drop what leaves the horizon
        # (or, pushed, its allowed weekdays).
        laid: list[_Session] = []
        median, most = spec.gap_s
        for number, session in enumerate(sessions):
            count = 1 + session.body + 2 * session.purchase + session.logout
            session.gaps = [_gap(rng, median, most) for _ in range(count - 1)]
            if laid and session.start < laid[-1].start + sum(laid[-1].gaps) + SESSION_GAP_MS:
                session.start = laid[-1].start + sum(laid[-1].gaps) + SESSION_GAP_MS + rng.randrange(20 * MINUTE_MS)
            if number and session.start + sum(session.gaps) > self.end_ms:
                break  # (the signup session, in the first 40% of the horizon, always fits)
            if number and persona.weekdays is not None and (session.start // DAY_MS + 3) % 7 not in persona.weekdays:
                continue
            laid.append(session)
        return laid

    def _content(self, rng: random.Random, persona: PersonaSpec, kind: str, features: list[str],
                 invite_weights: list[float]) -> tuple[str, dict]:
        """(event type, properties) of one ordinary in-session event of type ``kind``."""
        spec = self.spec
        pages = persona.pages or spec.pages
        if kind == "feature_used" and features:
            return kind, {"feature": rng.choice(features)}
        if kind == "click":
            return kind, {"element": rng.choice(spec.elements), "page": rng.choice(pages)}
        if kind == "form_submit":
            return kind, {"form": rng.choice(spec.forms)}
        if kind == "support_message":
            return kind, {"topic": rng.choice(spec.support_topics), "channel": rng.choice(SUPPORT_CHANNELS)}
        if kind == "invite_sent":
            return kind, {"channel": rng.choices(INVITE_CHANNELS, weights=invite_weights)[0]}
        return "page_view", {"page": rng.choice(pages)}


class _EventMaker:
    """Builds the event dicts of one session (a fresh dict per event: consumers may mutate them)."""

    def __init__(self, rng, user_id, anonymous_id, session_id, context, consent):
        self.rng, self.user_id, self.anonymous_id = rng, user_id, anonymous_id
        self.session_id, self.context, self.consent = session_id, context, consent

    def __call__(self, event_type: str, t: int, properties: dict, context: Optional[dict] = None,
                 backend: bool = False) -> dict:
        return {
            "event_id": str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            "event_type": event_type,
            "user_id": self.user_id,
            "anonymous_id": None if backend else self.anonymous_id,
            "session_id": None if backend else self.session_id,
            "occurred_at": t,
            "received_at": t,
            "properties": dict(properties),
            "context": dict(context or self.context),
            "consent": dict(self.consent),
        }


def live_login(user: PopulationUser, at_ms: int, seed: int) -> dict:
    """One ordinary ``login`` of ``user`` at ``at_ms``, from one of the user's own devices.

    ``seed`` picks the event id, session id and device; the identity (e-mail,
    devices, consent) is the one the user's history carries.
    """
    design, index = _parse_user_id(user.user_id)
    spec = _SPECS[design]
    identity = _identity(spec, index)
    rng = random.Random(f"{design}/{seed}/live/{index}/{int(at_ms)}")
    device = rng.choice(identity.devices)
    context = {k: device[k] for k in ("device", "os", "app_version", "user_agent", "ip")}
    context.update(locale=identity.locale, email=identity.email)
    make = _EventMaker(rng, user.user_id, device["anonymous_id"], f"sess-{rng.getrandbits(64):016x}",
                       context, identity.consent)
    return make("login", int(at_ms), {"method": rng.choice(spec.login_methods)})


def v2_serializer(registry=None) -> Callable[[dict], bytes]:
    """Serialize events as framed Avro, onboarding_event v2 under the events subject of ``registry``
    (default: the shipped file registry)."""
    from ...schemas import EVENTS_SUBJECT, default_registry, load_schema
    from ...schemas.wire import AvroSerializer

    return AvroSerializer(registry or default_registry(), EVENTS_SUBJECT, load_schema("onboarding_event", 2)).serialize


# -- small helpers -------------------------------------------------------------

def _user_id(design: str, index: int) -> str:
    return f"usr-{design}-{index + 1:06d}"


def _parse_user_id(user_id: str) -> tuple[str, int]:
    prefix, _, number = user_id.rpartition("-")
    design = prefix[len("usr-"):]
    if not prefix.startswith("usr-") or design not in _SPECS or not number.isdigit():
        raise ValueError("not a population user id (usr-<design>-<number>)")
    return design, int(number) - 1


def _identity(spec: DesignSpec, index: int) -> _Identity:
    rng = random.Random(f"{spec.name}/identity/{index}")
    devices = []
    for _ in range(2 if rng.random() < 0.3 else 1):
        device, os_name, app, agent, _ = rng.choices(spec.devices, weights=[d[4] for d in spec.devices])[0]
        version = str(rng.randint(14, 131))
        devices.append({
            "anonymous_id": f"dev-{uuid.UUID(int=rng.getrandbits(128), version=4)}",
            "device": device, "os": os_name, "app_version": app.replace("{v}", version),
            "user_agent": agent.replace("{v}", version), "ip": _public_ipv4(rng),
        })
    consent = {"analytics": rng.random() < CONSENT_RATES["analytics"], "personalization": True,
               "marketing": rng.random() < CONSENT_RATES["marketing"]}
    return _Identity(f"u{index + 1}@example.{spec.email_tld}", rng.choice(LOCALES), consent, devices)


def _public_ipv4(rng: random.Random) -> str:
    while True:
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        if address.is_global and not address.is_multicast:
            return str(address)


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


def _dirichlet(rng: random.Random, mix: Mapping[str, float], concentration: float) -> dict[str, float]:
    """A user's event mix: a Dirichlet draw with mean ``mix`` (normalized)."""
    total = sum(mix.values())
    draws = {k: rng.gammavariate(concentration * w / total, 1.0) for k, w in mix.items()}
    norm = sum(draws.values()) or 1.0
    return {k: v / norm for k, v in draws.items()}


def _gap(rng: random.Random, median_s: float, max_s: float) -> int:
    return int(min(max_s, max(2.0, median_s * rng.lognormvariate(0.0, 0.6))) * SECOND_MS)


def _cumulative(start: int, gaps: list[int]) -> list[int]:
    times = [start]
    for gap in gaps:
        times.append(times[-1] + gap)
    return times


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


# -- the designs -------------------------------------------------------------

_WEEKEND = frozenset({5, 6})

_DESKTOP_WEB = (
    ("desktop", "Windows", "web-{v}.2", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
     "(KHTML, like Gecko) Chrome/{v}.0.0.0 Safari/537.36", 0.45),
    ("desktop", "macOS", "web-{v}.2", "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Version/17.4 Safari/605.1.15", 0.3),
    ("desktop", "Linux", "web-{v}.2", "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:{v}.0) Gecko/20100101 "
     "Firefox/{v}.0", 0.07),
)
_MOBILE_WEB = (
    ("mobile", "iOS", "web-{v}.2", "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
     "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1", 0.1),
    ("mobile", "Android", "web-{v}.2", "Mozilla/5.0 (Linux; Android 14; Pixel 7) AppleWebKit/537.36 "
     "(KHTML, like Gecko) Chrome/{v}.0.0.0 Mobile Safari/537.36", 0.08),
)
_MOBILE_APP = (
    ("mobile", "iOS", "ios-5.{v}", "OnboardFlow/5.{v} (iPhone15,3; iOS 17.5; Scale/3.00)", 0.48),
    ("mobile", "Android", "android-5.{v}", "OnboardFlow/5.{v} (Linux; Android 14; SM-S918B) okhttp/4.12.0", 0.4),
    ("tablet", "iPadOS", "ios-5.{v}", "OnboardFlow/5.{v} (iPad13,8; iPadOS 17.5; Scale/2.00)", 0.08),
    ("tablet", "Android", "android-5.{v}", "OnboardFlow/5.{v} (Linux; Android 13; SM-X710) okhttp/4.12.0", 0.04),
)

SAAS_TEAMS = DesignSpec(
    name="saas_teams",
    description="Team workspace product, 12 days: invites and support as behaviours of their own, "
                "a large drop-off group, daily workers who finish the tutorial.",
    days=12.0,
    personas=(
        PersonaSpec("browse_and_leave", 0.25, (2, 8), {"page_view": 0.6, "click": 0.4},
                    day_p=0.6, window_days=(1.5, 3.0), max_sessions=2, logout_p=0.05),
        PersonaSpec("team_inviter", 0.10, (5, 14),
                    {"invite_sent": 0.55, "feature_used": 0.2, "page_view": 0.1, "click": 0.1, "form_submit": 0.05},
                    day_p=0.45, per_day=1.2, complete_p=0.6, partial_steps=(1, 3), tutorial_days=4.0,
                    breadth=(2, 5), purchase_p=0.15, logout_p=0.2),
        PersonaSpec("support_heavy", 0.15, (4, 10),
                    {"support_message": 0.45, "page_view": 0.2, "feature_used": 0.15, "click": 0.1,
                     "form_submit": 0.1},
                    day_p=0.5, complete_p=0.25, partial_steps=(1, 3), tutorial_days=8.0, breadth=(1, 3),
                    purchase_p=0.05, logout_p=0.15),
        PersonaSpec("drop_off", 0.30, (2, 6), {"page_view": 0.5, "click": 0.35, "form_submit": 0.15},
                    day_p=0.7, window_days=(1.0, 2.0), max_sessions=1, partial_steps=(1, 2), tutorial_days=2.0,
                    logout_p=0.05),
        PersonaSpec("daily_worker", 0.20, (8, 20),
                    {"feature_used": 0.6, "click": 0.13, "page_view": 0.12, "form_submit": 0.1, "invite_sent": 0.03,
                     "support_message": 0.02},
                    day_p=0.9, per_day=1.1, complete_p=0.95, partial_steps=(3, 4), tutorial_days=3.0,
                    breadth=(5, 10), purchase_p=0.35, logout_p=0.35),
    ),
    gap_s=(30.0, 150.0),
    hours=(7.0, 22.0),
    devices=_DESKTOP_WEB + _MOBILE_WEB,
    email_tld="com",
    plans={"free": 0.5, "trial": 0.3, "team": 0.2},
    signup_methods=("email", "google", "slack"),
    login_methods=("password", "google", "magic_link"),
    pages=("/home", "/projects", "/boards", "/team", "/settings", "/pricing", "/help", "/templates"),
    elements=("new_project", "board_card", "invite_button", "filter_bar", "help_icon", "upgrade_banner"),
    forms=("profile", "workspace_settings", "invite_team", "integration_setup", "feedback"),
    support_topics=("setup", "permissions", "billing", "bug_report", "how_to"),
)

MOBILE_CONSUMER = DesignSpec(
    name="mobile_consumer",
    description="Consumer mobile app, 10 days: tiny frequent sessions, a binge-and-quit group, "
                "weekend-only users, quick completers and lurkers.",
    days=10.0,
    personas=(
        PersonaSpec("snacker", 0.35, (1, 3), {"feature_used": 0.4, "page_view": 0.35, "click": 0.25},
                    day_p=0.9, per_day=3.5, complete_p=0.4, partial_steps=(1, 3), tutorial_days=5.0,
                    breadth=(2, 4), purchase_p=0.05, logout_p=0.02),
        PersonaSpec("binge_then_quit", 0.15, (15, 30),
                    {"feature_used": 0.4, "page_view": 0.3, "click": 0.25, "form_submit": 0.05},
                    day_p=1.0, per_day=2.5, window_days=(1.5, 2.0), complete_p=0.5, partial_steps=(2, 4),
                    tutorial_days=2.0, breadth=(4, 8), purchase_p=0.1, logout_p=0.1),
        PersonaSpec("weekend_user", 0.20, (2, 4), {"page_view": 0.4, "feature_used": 0.35, "click": 0.25},
                    day_p=0.95, per_day=2.5, weekdays=_WEEKEND, complete_p=0.2, partial_steps=(1, 2),
                    breadth=(2, 4), purchase_p=0.08, logout_p=0.05),
        PersonaSpec("completer", 0.10, (2, 4),
                    {"feature_used": 0.5, "page_view": 0.25, "click": 0.2, "form_submit": 0.05},
                    day_p=0.6, per_day=1.3, complete_p=0.97, partial_steps=(4, 4), tutorial_days=1.5,
                    breadth=(3, 6), purchase_p=0.3, logout_p=0.05),
        PersonaSpec("lurker", 0.20, (1, 2), {"page_view": 1.0},
                    day_p=0.25, logout_p=0.0),
    ),
    gap_s=(30.0, 90.0),
    hours=(6.5, 23.0),
    devices=_MOBILE_APP,
    email_tld="net",
    plans={"free": 0.8, "trial": 0.2},
    signup_methods=("apple", "google", "phone", "email"),
    login_methods=("biometric", "password", "magic_link"),
    pages=("feed", "discover", "profile", "saved", "search", "notifications", "settings"),
    elements=("like", "share", "story_ring", "tab_bar", "search_box", "paywall_close"),
    forms=("profile", "notification_prefs", "feedback"),
    support_topics=("login_problem", "subscription", "crash", "how_to"),
)

B2B_TRIAL = DesignSpec(
    name="b2b_trial",
    description="Sales-led B2B trial, 14 days: long office-hours sessions; admins configure, evaluators "
                "read docs and pricing, champions invite and buy, ghosts vanish, power users live in it.",
    days=14.0,
    personas=(
        PersonaSpec("admin_setup", 0.20, (20, 45),
                    {"form_submit": 0.45, "page_view": 0.15, "click": 0.15, "invite_sent": 0.12, "feature_used": 0.1,
                     "support_message": 0.03},
                    day_p=0.3, complete_p=0.7, partial_steps=(2, 4), tutorial_days=5.0, breadth=(2, 5),
                    purchase_p=0.2, logout_p=0.4),
        PersonaSpec("evaluator", 0.30, (20, 40),
                    {"page_view": 0.6, "click": 0.25, "feature_used": 0.1, "support_message": 0.05},
                    day_p=0.25, complete_p=0.1, partial_steps=(0, 2), breadth=(1, 3), purchase_p=0.03,
                    logout_p=0.2,
                    pages=("/docs", "/docs/api", "/docs/security", "/docs/sso", "/pricing", "/pricing/enterprise",
                           "/compare", "/case-studies")),
        PersonaSpec("champion", 0.15, (25, 55),
                    {"feature_used": 0.45, "invite_sent": 0.25, "page_view": 0.1, "click": 0.1, "form_submit": 0.07,
                     "support_message": 0.03},
                    day_p=0.4, complete_p=0.9, partial_steps=(3, 4), tutorial_days=6.0, breadth=(6, 10),
                    purchase_p=0.85, logout_p=0.3),
        PersonaSpec("ghost", 0.25, (4, 15), {"page_view": 0.6, "click": 0.3, "form_submit": 0.1},
                    day_p=0.08, max_sessions=1, partial_steps=(0, 1), logout_p=0.05),
        PersonaSpec("power_user", 0.10, (30, 60),
                    {"feature_used": 0.65, "page_view": 0.1, "click": 0.1, "form_submit": 0.08, "invite_sent": 0.05,
                     "support_message": 0.02},
                    day_p=0.6, complete_p=0.97, partial_steps=(4, 4), tutorial_days=3.0, breadth=(9, 12),
                    purchase_p=0.5, logout_p=0.5),
    ),
    gap_s=(75.0, 180.0),
    hours=(8.0, 17.0),
    devices=_DESKTOP_WEB,
    email_tld="org",
    plans={"trial": 0.7, "team": 0.2, "free": 0.1},
    signup_methods=("email", "google", "microsoft", "okta"),
    login_methods=("sso", "password"),
    pages=("/app", "/app/workspaces", "/app/connectors", "/app/reports", "/admin", "/admin/users", "/docs",
           "/pricing"),
    elements=("add_connector", "run_report", "invite_button", "admin_menu", "export_csv", "talk_to_sales"),
    forms=("sso", "billing", "integrations", "user_provisioning", "audit_log", "data_retention",
           "security_questionnaire"),
    support_topics=("sso", "security_review", "billing", "integrations", "data_migration"),
)

_SPECS: dict[str, DesignSpec] = {s.name: s for s in (SAAS_TEAMS, MOBILE_CONSUMER, B2B_TRIAL)}


def _factory(spec: DesignSpec) -> Callable[..., Population]:
    def make(users: int = 2000, seed: int = 7, start_ms: int = DEFAULT_START_MS) -> Population:
        return Population(spec, users=users, seed=seed, start_ms=start_ms)

    make.__name__ = spec.name
    make.__doc__ = f"The {spec.name} population: {spec.description}"
    return make


#: Design name -> factory(users=2000, seed=7, start_ms=DEFAULT_START_MS) -> Population.
DESIGNS: dict[str, Callable[..., Population]] = {name: _factory(spec) for name, spec in _SPECS.items()}


def population(name: str, users: int = 2000, seed: int = 7, start_ms: int = DEFAULT_START_MS) -> Population:
    """The population of design ``name`` (a key of ``DESIGNS``); ValueError for an unknown name."""
    if name not in DESIGNS:
        raise ValueError(f"unknown population design {name!r}; known: {sorted(DESIGNS)}")
    return DESIGNS[name](users=users, seed=seed, start_ms=start_ms)


__all__ = [
    "DESIGNS",
    "DesignSpec",
    "PersonaSpec",
    "Population",
    "PopulationUser",
    "live_login",
    "population",
    "v2_serializer",
]
