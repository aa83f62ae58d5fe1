"""Beam shell of identity stitching: ``StitchIdentities`` and ``WriteIdentityLinks``.

The logic is ``EmailMatcher`` and ``IdentityResolver`` (transforms/identity.py);
this module keys anonymized events first by their e-mail pseudonym
(``email_key``: the e-mail stage, which annotates events and makes
``LinkHint``s), then by their device pseudonym (``anonymous_key``; an event
without one by its ``user_key``, and passed through untouched), keeps each
address's owner and each device's link in ``ReadModifyWriteState`` cells and
a device's held anonymous events in a ``BagState``, and forgets them at an
event-time timer ``IdentityConfig.ttl_ms`` after the newest event. Counters
(namespace ``onboardflow``): ``identity_links``, ``identity_conflicts``,
``identity_email_hints``, ``identity_email_state_expired``,
``identity_events_released``, ``identity_events_rekeyed``,
``identity_pending_overflow``, ``identity_state_expired``. Released events
are emitted at the identifying event's timestamp (Beam refuses an output
older than its input); the profile stage reads event time from the event.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from ...transforms.identity import (
    CONFLICT,
    EmailMatcher,
    IdentityConfig,
    IdentityResolver,
    Link,
    LinkHint,
    anonymous_key,
    email_key,
    expire_at,
    released,
)
from ...transforms.metrics import PipelineMetrics
from ...transforms.profile import unusable
from ...transforms.profile_store.identity import VisitorRetireSink
from ...transforms.warehouse import rows
from .sinks import DEAD_LETTER, WriteToSink
from .warehouse import _WriteToWarehouse

#: Output tag of ``StitchIdentities``: the ``Stitch`` rows.
STITCHES = "stitches"


def _own_key(event) -> str:
    return (event.get("user_key") if isinstance(event, dict) else None) or ""


def _key_by_email(event):
    address = email_key(event)
    return (address, event) if address is not None else (_own_key(event), event)


def _key_by_device(element):
    if isinstance(element, LinkHint):
        return element.device, element
    device = anonymous_key(element)
    return (device, element) if device is not None else (_own_key(element), element)


def _counter(name: str):
    return Metrics.counter("onboardflow", name)


def _expiry(timer, ttl_ms: int, expires: Optional[int], t: int) -> int:
    """The key's expiry after an event at ``t`` (``transforms.identity.expire_at``), the timer moved when
    it moves: at most once an hour of event time per key."""
    at = expire_at(t, ttl_ms)
    if expires is None or at > expires:
        timer.set(Timestamp(micros=at * 1000))
        return at
    return expires


class _MatchEmailsFn(beam.DoFn):
    """(e-mail pseudonym or own key, event) in; events (annotated when a device gave an account's address)
    and ``LinkHint``s out. The address's cell: ``(owner, devices, expiry)``, written when it changes."""

    ADDRESS = ReadModifyWriteStateSpec("address", FastPrimitivesCoder())
    EXPIRE = TimerSpec("expire", TimeDomain.WATERMARK)

    def __init__(self, config: IdentityConfig):
        self._config = config

    def setup(self):
        self._matcher = EmailMatcher()
        self._hints, self._expired = _counter("identity_email_hints"), _counter("identity_email_state_expired")

    def process(self, element, cell=beam.DoFn.StateParam(ADDRESS), expire=beam.DoFn.TimerParam(EXPIRE)):
        key, event = element
        if email_key(event) != key or unusable(event) is not None:
            yield event
            return
        stored = cell.read() or (None, {}, None)
        owner, devices, expires = stored
        m = self._matcher.on_event(Link.from_primitive(owner), devices, event)
        expires = _expiry(expire, self._config.ttl_ms, expires, event["occurred_at"])
        updated = (None if m.owner is None else m.owner.to_primitive(), m.devices, expires)
        if updated != stored:
            cell.write(updated)
        yield m.forward
        for hint in m.hints:
            self._hints.inc()
            yield hint

    @on_timer(EXPIRE)
    def on_expire(self, cell=beam.DoFn.StateParam(ADDRESS)):
        self._expired.inc()
        cell.clear()


class _ResolveFn(beam.DoFn):
    """(device or user key, event or ``LinkHint``) in; events for the profile stage out, ``Stitch`` rows
    tagged.

    The device's cell holds ``(link, expiry, events held)``, written when it
    changes; the bag of held events is only read when the device links (a
    state access per element is what costs on a portable runner)."""

    # The names are the state's identity in a running job: keep them.
    DEVICE = ReadModifyWriteStateSpec("device", FastPrimitivesCoder())
    PENDING = BagStateSpec("pending", FastPrimitivesCoder())
    EXPIRE = TimerSpec("expire", TimeDomain.WATERMARK)

    def __init__(self, config: IdentityConfig):
        self._config = config

    def setup(self):
        self._resolver = IdentityResolver(self._config)
        self._links, self._conflicts = _counter("identity_links"), _counter("identity_conflicts")
        self._released, self._rekeyed = _counter("identity_events_released"), _counter("identity_events_rekeyed")
        self._overflow, self._expired = _counter("identity_pending_overflow"), _counter("identity_state_expired")

    def process(self, element, cell=beam.DoFn.StateParam(DEVICE), pending=beam.DoFn.StateParam(PENDING),
                expire=beam.DoFn.TimerParam(EXPIRE)):
        key, event = element
        hint = isinstance(event, LinkHint)
        if not hint and (anonymous_key(event) != key or unusable(event) is not None):
            yield event
            return
        stored = cell.read() or (None, None, 0)
        link_primitive, expires, held = stored
        link = Link.from_primitive(link_primitive)
        if hint:
            r, t = self._resolver.on_hint(link, event), event.linked_at
        else:
            r, t = self._resolver.on_event(link, held, event), event["occurred_at"]
            if link is not None and not event.get("identified"):
                self._rekeyed.inc()
        if r.hold:
            pending.add(r.forward)
            held += 1
        if r.overflow:
            self._overflow.inc()
        if r.forward is not None:
            yield r.forward
        if r.release:
            self._links.inc()
            for copy in released(pending.read(), r.link.user_key):
                self._released.inc()
                yield copy
            pending.clear()
            held = 0
        if r.stitch is not None:
            if r.stitch.status == CONFLICT:
                self._conflicts.inc()
            yield beam.pvalue.TaggedOutput(STITCHES, r.stitch)
        expires = _expiry(expire, self._config.ttl_ms, expires, t)
        updated = (None if r.link is None else r.link.to_primitive(), expires, held)
        if updated != stored:
            cell.write(updated)

    @on_timer(EXPIRE)
    def on_expire(self, cell=beam.DoFn.StateParam(DEVICE), pending=beam.DoFn.StateParam(PENDING)):
        self._expired.inc()
        cell.clear()
        pending.clear()


class StitchOutputs(NamedTuple):
    """``events``: for the profile stage (re-keyed and released ones included); ``stitches``: alias rows."""

    events: Any
    stitches: Any


class StitchIdentities(beam.PTransform):
    """Anonymized events in; the same events resolved to the account they belong to out (transforms/identity.py).

    An anonymous event of a device that identified as an account comes out
    with the account's ``user_key``; a device's first identification releases
    its earlier anonymous events to the account (marked ``stitched``). Events
    without a device id, and events the profile stage will dead-letter, pass
    through unchanged. ``stitches``: one ``Stitch`` per identifying event that
    carries a device id (``WriteIdentityLinks``).
    """

    def __init__(self, config: IdentityConfig = IdentityConfig()):
        super().__init__()
        self._config = config

    def expand(self, events):
        resolved = (events
                    | "KeyByEmail" >> beam.Map(_key_by_email)
                    | "MatchEmails" >> beam.ParDo(_MatchEmailsFn(self._config))
                    | "KeyByDevice" >> beam.Map(_key_by_device)
                    | "Resolve" >> beam.ParDo(_ResolveFn(self._config)).with_outputs(STITCHES, main="events"))
        return StitchOutputs(resolved.events, resolved[STITCHES])


class WriteIdentityAliases(_WriteToWarehouse):
    """``Stitch`` rows -> ``identity_aliases`` (key: device, account; the earliest link wins)."""

    SPEC = rows.IDENTITY_ALIASES


class WriteIdentityLinks(beam.PTransform):
    """``Stitch`` rows in: the alias table, and each linked visitor's profile retired in Redis.

    Out: the dead letters of both sinks. Both writes are idempotent, so a
    replayed bundle changes nothing.
    """

    def __init__(self, redis_url: str, key_prefix: str, profile_ttl_s: float, dsn: str, schema: str,
                 metrics: Optional[PipelineMetrics] = None):
        super().__init__()
        self._retire = (redis_url, key_prefix, profile_ttl_s)
        self._warehouse = (dsn, schema)
        self._metrics = metrics

    def expand(self, stitches):
        redis_url, key_prefix, ttl_s = self._retire
        retired = (stitches
                   | "Retirements" >> beam.Filter(lambda s: s.retire)
                   | "RetireVisitors" >> WriteToSink(
                       functools.partial(VisitorRetireSink, redis_url, key_prefix, ttl_s),
                       step="RetireVisitorProfiles"))
        aliases = stitches | "WriteAliases" >> WriteIdentityAliases(*self._warehouse, metrics=self._metrics)
        return retired[DEAD_LETTER], aliases
