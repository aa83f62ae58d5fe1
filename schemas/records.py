"""The records the stages pass each other, defined once: Event, ProfileUpdate, SegmentChange, DriftEvent.

Plain typed shapes, no behaviour and no engine. Where a record goes on the
wire it has an Avro schema beside this module, and tests/unit/test_records.py
holds each Python definition's fields and types equal to its ``.avsc``:

* ``Event`` (with ``EventContext`` and ``Consent``): a decoded onboarding
  event, ``schemas/onboarding_event.v2.avsc`` (the pipeline's reader schema;
  ``transforms/decode.py`` makes it, ``transforms/anonymize.py`` is the only
  stage that reads it, since it carries raw PII);
* ``SegmentChange``: a user entered or left a segment,
  ``schemas/segment_change.avsc`` (``RuleSet.diff`` makes it);
* ``DriftEvent``: an online model's drift detector fired,
  ``schemas/drift_event.avsc`` (``models/drift.py`` makes it);
* ``ProfileUpdate``: a profile as it is now and as it was last emitted, from the
  profile stage to enrichment and the rule stage (in-pipeline only, no schema).
  Its profiles' fields are the profile contract, ``schemas/contract.py``.

Times are epoch milliseconds, UTC (schemas/units.py).
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Optional, TypedDict

#: ``Event.event_type``: the reader schema's ``EventType`` symbols, in order.
EventType = Literal[
    "signup", "login", "page_view", "click", "form_submit", "tutorial_step",
    "feature_used", "support_message", "purchase", "logout",
    "invite_sent", "unknown",
]


class EventContext(TypedDict):
    """Where an event came from; ``ip``, ``user_agent`` and ``email`` are PII."""

    device: Optional[str]
    os: Optional[str]
    app_version: Optional[str]
    locale: Optional[str]
    ip: Optional[str]
    user_agent: Optional[str]
    email: Optional[str]


class Consent(TypedDict):
    """The user's consent at the time of the event."""

    analytics: bool
    personalization: bool
    marketing: bool


class Event(TypedDict):
    """One decoded onboarding event (reader schema v2); carries raw PII."""

    event_id: str
    event_type: EventType
    user_id: Optional[str]
    anonymous_id: Optional[str]
    session_id: Optional[str]
    occurred_at: int
    received_at: int
    properties: dict[str, str]
    context: EventContext
    consent: Consent
    referrer: Optional[str]


class ProfileUpdate(NamedTuple):
    """A profile as it is now, and as it was when last emitted (None at first)."""

    previous: Optional[dict]
    current: dict


class SegmentChange(TypedDict):
    """One entry into or exit from a segment."""

    user_key: str
    segment: str
    change: Literal["entered", "exited"]
    #: event time of the evaluation
    at: int
    #: a short code: rule:<name>, retired:<name>, segment:<name>, or a caller's; never PII
    reason: str
    #: event-time version of the profile that caused the change
    version: int


class DriftEvent(TypedDict):
    """A drift detector of an online model fired; aggregates only, never per-user data."""

    drift_id: str
    model_name: str
    model_version: str
    detector: str
    metric: str
    value: float
    threshold: Optional[float]
    window_events: int
    action: str
    detected_at: int
    version: int
