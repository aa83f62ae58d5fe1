"""Experiments: which variant of an onboarding experiment a user gets, from their pseudonym alone.

An experiment is declared in ``pipelines/experiments.yaml`` (reviewed like
code, as the segment rules and tracks are) and compiled once by
``ExperimentSet.load``. Assignment needs no state and no store: the user's
pseudonym (``user_key``, the HMAC the anonymization stage computes) and the
experiment's ``salt`` are hashed (SHA-256) to a point ``u`` in [0, 1), and
the variant is the one whose cumulative weight first exceeds ``u``. So it is

* sticky: the same pseudonym always gets the same variant, on every engine,
  server and replay, as long as salt and weights do not change;
* uniform: ``u`` is uniform over pseudonyms, so variants get their weights;
* independent between experiments: different salts give unrelated points.

Changing an experiment's weights or salt reshuffles users; to change an
experiment, start a new one (new name and salt). Reasoning and the report's
statistics: docs/experiments.md.

File format::

    version: "2026-12.1"
    experiments:
      - name: checklist_first           # [a-z][a-z0-9_]*, unique
        description: "..."
        salt: "checklist_first-2026-12" # unique; any non-empty string
        status: running                 # draft | running | paused | stopped
        start: 2026-12-01T00:00:00Z     # inclusive; a timezone is required
        end: 2027-03-01T00:00:00Z       # exclusive; optional (open-ended)
        control: control                # optional: the first variant
        variants:                       # weights are > 0 and sum to 1
          - {name: control, weight: 0.5}
          - {name: checklist, weight: 0.5}
        eligible:                       # optional; every condition given must hold
          segments_any: [onboarding_stalled]   # names of pipelines/segment_rules.yaml
          tracks: [standard, simplified]       # names of pipelines/onboarding_tracks.yaml

An experiment *serves* a user at ``at_ms`` when it is ``running``, ``start
<= at_ms < end``, and the profile is eligible: its ``segments`` hold one of
``segments_any`` and its ``onboarding_track`` is one of ``tracks``. A draft,
paused or stopped experiment serves nobody (its users keep their variant if
it runs again).

>>> experiments = ExperimentSet.from_dict({"version": "1", "experiments": [{
...     "name": "checklist", "salt": "s1", "status": "running", "start": "2026-01-01T00:00:00Z",
...     "variants": [{"name": "control", "weight": 0.5}, {"name": "treatment", "weight": 0.5}],
...     "eligible": {"tracks": ["standard"]}}]})
>>> experiment = experiments["checklist"]
>>> round(experiment.point("user-key-1"), 4), experiment.variant("user-key-1")
(0.2228, 'control')
>>> experiments.assign({"user_key": "user-key-1", "onboarding_track": "standard"}, at_ms=1_800_000_000_000)
{'checklist': 'control'}
>>> experiments.assign({"user_key": "user-key-1", "onboarding_track": "advanced"}, at_ms=1_800_000_000_000)
{}
>>> experiments.assign({"user_key": "user-key-1", "onboarding_track": "standard"}, at_ms=0)  # before start
{}

The pipeline writes a profile's assignment into its ``experiments`` field
(``with_experiments``, on both engines, after the onboarding track): the
same ``assign`` at the profile's own event time ``as_of``, so a replay
writes the same value; the decisions API serves that field.

>>> profile = {"user_key": "user-key-1", "as_of": 1_800_000_000_000, "segments": []}
>>> experiments.with_experiments({**profile, "onboarding_track": "standard"})["experiments"]
{'checklist': 'control'}
>>> experiments.with_experiments(profile, track_of=lambda p: "advanced")["experiments"]  # no track: the policy's
{}
"""
from __future__ import annotations

import bisect
import datetime as dt
import functools
import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

