"""Per-user sessions in event time, kept incrementally and out-of-order safe.

A session is a maximal run of one user's events where consecutive events are
at most ``gap`` apart (default 30 minutes), in *event* time: the client's
``session_id`` is not trusted, since it resets on reinstall and differs across
devices.

``SessionState`` is the pure, engine-free state the keyed profile stage
(``UserProfileState`` in ``transforms/profile.py``) keeps per user. Events may arrive in
any order: an event that falls inside or next to a session extends it, one
that lands between two sessions and within ``gap`` of both merges them (the
same semantics as Beam's merging ``Sessions`` windows). Final statistics
therefore do not depend on arrival order, which is what lets a streaming run
and a batch replay of the same input produce identical profiles.

State stays bounded: sessions that ended more than ``retention`` before the
newest event are folded into running totals. The profile stage never hands
this class an event older than its allowed lateness, and ``retention`` is
kept larger than that, so folding never changes a result.

>>> from onboardflow.transforms.sessionize import SessionState
>>> s = SessionState(gap_ms=30 * 60_000)
>>> for minute in (0, 10, 20, 80, 85):
...     s.add(minute * 60_000)
>>> s.session_count
2
>>> s.add(50 * 60_000)   # bridges the two: 20 -> 50 -> 80 minutes, each gap <= 30
>>> s.session_count
1
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..schemas.units import DAY_MS, MINUTE_MS


@dataclass
class SessionState:
    """Sessions of one user, as sorted, non-overlapping ``[start, end, events]``.

    Parameters
    ----------
    gap_ms
        Inactivity gap that closes a session (event time).
    retention_ms
        Sessions ending this long before the newest event are folded into
        totals; must exceed the profile stage's allowed lateness plus the gap.
    """

    gap_ms: int = 30 * MINUTE_MS
    retention_ms: int = 45 * DAY_MS
    # Parallel sorted lists (cheaper to pickle than a list of objects).
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    folded_sessions: int = 0
    folded_duration_ms: int = 0
    folded_events: int = 0
    max_event_ms: int | None = None

    def add(self, t: int) -> None:
        """Fold one event at event time ``t`` (epoch ms) into the sessions."""
        gap = self.gap_ms
        # Sessions that t touches: [lo, hi) with start - gap <= t <= end + gap.
        hi = bisect.bisect_right(self.starts, t + gap)
        lo = hi
        while lo > 0 and self.ends[lo - 1] + gap >= t:
            lo -= 1
        if lo == hi:
            self.starts.insert(lo, t)
            self.ends.insert(lo, t)
            self.counts.insert(lo, 1)
        else:
            start = min(self.starts[lo], t)
            end = max(max(self.ends[lo:hi]), t)
            count = sum(self.counts[lo:hi]) + 1
            self.starts[lo:hi] = [start]
            self.ends[lo:hi] = [end]
            self.counts[lo:hi] = [count]
        if self.max_event_ms is None or t > self.max_event_ms:
            self.max_event_ms = t
            self._fold_old()

    def _fold_old(self) -> None:
        horizon = self.max_event_ms - self.retention_ms
        n = 0
        while n < len(self.ends) and self.ends[n] < horizon:
            self.folded_sessions += 1
            self.folded_duration_ms += self.ends[n] - self.starts[n]
            self.folded_events += self.counts[n]
            n += 1
        if n:
            del self.starts[:n], self.ends[:n], self.counts[:n]

    @property
    def session_count(self) -> int:
        return self.folded_sessions + len(self.starts)

    def sessions_since(self, t: int) -> int:
        """Sessions that started at or after ``t``."""
        return len(self.starts) - bisect.bisect_left(self.starts, t)

    def visit_medians(self) -> tuple[int, float, float]:
        """(visits, median events per visit, median visit duration in seconds) of the retained sessions.

        A *visit* is a session of at least two events; a lone event (a login
        and nothing else, a bounce) is a session but not a visit. Medians over
        visits are what one more event cannot swing: a bounce adds no visit,
        and an event that grows or opens a visit moves the median by half a
        rank at most (docs/models.md "Stability"). Sessions older than the
        retention (folded into totals) are not counted.
        """
        events = sorted(c for c in self.counts if c >= 2)
        if not events:
            return 0, 0.0, 0.0
        durations = sorted((e - s) / 1000.0 for s, e, c in zip(self.starts, self.ends, self.counts) if c >= 2)
        return len(events), _median(events), _median(durations)

    def snapshot(self, at_ms: int) -> dict:
        """Session features as of event time ``at_ms``."""
        total = self.session_count
        visits, visit_events, visit_seconds = self.visit_medians()
        duration = self.folded_duration_ms + sum(e - s for s, e in zip(self.starts, self.ends))
        events = self.folded_events + sum(self.counts)
        return {
            "session_count": total,
            "sessions_7d": self.sessions_since(at_ms - 7 * DAY_MS),
            "sessions_30d": self.sessions_since(at_ms - 30 * DAY_MS),
            "avg_session_duration_s": round(duration / total / 1000.0, 3) if total else 0.0,
            "avg_events_per_session": round(events / total, 3) if total else 0.0,
            "last_session_duration_s": round((self.ends[-1] - self.starts[-1]) / 1000.0, 3) if self.starts else 0.0,
            "visits": visits,
            "median_visit_events": visit_events,
            "median_visit_duration_s": round(visit_seconds, 3),
        }


def _median(values: list) -> float:
    """The median of a sorted, non-empty list."""
    n = len(values)
    mid = n // 2
    return float(values[mid]) if n % 2 else (values[mid - 1] + values[mid]) / 2.0
