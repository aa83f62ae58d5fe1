"""Outboxes in Redis, relayed exactly once to Kafka and the warehouse (no engine).

The history of a profile (its segment changes, its snapshots) must follow
exactly what Redis accepted, so the profile upsert script
(``transforms/profile_store/writer.py``) appends it to a Redis stream in the
same script as the write it describes; dead letters of the Kafka source are
recorded once per source coordinate the same way. A relay moves each stream
to its sinks. Reasoning, guarantees and the tests that hold them:
docs/reliability.md.

Streams (prefix ``obf`` by default)::

    obf:outbox:segment-changes     u, v, at, old, new [, why]: one entry per
                                   applied write whose segments changed (and
                                   per member a sweep removed)
    obf:outbox:profile-snapshots   u, v, f: one entry per applied write (f:
                                   the hash fields as written)
    obf:outbox:dead-letters        id, k, hk, v: one entry per source
                                   coordinate ever dead-lettered
    obf:dead-letters:ids           set of the dead-letter ids recorded

Modules: ``keys`` (names, record ids), ``dead_letters`` (recording),
``kafka_target`` (the Kafka side), ``relay`` (draining a stream),
``converters`` (entries -> records and rows), ``retry`` (outages ridden
out), ``settings`` (one deployment's relays).
"""