#: The profile field the pipeline writes the assignment into (schemas/contract.py).
EXPERIMENTS_FIELD = "experiments"
DEFAULT_EXPERIMENTS_PATH = Path(__file__).resolve().parent.parent / "pipelines" / "experiments.yaml"
STATUSES = ("draft", "running", "paused", "stopped")
RUNNING = "running"
#: Weights must sum to 1 within this (YAML decimals such as 0.1 are not exact).
WEIGHT_TOLERANCE = 1e-9

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_TOP_KEYS = {"version", "experiments"}
_KEYS = {"name", "description", "salt", "status", "start", "end", "control", "variants", "eligible"}
_ELIGIBLE_KEYS = {"segments_any", "tracks"}
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


class ExperimentError(ValueError):
    """An experiments file that cannot be loaded; the message names the file and the place."""


def unit_point(salt: str, user_key: str) -> float:
    """The user's point in [0, 1) for ``salt``: the first 64 bits of SHA-256(salt NUL user_key) over 2**64.

    >>> unit_point("s1", "user-key-1") == unit_point("s1", "user-key-1") != unit_point("s2", "user-key-1")
    True
    """
    digest = hashlib.sha256(f"{salt}\x00{user_key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float


@dataclass(frozen=True)
class Experiment:
    """One declared experiment (module docstring); build through ``ExperimentSet``."""

    name: str
    salt: str
    variants: tuple[Variant, ...]
    control: str
    status: str
    start_ms: int
    end_ms: Optional[int] = None
    segments_any: Optional[frozenset] = None
    tracks: Optional[frozenset] = None
    description: str = ""

    @property
    def weights(self) -> dict[str, float]:
        return {v.name: v.weight for v in self.variants}

    @functools.cached_property
    def _bounds(self) -> list[float]:
        total, bounds = 0.0, []
        for v in self.variants:
            total += v.weight
            bounds.append(total)
        return bounds

    def point(self, user_key: str) -> float:
        """The user's uniform point in [0, 1) for this experiment (``unit_point`` with its salt)."""
        return unit_point(self.salt, user_key)

    def variant(self, user_key: str) -> str:
        """The variant of ``user_key``: the first whose cumulative weight exceeds the user's point."""
        index = bisect.bisect_right(self._bounds, self.point(user_key))
        return self.variants[min(index, len(self.variants) - 1)].name  # the last bound may round below 1

    def is_active(self, at_ms: int) -> bool:
        """Running, and ``start <= at_ms < end``."""
        return self.status == RUNNING and self.start_ms <= at_ms and (self.end_ms is None or at_ms < self.end_ms)

    def is_eligible(self, profile: Mapping[str, Any]) -> bool:
        """The profile's segments and onboarding track satisfy ``eligible`` (none given: everyone is)."""
        if self.segments_any is not None:
            segments = profile.get("segments")
            if not isinstance(segments, (list, tuple, set, frozenset)) or not self.segments_any.intersection(segments):
                return False
        if self.tracks is not None and profile.get("onboarding_track") not in self.tracks:
            return False
        return True


class ExperimentSet:
    """The compiled experiments file: ``assign(profile, at_ms)`` gives ``{experiment: variant}``."""

    def __init__(self, experiments: Iterable[Experiment], version: str) -> None:
        self.experiments: tuple[Experiment, ...] = tuple(experiments)
        self.version = version
        self._by_name = {e.name: e for e in self.experiments}

    def __getitem__(self, name: str) -> Experiment:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Experiment]:
        return iter(self.experiments)

    def __len__(self) -> int:
        return len(self.experiments)

    def __reduce__(self):
        # Plain frozen dataclasses: pickles as its experiments (a worker needs no file).
        return ExperimentSet, (self.experiments, self.version)

    def assign(self, profile: Mapping[str, Any], at_ms: int, user_key: Optional[str] = None) -> dict[str, str]:
        """``{name: variant}`` of every experiment active at ``at_ms`` the profile is eligible for.

        ``user_key`` defaults to the profile's; a profile without one gets ``{}``.
        """
        key = user_key or profile.get("user_key")
        if not isinstance(key, str) or not key:
            return {}
        return {e.name: e.variant(key) for e in self.experiments if e.is_active(at_ms) and e.is_eligible(profile)}

    def with_experiments(self, profile: Mapping[str, Any],
                         track_of: Optional[Callable[[Mapping[str, Any]], str]] = None) -> dict:
        """A copy of ``profile`` with ``experiments`` set: the hook the pipeline calls on every engine.

        The field is ``assign`` evaluated at the profile's ``as_of`` (event
        time, never the wall clock: a replay writes the same value), so it
        depends on the pseudonym, the segments, the track and this file only.
        A profile without ``onboarding_track`` (the online models are off) is
        judged with ``track_of(profile)``, the policy's choice the decisions
        API would serve (``TrackPolicy.choose``); that track is not written.
        A profile without an integer ``as_of`` gets ``{}``.
        """
        subject = profile
        if not isinstance(profile.get("onboarding_track"), str) and track_of is not None:
            subject = {**profile, "onboarding_track": track_of(profile)}
        as_of = profile.get("as_of")
        updated = dict(profile)
        updated[EXPERIMENTS_FIELD] = (self.assign(subject, as_of)
                                      if isinstance(as_of, int) and not isinstance(as_of, bool) else {})
        return updated

    @classmethod
    def load(cls, path: Union[str, Path] = DEFAULT_EXPERIMENTS_PATH, known_segments: Optional[Iterable[str]] = None,
             known_tracks: Optional[Iterable[str]] = None) -> "ExperimentSet":
        """Load and validate an experiments file; segment and track names are checked when the known
        ones are given (``RuleSet.known_segments``, ``TrackPolicy.tracks``)."""
        path = Path(path or DEFAULT_EXPERIMENTS_PATH)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ExperimentError(f"{path}: cannot read experiments file: {exc.strerror}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ExperimentError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(doc, str(path), known_segments, known_tracks)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<experiments>", known_segments: Optional[Iterable[str]] = None,
                  known_tracks: Optional[Iterable[str]] = None) -> "ExperimentSet":
        """Validate a parsed experiments document (module docstring); ``ExperimentError`` names the problem."""
        loader = _Loader(source, known_segments, known_tracks)
        if not isinstance(doc, Mapping):
            raise loader.fail("", "an experiments file is a mapping with version and experiments")
        unknown = sorted(set(map(str, doc)) - _TOP_KEYS)
        if unknown:
            raise loader.fail("", f"unknown fields {unknown} (known: {', '.join(sorted(_TOP_KEYS))})")
        version = doc.get("version")
        if not isinstance(version, (str, int)) or isinstance(version, bool) or str(version) == "":
            raise loader.fail("version", "needs a version (a string)")
        entries = doc.get("experiments") or []
        if not isinstance(entries, list):
            raise loader.fail("experiments", "needs a list of experiments")
        experiments = [loader.experiment(entry, f"experiments[{i}]") for i, entry in enumerate(entries)]
        for attribute in ("name", "salt"):
            values = [getattr(e, attribute) for e in experiments]
            twice = sorted({v for v in values if values.count(v) > 1})
            if twice:
                raise loader.fail("experiments", f"{attribute}s must be unique; repeated: {twice}")
        return cls(experiments, str(version))


