"""The batching sink base and the retry policy, with a fake sink (no services, no engine)."""
import logging

import pytest

from onboardflow.transforms.sinks.base import BatchingSink, RecordRejected, Rejected, SinkRecord
from onboardflow.transforms.sinks.retry import RetryPolicy

NO_WAIT = RetryPolicy(max_attempts=3, budget_s=0, base_s=0)


class Flaky(ConnectionError):
    """A transient error of the fake store."""


class FakeSink(BatchingSink):
    """Stores ints; refuses negative ones at prepare, odd ones at write; fails the first ``fail`` attempts."""

    stage = "fake"
    dead_letter_counter = "fake_dead_letter"
    retry_counter = "fake_retries"
    transient_errors = (Flaky,)

    def __init__(self, batch_size=3, fail=0, settle_before_failing=0, **kwargs):
        self.counts = {}
        super().__init__(batch_size, kwargs.pop("retry", NO_WAIT), count=self._count, **kwargs)
        self.batches = []
        self.stored = []
        self._fail = fail
        self._settle_before_failing = settle_before_failing

    def _count(self, name, n):
        self.counts[name] = self.counts.get(name, 0) + n

    def prepare(self, element):
        if not isinstance(element, int) or element < 0:
            raise RecordRejected("not_a_count", "element must be a non-negative int")
        return element

    def write(self, batch):
        self.batches.append((batch.id, batch.values))
        if self._fail:
            self._fail -= 1
            for record in batch.records[:self._settle_before_failing]:
                record.result = ("stored", record.value)  # settled before the connection broke
                self.stored.append(record.value)
            raise Flaky("connection lost")
        rejected = []
        for record in batch:
            if record.value % 2:
                rejected.append(Rejected(record, "odd", "odd values are refused"))
            else:
                record.result = ("stored", record.value)
                self.stored.append(record.value)
        return rejected


def results(records):
    return [r.result for r in records]


def test_records_are_buffered_until_the_batch_is_full_then_written_in_one_batch():
    sink = FakeSink(batch_size=3)
    assert sink.add(0) == [] and sink.add(2) == []
    settled = sink.add(4)
    assert results(settled) == [("stored", 0), ("stored", 2), ("stored", 4)]
    assert [values for _, values in sink.batches] == [[0, 2, 4]]


def test_flush_on_demand_writes_what_is_buffered_and_an_empty_flush_writes_nothing():
    sink = FakeSink(batch_size=100)
    sink.add(2)
    sink.add(6)
    assert results(sink.flush()) == [("stored", 2), ("stored", 6)]
    assert sink.flush() == []
    assert len(sink.batches) == 1


def test_records_write_rejects_come_back_as_dead_letters_with_their_reason_and_context():
    sink = FakeSink(batch_size=10)
    for n in (2, 3, 4):
        sink.add(n, context=("ts", n))
    settled = sink.flush()
    [odd] = [r for r in settled if r.rejection is not None]
    assert odd.rejection == ("odd", "odd values are refused") and odd.context == ("ts", 3)
    assert odd.result is None
    letter = sink.dead_letter(odd)
    assert (letter["stage"], letter["reason"], letter["payload"]) == ("fake", "odd", 3)
    assert sink.stored == [2, 4]
    assert sink.counts["fake_dead_letter"] == 1


def test_an_element_refused_at_prepare_is_settled_at_once_and_never_written():
    sink = FakeSink(batch_size=1)
    [refused] = sink.add(-5, context="c")
    assert refused.rejection == ("not_a_count", "element must be a non-negative int")
    assert sink.dead_letter(refused)["payload"] == -5
    assert sink.batches == []


def test_a_transient_error_is_retried_with_the_same_batch_id_and_only_the_unsettled_records():
    sink = FakeSink(batch_size=10, fail=1, settle_before_failing=1)
    for n in (2, 4, 6):
        sink.add(n)
    settled = sink.flush()
    (first_id, first), (second_id, second) = sink.batches
    assert first == [2, 4, 6] and second == [4, 6]  # 2 was settled by the failed attempt
    assert first_id == second_id
    assert results(settled) == [("stored", 2), ("stored", 4), ("stored", 6)]
    assert sink.stored == [2, 4, 6]  # each value once
    assert sink.retries == 1 and sink.counts["fake_retries"] == 1


