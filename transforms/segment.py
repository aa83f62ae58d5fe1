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
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union, get_args

import yaml

from ..schemas.contract import BOOL, NUMBER, STRING, TIMESTAMP, rule_field_kinds
from ..schemas.records import EventType, ProfileUpdate, SegmentChange
from ..schemas.units import DAY_MS
from .score import TUTORIAL_COMPLETED

DEFAULT_RULES_PATH = Path(__file__).resolve().parent.parent / "pipelines" / "segment_rules.yaml"

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


# --------------------------------------------------------------------------- compiler


def _marks_at(field: str, offset_ms: float) -> set[TimeMark]:
    """The integer instants around ``field + offset_ms`` at which a threshold on it can flip.

    A strict and a non-strict comparison flip one millisecond apart (``> x``
    becomes true at ``x + 1`` for integer times, ``>= x`` at ``x``), and a
    fractional threshold between two milliseconds flips at the next one.
    """
    low = math.ceil(offset_ms)
    return {(field, m) for m in (low, math.floor(offset_ms) + 1) if m > 0}


class _Compiler:
    def __init__(self, fields: Mapping[str, str], events: frozenset[str], where: str) -> None:
        self._fields = fields
        self._events = events
        self._where = where
        #: Time marks of the conditions compiled so far (module docstring).
        self.marks: set[TimeMark] = set()

    def fail(self, path: str, message: str) -> RuleError:
        return RuleError(f"{self._where}: {path}: {message}")

    def compile(self, node: Any, path: str) -> Predicate:
        if not isinstance(node, Mapping) or not node:
            raise self.fail(path, f"a condition must be a non-empty mapping, got {type(node).__name__}")
        keys = set(node)
        if "field" in keys:
            return self._comparison(node, path)
        if len(keys) != 1:
            raise self.fail(path, f"a condition has exactly one operator, got {sorted(map(str, keys))}")
        (op,) = keys
        arg = node[op]
        if op in ("all", "any"):
            if not isinstance(arg, list) or not arg:
                raise self.fail(f"{path}.{op}", "expects a non-empty list of conditions")
            parts = tuple(self.compile(c, f"{path}.{op}[{i}]") for i, c in enumerate(arg))
            if op == "all":
                return lambda p, at: all(part(p, at) for part in parts)
            return lambda p, at: any(part(p, at) for part in parts)
        if op == "not":
            inner = self.compile(arg, f"{path}.not")
            return lambda p, at: not inner(p, at)
        if op in _TIME_OPS:
            return self._time(op, arg, f"{path}.{op}")
        if op == "event_seen":
            return self._event_seen(arg, f"{path}.event_seen")
        if op in ("event_count", "feature_count"):
            return self._count(op, arg, f"{path}.{op}")
        if op in _COMPARISON_OPS:
            raise self.fail(path, f"comparison '{op}' needs a 'field': write {{field: <name>, {op}: <value>}}")
        known = ", ".join(_BOOLEAN_OPS + _TIME_OPS + _EVENT_OPS)
        raise self.fail(path, f"unknown operator {op!r} (known: {known}, or a comparison with 'field')")

    def _field(self, name: Any, path: str) -> str:
        if not isinstance(name, str):
            raise self.fail(path, f"field must be a string, got {name!r}")
        if name not in self._fields:
            raise self.fail(path, f"unknown field {name!r} (known: {', '.join(sorted(self._fields))})")
        return name

    def _op_and_value(self, node: Mapping, fixed: set[str], path: str) -> tuple[str, Any]:
        ops = [k for k in node if k not in fixed]
        if len(ops) != 1:
            raise self.fail(
                path, f"expects exactly one comparison operator ({', '.join(_COMPARISON_OPS)}), got {ops or 'none'}"
            )
        op = ops[0]
        if op not in _COMPARISON_OPS:
            raise self.fail(path, f"unknown comparison operator {op!r} (known: {', '.join(_COMPARISON_OPS)})")
        return op, node[op]

    def _comparison(self, node: Mapping, path: str) -> Predicate:
        name = self._field(node["field"], f"{path}.field")
        op, value = self._op_and_value(node, {"field"}, path)
        kind = self._fields[name]
        value = self._check_value(kind, op, value, f"{path}.{op}")
        if name in TIME_RELATIVE_FIELDS and op in _ORDERING_OPS | {"eq", "ne", "in"}:
            since, unit_ms = TIME_RELATIVE_FIELDS[name]
            thresholds = value if isinstance(value, (tuple, frozenset)) else (value,)
            for threshold in thresholds:
                self.marks |= _marks_at(since, threshold * unit_ms)
        return _comparison_predicate(name, kind, op, value)

    def _check_value(self, kind: str, op: str, value: Any, path: str) -> Any:
        numeric = kind in (NUMBER, TIMESTAMP)
        if op in _ORDERING_OPS and not numeric:
            raise self.fail(path, f"'{op}' needs a numeric or timestamp field, this one is {kind}")

        def check_scalar(v: Any) -> Any:
            if numeric and not _is_number(v):
                raise self.fail(path, f"expects a number, got {v!r}")
            if kind == STRING and not isinstance(v, str):
                raise self.fail(path, f"expects a string, got {v!r}")
            if kind == BOOL and not isinstance(v, bool):
                raise self.fail(path, f"expects true or false, got {v!r}")
            return v

        if op == "in":
            if not isinstance(value, list) or not value:
                raise self.fail(path, "expects a non-empty list")
            return frozenset(check_scalar(v) for v in value)
        if op == "between":
            if not isinstance(value, list) or len(value) != 2:
                raise self.fail(path, "expects a list [low, high]")
            low, high = (check_scalar(v) for v in value)
            if low > high:
                raise self.fail(path, f"low {low!r} is greater than high {high!r}")
            return (low, high)
        return check_scalar(value)

    def _time(self, op: str, arg: Any, path: str) -> Predicate:
        if not isinstance(arg, Mapping) or set(arg) != {"field", "days"}:
            raise self.fail(path, "expects {field: <timestamp field>, days: <number>}")
        name = self._field(arg["field"], f"{path}.field")
        if self._fields[name] != TIMESTAMP:
            raise self.fail(f"{path}.field", f"{name!r} is not a timestamp field")
        days = arg["days"]
        if not _is_number(days) or days < 0:
            raise self.fail(f"{path}.days", f"expects a number of days >= 0, got {days!r}")
        span_ms = days * DAY_MS
        # Both flip at the first millisecond with at - t > span_ms.
        self.marks.add((name, math.floor(span_ms) + 1))
        if op == "within_days":
            def within(p, at, name=name, span_ms=span_ms):
                t = p.get(name)
                return _is_number(t) and at - t <= span_ms
            return within

        def older_than(p, at, name=name, span_ms=span_ms):
            t = p.get(name)
            return _is_number(t) and at - t > span_ms
        return older_than

    def _event_seen(self, arg: Any, path: str) -> Predicate:
        event = self._event_name(arg, path)

        def seen(p, at, event=event):
            counts = p.get("event_counts")
            if isinstance(counts, Mapping) and (counts.get(event) or 0) > 0:
                return True
            milestones = p.get("milestones")
            return isinstance(milestones, (list, tuple, set, frozenset)) and event in milestones
        return seen

    def _event_name(self, name: Any, path: str) -> str:
        if not isinstance(name, str) or not name:
            raise self.fail(path, f"expects an event name, got {name!r}")
        if name not in self._events:
            raise self.fail(path, f"unknown event {name!r} (known: {', '.join(sorted(self._events))})")
        return name

    def _count(self, op: str, arg: Any, path: str) -> Predicate:
        subject_key, profile_key = ("event", "event_counts") if op == "event_count" else ("feature", "features_used")
        if not isinstance(arg, Mapping) or subject_key not in arg:
            raise self.fail(path, f"expects {{{subject_key}: <name>, <op>: <number>}}")
        if op == "event_count":
            subject = self._event_name(arg[subject_key], f"{path}.{subject_key}")
        else:
            subject = arg[subject_key]
            if not isinstance(subject, str) or not subject:
                raise self.fail(f"{path}.feature", f"expects a feature name, got {subject!r}")
        cmp_op, value = self._op_and_value(arg, {subject_key}, path)
        value = self._check_value(NUMBER, cmp_op, value, f"{path}.{cmp_op}")
        compare = _comparator(cmp_op, value)

        def count(p, at, subject=subject, profile_key=profile_key):
            counts = p.get(profile_key)
            n = counts.get(subject, 0) if isinstance(counts, Mapping) else 0
            return compare(n if _is_number(n) else 0)
        return count


