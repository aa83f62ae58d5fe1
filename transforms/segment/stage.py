"""The rule stage on one profile update (``segment_profile``): segments in, ``ProfileRejected`` for
what cannot be segmented.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

from ...schemas.records import ProfileUpdate
from .language import _is_number
from .ruleset import RuleSet


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
