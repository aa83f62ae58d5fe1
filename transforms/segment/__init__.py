"""Rule segments: a small, safe condition language over profile features.

Segments are declared in YAML (``pipelines/segment_rules.yaml``) and compiled
once, at load time, into plain Python closures: nothing is ever ``eval``-ed and
no YAML is touched per event. Loading validates every rule and fails with a
message that names the file, the segment and the path inside its condition
(unknown field, unknown operator, wrong value type, ...), so a bad rules file
stops a deployment instead of silently segmenting nobody.

File format::

    version: "2025-01-15.1"         # recorded in every SegmentChange
    segments:
      - name: dormant               # [a-z][a-z0-9_]*, unique
        description: "No activity for more than 30 days"   # no PII: it is the change reason
        enabled: true               # optional, default true
        when: <condition>
    retired: [old_segment]          # optional: removed from profiles on next evaluation

Conditions (``field`` must be a profile field rules may name: the contract's
``rule_field_kinds()``, schemas/contract.py; ``RuleSet.load(extra_fields=...)`` adds more):

* boolean: ``{all: [c, ...]}``, ``{any: [c, ...]}``, ``{not: c}``
* comparison: ``{field: f, <op>: value}`` with op one of gt, gte, lt, lte,
  eq, ne, in (a list) or between (``[low, high]``, inclusive). Ordering
  operators need a numeric or timestamp field; string and boolean fields take
  eq, ne and in.
* time, relative to the evaluation time ``at``:
  ``{within_days: {field: signup_at, days: 7}}`` is ``at - signup_at <= 7 days``
  (inclusive, and true for timestamps after ``at``);
  ``{older_than_days: {field: last_event_at, days: 30}}`` is
  ``at - last_event_at > 30 days`` (strict).
* events: ``{event_seen: tutorial_completed}`` (an event type or a milestone
  seen at least once); ``{event_count: {event: feature_used, <op>: value}}``;
  ``{feature_count: {feature: export, <op>: value}}`` (per-feature usage count).
  Counts of things never seen are 0.

A comparison or time condition on a field the profile does not have (None or
absent) is false; ``not`` turns that into true, so write ``not`` with care.

Rules are evaluated on profile updates, so a time condition can only flip
when the profile stage emits one. ``RuleSet.time_marks`` tells that stage
when: every ``within_days`` / ``older_than_days`` condition, and every
ordering comparison on a field that grows with time alone (``recency_ms``,
``days_since_signup``), becomes a *mark* ``(timestamp field, offset ms)``:
the condition can flip at ``profile[field] + offset``. ``BuildUserProfiles``
sets its lifecycle timer for the next mark, so a user who signs up and goes
silent enters ``onboarding_stalled`` three days later, to the millisecond,
without a new event. Rolling-window counts (``sessions_7d``, ``events_30d``,
...) fall as days pass too, but not at instants a mark can name: the 7-day
ones are brought up to date by the profile stage's daily refresh during the
first week of silence (``--profile_refresh_hours``,
``--profile_refresh_window_days``), after which they are 0; a rule on a
30-day count sees it fall at the next mark, refresh (weekly after the first
week, ``--profile_slow_refresh_days``) or dormancy.

``RuleSet.evaluate(profile, at_ms)`` gives the set of matching segments;
``RuleSet.diff`` turns old and new segment sets into ``SegmentChange`` dicts
(``schemas/segment_change.avsc``: reason ``rule:<name>``, version = the
profile's event-time version); the profile store's outbox is its one caller
in the pipeline, on the segments each applied write replaced.
``segment_profile`` is the rule stage on one profile update. Engine-free: the
rules file is compiled once, on the driver (``pipelines/onboarding.py``), and
the compiled ``RuleSet`` (it pickles as its text) goes to every stage that
needs it; ``pipelines/beam/segments.py`` runs the rule stage in Beam.
"""

from .language import DEFAULT_RULES_PATH, KNOWN_EVENTS, TIME_RELATIVE_FIELDS, Predicate, RuleError, TimeMark
from .ruleset import RuleSet, SegmentRule
from .stage import ProfileRejected, segment_profile

__all__ = [
    "DEFAULT_RULES_PATH", "KNOWN_EVENTS", "Predicate", "ProfileRejected", "RuleError", "RuleSet", "SegmentRule",
    "TIME_RELATIVE_FIELDS", "TimeMark", "segment_profile",
]
