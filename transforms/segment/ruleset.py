"""``RuleSet``: a compiled rules file; evaluates a profile's segments and diffs segment sets.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from ...schemas.contract import BOOL, NUMBER, STRING, TIMESTAMP, rule_field_kinds
from ...schemas.records import SegmentChange
from .compiler import _Compiler
from .language import _NAME_RE, DEFAULT_RULES_PATH, KNOWN_EVENTS, Predicate, RuleError, TimeMark


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
