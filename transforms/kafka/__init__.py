"""Kafka clients of the engine-free core (kafka-python; no Beam, no PyFlink).

* ``records``: what is read (``KafkaRecord``), which range of a partition
  (``KafkaPartition``), and the event time of a decoded record.
* ``offsets``: where a read starts (``StartPosition``, ``resolve_start_offset``).
* ``watermarks``: the per-partition event-time watermark policy and its
  alignment across the partitions of one read.
* ``consumer``: consumer settings, the consumers of one reader, partition
  discovery (``resolve_partitions``) and offset commits.
* ``sink``: the at-least-once ``KafkaSink`` (a ``BatchingSink``) and its producer settings.

The Beam source and sink that drive them are pipelines/beam/kafka_source.py
(with kafka_sdf.py) and pipelines/beam/kafka_sink.py; the reasoning is in docs/local-runner.md
and docs/decisions.md (``transforms/kafka``).
"""
