"""``StoreChain``: what the Flink job's keyed user stage does with a subtask's updates, free of PyFlink.

In, between two flushes: the profiles of the users whose state changed
(``add_profile``: ``UserProfileState.snapshot``, one per user however many
events it folded in, as the Beam shell emits one update per user per
bundle), the anonymized events for the warehouse (``add_row(EVENTS, ...)``),
late events and dead-letter rows. ``flush()`` carries them out in the order
the Beam pipeline composes the same core functions (pipelines/onboarding.py):

    profile ─► enrich (AccountsCache) ─► RFM scores (RfmScorer) ─► rule segments ─► online-model scores
            ─► onboarding track ─► experiments ─► ProfileSink (Redis, version-guarded, outbox
               in the same script) ─► relays, in a thread of their own
               (transforms/outbox/background.py): segment changes and
               snapshots to Kafka and the warehouse, dead letters to the DLQ
               topic; ``close()`` waits for a last round
    rows    ─► WarehouseSink per table (INSERT ... ON CONFLICT DO NOTHING; identity_aliases
               keeps the earliest link), then VisitorRetireSink (linked visitors'
               profiles retired in Redis, after the profile writes)

and returns the profiles Redis applied (for the learner). Everything it
writes is idempotent, so writing a user's pending work twice (after a
restore, pipelines/flink/users.py) changes nothing. Rejections of any sink
become rows of the ``dead_letters`` table, counted by stage and reason.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from ...models.model_registry import ModelStore
from ...models.tracks import TrackPolicy
from ...transforms.dead_letter import pipeline_dead_letter
from ...transforms.enrich import AccountsCache, enrich_profile
from ...transforms.experiments import EXPERIMENTS_FIELD, ExperimentSet
from ...transforms.metrics import PipelineMetrics
from ...transforms.outbox.background import BackgroundRelays
from ...transforms.outbox.settings import RelaySettings, make_relays
from ...transforms.profile_store.identity import VisitorRetireSink
from ...transforms.profile_store.sink import ProfileSink
from ...transforms.progress import EventTimeProgress
from ...transforms.rfm import RfmScorer, ServingReference
from ...transforms.segment import ProfileRejected, RuleSet, segment_profile
from ...transforms.warehouse import rows
from ...transforms.warehouse.sink import WarehouseSink
from ..configuration import AccountsTable

if TYPE_CHECKING:
    from ...transforms.online_models import ProfileScorer

_LOG = logging.getLogger(__name__)

EVENTS = "events"
LATE_EVENTS = "late_events"
DEAD_LETTERS = "dead_letters"
IDENTITY_ALIASES = "identity_aliases"
#: Visitors to retire in Redis (``Stitch`` rows with ``retire``: transforms/profile_store/identity.py).
RETIREMENTS = "retirements"

#: The dead_letters table fed with rows already made (``rows.dead_letter_row``)
#: upstream, so no raw payload travels through Flink's network or state.
DEAD_LETTER_ROWS = dataclasses.replace(rows.DEAD_LETTERS, to_row=tuple)
# Sinks flush when the chain says so; their own size trigger is only a backstop.
_SINK_BATCH = 1_000_000


def dead_letter_row(letter: dict) -> tuple:
    """A dead letter reduced to its warehouse row (metadata, payload hashed): safe to keep in state."""
    return rows.dead_letter_row(letter)


class StoreChain:
    """One subtask's writes (module docstring). ``open()`` before use, ``close()`` after."""

    def __init__(self, settings: Any, rules: RuleSet, tracks: TrackPolicy, metrics: PipelineMetrics,
                 count: Callable[[str, int], None], clock: Callable[[], float] = time.monotonic,
                 experiments: Optional[ExperimentSet] = None):
        self._settings = settings
        self._rules = rules
        self._tracks = tracks
        # The packaged file when none is given (pipelines/configuration.py load_experiments).
        self._experiments = experiments if experiments is not None else ExperimentSet.load(
            known_segments=rules.known_segments, known_tracks=tracks.tracks)
        self._metrics = metrics
        self._count = count
        self._clock = clock
        self._profiles: dict[str, dict] = {}
        self._pending_rows = 0

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        s = self._settings
        refresh = s.accounts_refresh_seconds if s.streaming() and s.accounts_refresh_seconds > 0 else float("inf")
        self._accounts = AccountsCache(AccountsTable(s.warehouse_dsn, s.warehouse_schema), refresh)
        self._accounts.refresh()
        self._rfm_store = ModelStore(s.redis_url, s.redis_key_prefix)
        self._rfm = RfmScorer(ServingReference(self._rfm_store, s.model_refresh_seconds), self._count)
        self._rfm.refresh()
        self._store = None
        self._scorer: Optional[ProfileScorer] = None
        if not s.disable_online_models:
            # Imported here: the models bring River and SciPy (~1 s), which a
            # run without them never needs.
            from ...transforms.online_models import ProfileScorer, ServingModels

            self._store = ModelStore(s.redis_url, s.redis_key_prefix)
            self._scorer = ProfileScorer(ServingModels(self._store, s.model_refresh_seconds), self._metrics,
                                         self._count)
            self._scorer.refresh()
        self._profile_sink = ProfileSink(
            s.redis_url, s.redis_key_prefix, s.profile_ttl_days * 86_400, _SINK_BATCH,
            future_tolerance_s=s.future_tolerance_seconds, outbox=True, metrics=self._metrics,
            progress=EventTimeProgress(s.redis_key_prefix), count=self._count)
        self._tables = {
            EVENTS: WarehouseSink(s.warehouse_dsn, rows.EVENTS, s.warehouse_schema, _SINK_BATCH,
                                  metrics=self._metrics, count=self._count),
            LATE_EVENTS: WarehouseSink(s.warehouse_dsn, rows.LATE_EVENTS, s.warehouse_schema, _SINK_BATCH,
                                       metrics=self._metrics, count=self._count),
            DEAD_LETTERS: WarehouseSink(s.warehouse_dsn, DEAD_LETTER_ROWS, s.warehouse_schema, _SINK_BATCH,
                                        metrics=self._metrics, count=self._count),
            IDENTITY_ALIASES: WarehouseSink(s.warehouse_dsn, rows.IDENTITY_ALIASES, s.warehouse_schema, _SINK_BATCH,
                                            metrics=self._metrics, count=self._count),
            RETIREMENTS: VisitorRetireSink(s.redis_url, s.redis_key_prefix, s.profile_ttl_days * 86_400,
                                           _SINK_BATCH, count=self._count),
        }
        for sink in (self._profile_sink, *self._tables.values()):
            sink.open()
        self._relay_interval_s = int(s.get("relay_interval_ms") or 0) / 1000
        self._relay_kicked = float("-inf")
        self._background = BackgroundRelays()
        self._relays = make_relays(
            RelaySettings(s.redis_url, s.redis_key_prefix, s.kafka_bootstrap_servers, s.segment_changes_topic,
                          s.dead_letter_topic, s.warehouse_dsn, s.warehouse_schema, self._rules, s.registry_url),
            on_warehouse_retry=self._background.warehouse_retry, count=self._background.count,
            on_redis_error=self._background.redis_error)
        self._background.start(self._relays)

    def close(self) -> None:
        """Close the sinks, after a last relay round of everything written (``BackgroundRelays.drain``)."""
        try:
            if getattr(self, "_background", None) is not None:
                self._relayed(*self._background.drain())
        finally:
            for sink in (getattr(self, "_profile_sink", None), *getattr(self, "_tables", {}).values()):
                if sink is not None:
                    sink.close()
            for relay in getattr(self, "_relays", {}).values():
                relay.close()
            for store in (getattr(self, "_store", None), getattr(self, "_rfm_store", None)):
                if store is not None:
                    store.close()

    # -- between flushes ----------------------------------------------------------

    def add_profile(self, profile: dict) -> None:
        """The user's current profile (the machine's snapshot); a later one of the same user replaces it."""
        self._profiles[profile["user_key"]] = profile

    def add_row(self, table: str, element: Any) -> None:
        """An element of ``table`` (EVENTS, LATE_EVENTS: anonymized events; DEAD_LETTERS: a row tuple)."""
        sink = self._tables[table]
        self._settle(sink, sink.add(element))
        self._pending_rows += 1

    @property
    def pending(self) -> int:
        return len(self._profiles) + self._pending_rows

    # -- the flush ----------------------------------------------------------------

    def flush(self) -> list[dict]:
        """Write everything added since the last flush, then relay the outboxes; the profiles Redis applied."""
        if self._scorer is not None:
            self._scorer.refresh()
        self._rfm.refresh()
        if not self._accounts.refresh():
            self._count("enrich_reference_refresh_failed", 1)
        profiles, self._profiles = self._profiles, {}
        applied: list[dict] = []
        for profile in profiles.values():
            prepared = self._prepare(profile)
            if prepared is not None:
                applied += self._settle(self._profile_sink, self._profile_sink.add(prepared))
        applied += self._settle(self._profile_sink, self._profile_sink.flush())
        # Retirements after the profiles: a visitor's last write goes before its profile is removed.
        for table in (EVENTS, LATE_EVENTS, IDENTITY_ALIASES, RETIREMENTS):
            self._settle(self._tables[table], self._tables[table].flush())
        # Last, so the rejections of this flush (dead-letter rows now) go with it.
        letters = self._tables[DEAD_LETTERS]
        for record in letters.flush():
            if record.rejection is not None:
                self._count("dead_letter_rows_refused", 1)
                _LOG.error("a dead-letter row was refused (%s); counted dead_letter_rows_refused",
                           record.rejection[0])
        self._pending_rows = 0
        # The relays trail the writes in their own thread (transforms/outbox/background.py), woken at
        # most once per ``relay_interval_ms``: a round costs the one GIL its fixed Redis, warehouse and
        # Kafka calls, and the outbox keeps what waits (docs/flink.md "Effectively once").
        now = self._clock()
        if now - self._relay_kicked >= self._relay_interval_s:
            self._relay_kicked = now
            self._relayed(*self._background.kick())
        else:
            self._relayed(*self._background.collect())
        return applied

    def _relayed(self, reports: list, calls: list) -> None:
        """Count what finished relay rounds did (``BackgroundRelays``), in this thread."""
        replay = {"count": self._count, "warehouse_retry": self._metrics.warehouse_error,
                  "redis_error": self._metrics.redis_error}
        for method, args in calls:
            replay[method](*args)
        for name, report in reports:
            self._count("outbox_entries_relayed", report.entries)
            self._count("outbox_records_sent", report.records)
            self._count("outbox_records_skipped", report.skipped)
            self._count("outbox_rows_rejected", report.rejected)
            if name == "segment-changes" and report.records:
                self._metrics.segment_changes(report.records)

    def _prepare(self, profile: dict) -> Optional[dict]:
        """enrich ─► RFM ─► rules ─► scores ─► track ─► experiments; None (and a dead-letter row) when the rules
        refuse it. Without the models there is no track; experiments judge by the policy's choice."""
        enriched, found = enrich_profile(profile, self._accounts.accounts)
        if not found:
            self._count("enrich_reference_missing", 1)
        enriched = self._rfm.score(enriched)
        try:
            segmented = segment_profile(self._rules, enriched, enriched["as_of"])
        except ProfileRejected as rejected:
            self._dead_letter(pipeline_dead_letter("segment", rejected.reason, rejected.detail, enriched,
                                                   key_field="user_key"))
            return None
        if self._scorer is not None:
            segmented = self._tracks.with_track(self._scorer.score(segmented))
            self._count(f"onboarding_track_{segmented['onboarding_track']}", 1)
        assigned = self._experiments.with_experiments(segmented, self._tracks.choose)
        for name, variant in assigned[EXPERIMENTS_FIELD].items():
            self._count(f"experiment_{name}_{variant}", 1)
        return assigned

    def _settle(self, sink, records) -> list[dict]:
        """Results of ``sink``: applied profiles returned, rejections added as dead-letter rows."""
        applied = []
        for record in records:
            if record.rejection is not None:
                self._dead_letter(sink.dead_letter(record))
            elif record.result is not None and getattr(record.result, "applied", False):
                applied.append(record.result.profile)
        return applied

    def _dead_letter(self, letter: dict) -> None:
        self._metrics.dead_lettered(str(letter.get("stage") or "unknown"), str(letter.get("reason") or "unknown"))
        # The dead-letter sink refuses nothing at add time (rows are made already).
        self._tables[DEAD_LETTERS].add(dead_letter_row(letter))