def test_a_flush_that_keeps_failing_raises_once_the_policy_gives_up():
    sink = FakeSink(batch_size=10, fail=5)
    sink.add(2)
    with pytest.raises(Flaky):
        sink.flush()
    assert len(sink.batches) == 3  # max_attempts
    assert sink.flush() == []  # the failed records are not kept: the engine retries the input


def test_a_non_transient_error_is_raised_without_retrying():
    class Broken(FakeSink):
        def write(self, batch):
            self.batches.append(batch.values)
            raise RuntimeError("a bug, not an outage")

    sink = Broken(batch_size=10)
    sink.add(2)
    with pytest.raises(RuntimeError):
        sink.flush()
    assert len(sink.batches) == 1 and sink.retries == 0


class Newest(FakeSink):
    """Keeps the newest (largest) value per key ``value // 10``."""

    def compact_key(self, value):
        return value // 10

    def newest(self, held, new):
        return held if held.value >= new.value else new

    def superseded(self, record):
        return ("superseded", record.value)


def test_compaction_keeps_the_newest_record_per_key_and_settles_the_other_at_once():
    sink = Newest(batch_size=10)
    assert results(sink.add(12)) == []
    assert results(sink.add(14)) == [("superseded", 12)]  # newer: replaces the held one
    assert results(sink.add(10)) == [("superseded", 10)]  # older than the held one: dropped
    assert results(sink.add(20)) == []
    assert results(sink.flush()) == [("stored", 14), ("stored", 20)]


def test_the_batch_size_counts_distinct_keys_under_compaction():
    sink = Newest(batch_size=2)
    assert [r.result for r in sink.add(12)] == []
    assert [r.result for r in sink.add(14)] == [("superseded", 12)]
    assert [r.result for r in sink.add(22)] == [("stored", 14), ("stored", 22)]


def test_discard_forgets_the_buffer():
    sink = FakeSink(batch_size=10)
    sink.add(2)
    sink.discard()
    assert sink.flush() == [] and sink.batches == []


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ValueError):
        FakeSink(batch_size=0)


def test_a_sink_without_write_says_so():
    class Nothing(BatchingSink):
        pass

    sink = Nothing(1)
    with pytest.raises(NotImplementedError, match="Nothing must implement write"):
        sink.add("x")


def test_sink_records_show_their_outcome_not_their_value():
    record = SinkRecord({"email": "alice@example.com"}, None)
    assert "alice" not in repr(record)


# --------------------------------------------------------------------------- RetryPolicy


def test_the_policy_retries_until_both_the_attempts_and_the_budget_are_spent(caplog):
    calls, errors, retries = [], [], []

    def attempt():
        calls.append(1)
        raise Flaky("server at 10.0.0.1 went away")

    policy = RetryPolicy(max_attempts=4, budget_s=0, base_s=0)
    with caplog.at_level(logging.WARNING), pytest.raises(Flaky):
        policy.run(attempt, transient=(Flaky,), what="fake write", on_error=errors.append, on_retry=retries.append)
    assert len(calls) == 4 and len(errors) == 4 and len(retries) == 3
    assert "fake write failed (attempt 1" in caplog.text and "fake write gave up after 4 attempts" in caplog.text


def test_the_policy_returns_the_first_success_and_takes_a_predicate():
    outcomes = iter([Flaky("x"), Flaky("y"), "done"])

    def attempt():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert RetryPolicy(base_s=0).run(attempt, transient=lambda e: isinstance(e, Flaky), what="w") == "done"


def test_waits_double_up_to_the_cap_and_jitter_stays_below_them():
    exact = RetryPolicy(base_s=0.1, cap_s=0.5, jitter=False)
    assert [exact.delay(n) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    jittered = RetryPolicy(base_s=0.1, cap_s=0.5)
    assert all(0 <= jittered.delay(n) <= min(0.5, 0.1 * 2 ** (n - 1)) for n in range(1, 8) for _ in range(20))


def test_a_log_without_detail_names_only_the_error_type(caplog):
    policy = RetryPolicy(max_attempts=1, budget_s=0, log_detail=False)
    with caplog.at_level(logging.WARNING), pytest.raises(Flaky):
        policy.run(lambda: (_ for _ in ()).throw(Flaky("secret-host:9092")), transient=(Flaky,), what="relay")
    assert "Flaky" in caplog.text and "secret-host" not in caplog.text