def _comparator(op: str, value: Any) -> Callable[[Any], bool]:
    if op == "gt":
        return lambda v: v > value
    if op == "gte":
        return lambda v: v >= value
    if op == "lt":
        return lambda v: v < value
    if op == "lte":
        return lambda v: v <= value
    if op == "eq":
        return lambda v: v == value
    if op == "ne":
        return lambda v: v != value
    if op == "in":
        return lambda v: v in value
    low, high = value
    return lambda v: low <= v <= high


def _comparison_predicate(name: str, kind: str, op: str, value: Any) -> Predicate:
    compare = _comparator(op, value)
    if kind in (NUMBER, TIMESTAMP):
        def numeric(p, at):
            v = p.get(name)
            return _is_number(v) and compare(v)
        return numeric
    expected = str if kind == STRING else bool

    def typed(p, at):
        v = p.get(name)
        return isinstance(v, expected) and compare(v)
    return typed


# --------------------------------------------------------------------------- rule set


@dataclass(frozen=True)
class SegmentRule:
    name: str
    description: str
    predicate: Predicate

    @property
    def reason(self) -> str:
        return f"rule:{self.name}"


class RuleSet:
    """Compiled segment rules; build with ``RuleSet.load`` / ``RuleSet.from_yaml``."""

    def __init__(self, rules: Iterable[SegmentRule], version: str, retired: Iterable[str] = (),
                 time_marks: Iterable[TimeMark] = ()) -> None:
        self.rules: tuple[SegmentRule, ...] = tuple(rules)
        self.version = version
        self.retired: frozenset[str] = frozenset(retired)
        #: When the enabled rules' time conditions can flip without a new event,
        #: sorted (module docstring); ``ProfileConfig.time_marks`` takes them.
        self.time_marks: tuple[TimeMark, ...] = tuple(sorted(set(time_marks)))
        self._by_name = {rule.name: rule for rule in self.rules}
        self.owned: frozenset[str] = frozenset(self._by_name) | self.retired
        #: (text, source, extra fields, extra events) when compiled by ``from_yaml``: what a pickle carries.
        self._spec: Optional[tuple] = None

    def __reduce_ex__(self, protocol):
        # Predicates are closures: a compiled rule set travels as its text and is
        # compiled again on arrival (same rules, same version, same marks).
        if self._spec is None:
            return super().__reduce_ex__(protocol)
        return RuleSet.from_yaml, self._spec

    @property
    def names(self) -> list[str]:
        return [rule.name for rule in self.rules]

    @property
    def known_segments(self) -> frozenset[str]:
        """Every segment these rules define (enabled) or retire: what a tracks rule may name."""
        return self.owned

    @classmethod
    def load(
        cls,
        path: Union[str, Path] = DEFAULT_RULES_PATH,
        extra_fields: Optional[Mapping[str, str]] = None,
        extra_events: Iterable[str] = (),
    ) -> "RuleSet":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleError(f"{path}: cannot read rules file: {exc.strerror}") from None
        return cls.from_yaml(text, source=str(path), extra_fields=extra_fields, extra_events=extra_events)

    @classmethod
    def from_yaml(
        cls,
        text: str,
        source: str = "<rules>",
        extra_fields: Optional[Mapping[str, str]] = None,
        extra_events: Iterable[str] = (),
    ) -> "RuleSet":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RuleError(f"{source}: not valid YAML: {exc}") from None
        fields = rule_field_kinds()
        for name, kind in (extra_fields or {}).items():
            if kind not in (NUMBER, TIMESTAMP, STRING, BOOL):
                raise RuleError(f"extra field {name!r}: unknown kind {kind!r}")
            fields[name] = kind
        events = KNOWN_EVENTS | frozenset(extra_events)

        if not isinstance(doc, Mapping):
            raise RuleError(f"{source}: expected a mapping with 'version' and 'segments'")
        unknown = set(doc) - {"version", "segments", "retired"}
        if unknown:
            raise RuleError(f"{source}: unknown top-level keys {sorted(map(str, unknown))}")
        declared = doc.get("version")
        if not isinstance(declared, (str, int)) or isinstance(declared, bool) or str(declared) == "":
            raise RuleError(f"{source}: 'version' is required (a string or number)")
        segments = doc.get("segments")
        if not isinstance(segments, list) or not segments:
            raise RuleError(f"{source}: 'segments' must be a non-empty list")
        retired = doc.get("retired") or []
        if not isinstance(retired, list) or not all(isinstance(r, str) and _NAME_RE.match(r) for r in retired):
            raise RuleError(f"{source}: 'retired' must be a list of segment names")

        rules = []
        marks: set[TimeMark] = set()
        seen: set[str] = set()
        for index, entry in enumerate(segments):
            where = f"{source}: segments[{index}]"
            if not isinstance(entry, Mapping):
                raise RuleError(f"{where}: expected a mapping with name and when")
            name = entry.get("name")
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise RuleError(f"{where}: 'name' must match {_NAME_RE.pattern}, got {name!r}")
            where = f"{source}: segment {name!r}"
            unknown = set(entry) - {"name", "description", "enabled", "when"}
            if unknown:
                raise RuleError(f"{where}: unknown keys {sorted(map(str, unknown))}")
            if name in seen:
                raise RuleError(f"{where}: defined twice")
            if name in retired:
                raise RuleError(f"{where}: both defined and retired")
            seen.add(name)
            description = entry.get("description", "")
            if not isinstance(description, str):
                raise RuleError(f"{where}: 'description' must be a string")
            enabled = entry.get("enabled", True)
            if not isinstance(enabled, bool):
                raise RuleError(f"{where}: 'enabled' must be true or false")
            if "when" not in entry:
                raise RuleError(f"{where}: 'when' (the condition) is required")
            compiler = _Compiler(fields, events, where)
            predicate = compiler.compile(entry["when"], "when")
            if enabled:
                rules.append(SegmentRule(name, description.strip(), predicate))
                marks |= compiler.marks

        fingerprint = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
        compiled = cls(rules, f"{declared}+{fingerprint}", retired, marks)
        compiled._spec = (text, source, dict(extra_fields or {}), tuple(extra_events))
        return compiled

    def evaluate(self, profile: Mapping[str, Any], at_ms: int) -> set[str]:
        """Names of the segments whose rule matches the profile at at_ms."""
        return {rule.name for rule in self.rules if rule.predicate(profile, at_ms)}

    def diff(
        self,
        old_segments: Iterable[str],
        new_segments: Iterable[str],
        at_ms: int,
        reason: Optional[str] = None,
        user_key: str = "",
        version: Optional[int] = None,
    ) -> list[SegmentChange]:
        """Entered / exited changes between two segment sets, sorted by segment.

        Each change's reason is ``reason`` when given (e.g. another stage's
        "model:cluster_7"), else the rule's code: ``rule:<name>``,
        ``retired:<name>`` for retired segments, ``segment:<name>`` for
        segments these rules do not define. ``user_key`` is the user's
        pseudonymous key (the outbox, the one caller in the pipeline, always
        gives it). ``version`` is the profile's event-time version (consumers
        keep the newest change per user and segment); it defaults to ``at_ms``.
        """
        old, new = set(old_segments), set(new_segments)
        changes: list[SegmentChange] = []
        for segment in sorted(old ^ new):
            if reason:
                why = reason
            elif segment in self._by_name:
                why = self._by_name[segment].reason
            elif segment in self.retired:
                why = f"retired:{segment}"
            else:
                why = f"segment:{segment}"
            changes.append(
                SegmentChange(
                    user_key=user_key,
                    segment=segment,
                    change="entered" if segment in new else "exited",
                    at=at_ms,
                    reason=why,
                    version=at_ms if version is None else version,
                )
            )
        return changes

    def assign(self, previous: Iterable[str], profile: Mapping[str, Any], at_ms: int) -> set[str]:
        """The profile's new segment set: rule segments re-evaluated, retired ones
        removed, segments owned by others (e.g. the online model) kept as they are."""
        return (set(previous) - self.owned) | self.evaluate(profile, at_ms)


