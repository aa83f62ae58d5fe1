"""The onboarding personalization pipeline: Kafka events in, Redis profiles out.

Concepts: event time throughout (element timestamps are the events'
``occurred_at``), a watermark per Kafka partition that trails the newest event
by a bounded out-of-orderness, allowed lateness in the keyed profile stage
(later events are counted and kept in the warehouse, never silently dropped),
and event-time timers for dormancy and state cleanup. Composition only: every
step is a Beam shell from ``pipelines/beam/`` or a transform over the engine-free
core in ``transforms/`` (see docs/architecture.md); the segment rules, the
tracks policy and the experiments are compiled once here and handed to every
stage that uses them::

    ReadFromKafka(decode) ─► NormalizeEvents ─► AnonymizeEvents ─► StitchIdentities ─► BuildUserProfiles
         │ dead letters           │ events (warehouse)      │ aliases, retired      │ ProfileUpdate
         │                        │                         │ visitors (WriteIdentityLinks)
         ▼                        ▼                         ▼
    DLQ topic + metadata    WriteEventsToWarehouse    EnrichProfiles ─► ScoreRfm ─► AssignRuleSegments
                                                                               │ profiles
                                                                               ▼
                                    ScoreProfiles (online models) ─► AssignOnboardingTracks
                                                                               │
                                                                       AssignExperiments
                                                                               │
                                                                               ▼
                  WriteProfilesToRedis ─► applied writes ─► snapshots, segment changes (Kafka +
                                                            warehouse), LearnOnlineModels ─►
                                                            registry snapshots, drift events

``build(p, options)`` applies it to a pipeline, ``run(options)`` runs it; the
command line (``onboardflow run``, runners/cli/run.py) turns the deployment's
settings and its flags into those options. Run it locally (Prism), streaming::

    onboardflow run --demo_mode

as a bounded replay / backfill of what is in the topic now::

    onboardflow run --kafka_bounded --kafka_start_position=earliest --secret_file=key.bin

or on Flink (see docs/flink.md)::

    onboardflow run --runner=FlinkRunner --flink_master=localhost:8081 \\
        --flink_job_server_jar=... --environment_type=EXTERNAL \\
        --environment_config=localhost:50000 --streaming --secret_file=key.bin
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from ..models.segmentation import SegmentSettings
from ..models.tracks import DEFAULT_TRACKS_PATH, TrackPolicy
from ..transforms.anonymize import SecretKey
from ..transforms.backfill_horizon import backfill_horizon
from ..transforms.decode import OnboardingEventDecoder
from ..transforms.kafka.consumer import resolve_partitions
from ..transforms.kafka.offsets import StartPosition
from ..transforms.outbox.keys import PROFILE_SNAPSHOTS as PROFILE_SNAPSHOTS_OUTBOX
from ..transforms.outbox.keys import SEGMENT_CHANGES as SEGMENT_CHANGES_OUTBOX
from ..transforms.outbox.settings import RelaySettings
from ..transforms.warehouse.migrations import apply_migrations
from .beam.anonymize import AnonymizeEvents
from .beam.enrich import EnrichProfiles
from .beam.experiments import AssignExperiments
from .beam.identity import StitchIdentities, WriteIdentityLinks
from .beam.kafka_sink import WriteToKafka
from .beam.kafka_source import DEAD_LETTERS, ReadFromKafka
from .beam.metrics import CountDeadLetters, PublishSinkWatermark, pipeline_metrics_from_options
from .beam.normalize import NormalizeEvents
from .beam.online_models import LearnOnlineModels, ScoreProfiles
from .beam.profile import TOO_LATE, BuildUserProfiles
from .beam.profile_store import WriteProfilesToRedis
from .beam.relay import RecordDeadLetters, RelayOutboxes
from .beam.rfm import ScoreRfm
from .beam.segments import AssignRuleSegments
from .beam.tracks import AssignOnboardingTracks
from .beam.warehouse import WriteDeadLetterMetadata, WriteDriftEvents, WriteEventsToWarehouse, WriteLateEvents
from .configuration import (
    AccountsTable,
    drift_event_kv,
    identity_config,
    load_experiments,
    load_rules,
    profile_config,
    resolve_secret,
)
from .options import KafkaReadOptions, OnboardingOptions

_LOG = logging.getLogger(__name__)


class PipelineOutputs(NamedTuple):
    """The PCollections a test or the demo may want to observe."""

    events: Any
    dead_letters: Any
    profiles: Any
    relayed: Any
    redis_writes: Any
    too_late: Any


def build(p: beam.Pipeline, options: PipelineOptions, secret: Optional[SecretKey] = None) -> PipelineOutputs:
    """Apply the onboarding pipeline to ``p``; returns the observable outputs."""
    opts = options.view_as(OnboardingOptions)
    kafka = options.view_as(KafkaReadOptions)
    streaming = options.view_as(StandardOptions).streaming
    secret = secret or resolve_secret(opts)
    decoder = OnboardingEventDecoder(registry_url=opts.registry_url)
    # Compiled once; every stage that evaluates rules or names segments gets these objects.
    rules = load_rules(opts)
    tracks = TrackPolicy.from_yaml(opts.tracks_file or DEFAULT_TRACKS_PATH, rules)
    experiments = load_experiments(opts, rules, tracks)
    bootstrap = kafka.kafka_bootstrap_servers
    dsn, schema = opts.warehouse_dsn, opts.warehouse_schema

    # One facade for every stage: Beam metrics + each worker's /metrics (docs/observability.md).
    metrics = pipeline_metrics_from_options(options)

    # A bounded run reads offset ranges fixed here, and its profiles end at the
    # newest event in exactly those ranges (transforms/backfill_horizon.py).
    partitions = horizon = None
    if kafka.kafka_bounded:
        partitions = resolve_partitions(bootstrap, [t.strip() for t in kafka.kafka_topics.split(",") if t.strip()],
                                        kafka.kafka_consumer_group, StartPosition.parse(kafka.kafka_start_position),
                                        bounded=True)
        horizon = backfill_horizon(opts.backfill_horizon, bootstrap, partitions, decoder.decode)
    read = p | "ReadEvents" >> ReadFromKafka.from_options(options, decoder=decoder, metrics=metrics,
                                                          partitions=partitions)
    dead_letters = read[DEAD_LETTERS]
    # Once per source coordinate into the dead-letter outbox, relayed below:
    # a replay re-publishes none (docs/reliability.md).
    recorded_letters = dead_letters | "RecordDeadLetters" >> RecordDeadLetters(
        opts.redis_url, opts.redis_key_prefix, decoder.encode_dead_letter, metrics=metrics)

    anonymized = (
        read.events
        | "Normalize" >> NormalizeEvents()
        | "Anonymize" >> AnonymizeEvents(secret, metrics=metrics)
    )
    events = anonymized[AnonymizeEvents.PERSONALIZATION]
    analytics_only = anonymized[AnonymizeEvents.ANALYTICS_ONLY]

    # One sink per consent route rather than one behind a Flatten: on Prism a
    # Flatten's consumer is a stage of its own, which moved every event through
    # the runner once more (docs/decisions.md "pipelines/onboarding.py").
    event_rejects = (
        events | "WriteEvents" >> WriteEventsToWarehouse(dsn, schema, metrics=metrics),
        analytics_only | "WriteAnalyticsOnlyEvents" >> WriteEventsToWarehouse(dsn, schema, metrics=metrics))

    # A device's anonymous activity follows the account it identifies as (transforms/identity.py).
    identity_rejects = ()
    if not opts.disable_identity_stitching:
        stitched = events | "StitchIdentities" >> StitchIdentities(identity_config(opts))
        events = stitched.events
        identity_rejects = stitched.stitches | "WriteIdentityLinks" >> WriteIdentityLinks(
            opts.redis_url, opts.redis_key_prefix, opts.profile_ttl_days * 86_400, dsn, schema, metrics=metrics)
    built = events | "BuildProfiles" >> BuildUserProfiles(profile_config(opts, horizon, rules), metrics=metrics,
                                                           erased_from=(opts.redis_url, opts.redis_key_prefix))
    too_late = built[TOO_LATE]
    late_rejects = too_late | "WriteLateEvents" >> WriteLateEvents(dsn, schema, metrics=metrics)

    refresh = opts.accounts_refresh_seconds if streaming and opts.accounts_refresh_seconds > 0 else None
    segmented = (
        built.profiles
        | "Enrich" >> EnrichProfiles(AccountsTable(dsn, schema), refresh)
        # RFM scores before the rules: value segments name them (docs/rfm.md).
        | "ScoreRfm" >> ScoreRfm(opts.redis_url, opts.redis_key_prefix, refresh_seconds=opts.model_refresh_seconds)
        | "AssignSegments" >> AssignRuleSegments(rules)
    )
    profiles = segmented[AssignRuleSegments.PROFILES]
    if not opts.disable_online_models:
        profiles = (
            profiles
            | "ScoreProfiles" >> ScoreProfiles(opts.redis_url, opts.redis_key_prefix,
                                                refresh_seconds=opts.model_refresh_seconds, metrics=metrics)
            | "AssignTracks" >> AssignOnboardingTracks(tracks)
        )
    # After the track, with or without the models: eligibility may name it (docs/experiments.md).
    profiles = profiles | "AssignExperiments" >> AssignExperiments(experiments, tracks)

    redis = profiles | "WriteProfiles" >> WriteProfilesToRedis(
        opts.redis_url, opts.redis_key_prefix, profile_ttl_s=opts.profile_ttl_days * 86_400, metrics=metrics,
        future_tolerance_s=opts.future_tolerance_seconds)
    redis[WriteProfilesToRedis.WRITTEN] | "PublishSinkWatermark" >> PublishSinkWatermark(  # "settled": demo.py
        opts.redis_url, opts.redis_key_prefix, lag_ms=int(kafka.kafka_max_out_of_orderness * 1000), cap_ms=horizon)
    written = redis[WriteProfilesToRedis.WRITTEN]
    # History follows what the store accepted: each applied write put its
    # segment changes and snapshot in the outbox in the same Redis script; the
    # relay moves them to Kafka and the warehouse exactly once. Every write
    # result triggers it, applied or not: a replay after a crash relays what
    # the crashed run left behind. Each relay runs fused into the stage whose
    # writes trigger it, at the end of that stage's bundle (no stage of its
    # own: Prism busy-waits through every bundle of a stage without outputs
    # or timers, docs/decisions.md "pipelines/onboarding.py").
    relay_settings = RelaySettings(
        opts.redis_url, opts.redis_key_prefix, bootstrap, opts.segment_changes_topic, opts.dead_letter_topic,
        dsn, schema, rules, opts.registry_url)
    relayed = (
        ((written
         | "OutboxesOfWrites" >> beam.FlatMap(lambda _: (SEGMENT_CHANGES_OUTBOX, PROFILE_SNAPSHOTS_OUTBOX))
         | "RelayOutboxes" >> RelayOutboxes(relay_settings, metrics=metrics)),
         recorded_letters | "RelayDeadLetters" >> RelayOutboxes(relay_settings, metrics=metrics))
        | "Relayed" >> beam.Flatten())
    applied = written | "AppliedWrites" >> beam.Filter(lambda r: r.applied)

    model_rejects = ()
    if not opts.disable_online_models:
        # The learner follows the store too: a replay's stale writes teach the models nothing.
        drift = (applied
                 | "AppliedScoredProfiles" >> beam.Map(lambda r: r.profile)
                 | "LearnModels" >> LearnOnlineModels(
                     opts.redis_url, dsn, schema, opts.redis_key_prefix,
                     segments=SegmentSettings(refit_ms=int(opts.model_refit_hours * 3_600_000),
                                              n_clusters=opts.segment_clusters, min_users=opts.segment_min_users),
                     tracks=tracks, batch_size=opts.model_batch_size,
                     metrics=metrics, keep_versions=opts.model_keep_versions, keep_days=opts.model_keep_days or None))
        model_rejects = (drift | "WriteDriftEvents" >> WriteDriftEvents(dsn, schema),)
        (drift
         | "EncodeDriftEvents" >> beam.Map(drift_event_kv(opts.registry_url))
         | "PublishDriftEvents" >> WriteToKafka(bootstrap, opts.model_events_topic))

    # In-pipeline rejects (anonymize, rules, sinks) carry no raw Kafka bytes:
    # their metadata goes to the warehouse's dead_letters table with the rest.
    internal_rejects = (
        anonymized[AnonymizeEvents.DEAD_LETTER], built.dead_letter, segmented[AssignRuleSegments.DEAD_LETTER],
        redis[WriteProfilesToRedis.DEAD_LETTER], *event_rejects, late_rejects, *model_rejects, *identity_rejects,
    )
    ((dead_letters,) + internal_rejects
     | "AllDeadLetters" >> beam.Flatten()
     | "CountDeadLetters" >> CountDeadLetters(metrics)
     | "WriteDeadLetterMetadata" >> WriteDeadLetterMetadata(dsn, schema))

    return PipelineOutputs(read.events, dead_letters, profiles, relayed, written, too_late)


def run(options: PipelineOptions, secret: Optional[SecretKey] = None, wait: bool = True):
    """Migrate the warehouse, build the pipeline on ``options`` and run it; returns the PipelineResult.

    The options come complete from the caller (runners/cli/run.py turns the
    deployment's settings and the command line into them). Finished when ``wait``.
    """
    opts = options.view_as(OnboardingOptions)
    secret = secret or resolve_secret(opts)
    applied = apply_migrations(opts.warehouse_dsn, opts.warehouse_schema)
    if applied:
        _LOG.info("warehouse: applied migrations %s", ", ".join(m.name for m in applied))
    if (options.view_as(StandardOptions).runner == "PrismRunner"
            and options.view_as(KafkaReadOptions).kafka_start_position != "earliest"):
        _LOG.warning("--kafka_start_position=%s on Prism: this job starts with empty profile state, so each "
                     "user's next event writes a profile of that event alone over the stored one. Rebuild "
                     "the state from the earliest offset unless the topic holds only new users "
                     "(docs/local-runner.md).", options.view_as(KafkaReadOptions).kafka_start_position)
    p = beam.Pipeline(options=options)
    build(p, options, secret)
    result = p.run()
    if wait:
        result.wait_until_finish()
    return result
