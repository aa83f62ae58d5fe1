"""Sinks: one batching base that the Redis, warehouse and Kafka writers configure (no engine).

``base.BatchingSink`` buffers records and flushes them at a size or on demand;
``retry.RetryPolicy`` is the one retry of transient errors every writer uses.
The Beam driver is ``pipelines/beam/sinks.py``. Why the shape:
docs/decisions.md (## transforms/sinks).
"""
