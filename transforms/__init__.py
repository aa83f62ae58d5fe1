"""The engine-free core: what happens to an event, and where it is written (no Beam or Flink import).

Stages (decode, normalize, anonymize, profile, score, sessionize, enrich,
segment, online_models, rescore) and the I/O they end in (kafka/, sinks/,
profile_store/, warehouse/, outbox/, metrics). Engines drive them through thin
shells (pipelines/beam/); docs/architecture.md "Code layout".
"""
