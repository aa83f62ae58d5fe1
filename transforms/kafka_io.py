"""Kafka I/O for Beam Python on kafka-python (no Java expansion service).

(Being written: see the foundation issue, section 5.)
"""
from typing import NamedTuple, Optional


class KafkaRecord(NamedTuple):
    """One Kafka record as read from a topic-partition, value still undecoded."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: Optional[bytes]
    value: Optional[bytes]
