"""``EmailStage`` and ``IdentityStage``: identity stitching in the Flink job.

``EmailStage`` (keyed by the e-mail pseudonym) matches devices and accounts
that gave the same address (``EmailMatcher``) and sends ``(HINT, device,
LinkHint)`` on. ``IdentityStage``, in (keyed by ``anonymous_key``, or by the
element's key when it has none): the decoder's ``(kind, key, payload)``
elements and the hints. Out, for ``UserStage``
(keyed by the new key): an event of a device that identified as an account
with the account's key; on a device's first identification its held
anonymous events, released to the account (``RELEASED``: folded into the
profile, not written to the warehouse again); ``(STITCH, device, Stitch)``
for each identifying event (the alias row, and the visitor's retirement in
Redis when it links). Everything else passes through. The logic is
``IdentityResolver`` (transforms/identity.py), as in the Beam shell
(pipelines/beam/identity.py); the link, the expiry and the held
events are Flink keyed state, dropped at an event-time timer
``IdentityConfig.ttl_ms`` after the device's newest event.
"""
from __future__ import annotations

from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from ...transforms.identity import (
    CONFLICT,
    EmailMatcher,
    IdentityResolver,
    Link,
    anonymous_key,
    email_key,
    expire_at,
    released,
)
from ...transforms.profile import unusable
from ..configuration import identity_config
from .metrics import Counters
from .settings import JobSettings
from .state_cache import DEFAULT_SIZE, StateCache
from .users import EVENT, RELEASED, STITCH

STAGE_COUNTERS = ("identity_links", "identity_conflicts", "identity_events_released", "identity_events_rekeyed",
                  "identity_pending_overflow", "identity_state_expired")
EMAIL_COUNTERS = ("identity_email_hints", "identity_email_state_expired")
#: Element kind from the e-mail stage to the identity stage: ``(HINT, device, LinkHint)``.
HINT = "l"


def email_stage_key(element) -> str:
    """The e-mail stage's key of an element: the event's e-mail pseudonym, else the element's own key."""
    kind, key, payload = element
    if kind == EVENT:
        address = email_key(payload)
        if address is not None:
            return address
    return key


def device_key(element) -> str:
    """The identity stage's key of an element: the event's device pseudonym, else the element's own key."""
    kind, key, payload = element
    if kind == EVENT:
        device = anonymous_key(payload)
        if device is not None:
            return device
    return key


def _expiry(timers, ttl_ms: int, expires, t: int):
    """The key's expiry after an event at ``t`` (``transforms.identity.expire_at``); its timer moved when
    it moves: at most once an hour of event time per key."""
    at = expire_at(t, ttl_ms)
    if expires is not None and at <= expires:
        return expires
    if expires is not None:
        timers.delete_event_time_timer(expires)
    timers.register_event_time_timer(at)
    return at


class EmailStage(KeyedProcessFunction):
    """The e-mail stage (``EmailMatcher``), keyed by ``email_stage_key``: events out, annotated when an
    anonymous device gave an account's address, and ``(HINT, device, LinkHint)`` for devices that gave
    it before the account appeared. State: ``(owner, devices, expiry)`` per address, written when it
    changes."""

    def __init__(self, settings: JobSettings):
        self._settings = settings

    def open(self, runtime_context: RuntimeContext):
        self._matcher = EmailMatcher()
        self._ttl_ms = identity_config(self._settings).ttl_ms
        self._address = runtime_context.get_state(ValueStateDescriptor("address", Types.PICKLED_BYTE_ARRAY()))
        self._cache = StateCache(self._settings.get("state_cache_size") or DEFAULT_SIZE)
        self._count = Counters(runtime_context)
        self._count.register(*EMAIL_COUNTERS)

    def close(self):
        if getattr(self, "_count", None) is not None:
            self._count.push()

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        kind, key, event = value
        if kind != EVENT or unusable(event) is not None or email_key(event) is None:
            yield value
            return
        address = email_stage_key(value)  # the current key, without a call into the JVM
        stored = self._cache.read(address, self._address.value) or (None, {}, None)
        owner, devices, expires = stored
        m = self._matcher.on_event(Link.from_primitive(owner), devices, event)
        expires = _expiry(ctx.timer_service(), self._ttl_ms, expires, event["occurred_at"])
        updated = (None if m.owner is None else m.owner.to_primitive(), m.devices, expires)
        if updated != stored:
            self._address.update(updated)
            self._cache.put(address, updated)
        yield EVENT, key, m.forward
        for hint in m.hints:
            self._count("identity_email_hints", 1)
            yield HINT, hint.device, hint

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        address = ctx.get_current_key()
        stored = self._cache.read(address, self._address.value)
        if stored is not None and stored[2] <= timestamp:
            self._count("identity_email_state_expired", 1)
            self._address.clear()
            self._cache.put(address, None)
        yield from ()


class IdentityStage(KeyedProcessFunction):
    """See the module docstring."""

    def __init__(self, settings: JobSettings):
        self._settings = settings

    def open(self, runtime_context: RuntimeContext):
        self._resolver = IdentityResolver(identity_config(self._settings))
        # (link, expiry, events held), written when it changes; the held events are read only when the
        # device links.
        self._device = runtime_context.get_state(ValueStateDescriptor("device", Types.PICKLED_BYTE_ARRAY()))
        self._pending = runtime_context.get_list_state(ListStateDescriptor("pending", Types.PICKLED_BYTE_ARRAY()))
        self._cache = StateCache(self._settings.get("state_cache_size") or DEFAULT_SIZE)
        self._count = Counters(runtime_context)
        self._count.register(*STAGE_COUNTERS)

    def close(self):
        if getattr(self, "_count", None) is not None:
            self._count.push()

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        kind, key, event = value
        if kind != HINT and (kind != EVENT or anonymous_key(event) is None or unusable(event) is not None):
            yield value
            return
        device = device_key(value)  # the current key, without a call into the JVM
        stored = self._cache.read(device, self._device.value) or (None, None, 0)
        link_primitive, expires, held = stored
        if kind == HINT:
            r, t = self._resolver.on_hint(Link.from_primitive(link_primitive), event), event.linked_at
        else:
            link = Link.from_primitive(link_primitive)
            r, t = self._resolver.on_event(link, held, event), event["occurred_at"]
            if link is not None and not event.get("identified"):
                self._count("identity_events_rekeyed", 1)
        if r.hold:
            self._pending.add(r.forward)
            held += 1
        if r.overflow:
            self._count("identity_pending_overflow", 1)
        if r.forward is not None:
            yield EVENT, r.forward["user_key"], r.forward
        if r.release:
            self._count("identity_links", 1)
            copies = released(self._pending.get(), r.link.user_key)
            self._count("identity_events_released", len(copies))
            for copy in copies:
                yield RELEASED, copy["user_key"], copy
            self._pending.clear()
            held = 0
        if r.stitch is not None:
            if r.stitch.status == CONFLICT:
                self._count("identity_conflicts", 1)
            yield STITCH, r.stitch.anonymous_key, r.stitch
        expires = _expiry(ctx.timer_service(), self._resolver.config.ttl_ms, expires, t)
        updated = (None if r.link is None else r.link.to_primitive(), expires, held)
        if updated != stored:
            self._device.update(updated)
            self._cache.put(device, updated)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        device = ctx.get_current_key()
        stored = self._cache.read(device, self._device.value)
        if stored is not None and stored[1] <= timestamp:
            self._count("identity_state_expired", 1)
            self._device.clear()
            self._pending.clear()
            self._cache.put(device, None)
        yield from ()
