"""``IdentityStage``: identity stitching in the Flink job, keyed by the device pseudonym.

In (keyed by ``anonymous_key``, or by the element's key when it has none):
the decoder's ``(kind, key, payload)`` elements. Out, for ``UserStage``
(keyed by the new key): an event of a device that identified as an account
with the account's key; on a device's first identification its held
anonymous events, released to the account (``RELEASED``: folded into the
profile, not written to the warehouse again); ``(STITCH, device, Stitch)``
for each identifying event (the alias row, and the visitor's retirement in
Redis when it links). Everything else passes through. The logic is
``IdentityResolver`` (transforms/identity.py), as in the Beam shell
(pipelines/beam/identity.py); the link, the newest event time and the held
events are Flink keyed state, dropped at an event-time timer
``IdentityConfig.ttl_ms`` after the device's newest event.
"""
from __future__ import annotations

from pyflink.common.typeinfo import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from ...transforms.identity import CONFLICT, IdentityResolver, Link, anonymous_key, released
from ...transforms.profile import unusable
from ..configuration import identity_config
from .metrics import Counters
from .settings import JobSettings
from .users import EVENT, RELEASED, STITCH

STAGE_COUNTERS = ("identity_links", "identity_conflicts", "identity_events_released", "identity_events_rekeyed",
                  "identity_pending_overflow", "identity_state_expired")


def device_key(element) -> str:
    """The stage's key of an element: the event's device pseudonym, else the element's own key."""
    kind, key, payload = element
    if kind == EVENT:
        device = anonymous_key(payload)
        if device is not None:
            return device
    return key


class IdentityStage(KeyedProcessFunction):
    """See the module docstring."""

    def __init__(self, settings: JobSettings):
        self._settings = settings

    def open(self, runtime_context: RuntimeContext):
        self._resolver = IdentityResolver(identity_config(self._settings))
        # (link, newest event time, events held): the held events are read only when the device links.
        self._device = runtime_context.get_state(ValueStateDescriptor("device", Types.PICKLED_BYTE_ARRAY()))
        self._pending = runtime_context.get_list_state(ListStateDescriptor("pending", Types.PICKLED_BYTE_ARRAY()))
        self._count = Counters(runtime_context)
        self._count.register(*STAGE_COUNTERS)

    def close(self):
        if getattr(self, "_count", None) is not None:
            self._count.push()

    def process_element(self, value, ctx: KeyedProcessFunction.Context):
        kind, key, event = value
        if kind != EVENT or anonymous_key(event) is None or unusable(event) is not None:
            yield value
            return
        stored = self._device.value()
        link_primitive, newest, held = stored if stored is not None else (None, None, 0)
        link = Link.from_primitive(link_primitive)
        r = self._resolver.on_event(link, held, event)
        if r.hold:
            self._pending.add(r.forward)
            held += 1
        if r.overflow:
            self._count("identity_pending_overflow", 1)
        if link is not None and not event.get("identified"):
            self._count("identity_events_rekeyed", 1)
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
        t = event["occurred_at"]
        if newest is None or t > newest:
            timers = ctx.timer_service()
            if newest is not None:
                timers.delete_event_time_timer(self._resolver.expire_at(newest))
            newest = t
            timers.register_event_time_timer(self._resolver.expire_at(t))
        self._device.update((None if r.link is None else r.link.to_primitive(), newest, held))

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
        stored = self._device.value()
        if stored is not None and self._resolver.expire_at(stored[1]) <= timestamp:
            self._count("identity_state_expired", 1)
            self._device.clear()
            self._pending.clear()
        yield from ()
