"""Identity stitching: a visitor's anonymous activity resolved into the account it identifies as.

Engine-free. ``IdentityResolver`` is the keyed stage *before* the profile
stage, keyed by the event's ``anonymous_key`` (the pseudonym of its device
id, transforms/anonymize.py); events without one pass it untouched. Per
device it keeps a ``Link`` (the account the device identified as, or none
yet) and the device's anonymous events seen before the link (``pending``).

    resolver.on_event(link, pending_count, event) -> Resolution

* An anonymous event (no account id) of a device with no link goes on to the
  visitor's own profile (keyed by the anonymous key) and is *held*: the
  engine appends it to the device's pending events.
* An anonymous event of a linked device goes to the account's profile
  (``user_key`` replaced): later events that carry only the anonymous id land
  on the user.
* An identified event carrying the device id (signup, login) goes to the
  account as always. The first one *links* the device and yields a ``Stitch``
  (a row of the warehouse's ``identity_aliases``: device, account, event time,
  event id; a later one only when it is earlier than the link, or names
  another account): the engine *releases* its pending events to the account
  (``stitched_copy``: re-keyed and marked ``stitched``, so the profile stage
  folds them in whatever their lateness, transforms/profile.py), clears them,
  and retires the visitor's profile (Redis: the profile and its segment
  memberships removed and its later writes refused,
  transforms/profile_store/writer.py).

``EmailMatcher``, keyed by the e-mail pseudonym (``email_key``), runs before
the resolver: an anonymous event giving an address an account's identified
events gave links its device like a signup would (``match`` "email"), and a
device that gave it before the account appeared gets a ``LinkHint``
(``resolver.on_hint``). ``LocalIdentities`` runs both with dict state.

Why the result does not depend on arrival order: every profile state class
is an order-independent fold of a set of events (transforms/profile.py), so
the account's profile holds the same events whether the device's anonymous
events came before the link (released), after it (re-keyed) or are replayed;
a late signup only moves the link's time. The alias rows are one per (device,
account) with the earliest event time winning, and the retirement is
idempotent. The one order-dependent case is a device that identifies as two
accounts (a shared computer): the first link holds, the second is recorded as
a ``conflict`` row and counted, and events keep going to the first account.
Design notes: docs/identity.md.

State size: at most ``max_pending`` held events per device (the rest still
reach the visitor's profile, counted as ``overflow``, and are not moved on a
link); a device's state is dropped ``ttl_ms`` of event time after its newest
event (``expire_at``, at hour granularity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from ..schemas.units import DAY_MS, HOUR_MS

#: ``Stitch.match``: how the device and the account were matched: an event carrying both ids, or an
#: anonymous event of the device giving the account's e-mail address (``EmailMatcher``).
MATCH_ID, MATCH_EMAIL = "id", "email"
#: ``Stitch.status``: the link that holds, or a second account the device identified as.
LINKED, CONFLICT = "linked", "conflict"


class Link(NamedTuple):
    """The account a device identified as: its pseudonym, and the earliest identifying event seen."""

    user_key: str
    linked_at: int
    event_id: str

    def to_primitive(self) -> tuple:
        return tuple(self)

    @classmethod
    def from_primitive(cls, value) -> Optional["Link"]:
        return None if value is None else cls(*value)


class Stitch(NamedTuple):
    """One (device, account) link as the warehouse's ``identity_aliases`` keeps it; ``retire``: the
    visitor's profile is to be retired into the account (the first link of the device)."""

    anonymous_key: str
    user_key: str
    linked_at: int
    event_id: str
    match: str = MATCH_ID
    status: str = LINKED
    retire: bool = False


class Resolution(NamedTuple):
    """What to do with one event (module docstring).

    ``forward``: the event for the profile stage (its ``user_key`` is the key to
    send it to); ``link``: the device's link after the event (store it);
    ``hold``: append ``forward`` to the device's pending events; ``release``:
    send the pending events to ``link.user_key`` (``stitched_copy``) and clear
    them; ``stitch``: the alias row, if the event identified the device;
    ``overflow``: the event could not be held (``max_pending``).
    """

    forward: dict
    link: Optional[Link]
    hold: bool = False
    release: bool = False
    stitch: Optional[Stitch] = None
    overflow: bool = False