# --------------------------------------------------------------------------- the rule stage


class ProfileRejected(ValueError):
    """An element the rule stage cannot segment; ``reason`` is a short code, ``detail`` names no value."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _eval_time(profile: Mapping[str, Any], fallback_ms: int) -> int:
    at_ms = profile.get("as_of")
    return at_ms if _is_number(at_ms) else fallback_ms


def _profile_error(profile: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    user_key = profile.get("user_key")
    if not isinstance(user_key, str) or not user_key:
        return "missing_user_key", "profile has no user_key"
    segments = profile.get("segments")
    if segments is not None and (
        not isinstance(segments, (list, tuple, set, frozenset)) or not all(isinstance(s, str) for s in segments)
    ):
        return "bad_segments", "segments must be a list of strings"
    return None


def segment_profile(rules: RuleSet, element: Union[ProfileUpdate, Mapping[str, Any]], fallback_ms: int) -> dict:
    """The rule stage on one element: the current profile with ``segments`` set.

    ``element`` is a ``ProfileUpdate`` (its ``current`` is segmented) or a
    profile dict. Rules are evaluated at the profile's ``as_of`` (``fallback_ms``,
    the element's event time, when it has none); the new ``segments`` are the
    rule segments that match, plus the segments these rules do not own (e.g.
    from the online model) as the profile carried them; retired ones go.
    Segment changes are not derived here: the profile store's outbox derives
    them from the segments it replaces (``transforms/outbox/``). Raises
    ``ProfileRejected`` for a missing ``user_key`` or malformed ``segments``.
    The element is not checked for being a mapping: the profile stage's
    updates are ``ProfileUpdate``s of profile dicts (``UserProfileState.snapshot``)
    and enrichment keeps them so.
    """
    profile = element.current if isinstance(element, ProfileUpdate) else element
    error = _profile_error(profile)
    if error is not None:
        raise ProfileRejected(*error)
    updated = dict(profile)
    updated["segments"] = sorted(rules.assign(profile.get("segments") or (), profile,
                                              _eval_time(profile, fallback_ms)))
    return updated
