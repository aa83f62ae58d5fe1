"""The Beam shell of the outboxes (transforms/outbox/ holds the logic).

* ``RecordDeadLetters``: the Kafka source's dead letters in, each recorded
  once in the dead-letter outbox (by source topic/partition/offset, so a
  replay records nothing); out: one trigger per letter.
* ``RelayOutboxes``: triggers in (names of outbox streams that may hold new
  entries: ``outbox.SEGMENT_CHANGES``, ``PROFILE_SNAPSHOTS``, ``DEAD_LETTERS``);
  at the end of each bundle the named outboxes are relayed to Kafka and the
  warehouse. Apply it downstream of the stage that writes the outbox, so a
  bundle's relay runs after its writes; the profile writes' results trigger it
  whether they applied or not, so a replay after a crash relays what the
  crashed run left in the outbox. Out: nothing downstream needs (reports).

Counters (namespace ``onboardflow``): ``dead_letters_recorded``,
``dead_letters_already_recorded``, ``outbox_entries_relayed``,
``outbox_records_sent``, ``outbox_records_skipped`` (sent by a relay that
died before its cursor moved), ``outbox_rows_rejected``; relayed segment
changes also count in ``onboardflow_segment_changes_total``, failed warehouse
writes of the relay in ``onboardflow_warehouse_errors_total`` and their
retries in ``warehouse_retries`` (as the warehouse sinks' do).
"""
from __future__ import annotations

import functools
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from ...transforms.connections import redis_client
from ...transforms.metrics import PipelineMetrics
from ...transforms.outbox.dead_letters import DeadLetterOutbox, dead_letter_id
from ...transforms.outbox.keys import DEAD_LETTERS, SEGMENT_CHANGES, OutboxKeys
from ...transforms.outbox.settings import RelaySettings, make_relays
from .metrics import beam_counter, beam_pipeline_metrics

METRICS_NAMESPACE = "onboardflow"


class _RecordDeadLettersFn(beam.DoFn):
    def __init__(self, redis_url: str, key_prefix: str, encode, retry_s: float,
                 metrics: Optional[PipelineMetrics]):
        self._redis_url, self._key_prefix, self._encode, self._retry_s = redis_url, key_prefix, encode, retry_s
        self._metrics = metrics or beam_pipeline_metrics(prometheus=False)
        self._recorded = Metrics.counter(METRICS_NAMESPACE, "dead_letters_recorded")
        self._again = Metrics.counter(METRICS_NAMESPACE, "dead_letters_already_recorded")

    def setup(self):
        self._metrics.setup()
        self._client = redis_client(self._redis_url, socket_timeout=30, socket_connect_timeout=10)
        self._outbox = DeadLetterOutbox(self._client, OutboxKeys(self._key_prefix), self._retry_s,
                                        on_redis_error=self._metrics.redis_error)

    def process(self, letter):
        # One round trip per letter: dead letters are rare, and the trigger
        # that follows must come after the letter is in the outbox.
        if self._outbox.write([(dead_letter_id(letter), letter.get("key"), self._encode(letter))]):
            self._recorded.inc()
        else:
            self._again.inc()
        yield DEAD_LETTERS

    def teardown(self):
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()


class RecordDeadLetters(beam.PTransform):
    """Source dead-letter dicts in (schemas/dead_letter.avsc fields); outbox triggers out.

    ``encode`` maps a letter to its framed Avro value (``OnboardingEventDecoder.encode_dead_letter``).
    """

    def __init__(self, redis_url: str, key_prefix: str, encode, retry_s: float = 300.0,
                 metrics: Optional[PipelineMetrics] = None):
        super().__init__()
        self._fn = _RecordDeadLettersFn(redis_url, key_prefix, encode, retry_s, metrics)

    def expand(self, letters):
        return letters | "RecordInOutbox" >> beam.ParDo(self._fn)


class _RelayOutboxesFn(beam.DoFn):
    def __init__(self, settings: RelaySettings, metrics: Optional[PipelineMetrics]):
        self._settings = settings
        self._metrics = metrics or beam_pipeline_metrics(prometheus=False)
        self._entries = Metrics.counter(METRICS_NAMESPACE, "outbox_entries_relayed")
        self._sent = Metrics.counter(METRICS_NAMESPACE, "outbox_records_sent")
        self._skipped = Metrics.counter(METRICS_NAMESPACE, "outbox_records_skipped")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, "outbox_rows_rejected")

    def setup(self):
        self._metrics.setup()
        self._relays = make_relays(self._settings, on_warehouse_retry=self._metrics.warehouse_error,
                                   count=functools.partial(beam_counter, METRICS_NAMESPACE),
                                   on_redis_error=self._metrics.redis_error)

    def start_bundle(self):
        self._due: set[str] = set()

    def process(self, name):
        self._due.add(name)

    def finish_bundle(self):
        # Raises when a sink stays down past its retries: the runner retries
        # the bundle; the entries wait in the outbox meanwhile.
        for name in sorted(self._due):
            report = self._relays[name].relay()
            self._entries.inc(report.entries)
            self._sent.inc(report.records)
            self._skipped.inc(report.skipped)
            self._rejected.inc(report.rejected)
            if name == SEGMENT_CHANGES and report.records:
                self._metrics.segment_changes(report.records)
        self._due = set()

    def teardown(self):
        for relay in getattr(self, "_relays", {}).values():
            relay.close()


class RelayOutboxes(beam.PTransform):
    """Outbox names in (triggers); each named outbox relayed at the end of the bundle."""

    def __init__(self, settings: RelaySettings, metrics: Optional[PipelineMetrics] = None):
        super().__init__()
        self._fn = _RelayOutboxesFn(settings, metrics)

    def expand(self, triggers):
        return triggers | "Relay" >> beam.ParDo(self._fn)
