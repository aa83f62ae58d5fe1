"""The in-pipeline dead-letter record, shared by every stage after decoding.

Records that fail at the Kafka source keep their raw bytes and Kafka position
(``OnboardingEventDecoder.dead_letter``, schemas/dead_letter.avsc). Records
that fail later (anonymization, the profile stage, rules, the sinks) have no
Kafka position any more; they become this dict, which
``WriteDeadLetterMetadata`` stores as metadata (never the payload itself)::

    {"stage", "reason", "detail", "event_id" or "user_key", "payload"}

``detail`` names fields only, never values. ``payload`` is the element as the
stage received it: raw event before anonymization (so the dead-letter store
needs the same protection as the input topic), pseudonymous afterwards.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Optional

_HEX_KEY = re.compile(r"^[0-9a-f]{64}$")


def pipeline_dead_letter(stage: str, reason: str, detail: str, payload: Any, *, key_field: str = "event_id") -> dict:
    """A dead letter for ``payload``; its id field is copied when it is usable.

    ``key_field`` is ``"event_id"`` (events) or ``"user_key"`` (profiles; only a
    64-hex pseudonym is copied, so a raw id never lands in the metadata table).
    """
    value: Optional[str] = payload.get(key_field) if isinstance(payload, Mapping) else None
    if not isinstance(value, str) or (key_field == "user_key" and not _HEX_KEY.match(value)):
        value = None
    return {"stage": stage, "reason": reason, "detail": detail, key_field: value, "payload": payload}
