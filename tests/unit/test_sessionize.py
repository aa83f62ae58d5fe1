"""SessionState: event-time sessions that do not depend on arrival order."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from onboardflow.transforms.sessionize import DAY_MS, MINUTE_MS, SessionState


def sessions_by_sorting(times, gap):
    """Independent reference: sort, then split where the gap is exceeded."""
    times = sorted(times)
    sessions = []
    for t in times:
        if sessions and t - sessions[-1][1] <= gap:
            sessions[-1][1] = t
            sessions[-1][2] += 1
        else:
            sessions.append([t, t, 1])
    return sessions


def test_events_within_gap_form_one_session_and_a_longer_pause_starts_another():
    s = SessionState(gap_ms=30 * MINUTE_MS)
    for minute in (0, 5, 34, 60, 200):
        s.add(minute * MINUTE_MS)
    assert s.session_count == 2
    assert s.snapshot(200 * MINUTE_MS)["avg_events_per_session"] == 2.5


def test_exactly_gap_apart_stays_in_the_same_session():
    s = SessionState(gap_ms=30 * MINUTE_MS)
    s.add(0)
    s.add(30 * MINUTE_MS)
    assert s.session_count == 1
    s.add(60 * MINUTE_MS + 1)
    assert s.session_count == 2


def test_late_event_bridging_two_sessions_merges_them():
    s = SessionState(gap_ms=30 * MINUTE_MS)
    s.add(0)
    s.add(50 * MINUTE_MS)
    assert s.session_count == 2
    s.add(25 * MINUTE_MS)
    assert s.session_count == 1
    assert s.snapshot(50 * MINUTE_MS)["last_session_duration_s"] == 50 * 60


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=3 * DAY_MS), min_size=1, max_size=60), st.randoms())
def test_any_arrival_order_gives_the_sessions_of_the_sorted_stream(times, rnd):
    gap = 30 * MINUTE_MS
    shuffled = list(times)
    rnd.shuffle(shuffled)
    s = SessionState(gap_ms=gap)
    for t in shuffled:
        s.add(t)
    expected = sessions_by_sorting(times, gap)
    assert [list(x) for x in zip(s.starts, s.ends, s.counts)] == expected


def test_old_sessions_fold_into_totals_without_changing_the_features():
    rng = random.Random(7)
    times = sorted(rng.randrange(0, 90 * DAY_MS) for _ in range(400))
    folded = SessionState(retention_ms=40 * DAY_MS)
    kept = SessionState(retention_ms=10_000 * DAY_MS)
    for t in times:
        folded.add(t)
        kept.add(t)
    assert folded.folded_sessions > 0
    assert len(folded.starts) < len(kept.starts)
    at = times[-1]
    # Totals and rates survive folding; the visit medians are over the
    # retained sessions only (the last ``retention_ms``), by definition.
    medians = ("visits", "median_visit_events", "median_visit_duration_s")
    a, b = folded.snapshot(at), kept.snapshot(at)
    assert {k: v for k, v in a.items() if k not in medians} == {k: v for k, v in b.items() if k not in medians}
    assert a["visits"] == sum(1 for c in folded.counts if c >= 2) < b["visits"]


def test_a_lone_event_is_a_session_but_not_a_visit_and_leaves_the_medians():
    s = SessionState()
    for t in (0, 60_000, 120_000, DAY_MS, DAY_MS + 30_000):     # a 3-event visit, a 2-event visit
        s.add(t)
    before = s.snapshot(DAY_MS + 30_000)
    assert (before["visits"], before["median_visit_events"], before["median_visit_duration_s"]) == (2, 2.5, 75.0)
    s.add(5 * DAY_MS)                                           # a login and nothing else
    after = s.snapshot(5 * DAY_MS)
    assert after["session_count"] == before["session_count"] + 1
    assert (after["visits"], after["median_visit_events"], after["median_visit_duration_s"]) == (2, 2.5, 75.0)


def test_sessions_in_the_last_7_and_30_days_count_by_session_start():
    s = SessionState()
    now = 100 * DAY_MS
    for day in (60, 75, 95, 96, 99):
        s.add(day * DAY_MS)
    snap = s.snapshot(now)
    assert snap["sessions_7d"] == 3
    assert snap["sessions_30d"] == 4
    assert snap["session_count"] == 5
