"""Compiles one rule condition into a predicate and the time marks at which it can flip.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ...schemas.contract import BOOL, NUMBER, STRING, TIMESTAMP
from ...schemas.units import DAY_MS
from .language import (
    _BOOLEAN_OPS,
    _COMPARISON_OPS,
    _EVENT_OPS,
    _ORDERING_OPS,
    _TIME_OPS,
    TIME_RELATIVE_FIELDS,
    Predicate,
    RuleError,
    TimeMark,
    _is_number,
)


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
