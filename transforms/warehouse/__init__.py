"""The PostgreSQL warehouse: history of events, profiles, segment changes, drift and dead letters (no engine).

Redis holds the latest profile per user for online reads; the warehouse keeps
everything that happened, for analytics, audits and model training. Modules:
``schema`` (the PostgreSQL schema name), ``migrations`` (versioned DDL:
discover, apply, status), ``rows`` (element -> row per table, ``TableSpec``),
``writer`` (idempotent COPY batches), ``sink`` (the writer as a
``BatchingSink``), ``accounts`` (the account reference table). The Beam
shells: ``pipelines/beam/warehouse.py``.
"""
