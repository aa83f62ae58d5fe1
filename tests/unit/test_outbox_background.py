"""BackgroundRelays: relay rounds in a thread, their reports and counter calls handed back to the caller."""
import threading
import time

import pytest

from onboardflow.transforms.outbox.background import BackgroundRelays
from onboardflow.transforms.outbox.kafka_target import KafkaOutboxTarget
from onboardflow.transforms.outbox.relay import RelayReport
from onboardflow.transforms.outbox.retry import RelayCancelled


class FakeRelay:
    """Counts its rounds; each round relays what was 'written' since the last one."""

    def __init__(self, name, background, written, fail_rounds=()):
        self.name, self.background, self.written = name, background, written
        self.rounds = 0
        self.threads = set()
        self.fail_rounds = set(fail_rounds)
        self.relayed = 0
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def relay(self):
        self.rounds += 1
        self.threads.add(threading.get_ident())
        self.background.count("warehouse_retries", 1)
        if self.rounds in self.fail_rounds:
            raise RuntimeError(f"{self.name}: round {self.rounds} gave up")
        moved = self.written[0] - self.relayed
        self.relayed = self.written[0]
        return RelayReport(entries=moved, records=moved)


def test_drain_runs_a_last_round_after_every_write_and_hands_back_every_report():
    background = BackgroundRelays()
    written = [0]
    relays = {"segment-changes": FakeRelay("segment-changes", background, written),
              "dead-letters": FakeRelay("dead-letters", background, written)}
    background.start(relays)
    seen = []
    for _ in range(20):
        written[0] += 5
        reports, calls = background.kick()
        seen += reports
    written[0] += 7  # written after the last kick: only drain's round can relay it
    reports, calls_after = background.drain()
    seen += reports
    for name, relay in relays.items():
        assert relay.relayed == written[0] == 107
        assert sum(r.entries for n, r in seen if n == name) == 107
        assert relay.threads and threading.get_ident() not in relay.threads
    assert 1 <= relays["segment-changes"].rounds <= 21


def test_counter_calls_come_back_to_the_caller_in_order():
    background = BackgroundRelays()
    written = [1]
    background.start({"a": FakeRelay("a", background, written)})
    _, calls = background.drain()
    assert calls == [("count", ("warehouse_retries", 1))]


def test_redis_errors_and_warehouse_retries_are_deferred_to_the_caller_too():
    background = BackgroundRelays()
    background.redis_error("outbox_relay")
    background.warehouse_retry("profile_snapshots")
    assert background.kick() == ([], [("redis_error", ("outbox_relay",)), ("warehouse_retry", ("profile_snapshots",))])


def test_a_round_that_gave_up_is_raised_by_the_next_kick_and_later_rounds_go_on():
    background = BackgroundRelays()
    written = [3]
    relay = FakeRelay("a", background, written, fail_rounds={1})
    background.start({"a": relay})
    background.kick()
    # Wait for the failed round without racing it: drain would raise it too.
    for _ in range(1000):
        if relay.rounds >= 1:
            break
        threading.Event().wait(0.005)
    with pytest.raises(RuntimeError, match="round 1 gave up"):
        for _ in range(1000):
            background.kick()
            threading.Event().wait(0.005)
    reports, _ = background.drain()
    assert relay.relayed == 3
    assert sum(r.entries for _, r in reports) <= 3


def test_drain_without_start_returns_nothing():
    assert BackgroundRelays().drain() == ([], [])


class StuckRelay(FakeRelay):
    """A round that cannot finish (a deleted topic, Kafka down) until it is cancelled."""

    def __init__(self, *args):
        super().__init__(*args)
        self.stop = threading.Event()
        self.started = threading.Event()

    def cancel(self):
        super().cancel()
        self.stop.set()

    def relay(self):
        self.rounds += 1
        self.started.set()
        self.stop.wait(60)
        raise RelayCancelled("cancelled")


def test_drain_gives_up_on_a_round_that_cannot_finish_and_the_thread_ends():
    background = BackgroundRelays()
    relay = StuckRelay("a", background, [1])
    background.start({"a": relay})
    background.kick()
    assert relay.started.wait(5)
    thread = background._thread
    reports, calls = background.drain(timeout_s=0.2)
    assert relay.cancelled
    assert reports == []  # the cancelled round reports nothing and raises nothing
    thread.join(5)
    assert not thread.is_alive()


def test_a_missing_topic_is_polled_not_spun_and_cancel_ends_the_wait():
    class NoPartitions:
        calls = 0

        def partitions_for(self, topic):
            NoPartitions.calls += 1
            return None

    target = KafkaOutboxTarget("127.0.0.1:1", "gone")
    target._producer = NoPartitions()
    threading.Timer(0.5, target.cancel).start()
    started = time.monotonic()
    with pytest.raises(RelayCancelled):
        target.partitions()
    elapsed = time.monotonic() - started
    assert elapsed >= 0.4
    # One request per PARTITIONS_POLL_S (0.2 s), not thousands, however late the cancel came.
    assert 2 <= NoPartitions.calls <= elapsed / 0.2 + 2
