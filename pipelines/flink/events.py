"""``DecodeAndAnonymize``: Kafka records in, anonymized events keyed for the user stage out.

In: ``(topic, partition, offset, kafka_timestamp_ms, key, value)`` tuples
from the Kafka source (pipelines/flink/job.py). Out: ``(kind, key,
payload)`` for ``UserStage`` (pipelines/flink/users.py): ``EVENT`` or
``ANALYTICS`` with the anonymized event and its ``user_key``, or ``DEAD`` with
the dead-letter *row* (metadata and payload hash, ``rows.dead_letter_row``)
keyed by ``dlq:<topic>:<partition>``; events without either consent are
dropped here, counted ``consent_filtered``. In streaming runs a heartbeat
source also sends ``HEARTBEAT_TICK`` once a second: after
``--kafka_idle_timeout`` without a record it becomes ``(HEARTBEAT, "", now)``,
whose timestamp moves the watermark to the wall clock minus the
out-of-orderness, as the Beam source does for idle partitions (the job drops
it right after the watermark).

The same core as the Beam pipeline, in the same order:
``OnboardingEventDecoder.decode`` (dead letters with the same reasons,
stage ``decode``), ``normalize_event``, ``EventAnonymizer`` (the consent gate;
its dead letters, stage ``anonymize``). A record that fails to decode is
also recorded, raw bytes and all, in the dead-letter outbox in Redis before
this function returns (one round trip, once per source coordinate: a replay
records nothing); the user stage's flush relays it to the DLQ topic. So the
raw bytes never enter Flink's state or network. Counters as in Beam:
``events_read``, ``events``, ``dead_letters``, ``events_without_key``,
``consent_filtered``, ``anonymized_personalization``,
``anonymized_analytics_only``, ``anonymize_dead_letter``,
``pii_properties_stripped``, ``clock_skew_clamped``.
"""
from __future__ import annotations

import logging
import time

from pyflink.datastream import ProcessFunction, RuntimeContext

from ...transforms import anonymize as core
from ...transforms.anonymize import EventAnonymizer, Pseudonymizer
from ...transforms.connections import redis_client
from ...transforms.decode import OnboardingEventDecoder
from ...transforms.kafka.records import KafkaRecord, event_time_ms
from ...transforms.normalize import normalize_event
from ...transforms.outbox.dead_letters import DeadLetterOutbox, dead_letter_id
from ...transforms.outbox.keys import OutboxKeys
from ..configuration import resolve_secret
from .metrics import Counters, flink_pipeline_metrics
from .settings import JobSettings
from .store import dead_letter_row
from .users import ANALYTICS, DEAD, EVENT

#: What the heartbeat source sends (streaming only), and the element kind it becomes.
HEARTBEAT_TICK = "tick"
HEARTBEAT = "h"

_LOG = logging.getLogger(__name__)
#: Report the per-partition event-time high mark every this many records.
_WATERMARK_EVERY = 1000


class DecodeAndAnonymize(ProcessFunction):
    """See the module docstring."""

    def __init__(self, settings: JobSettings):
        self._settings = settings

    def open(self, runtime_context: RuntimeContext):
        s = self._settings
        self._decoder = OnboardingEventDecoder(registry_url=s.registry_url)
        self._anonymizer = EventAnonymizer(Pseudonymizer(resolve_secret(s).resolve()))
        self._count = Counters(runtime_context)
        self._metrics = flink_pipeline_metrics(self._count, s)
        self._client = redis_client(s.redis_url, socket_timeout=30, socket_connect_timeout=10)
        self._outbox = DeadLetterOutbox(self._client, OutboxKeys(s.redis_key_prefix),
                                        on_redis_error=self._metrics.redis_error)
        self._newest: dict[tuple, int] = {}
        self._seen = 0
        self._idle_s = float(s.get("kafka_idle_timeout") or 0)
        self._last_record = time.monotonic()
        self._warned_keyless: set = set()

    def close(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()
            self._count.push()

    def process_element(self, value, ctx: ProcessFunction.Context):
        if value == HEARTBEAT_TICK:
            self._count.tick()
            yield from self._heartbeat()
            return
        self._last_record = time.monotonic()
        record = KafkaRecord(*value)
        self._count("records_read", 1)
        self._metrics.events_read(record.topic, record.partition, 1)
        try:
            event = self._decoder.decode(record)
            t = event_time_ms(event)
        except Exception as error:  # noqa: BLE001 - bad input is dead-lettered, never raised
            yield self._source_dead_letter(self._decoder.dead_letter(record, error, stage="decode"))
            return
        self._count("events", 1)
        if not record.key:
            self._keyless(record)
        self._high_mark(record, t)
        event, clamped = normalize_event(event)
        if clamped:
            self._count("clock_skew_clamped", 1)
        route, out, stripped = self._anonymizer.anonymize(event)
        if route == core.DEAD_LETTER:
            self._count("anonymize_dead_letter", 1)
            self._metrics.dead_lettered("anonymize", str(out.get("reason") or "unknown"))
            yield DEAD, f"dlq:{record.topic}:{record.partition}", dead_letter_row(out)
            return
        if route == core.CONSENT_FILTERED:
            self._count("consent_filtered", 1)
            self._metrics.consent_filtered(1)
            return
        self._metrics.events_valid(1)
        if stripped:
            self._count("pii_properties_stripped", stripped)
        if route == core.PERSONALIZATION:
            self._count("anonymized_personalization", 1)
            yield EVENT, out["user_key"], out
        else:
            self._count("anonymized_analytics_only", 1)
            yield ANALYTICS, out["user_key"], out

    def _heartbeat(self):
        """No record for ``--kafka_idle_timeout``: the watermark may move to the wall clock minus the
        out-of-orderness, as the Beam source moves an idle partition's (transforms/kafka/watermarks.py)."""
        if self._idle_s > 0 and time.monotonic() - self._last_record >= self._idle_s:
            yield HEARTBEAT, "", time.time_ns() // 1_000_000

    def _source_dead_letter(self, letter: dict):
        """Record the letter (raw bytes) in the outbox now; the row (no raw bytes) goes on."""
        self._count("dead_letters", 1)
        self._metrics.dead_lettered(letter["stage"], letter["reason"])
        if self._outbox.write([(dead_letter_id(letter), letter.get("key"), self._decoder.encode_dead_letter(letter))]):
            self._count("dead_letters_recorded", 1)
        else:
            self._count("dead_letters_already_recorded", 1)
        return DEAD, f"dlq:{letter['source_topic']}:{letter['source_partition']}", dead_letter_row(letter)

    def _keyless(self, record: KafkaRecord) -> None:
        self._count("events_without_key", 1)
        self._metrics.events_without_key(record.topic, record.partition, 1)
        tp = (record.topic, record.partition)
        if tp not in self._warned_keyless:
            self._warned_keyless.add(tp)
            _LOG.warning("%s/%d: events without a Kafka key (counted as events_without_key): their producer "
                         "spreads a user's events over partitions", *tp)

    def _high_mark(self, record: KafkaRecord, t: int) -> None:
        tp = (record.topic, record.partition)
        if t > self._newest.get(tp, -1):
            self._newest[tp] = t
        self._seen += 1
        if self._seen % _WATERMARK_EVERY == 0:
            lag = int(float(self._settings.kafka_max_out_of_orderness) * 1000)
            for (topic, partition), newest in self._newest.items():
                self._metrics.source_watermark(topic, partition, (newest - lag) * 1000)
