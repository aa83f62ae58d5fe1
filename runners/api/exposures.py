"""``ExposureLog``: the experiment variants the decisions route served, batched to the warehouse off the request path.

In: ``record(user_key, {experiment: variant}, served_at_ms)`` from the route,
which returns at once (an ``asyncio.Queue.put_nowait``). Out: rows of
``experiment_exposures`` (V009; ``EXPERIMENT_EXPOSURES``, the warehouse
writer's idempotent COPY batches, earliest ``served_at`` kept), written by
one background task: a batch goes when it holds ``batch_rows`` exposures or
``flush_ms`` after its first one, through one try of the writer in a worker
thread. Nothing here can block or fail a request:

* a full queue (``queue_rows``: the warehouse is slow or away) drops the new
  exposure, counted as ``queue_full``;
* a batch the warehouse does not take (down, refusing, schema not migrated)
  is dropped, counted as ``warehouse_unavailable``; a row it refuses for its
  data, as ``rejected``.

Dropped exposures are forgotten, so the user's next decision records them
again (its ``served_at`` is then later than the first serving; docs/experiments.md
says what that does to the report). Pairs written, or waiting in the queue,
are remembered (the newest ``remember`` of them) and not queued again: a user
who asks for a decision on every page view costs one row per experiment.
Counters: ``onboardflow_api_exposures_written``,
``onboardflow_api_exposures_dropped{reason}`` (metrics.py). No raw id is
ever held: ``user_key`` is the pseudonym.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Mapping
from typing import Optional

from ...transforms.warehouse.rows import EXPERIMENT_EXPOSURES
from ...transforms.warehouse.writer import WarehouseWriter
from .metrics import ApiMetrics

_LOG = logging.getLogger(__name__)
QUEUE_FULL, WAREHOUSE_UNAVAILABLE, REJECTED = "queue_full", "warehouse_unavailable", "rejected"
DROP_REASONS = (QUEUE_FULL, WAREHOUSE_UNAVAILABLE, REJECTED)

Exposure = tuple[str, str, str, int]  # (experiment, user_key, variant, served_at epoch ms)


class ExposureLog:
    """Exposures queued by the route and written in batches by a background task (module docstring).

    ``writer`` is the warehouse writer of ``experiment_exposures``
    (``warehouse_writer``): ``attempt(rows)`` makes one try and returns a
    ``WriteReport``, any exception counts the batch as dropped; ``close()``
    at ``stop()``.
    """

    def __init__(self, writer: WarehouseWriter, metrics: ApiMetrics, *, batch_rows: int = 500,
                 flush_ms: float = 200.0, queue_rows: int = 20_000, remember: int = 200_000) -> None:
        if batch_rows < 1 or queue_rows < 1 or flush_ms <= 0:
            raise ValueError("batch_rows and queue_rows must be positive and flush_ms above 0")
        self._writer = writer
        self._metrics = metrics
        self.batch_rows, self.flush_s, self.remember = batch_rows, flush_ms / 1000.0, remember
        self._queue: asyncio.Queue[Exposure] = asyncio.Queue(maxsize=queue_rows)
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._batch: list[Exposure] = []  # gathered, not yet handed to a flush
        self._in_flight: Optional[asyncio.Future] = None
        self._task: Optional[asyncio.Task] = None
        self._closing = False

    def record(self, user_key: str, variants: Mapping[str, str], served_at_ms: int) -> None:
        """Queue one exposure a variant (never blocks, never raises)."""
        for experiment, variant in variants.items():
            pair = (experiment, user_key)
            if pair in self._seen or self._closing:
                continue
            try:
                self._queue.put_nowait((experiment, user_key, variant, served_at_ms))
            except asyncio.QueueFull:
                self._metrics.exposures_dropped(QUEUE_FULL, 1)
                continue
            self._seen[pair] = None
            if len(self._seen) > self.remember:
                self._seen.popitem(last=False)

    @property
    def pending(self) -> int:
        """Exposures recorded and not yet handed to the warehouse."""
        return self._queue.qsize() + len(self._batch)

    def start(self) -> None:
        """Start the background writer on the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="onboardflow-exposures")

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the writer, let a write in progress end, then write what is left (within ``timeout_s``
        each; what does not make it counts as dropped) and close the connection."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._in_flight is not None and not self._in_flight.done():
            await asyncio.wait([self._in_flight], timeout=timeout_s)
        batch, self._batch = self._batch, []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        try:
            if batch:
                await asyncio.wait_for(self.flush(batch), timeout_s)
        except asyncio.TimeoutError:
            self._metrics.exposures_dropped(WAREHOUSE_UNAVAILABLE, len(batch))
        else:
            await asyncio.to_thread(self._writer.close)

    async def _run(self) -> None:
        """Until stopped: wait for an exposure, gather up to ``batch_rows`` for at most ``flush_ms``, write."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            self._batch.append(await self._queue.get())
            deadline = loop.time() + self.flush_s
            while len(self._batch) < self.batch_rows:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    self._batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch, self._batch = self._batch, []
            # Shielded: stopping cancels this loop, never a write half done (stop() waits for it).
            self._in_flight = asyncio.ensure_future(self.flush(batch))
            await asyncio.shield(self._in_flight)

    async def flush(self, batch: list[Exposure]) -> None:
        """Write one batch in a worker thread; count what was written or dropped."""
        rows = [EXPERIMENT_EXPOSURES.to_row({"experiment": e, "user_key": k, "variant": v, "served_at": t})
                for e, k, v, t in batch]
        try:
            report = await asyncio.to_thread(self._writer.attempt, rows)
        except Exception as exc:  # noqa: BLE001 - whatever the warehouse raises, the API carries on
            _LOG.warning("experiment exposures: %d dropped, the warehouse did not take them (%s)",
                         len(batch), type(exc).__name__)
            self._metrics.exposures_dropped(WAREHOUSE_UNAVAILABLE, len(batch))
            self._forget(batch)
            return
        self._metrics.exposures_written(report.inserted)
        if report.rejected:
            self._metrics.exposures_dropped(REJECTED, len(report.rejected))
            self._forget([batch[index] for index, _ in report.rejected])

    def _forget(self, batch: list[Exposure]) -> None:
        for experiment, user_key, _, _ in batch:
            self._seen.pop((experiment, user_key), None)


def warehouse_writer(dsn: str, schema: str, connect_timeout_s: int = 3) -> WarehouseWriter:
    """The writer of ``experiment_exposures``; ``ExposureLog`` makes one ``attempt`` a batch (no retry loop:
    a failed batch is dropped and counted, and the users' next decisions record their exposures again)."""
    return WarehouseWriter(dsn, EXPERIMENT_EXPOSURES, schema, max_attempts=1, connect_timeout_s=connect_timeout_s)
