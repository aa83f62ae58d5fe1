"""Which old model versions may lose their payload (``ModelRegistry.prune``; docs/models-registry.md#retention).
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import Optional

from .versions import _EPOCH, RegistryError


def check_retention(keep_last: int, keep_days: Optional[float]) -> None:
    """Refuse a retention that would keep nothing or cannot be read as a time span."""
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        # The newest version is what the learner just published and what
        # ``promote`` serves by default: it always stays.
        raise RegistryError(f"keep_last must be a whole number >= 1, got {keep_last!r}")
    if keep_days is not None:
        if isinstance(keep_days, bool) or not isinstance(keep_days, (int, float)) or not keep_days >= 0 \
                or keep_days == float("inf"):
            raise RegistryError(f"keep_days must be a finite number of days >= 0, got {keep_days!r}")


def retention_cutoff(now: dt.datetime, keep_days: Optional[float]) -> Optional[dt.datetime]:
    """The creation (or pointer move) time before which ``keep_days`` no longer protects; None without it."""
    if keep_days is None:
        return None
    try:
        return now - dt.timedelta(days=keep_days)
    except OverflowError:  # more days than the calendar holds: everything is recent
        return _EPOCH


def prunable_versions(kept: Mapping[int, dt.datetime], newest: int, protected: Iterable[int], keep_last: int,
                      cutoff: Optional[dt.datetime] = None) -> list[int]:
    """The versions a prune removes, oldest first.

    ``kept`` maps each version that still holds a payload to its creation
    time; ``newest`` is the kind's highest version number (numbers count up
    without gaps, so the newest ``keep_last`` are those above
    ``newest - keep_last``, pruned or not); ``protected`` are versions that
    stay whatever their age (served now, or by a recent pointer move);
    ``cutoff`` (``retention_cutoff``): versions created at or after it stay.

    >>> t = dt.datetime(2026, 1, 10, tzinfo=dt.timezone.utc)
    >>> kept = {n: t + dt.timedelta(hours=n) for n in range(1, 8)}
    >>> prunable_versions(kept, newest=7, protected={2}, keep_last=3)
    [1, 3, 4]
    >>> prunable_versions(kept, newest=7, protected={2}, keep_last=3, cutoff=t + dt.timedelta(hours=3))
    [1]
    """
    check_retention(keep_last, None)
    protected = set(protected)
    return sorted(
        n for n, created_at in kept.items()
        if n <= newest - keep_last and n not in protected and (cutoff is None or created_at < cutoff)
    )
