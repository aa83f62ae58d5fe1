"""The API's experiment exposure log (runners/api/exposures.py), without services.

It is driven with a writer of the test's own: batches by size
and by time, one row per experiment and user however often they ask, a full
queue and a warehouse that raises never reach the caller (they are counted),
and what is queued at shutdown is written.
"""
from __future__ import annotations

import asyncio
import datetime as dt

from onboardflow.runners.api.exposures import ExposureLog
from onboardflow.runners.api.metrics import ApiMetrics
from onboardflow.transforms.warehouse.writer import WriteReport

NOW = 1_796_500_000_000  # 2026-12-05


class Writer:
    """A stand-in for the warehouse writer: records batches; ``fail`` makes attempts raise."""

    def __init__(self, fail: bool = False, reject: tuple[int, ...] = ()):
        self.batches: list[list[tuple]] = []
        self.fail, self.reject, self.closed = fail, reject, False

    def attempt(self, rows):
        if self.fail:
            raise ConnectionError("warehouse down")
        self.batches.append(list(rows))
        rejected = [(i, "23514 check") for i in self.reject if i < len(rows)]
        return WriteReport(len(rows) - len(rejected), 0, rejected)

    def close(self):
        self.closed = True


def counter(metrics: ApiMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def run(coroutine):
    return asyncio.run(coroutine)


def test_exposures_are_batched_by_time_and_written_once_per_user_and_experiment():
    async def scenario():
        writer, metrics = Writer(), ApiMetrics()
        log = ExposureLog(writer, metrics, flush_ms=50)
        log.start()
        for _ in range(5):  # the same user asking five times
            log.record("k1", {"a": "control", "b": "checklist"}, NOW)
        log.record("k2", {"a": "checklist"}, NOW + 1)
        await asyncio.sleep(0.3)
        await log.stop()
        return writer, metrics

    writer, metrics = run(scenario())
    assert len(writer.batches) == 1 and writer.closed
    at = dt.datetime.fromtimestamp(NOW / 1000, dt.timezone.utc)
    assert sorted(writer.batches[0]) == sorted([("a", "k1", "control", at), ("b", "k1", "checklist", at),
                                                ("a", "k2", "checklist", at + dt.timedelta(milliseconds=1))])
    assert counter(metrics, "onboardflow_api_exposures_written_total") == 3


def test_a_full_batch_goes_without_waiting_for_the_flush_interval():
    async def scenario():
        writer = Writer()
        log = ExposureLog(writer, ApiMetrics(), batch_rows=10, flush_ms=60_000)
        log.start()
        for i in range(25):
            log.record(f"k{i}", {"a": "control"}, NOW)
        await asyncio.sleep(0.2)
        sizes = [len(b) for b in writer.batches]
        await log.stop()
        return sizes, [len(b) for b in writer.batches]

    before_stop, after_stop = run(scenario())
    assert before_stop == [10, 10]
    assert after_stop == [10, 10, 5]  # the rest is written at shutdown


def test_a_full_queue_drops_and_counts_without_blocking_the_caller():
    async def scenario():
        metrics = ApiMetrics()
        log = ExposureLog(Writer(), metrics, queue_rows=3)  # not started: nothing drains the queue
        for i in range(5):
            log.record(f"k{i}", {"a": "control"}, NOW)
        return log.pending, metrics

    pending, metrics = run(scenario())
    assert pending == 3
    assert counter(metrics, "onboardflow_api_exposures_dropped_total", reason="queue_full") == 2


def test_a_warehouse_outage_drops_counted_batches_and_the_next_decision_records_them_again():
    async def scenario():
        writer, metrics = Writer(fail=True), ApiMetrics()
        log = ExposureLog(writer, metrics, flush_ms=20)
        log.start()
        log.record("k1", {"a": "control"}, NOW)
        await asyncio.sleep(0.15)
        dropped = counter(metrics, "onboardflow_api_exposures_dropped_total", reason="warehouse_unavailable")
        writer.fail = False
        log.record("k1", {"a": "control"}, NOW + 5000)  # the user's next decision
        await asyncio.sleep(0.15)
        await log.stop()
        return dropped, writer.batches

    dropped, batches = run(scenario())
    assert dropped == 1
    assert [[(e, k, v) for e, k, v, _ in b] for b in batches] == [[("a", "k1", "control")]]


def test_rows_the_warehouse_rejects_are_counted_apart():
    async def scenario():
        metrics = ApiMetrics()
        log = ExposureLog(Writer(reject=(0,)), metrics, flush_ms=20)
        log.start()
        log.record("k1", {"a": "control", "b": "control"}, NOW)
        await asyncio.sleep(0.15)
        await log.stop()
        return metrics

    metrics = run(scenario())
    assert counter(metrics, "onboardflow_api_exposures_dropped_total", reason="rejected") == 1
    assert counter(metrics, "onboardflow_api_exposures_written_total") == 1
