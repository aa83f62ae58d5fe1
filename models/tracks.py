"""Onboarding tracks: from what we know about a user to how we onboard them.

Rule segments (``transforms/segment/``) say what we already know about a
user, the online clusters (``models/segmentation.py``) what we found; this
module turns both into one decision, the profile's ``onboarding_track``, so
apps read a track name and need no logic of their own. The mapping is
configuration (``pipelines/onboarding_tracks.yaml``), reviewed like code.
Engine-free: the pipeline applies it in ``pipelines/beam/tracks.py``
(``AssignOnboardingTracks``) and the learner re-applies it when it re-scores
(docs/models-registry.md "Onboarding tracks (the personalization hook)"). A compiled policy pickles as its
validated document. The file format:

    version: "2026-01.1"
    default: standard                   # the track when no rule matches
    tracks:                             # every track a rule may name, with what it means
      advanced: "Advanced tutorials ..."
      standard: "The default onboarding tour"
    rules:                              # tried in order: the first that matches wins
      - name: highly_engaged            # [a-z][a-z0-9_]*, unique; recorded with the decision
        track: advanced
        when:                           # every condition listed must hold
          segments_any: [highly_engaged_new, active_engaged]

Conditions (all optional, at least one per rule):

* ``segments_any`` / ``segments_all`` / ``segments_none``: lists of rule
  segment names, tested against the profile's ``segments``; names must exist
  in the segment rules file (a typo would otherwise silently match nobody);
* ``segment_labels``: the online cluster's ``segment_label`` is one of these
  (names of ``models/segmentation.py`` ``LABELS``; a name outside that
  catalogue is refused, as a typo would match nobody);
* ``cluster_ids``: ``cluster_id`` is one of these integers;
* ``account_tier`` / ``plan``: the profile's value is one of these strings;
* ``propensity``: ``{gte: 0.7}``, ``{lt: 0.2}`` (any of gt, gte, lt, lte, in
  [0, 1]); a profile the model has not scored yet (null) does not match.

Loading validates everything and fails with the file and the path of the
problem (``rules[2].when.segmnets_any: unknown condition``). A profile field
that is missing or null never matches a condition on it (``segments_none``
holds for a profile without segments).

>>> policy = TrackPolicy.from_dict({
...     "version": "1", "default": "standard",
...     "tracks": {"advanced": "power features", "standard": "the tour"},
...     "rules": [{"name": "engaged", "track": "advanced", "when": {"segments_any": ["active_engaged"]}}],
... }, known_segments={"active_engaged"})
>>> policy.choose({"segments": ["active_engaged"]}), policy.choose({"segments": []})
('advanced', 'standard')
>>> policy.decide({"segments": ["active_engaged"]})
TrackDecision(track='advanced', rule='engaged')
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import yaml

if TYPE_CHECKING:
    from ..transforms.segment import RuleSet

DEFAULT_TRACKS_PATH = Path(__file__).resolve().parent.parent / "pipelines" / "onboarding_tracks.yaml"
TRACK_FIELD = "onboarding_track"
DEFAULT_RULE = "default"

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_TOP_KEYS = {"version", "default", "tracks", "rules"}
_RULE_KEYS = {"name", "track", "when"}
_SEGMENT_CONDITIONS = ("segments_any", "segments_all", "segments_none")
_STRING_CONDITIONS = {"segment_labels": "segment_label", "account_tier": "account_tier", "plan": "plan"}
_CONDITIONS = (*_SEGMENT_CONDITIONS, *_STRING_CONDITIONS, "cluster_ids", "propensity")
_PROPENSITY_OPS: dict[str, Callable[[float, float], bool]] = {
    "gt": lambda v, t: v > t, "gte": lambda v, t: v >= t, "lt": lambda v, t: v < t, "lte": lambda v, t: v <= t,
}

Check = Callable[[Mapping[str, Any]], bool]


class TrackPolicyError(ValueError):
    """A tracks file that cannot be loaded; the message names the file and the place."""


class TrackDecision(NamedTuple):
    track: str
    rule: str  # the rule that matched, or "default"


@dataclass(frozen=True)
class TrackRule:
    name: str
    track: str
    checks: tuple[Check, ...]

    def matches(self, profile: Mapping[str, Any]) -> bool:
        return all(check(profile) for check in self.checks)


def _segments(profile: Mapping[str, Any]) -> frozenset:
    value = profile.get("segments")
    return (frozenset(s for s in value if isinstance(s, str))
            if isinstance(value, (list, tuple, set, frozenset)) else frozenset())


class _Loader:
    def __init__(self, source: str, known_segments: Optional[frozenset]) -> None:
        self.source = source
        self.known_segments = known_segments

    def fail(self, path: str, message: str) -> TrackPolicyError:
        return TrackPolicyError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def names(self, value: Any, path: str) -> list[str]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(path, "expects a non-empty list of names")
        return value

    def condition(self, key: str, value: Any, path: str) -> Check:
        if key in _SEGMENT_CONDITIONS:
            names = frozenset(self.names(value, path))
            if self.known_segments is not None:
                unknown = sorted(names - self.known_segments)
                if unknown:
                    raise self.fail(path,
                                    f"unknown segments {unknown} (known: {', '.join(sorted(self.known_segments))})")
            if key == "segments_any":
                return lambda p: bool(_segments(p) & names)
            if key == "segments_all":
                return lambda p: names <= _segments(p)
            return lambda p: not (_segments(p) & names)
        if key == "segment_labels":
            from .segmentation import LABELS

            labels = frozenset(self.names(value, path))
            unknown = sorted(labels - set(LABELS))
            if unknown:
                raise self.fail(path, f"unknown segment labels {unknown} (known: {', '.join(LABELS)})")
            return lambda p: p.get("segment_label") in labels
        if key in _STRING_CONDITIONS:
            allowed = frozenset(self.names(value, path))
            field_name = _STRING_CONDITIONS[key]
            return lambda p: p.get(field_name) in allowed
        if key == "cluster_ids":
            if not isinstance(value, list) or not value or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
                raise self.fail(path, "expects a non-empty list of non-negative integers")
            ids = frozenset(value)
            return lambda p: p.get("cluster_id") in ids and not isinstance(p.get("cluster_id"), bool)
        if key == "propensity":
            if not isinstance(value, Mapping) or not value:
                raise self.fail(path, f"expects a mapping of {'/'.join(_PROPENSITY_OPS)} to a number in [0, 1]")
            tests = []
            for op, threshold in value.items():
                if op not in _PROPENSITY_OPS:
                    raise self.fail(f"{path}.{op}", f"unknown operator (known: {', '.join(_PROPENSITY_OPS)})")
                if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
                    raise self.fail(f"{path}.{op}", "expects a number in [0, 1]")
                tests.append((_PROPENSITY_OPS[op], float(threshold)))

            def check(p: Mapping[str, Any]) -> bool:
                v = p.get("propensity")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    return False
                return all(test(v, t) for test, t in tests)
            return check
        raise self.fail(path, f"unknown condition (known: {', '.join(_CONDITIONS)})")

    def rule(self, node: Any, index: int, tracks: Mapping[str, str], seen: set) -> TrackRule:
        path = f"rules[{index}]"
        if not isinstance(node, Mapping):
            raise self.fail(path, "a rule is a mapping with name, track and when")
        unknown = sorted(set(map(str, node)) - _RULE_KEYS)
        if unknown:
            raise self.fail(path, f"unknown fields {unknown} (known: {', '.join(sorted(_RULE_KEYS))})")
        name = node.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise self.fail(f"{path}.name", "needs a name of lower-case letters, digits and '_'")
        if name in seen or name == DEFAULT_RULE:
            raise self.fail(f"{path}.name", f"rule name {name!r} is used twice (or reserved)")
        seen.add(name)
        track = node.get("track")
        if track not in tracks:
            raise self.fail(f"{path}.track", f"unknown track {track!r} (declared: {', '.join(tracks)})")
        when = node.get("when")
        if not isinstance(when, Mapping) or not when:
            raise self.fail(f"{path}.when", "needs at least one condition")
        checks = tuple(self.condition(str(k), v, f"{path}.when.{k}") for k, v in when.items())
        return TrackRule(name, track, checks)


class TrackPolicy:
    """Which onboarding track each profile gets: first matching rule, else the default."""

    def __init__(self, rules: Iterable[TrackRule], default: str, tracks: Mapping[str, str], version: str) -> None:
        self.rules = tuple(rules)
        self.default = default
        self.tracks = dict(tracks)
        self.version = version
        #: (document, source, known segments) when built by ``from_dict``: what a pickle carries.
        self._spec: Optional[tuple] = None

    def __reduce_ex__(self, protocol):
        # The rules are closures; a policy travels as its validated document and is
        # rebuilt on arrival (workers need not see the launcher's files).
        if self._spec is None:
            return super().__reduce_ex__(protocol)
        return TrackPolicy.from_dict, self._spec

    @classmethod
    def from_yaml(cls, path: Union[str, Path] = DEFAULT_TRACKS_PATH,
                  segment_rules: Optional["RuleSet"] = None) -> "TrackPolicy":
        """Load and validate a tracks file; segment names are checked against the compiled
        ``segment_rules`` (default: the packaged ``pipelines/segment_rules.yaml``)."""
        path = Path(path or DEFAULT_TRACKS_PATH)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise TrackPolicyError(f"{path}: cannot read tracks file: {exc.strerror}") from None
        rules = segment_rules if segment_rules is not None else _packaged_rules()
        return cls.from_text(text, str(path), rules.known_segments)

    @classmethod
    def from_text(cls, text: str, source: str = "<tracks>",
                  known_segments: Optional[Iterable[str]] = None) -> "TrackPolicy":
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TrackPolicyError(f"{source}: not valid YAML: {exc}") from None
        return cls.from_dict(doc, source, known_segments)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<tracks>",
                  known_segments: Optional[Iterable[str]] = None) -> "TrackPolicy":
        """Validate a parsed tracks document. ``known_segments`` None skips the segment-name check."""
        loader = _Loader(source, None if known_segments is None else frozenset(known_segments))
        if not isinstance(doc, Mapping):
            raise loader.fail("", "a tracks file is a mapping with version, default, tracks and rules")
        unknown = sorted(set(map(str, doc)) - _TOP_KEYS)
        if unknown:
            raise loader.fail("", f"unknown fields {unknown} (known: {', '.join(sorted(_TOP_KEYS))})")
        version = doc.get("version")
        if not isinstance(version, (str, int)) or isinstance(version, bool) or str(version) == "":
            raise loader.fail("version", "needs a version (a string)")
        tracks = doc.get("tracks")
        if not isinstance(tracks, Mapping) or not tracks:
            raise loader.fail("tracks", "needs a mapping of track names to descriptions")
        for name, description in tracks.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise loader.fail(f"tracks.{name}", "track names are lower-case letters, digits and '_'")
            if not isinstance(description, str) or not description.strip():
                raise loader.fail(f"tracks.{name}", "needs a description of what the track is")
        default = doc.get("default")
        if default not in tracks:
            raise loader.fail("default", f"default track {default!r} is not declared under tracks")
        rules_doc = doc.get("rules")
        if rules_doc is None:
            rules_doc = []
        if not isinstance(rules_doc, list):
            raise loader.fail("rules", "needs a list of rules")
        seen: set = set()
        rules = [loader.rule(node, i, tracks, seen) for i, node in enumerate(rules_doc)]
        policy = cls(rules, default, tracks, str(version))
        policy._spec = (doc, source, loader.known_segments)
        return policy

    def decide(self, profile: Mapping[str, Any]) -> TrackDecision:
        """The track and the rule that chose it (``"default"`` when none matched)."""
        for rule in self.rules:
            if rule.matches(profile):
                return TrackDecision(rule.track, rule.name)
        return TrackDecision(self.default, DEFAULT_RULE)

    def choose(self, profile: Mapping[str, Any]) -> str:
        """The onboarding track for ``profile``."""
        return self.decide(profile).track

    def with_track(self, profile: Mapping[str, Any]) -> dict:
        """A copy of ``profile`` with ``onboarding_track`` set: the hook the pipeline calls."""
        updated = dict(profile)
        updated[TRACK_FIELD] = self.choose(profile)
        return updated


def _packaged_rules() -> "RuleSet":
    from ..transforms.segment import DEFAULT_RULES_PATH, RuleError, RuleSet

    try:
        return RuleSet.load(DEFAULT_RULES_PATH)
    except RuleError as exc:
        raise TrackPolicyError(f"cannot check segment names: {exc}") from None
