"""The steps catalogue: the next recommended onboarding steps of each track (pipelines/onboarding_steps.yaml).

In: the catalogue file and the track policy it serves
(``models.tracks.TrackPolicy``, pipelines/onboarding_tracks.yaml). Out: a
validated ``StepCatalogue`` whose ``next_steps(track, profile)`` lists the
first ``max_steps`` steps of the track the profile has not done yet. Loading
fails with the file and the path of the problem when a track of the policy
has no steps, a track is not the policy's, or a step is malformed. The
format is in the file's header; decisions built on it: ``decisions.py``.

>>> catalogue = StepCatalogue.from_dict({"version": "1", "max_steps": 2, "fallback": {"track": "standard"},
...     "tracks": {"standard": [{"id": "tour", "title": "Take the tour", "done_when": {"milestone": "done"}},
...                             {"id": "invite", "title": "Invite", "done_when": {"event": "invite_sent"}},
...                             {"id": "export", "title": "Export"}]}}, tracks={"standard"})
>>> [s.id for s in catalogue.next_steps("standard", {"milestones": ["done"], "event_counts": {}})]
['invite', 'export']
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import yaml

DEFAULT_STEPS_PATH = Path(__file__).resolve().parents[2] / "pipelines" / "onboarding_steps.yaml"
_ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: done_when kind -> the profile field it reads (docs/redis-contract.md).
_DONE_FIELDS = {"event": "event_counts", "feature": "features_used", "milestone": "milestones"}


class CatalogueError(ValueError):
    """A steps catalogue that cannot be served; the message names the file and the path."""


@dataclass(frozen=True)
class Step:
    """One recommended step: ``id`` (stable, for apps), ``title`` (for people), when it counts as done."""

    id: str
    title: str
    done_kind: Optional[str] = None
    done_value: Optional[str] = None

    def done(self, profile: Optional[Mapping[str, Any]]) -> bool:
        if profile is None or self.done_kind is None:
            return False
        held = profile.get(_DONE_FIELDS[self.done_kind])
        if isinstance(held, Mapping):
            count = held.get(self.done_value)
            return isinstance(count, (int, float)) and count > 0
        return isinstance(held, list) and self.done_value in held


@dataclass(frozen=True)
class StepCatalogue:
    version: str
    max_steps: int
    fallback_track: str
    tracks: Mapping[str, tuple[Step, ...]]

    @classmethod
    def from_yaml(cls, path: Union[str, Path] = DEFAULT_STEPS_PATH,
                  tracks: Optional[Iterable[str]] = None) -> "StepCatalogue":
        """Load ``path``; ``tracks`` (the policy's track names) must each have steps, and no others."""
        path = Path(path)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CatalogueError(f"{path}: cannot read the steps catalogue: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise CatalogueError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_dict(doc, str(path), tracks)

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<steps>", tracks: Optional[Iterable[str]] = None) -> "StepCatalogue":
        def fail(where: str, message: str) -> CatalogueError:
            return CatalogueError(f"{source}: {where}: {message}")

        if not isinstance(doc, Mapping) or set(map(str, doc)) - {"version", "max_steps", "fallback", "tracks"}:
            raise fail("top level", "a mapping with version, max_steps, fallback and tracks only")
        version, max_steps = doc.get("version"), doc.get("max_steps", 3)
        if not isinstance(version, (str, int)) or isinstance(version, bool) or str(version) == "":
            raise fail("version", "needs a version (a string)")
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or not 1 <= max_steps <= 20:
            raise fail("max_steps", "an integer from 1 to 20")
        body = doc.get("tracks")
        if not isinstance(body, Mapping) or not body:
            raise fail("tracks", "needs a mapping of track names to lists of steps")
        parsed: dict[str, tuple[Step, ...]] = {}
        for track, steps in body.items():
            if not isinstance(steps, list) or not steps:
                raise fail(f"tracks.{track}", "needs a non-empty list of steps")
            parsed[str(track)] = tuple(_step(step, f"tracks.{track}[{i}]", fail) for i, step in enumerate(steps))
            ids = [s.id for s in parsed[str(track)]]
            if len(set(ids)) != len(ids):
                raise fail(f"tracks.{track}", "step ids must be unique within a track")
        if tracks is not None:
            expected = set(tracks)
            missing, unknown = sorted(expected - set(parsed)), sorted(set(parsed) - expected)
            if missing:
                raise fail("tracks", f"no steps for the policy's tracks {missing}")
            if unknown:
                raise fail("tracks", f"tracks {unknown} are not in the track policy")
        fallback = doc.get("fallback")
        if not isinstance(fallback, Mapping) or fallback.get("track") not in parsed:
            raise fail("fallback.track", "must name a track of the catalogue")
        return cls(str(version), max_steps, fallback["track"], parsed)

    def next_steps(self, track: str, profile: Optional[Mapping[str, Any]] = None) -> list[Step]:
        """The first ``max_steps`` steps of ``track`` not done by ``profile`` (all of them for None)."""
        steps = self.tracks.get(track) or self.tracks[self.fallback_track]
        return [s for s in steps if not s.done(profile)][: self.max_steps]


def _step(node: Any, where: str, fail) -> Step:
    if not isinstance(node, Mapping) or set(map(str, node)) - {"id", "title", "done_when"}:
        raise fail(where, "a step is a mapping with id, title and optionally done_when")
    step_id, title = node.get("id"), node.get("title")
    if not isinstance(step_id, str) or not _ID_RE.match(step_id):
        raise fail(f"{where}.id", "lower-case letters, digits and '_', starting with a letter")
    if not isinstance(title, str) or not title.strip():
        raise fail(f"{where}.title", "needs a title")
    done = node.get("done_when")
    if done is None:
        return Step(step_id, title)
    if not isinstance(done, Mapping) or len(done) != 1 or next(iter(done)) not in _DONE_FIELDS \
            or not isinstance(next(iter(done.values())), str):
        raise fail(f"{where}.done_when", f"one of {', '.join(sorted(_DONE_FIELDS))} with a name")
    kind, value = next(iter(done.items()))
    return Step(step_id, title, kind, value)
