"""The warehouse sinks: one transform per table, each a ``WarehouseSink`` driven by the sink driver.

In: the table's elements. Out: a PCollection of dead letters
``{"stage": "warehouse.<table>", "reason", "detail", "event_id", "payload"}``
for elements that cannot become a row or that the database refused. Writes
are idempotent (replays insert nothing new); retries, counters and the row
mappings: transforms/warehouse/sink.py and transforms/warehouse/rows.py.
"""
from __future__ import annotations

import functools
from typing import Optional

from ...transforms.metrics import PipelineMetrics
from ...transforms.sinks.retry import DEFAULT_MAX_ATTEMPTS
from ...transforms.warehouse import rows
from ...transforms.warehouse.rows import TableSpec
from ...transforms.warehouse.schema import DEFAULT_SCHEMA, check_schema
from ...transforms.warehouse.sink import DEFAULT_BATCH_SIZE, WarehouseSink
from .metrics import beam_pipeline_metrics
from .sinks import DEAD_LETTER, WriteToSink


class _WriteToWarehouse(WriteToSink):
    """Common body of the warehouse sinks; subclasses only name their ``TableSpec``."""

    SPEC: TableSpec
    DEAD_LETTER = DEAD_LETTER

    def __init__(
        self,
        dsn: str,
        schema: str = DEFAULT_SCHEMA,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        label: Optional[str] = None,
        metrics: Optional[PipelineMetrics] = None,
    ) -> None:
        check_schema(schema)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        super().__init__(functools.partial(
            WarehouseSink, dsn, self.SPEC, schema, batch_size, max_attempts,
            metrics=metrics or beam_pipeline_metrics(prometheus=False),
        ), step=f"CopyInto_{self.SPEC.table}", label=label)

    def expand(self, elements):
        return super().expand(elements)[DEAD_LETTER]


class WriteEventsToWarehouse(_WriteToWarehouse):
    """Anonymized events -> ``events`` (day partitions created on demand).

    Dead letters for events without event_id / event_type / occurred_at, with
    mistyped fields, or refused by the database. Replays insert nothing new
    (key: event_id, occurred_at). Counters ``rows_written_events``,
    ``rows_duplicate_events``.
    """

    SPEC = rows.EVENTS


class WriteLateEvents(_WriteToWarehouse):
    """Anonymized events that came too late for profiles -> ``late_events`` (not partitioned).

    Same row mapping, key and dead letters as ``WriteEventsToWarehouse`` (stage
    ``warehouse.late_events``).
    """

    SPEC = rows.LATE_EVENTS


class WriteDriftEvents(_WriteToWarehouse):
    """Drift event dicts -> ``drift_events`` (key: drift_id, so replays add nothing).

    Dead letters for events with a missing or mistyped field.
    """

    SPEC = rows.DRIFT_EVENTS


class WriteDeadLetterMetadata(_WriteToWarehouse):
    """Dead letters (Kafka-record or in-pipeline shape) -> ``dead_letters``, metadata only.

    The raw key and value are never stored: the value becomes payload_size and
    payload_sha256. Missing metadata gets defaults (topic '', partition and
    offset -1, stage and reason 'unknown') rather than a rejection. Dead
    letters of its own: letters that are not mappings or that the database refuses.
    """

    SPEC = rows.DEAD_LETTERS