@dataclass(frozen=True)
class IdentityConfig:
    """Settings of the resolver (module docstring)."""

    ttl_ms: int = 90 * DAY_MS
    max_pending: int = 1000

    def __post_init__(self):
        for name in ("ttl_ms", "max_pending"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def anonymous_key(event: Any) -> Optional[str]:
    """The key of the resolver for ``event`` (its device pseudonym), or None: the event skips it."""
    if not isinstance(event, dict):
        return None
    key = event.get("anonymous_key")
    return key if isinstance(key, str) and key else None


def stitched_copy(event: dict, user_key: str) -> dict:
    """A held anonymous event, released to ``user_key``: folded in there whatever its lateness."""
    return {**event, "user_key": user_key, "stitched": True}


def as_received(event: dict) -> Optional[dict]:
    """The event as the resolver received it, for the warehouse's ``events`` table (which keeps each event
    under the key it arrived with; ``events_resolved`` resolves it); None for a released copy, stored when
    it first came."""
    if event.get("stitched"):
        return None
    device = event.get("anonymous_key")
    if device and not event.get("identified") and event.get("user_key") != device:
        return {**event, "user_key": device}
    return event


def released(pending, user_key: str) -> list[dict]:
    """A device's held events released to ``user_key`` (``stitched_copy``), each event id once."""
    out, seen = [], set()
    for event in pending:
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            out.append(stitched_copy(event, user_key))
    return out


class LinkHint(NamedTuple):
    """From the e-mail stage (``EmailMatcher``): ``device`` belongs to ``user_key``, because an anonymous
    event of the device (``event_id`` at ``linked_at``) gave the e-mail address the account has."""

    device: str
    user_key: str
    linked_at: int
    event_id: str


#: The field an anonymous event carries out of the e-mail stage when its address is an account's:
#: (user_key, event time, event id) of the claim (``EmailMatcher``); the resolver removes it.
EMAIL_LINK = "email_link"


class IdentityResolver:
    """The per-device decision (module docstring); holds no state of its own."""

    def __init__(self, config: IdentityConfig = IdentityConfig()):
        self.config = config

    def on_event(self, link: Optional[Link], pending_count: int, event: dict) -> Resolution:
        device = event["anonymous_key"]
        if event.get("identified"):
            claim = (event["user_key"], event["occurred_at"], event["event_id"], MATCH_ID)
        elif event.get(EMAIL_LINK):
            user_key, at, event_id = event[EMAIL_LINK]
            claim = (user_key, at, event_id, MATCH_EMAIL)
            event = {k: v for k, v in event.items() if k != EMAIL_LINK}
        else:
            if link is not None:
                return Resolution({**event, "user_key": link.user_key}, link)
            if pending_count >= self.config.max_pending:
                return Resolution(event, None, overflow=True)
            return Resolution(event, None, hold=True)
        resolution = self._claim(link, device, *claim)
        forward = event if event.get("identified") else {**event, "user_key": resolution.link.user_key}
        return resolution._replace(forward=forward)

    def on_hint(self, link: Optional[Link], hint: LinkHint) -> Resolution:
        """A link from the e-mail stage: as an identifying event, with no event to forward (``forward`` None)."""
        return self._claim(link, hint.device, hint.user_key, hint.linked_at, hint.event_id, MATCH_EMAIL)

    @staticmethod
    def _claim(link: Optional[Link], device: str, user_key: str, at: int, event_id: str, match: str) -> Resolution:
        """``device`` identified as ``user_key`` at ``at`` (``event_id``): link, confirm or conflict."""
        if link is None:
            link = Link(user_key, at, event_id)
            return Resolution(None, link, release=True,
                              stitch=Stitch(device, user_key, at, event_id, match, retire=True))
        if link.user_key != user_key:
            return Resolution(None, link, stitch=Stitch(device, user_key, at, event_id, match, status=CONFLICT))
        if (at, event_id) < (link.linked_at, link.event_id):
            # An earlier identification than the one on record: the link (and its row) moves earlier.
            link = Link(user_key, at, event_id)
            return Resolution(None, link, stitch=Stitch(device, user_key, at, event_id, match))
        return Resolution(None, link)  # the row on record is as early or earlier


def expire_at(newest_ms: int, ttl_ms: int) -> int:
    """Event time at which the identity stages forget a key whose newest event is at ``newest_ms``:
    ``ttl_ms`` after the end of that event's hour, so a key's state and timer change at most once an hour."""
    return (newest_ms // HOUR_MS + 1) * HOUR_MS + ttl_ms


def email_key(event: Any) -> Optional[str]:
    """The key of the e-mail stage for ``event`` (its e-mail pseudonym), or None: the event skips it."""
    if not isinstance(event, dict):
        return None
    key = event.get("email_key")
    return key if isinstance(key, str) and key else None


class EmailMatch(NamedTuple):
    """What the e-mail stage does with one event: the ``owner`` and ``devices`` to store, the event to
    forward (annotated with ``EMAIL_LINK`` when an anonymous device gave the account's address), and the
    ``hints`` for devices that gave it before the account appeared."""

    owner: Optional[Link]
    devices: dict
    forward: dict
    hints: tuple = ()


class EmailMatcher:
    """Deterministic matching on the e-mail pseudonym, keyed by it (docs/identity.md "E-mail matching").

    Per address it keeps the *owner* (the account of the earliest identified event that carried it) and
    the devices that gave it anonymously before any account did (``{device: (time, event id)}``, the
    earliest). An identified event makes its account the owner if there was none (then each waiting
    device gets a ``LinkHint``) or if it is earlier than the owner's (same account); an anonymous event
    of a device is annotated with the owner when there is one, else its device waits. A second account
    with the same address is left alone (the first holds; an address is an account's)."""

    def on_event(self, owner: Optional[Link], devices: dict, event: dict) -> EmailMatch:
        at, event_id = event["occurred_at"], event["event_id"]
        if event.get("identified"):
            user_key = event["user_key"]
            if owner is None:
                hints = tuple(LinkHint(d, user_key, t, e) for d, (t, e) in sorted(devices.items()))
                return EmailMatch(Link(user_key, at, event_id), {}, event, hints)
            if owner.user_key == user_key and (at, event_id) < (owner.linked_at, owner.event_id):
                owner = Link(user_key, at, event_id)
            return EmailMatch(owner, devices, event)
        device = anonymous_key(event)
        if device is None:
            return EmailMatch(owner, devices, event)
        if owner is not None:
            return EmailMatch(owner, devices, {**event, EMAIL_LINK: (owner.user_key, at, event_id)})
        seen = devices.get(device)
        if seen is None or (at, event_id) < tuple(seen):
            devices = {**devices, device: (at, event_id)}
        return EmailMatch(None, devices, event)


class LocalIdentities:
    """The e-mail stage and the resolver with their state in dicts, for in-process drivers (the identity
    evaluation, the plain benchmark loop, tests): ``resolve(event)`` -> the events for the profile stage
    (the event itself or resolved, and any released ones) and the alias rows it made. No expiry: a
    driver's run is bounded."""

    def __init__(self, config: IdentityConfig = IdentityConfig()):
        self.resolver = IdentityResolver(config)
        self.matcher = EmailMatcher()
        self.links: dict[str, Optional[Link]] = {}
        self.held: dict[str, list] = {}
        self.owners: dict[str, tuple] = {}

    def resolve(self, event: dict) -> tuple[list[dict], list[Stitch]]:
        out: list[dict] = []
        stitches: list[Stitch] = []
        address = email_key(event)
        if address is not None:
            owner, devices = self.owners.get(address, (None, {}))
            m = self.matcher.on_event(owner, devices, event)
            self.owners[address] = (m.owner, m.devices)
            event = m.forward
            for hint in m.hints:
                self._carry_out(hint.device, self.resolver.on_hint(self.links.get(hint.device), hint), out, stitches)
        device = anonymous_key(event)
        if device is None:
            return [event] + out, stitches
        r = self.resolver.on_event(self.links.get(device), len(self.held.get(device, ())), event)
        return [r.forward] + self._carry_out(device, r, out, stitches), stitches

    def _carry_out(self, device: str, r: Resolution, out: list, stitches: list) -> list:
        held = self.held.setdefault(device, [])
        self.links[device] = r.link
        if r.hold:
            held.append(r.forward)
        if r.release:
            out += released(held, r.link.user_key)
            held.clear()
        if r.stitch is not None:
            stitches.append(r.stitch)
        return out
