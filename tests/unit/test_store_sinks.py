"""ProfileSink and WarehouseSink over stub writers: what each settles, counts and reports (no services).

The real Redis script and COPY path: tests/integration/test_profile_store.py, test_warehouse.py.
"""
import hashlib
import hmac
import time

import psycopg
import pytest
import redis

from onboardflow.transforms.profile_store.sink import ProfileSink
from onboardflow.transforms.profile_store.writer import WriteOutcome
from onboardflow.transforms.sinks.retry import RetryPolicy
from onboardflow.transforms.warehouse.rows import SEGMENT_CHANGES
from onboardflow.transforms.warehouse.sink import WarehouseSink
from onboardflow.transforms.warehouse.writer import WriteReport

SECRET = b"unit-test-secret-0123456789abcdef"
T0 = 1_736_899_200_000
NO_WAIT = RetryPolicy(max_attempts=3, budget_s=0, base_s=0)


def key_of(user_id):
    return hmac.new(SECRET, user_id.encode(), hashlib.sha256).hexdigest()


def profile(user, as_of, n=1, **fields):
    return {"user_key": key_of(user), "version": as_of * 1000 + n, "as_of": as_of, "last_event_at": as_of,
            "segments": ["activated"], **fields}


class Recorder:
    """Stands in for PipelineMetrics and EventTimeProgress: records every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))

    def names(self):
        return [c[0] for c in self.calls]


class StubRedisWriter:
    """``send`` replies from a script of outcomes per attempt; remembers what it was sent."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []
        self.client = "client"

    def send(self, items, write_id):
        self.sent.append(([i.user_key for i in items], write_id))
        outcomes, error = self.replies.pop(0)
        return outcomes[:len(items)], error

    def close(self):
        pass


def profile_sink(replies, **kwargs):
    counts = {}
    metrics, progress = Recorder(), Recorder()
    sink = ProfileSink("redis://unused", "unit", batch_size=kwargs.pop("batch_size", 10), metrics=metrics,
                       progress=progress, count=lambda n, k: counts.__setitem__(n, counts.get(n, 0) + k), **kwargs)
    sink.retry = NO_WAIT
    sink.writer = StubRedisWriter(replies)
    return sink, counts, metrics, progress


def test_the_newest_profile_per_user_in_a_batch_is_written_and_the_older_reported_not_applied():
    sink, counts, _, _ = profile_sink([([WriteOutcome(applied=True, previous_segments=())], None)])
    older, newer = profile("u1", T0, 1), profile("u1", T0, 2)
    [dropped] = sink.add(newer) + sink.add(older)
    assert (dropped.result.version, dropped.result.applied) == (older["version"], False)
    [written] = sink.flush()
    assert written.result.applied and written.result.profile == newer and written.result.previous_segments == ()
    assert sink.writer.sent[0][0] == [key_of("u1")]
    assert counts == {"profiles_stale_skipped": 1, "profiles_written": 1}


def test_a_profile_from_the_future_and_an_invalid_one_are_dead_lettered_without_a_write():
    sink, counts, _, _ = profile_sink([])
    now_ms = time.time_ns() // 1_000_000
    [future] = sink.add(profile("u1", now_ms + 3_600_000))
    [raw] = sink.add({"user_key": "alice@example.com", "version": 1})
    assert future.rejection[0] == "version_in_future" and raw.rejection[0] == "invalid_user_key"
    assert sink.dead_letter(raw)["user_key"] is None  # a raw id never reaches the metadata
    assert sink.dead_letter(future)["stage"] == "profile_store"
    assert sink.flush() == [] and sink.writer.sent == []
    assert counts == {"profile_store_dead_letter": 2}


