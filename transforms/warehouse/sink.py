"""``WarehouseSink``: the warehouse writer as a ``BatchingSink`` for one table (no engine).

In: elements of one ``TableSpec`` (events, profiles, segment changes, drift
events, dead letters). Out: dead letters only (stage ``warehouse.<table>``):
the ``RowError`` reasons of the table's row function (``missing_event_id``,
``invalid_field``, ...) and ``database_rejected`` for rows the database
refused. Counters ``rows_written_<table>``, ``rows_duplicate_<table>``,
``warehouse_dead_letter``, ``warehouse_retries``; the ``PipelineMetrics``
facade gets write latency and errors per table. The Beam shells:
pipelines/beam/warehouse.py.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import psycopg

from ..sinks.base import BatchingSink, Count, Rejected, SinkBatch, SinkRecord
from ..sinks.retry import DEFAULT_MAX_ATTEMPTS
from .rows import TableSpec
from .schema import DEFAULT_SCHEMA
from .writer import TRANSIENT_ERRORS, WarehouseWriter

DEFAULT_BATCH_SIZE = 1000
_LOG = logging.getLogger(__name__)


class WarehouseSink(BatchingSink):
    """Idempotent batches of one table's rows; see the module docstring."""

    dead_letter_counter = "warehouse_dead_letter"
    retry_counter = "warehouse_retries"
    transient_errors = TRANSIENT_ERRORS
    log = _LOG

    def __init__(self, dsn: str, spec: TableSpec, schema: str = DEFAULT_SCHEMA,
                 batch_size: int = DEFAULT_BATCH_SIZE, max_attempts: int = DEFAULT_MAX_ATTEMPTS, *,
                 metrics: Any = None, count: Optional[Count] = None) -> None:
        self.spec = spec
        self.writer = WarehouseWriter(dsn, spec, schema, max_attempts=max_attempts)
        super().__init__(batch_size, self.writer.retry, count)
        self.stage = spec.stage
        self.description = self.writer.description
        self._metrics = metrics

    def prepare(self, element: Any) -> tuple:
        return self.spec.to_row(element)  # RowError: a dead letter

    def write(self, batch: SinkBatch) -> list[Rejected]:
        report = self.writer.attempt(batch.values)
        self.count(f"rows_written_{self.spec.table}", report.inserted)
        self.count(f"rows_duplicate_{self.spec.table}", report.duplicates)
        return [Rejected(batch.records[index], "database_rejected", error) for index, error in report.rejected]

    def attempt_failed(self, error: BaseException) -> None:
        if self._metrics is not None:
            self._metrics.warehouse_error(self.spec.table)

    def flushed(self, records: list[SinkRecord], seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.warehouse_write_seconds(self.spec.table, seconds)

    def open(self) -> None:
        if self._metrics is not None:
            self._metrics.setup()
        try:
            self.writer.connect()
        except psycopg.OperationalError:
            pass  # the first write retries the connection with backoff

    def close(self) -> None:
        self.writer.close()
