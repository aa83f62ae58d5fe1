"""One deployment's relays: ``RelaySettings`` in, one ``OutboxRelay`` per stream out.

The pipeline (``RelayOutboxes``) and the ``onboardflow outbox`` command build
their relays here, so both move the same streams to the same sinks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import redis

from ..connections import redis_client
from ..warehouse.rows import PROFILE_SNAPSHOTS as SNAPSHOT_TABLE
from ..warehouse.rows import SEGMENT_CHANGES as CHANGE_TABLE
from ..warehouse.writer import WarehouseWriter
from .converters import SegmentChangeConverter, dead_letter_converter, profile_snapshot_converter
from .kafka_target import KafkaOutboxTarget
from .keys import DEAD_LETTERS, PROFILE_SNAPSHOTS, SEGMENT_CHANGES, OutboxKeys
from .relay import DEFAULT_BATCH_SIZE, OutboxRelay

if TYPE_CHECKING:
    from ..segment import RuleSet


@dataclass(frozen=True)
class RelaySettings:
    """Where the outboxes of one deployment go (one object for the pipeline and the CLI).

    A topic or ``warehouse_dsn`` of None leaves that sink out (its entries are
    still moved, so the stream does not grow). ``rules``: the compiled rule set
    that names the segments (the pipeline's own; None: the packaged rules); it
    pickles as its text.
    """

    redis_url: str
    key_prefix: str
    bootstrap_servers: Optional[str] = None
    segment_changes_topic: Optional[str] = None
    dead_letter_topic: Optional[str] = None
    warehouse_dsn: Optional[str] = None
    warehouse_schema: str = "onboardflow"
    rules: Optional["RuleSet"] = None
    registry_url: Optional[str] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    #: how long a sink outage is ridden out before the relay raises (the entries stay)
    retry_s: float = 300.0


def make_relays(settings: RelaySettings, client: Optional[redis.Redis] = None,
                on_warehouse_retry: Optional[Callable[[str], None]] = None,
                count: Optional[Callable[[str, int], None]] = None,
                on_redis_error: Optional[Callable[[str], None]] = None) -> dict[str, OutboxRelay]:
    """One ``OutboxRelay`` per outbox stream of ``settings`` (names: ``keys.STREAMS``).

    ``on_warehouse_retry(table)`` is called on every failed warehouse write
    attempt (metrics); ``count(name, n)`` receives the writers' retry counter
    (``warehouse_retries``); ``on_redis_error(operation)`` every relay attempt
    Redis failed (``PipelineMetrics.redis_error``).
    """
    from ...schemas import SEGMENT_CHANGES_SUBJECT, load_schema
    from ...schemas.schema_registry import registry_from_url
    from ...schemas.wire import AvroSerializer
    from ..segment import DEFAULT_RULES_PATH, RuleSet

    client = client or redis_client(settings.redis_url, socket_timeout=30, socket_connect_timeout=10)
    keys = OutboxKeys(settings.key_prefix)

    def kafka(topic: Optional[str]) -> Optional[KafkaOutboxTarget]:
        return KafkaOutboxTarget(settings.bootstrap_servers, topic) if topic and settings.bootstrap_servers else None

    def warehouse(spec) -> Any:
        if not settings.warehouse_dsn:
            return None
        # Attempts sized so a database outage of ``retry_s`` is ridden out (backoff capped at 5 s).
        return WarehouseWriter(settings.warehouse_dsn, spec, settings.warehouse_schema,
                               max_attempts=max(8, int(settings.retry_s / 2.5)), on_retry=on_warehouse_retry,
                               count=count)

    serializer = AvroSerializer(registry_from_url(settings.registry_url), SEGMENT_CHANGES_SUBJECT,
                                load_schema("segment_change"))
    rules = settings.rules if settings.rules is not None else RuleSet.load(DEFAULT_RULES_PATH)
    common = dict(batch_size=settings.batch_size, redis_retry_s=settings.retry_s, on_redis_error=on_redis_error)
    return {
        SEGMENT_CHANGES: OutboxRelay(client, keys, SEGMENT_CHANGES,
                                     SegmentChangeConverter(rules, serializer.serialize),
                                     kafka=kafka(settings.segment_changes_topic),
                                     warehouse=warehouse(CHANGE_TABLE), **common),
        PROFILE_SNAPSHOTS: OutboxRelay(client, keys, PROFILE_SNAPSHOTS, profile_snapshot_converter,
                                       warehouse=warehouse(SNAPSHOT_TABLE), **common),
        DEAD_LETTERS: OutboxRelay(client, keys, DEAD_LETTERS, dead_letter_converter,
                                  kafka=kafka(settings.dead_letter_topic), **common),
    }
