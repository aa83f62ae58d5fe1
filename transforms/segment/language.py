"""The rule language's vocabulary: operators, kinds, time marks, the events rules may name.

The language itself is described in transforms/segment/__init__.py.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args

from ...schemas.records import EventType
from ...schemas.units import DAY_MS
from ..score import TUTORIAL_COMPLETED

DEFAULT_RULES_PATH = Path(__file__).resolve().parents[2] / "pipelines" / "segment_rules.yaml"

#: Event names for event_seen / event_count: the reader schema's event types
#: (``EventType``, schemas/records.py) but ``unknown``, which carries no signal,
#: and the milestone EngagementState derives.
KNOWN_EVENTS: frozenset[str] = frozenset(get_args(EventType)) - {"unknown"} | {TUTORIAL_COMPLETED}

_COMPARISON_OPS = ("gt", "gte", "lt", "lte", "eq", "ne", "in", "between")
_ORDERING_OPS = frozenset({"gt", "gte", "lt", "lte", "between"})
_BOOLEAN_OPS = ("all", "any", "not")
_TIME_OPS = ("within_days", "older_than_days")
_EVENT_OPS = ("event_seen", "event_count", "feature_count")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

#: Fields that change with the evaluation time alone, as (the timestamp they
#: are measured from, milliseconds per unit): ``recency_ms`` is ``at -
#: last_event_at``, ``days_since_signup`` is ``(at - signup_at) / 1 day``.
#: Ordering comparisons on them yield time marks (``RuleSet.time_marks``).
TIME_RELATIVE_FIELDS: dict[str, tuple[str, int]] = {
    "recency_ms": ("last_event_at", 1),
    "days_since_signup": ("signup_at", DAY_MS),
}

#: A time mark: the condition can flip at ``profile[field] + offset_ms``.
TimeMark = tuple[str, int]

Predicate = Callable[[Mapping[str, Any], int], bool]


class RuleError(ValueError):
    """A rules file or rule that cannot be loaded; the message says where and why."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