class _Loader:
    def __init__(self, source: str, known_segments: Optional[Iterable[str]],
                 known_tracks: Optional[Iterable[str]]) -> None:
        self.source = source
        self.known_segments = None if known_segments is None else frozenset(known_segments)
        self.known_tracks = None if known_tracks is None else frozenset(known_tracks)

    def fail(self, path: str, message: str) -> ExperimentError:
        return ExperimentError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def experiment(self, node: Any, path: str) -> Experiment:
        if not isinstance(node, Mapping):
            raise self.fail(path, "an experiment is a mapping with name, salt, status, start and variants")
        name = node.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise self.fail(f"{path}.name", f"must match {_NAME_RE.pattern}, got {name!r}")
        path = f"experiment {name!r}"
        unknown = sorted(set(map(str, node)) - _KEYS)
        if unknown:
            raise self.fail(path, f"unknown fields {unknown} (known: {', '.join(sorted(_KEYS))})")
        salt = node.get("salt")
        if not isinstance(salt, str) or not salt.strip():
            raise self.fail(f"{path}.salt", "needs a non-empty string (unique among experiments)")
        status = node.get("status")
        if status not in STATUSES:
            raise self.fail(f"{path}.status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
        start_ms = self.timestamp(node.get("start"), f"{path}.start")
        end_ms = None if node.get("end") is None else self.timestamp(node["end"], f"{path}.end")
        if end_ms is not None and end_ms <= start_ms:
            raise self.fail(f"{path}.end", "must be after start")
        variants = self.variants(node.get("variants"), f"{path}.variants")
        control = node.get("control", variants[0].name)
        if control not in {v.name for v in variants}:
            raise self.fail(f"{path}.control", f"{control!r} is not one of the variants")
        description = node.get("description", "")
        if not isinstance(description, str):
            raise self.fail(f"{path}.description", "must be a string")
        segments, tracks = self.eligible(node.get("eligible"), f"{path}.eligible")
        return Experiment(name, salt, variants, control, status, start_ms, end_ms, segments, tracks,
                          description.strip())

    def timestamp(self, value: Any, path: str) -> int:
        if isinstance(value, str):
            try:
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                raise self.fail(path, f"not an ISO-8601 timestamp: {value!r}") from None
        if not isinstance(value, dt.datetime):
            raise self.fail(path, "needs a timestamp such as 2026-12-01T00:00:00Z")
        if value.tzinfo is None:
            raise self.fail(path, "needs a timezone (e.g. a trailing Z for UTC)")
        return (value - _EPOCH) // dt.timedelta(milliseconds=1)

    def variants(self, value: Any, path: str) -> tuple[Variant, ...]:
        if not isinstance(value, list) or len(value) < 2:
            raise self.fail(path, "needs a list of at least two variants, each {name, weight}")
        variants = []
        for i, node in enumerate(value):
            if not isinstance(node, Mapping) or set(node) != {"name", "weight"}:
                raise self.fail(f"{path}[{i}]", "a variant is {name: ..., weight: ...}")
            name, weight = node["name"], node["weight"]
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise self.fail(f"{path}[{i}].name", f"must match {_NAME_RE.pattern}, got {name!r}")
            if (not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight)
                    or weight <= 0):
                raise self.fail(f"{path}[{i}].weight", f"must be a number above 0, got {weight!r}")
            variants.append(Variant(name, float(weight)))
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise self.fail(path, f"variant names must be unique: {names}")
        total = math.fsum(v.weight for v in variants)
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise self.fail(path, f"weights must sum to 1, they sum to {total:.12g}")
        return tuple(variants)

    def eligible(self, value: Any, path: str) -> tuple[Optional[frozenset], Optional[frozenset]]:
        if value is None:
            return None, None
        if not isinstance(value, Mapping) or not value:
            raise self.fail(path, "a mapping with segments_any and/or tracks")
        unknown = sorted(set(map(str, value)) - _ELIGIBLE_KEYS)
        if unknown:
            raise self.fail(path, f"unknown conditions {unknown} (known: {', '.join(sorted(_ELIGIBLE_KEYS))})")
        out = []
        for key, known in (("segments_any", self.known_segments), ("tracks", self.known_tracks)):
            names = value.get(key)
            if names is None:
                out.append(None)
                continue
            if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
                raise self.fail(f"{path}.{key}", "expects a non-empty list of names")
            missing = sorted(set(names) - known) if known is not None else []
            if missing:
                raise self.fail(f"{path}.{key}", f"unknown names {missing} (known: {', '.join(sorted(known))})")
            out.append(frozenset(names))
        return out[0], out[1]