def test_writes_a_transient_reply_left_are_sent_again_alone_with_the_same_write_id():
    busy = redis.exceptions.ResponseError("BUSY Redis is busy running a script")
    sink, counts, metrics, _ = profile_sink([
        ([WriteOutcome(applied=True, previous_segments=()), None, WriteOutcome(applied=False)], busy),
        ([WriteOutcome(applied=True, previous_segments=("x",))], None),
    ])
    for user in ("u1", "u2", "u3"):
        sink.add(profile(user, T0))
    settled = sink.flush()
    (first, first_id), (second, second_id) = sink.writer.sent
    assert first == [key_of(u) for u in ("u1", "u2", "u3")] and second == [key_of("u2")]
    assert first_id == second_id
    assert [r.result.applied for r in settled] == [True, True, False]
    assert counts == {"profiles_written": 2, "profiles_stale_skipped": 1, "redis_retries": 1}
    assert metrics.names().count("redis_error") == 1  # one failed attempt, reported as it happened


def test_a_write_redis_refuses_becomes_a_dead_letter_and_the_flush_reports_latency_and_progress():
    sink, counts, metrics, progress = profile_sink([
        ([WriteOutcome(applied=False, rejected="WRONGTYPE Operation against a key"),
          WriteOutcome(applied=True, previous_segments=())], None)])
    sink.add(profile("u1", T0))
    sink.add(profile("u2", T0 + 5))
    refused, written = sink.flush()
    assert refused.rejection == ("redis_rejected", "WRONGTYPE Operation against a key")
    assert written.result.applied
    assert counts["profile_store_dead_letter"] == 1
    assert {"redis_write_seconds", "profiles_written", "event_to_redis_seconds"} <= set(metrics.names())
    assert ("profiles_written", 1) in metrics.calls
    [(name, client, newest, _written_at)] = progress.calls
    assert (name, client, newest) == ("record", "client", T0 + 5)


def test_a_lost_connection_that_outlasts_the_retries_fails_the_flush():
    lost = redis.exceptions.ConnectionError("Connection closed by server.")
    sink, _, metrics, _ = profile_sink([([None], lost)] * 3)
    sink.add(profile("u1", T0))
    with pytest.raises(redis.exceptions.ConnectionError):
        sink.flush()
    assert metrics.names().count("redis_error") == 3


class StubWarehouseWriter:
    def __init__(self, reports):
        self.reports = list(reports)
        self.batches = []
        self.description = "warehouse write to stub"

    def attempt(self, rows):
        self.batches.append(list(rows))
        report = self.reports.pop(0)
        if isinstance(report, Exception):
            raise report
        return report

    def close(self):
        pass


def change(i, direction="entered"):
    return {"user_key": key_of(f"u{i}"), "segment": "activated", "change": direction, "at": T0, "reason": "r",
            "version": T0}


def test_the_warehouse_sink_counts_new_and_duplicate_rows_and_dead_letters_refused_ones():
    counts, metrics = {}, Recorder()
    sink = WarehouseSink("postgresql://unused", SEGMENT_CHANGES, batch_size=3, metrics=metrics,
                         count=lambda n, k: counts.__setitem__(n, counts.get(n, 0) + k))
    sink.retry = NO_WAIT
    sink.writer = StubWarehouseWriter([psycopg.OperationalError("server closed the connection"),
                                       WriteReport(1, 1, [(2, "22021 invalid byte sequence")])])
    [sideways] = sink.add(change(9, "sideways"))
    assert sideways.rejection[0] == "invalid_field"
    assert sink.dead_letter(sideways)["stage"] == "warehouse.segment_changes"
    settled = sink.add(change(0)) + sink.add(change(1)) + sink.add(change(2))
    assert [r.rejection for r in settled] == [None, None, ("database_rejected", "22021 invalid byte sequence")]
    assert len(sink.writer.batches) == 2 and sink.writer.batches[0] == sink.writer.batches[1]
    assert counts == {"warehouse_dead_letter": 2, "warehouse_retries": 1, "rows_written_segment_changes": 1,
                      "rows_duplicate_segment_changes": 1}
    assert ("warehouse_error", "segment_changes") in metrics.calls
    assert "warehouse_write_seconds" in metrics.names()
