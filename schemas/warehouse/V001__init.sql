-- V001: the warehouse tables. Applied by onboardflow.transforms.warehouse.apply_migrations
-- inside one transaction, with search_path set to the target schema: names are
-- unqualified on purpose so tests can apply the same DDL to a private schema.
-- Timestamps are timestamptz (UTC); versions stay epoch milliseconds (bigint)
-- because they are the profile store's monotonic version, compared as numbers.

-- Anonymized events, one partition per UTC day of event time. The writer
-- creates day partitions on demand before each batch; events whose day it
-- does not create (outside its horizon) land in events_default, so nothing is
-- rejected. The natural key includes occurred_at because a unique index on a
-- partitioned table must contain the partition key; the event id alone is
-- unique in practice (a UUID).
CREATE TABLE events (
    event_id                text        NOT NULL,
    occurred_at             timestamptz NOT NULL,
    received_at             timestamptz,
    event_type              text        NOT NULL,
    user_key                text,
    identified              boolean,
    session_id              text,
    properties              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    device                  text,
    os                      text,
    app_version             text,
    locale                  text,
    country                 text,
    email_domain            text,
    ip_prefix               text,
    device_class            text,
    referrer_host           text,
    consent_analytics       boolean,
    consent_personalization boolean,
    consent_marketing       boolean,
    loaded_at               timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE INDEX events_user_key_occurred_at_idx ON events (user_key, occurred_at);
CREATE INDEX events_event_type_occurred_at_idx ON events (event_type, occurred_at);

-- Events that arrived behind the watermark by more than the allowed lateness:
-- counted and kept here for analysis instead of being folded into profiles.
-- Same columns and key as events, not partitioned (few rows).
CREATE TABLE late_events (
    LIKE events INCLUDING DEFAULTS,
    PRIMARY KEY (event_id, occurred_at)
);

-- Every profile version the pipeline wrote to Redis: the history the profile
-- store does not keep. snapshot is the whole profile as JSON.
CREATE TABLE profile_snapshots (
    user_key   text        NOT NULL,
    version    bigint      NOT NULL,
    snapshot   jsonb       NOT NULL,
    written_at timestamptz NOT NULL,
    PRIMARY KEY (user_key, version)
);

CREATE INDEX profile_snapshots_written_at_idx ON profile_snapshots (written_at);

-- The latest snapshot per user, for ad-hoc queries and joins.
CREATE VIEW latest_profiles AS
SELECT DISTINCT ON (user_key) user_key, version, snapshot, written_at
FROM profile_snapshots
ORDER BY user_key, version DESC;

CREATE TABLE segment_changes (
    user_key text        NOT NULL,
    segment  text        NOT NULL,
    change   text        NOT NULL CHECK (change IN ('entered', 'exited')),
    at       timestamptz NOT NULL,
    reason   text        NOT NULL DEFAULT '',
    version  bigint      NOT NULL,
    PRIMARY KEY (user_key, segment, version, change)
);

CREATE INDEX segment_changes_segment_at_idx ON segment_changes (segment, at);

-- Dead-letter metadata only. The raw key and value may hold PII and stay in
-- the dead-letter topic (same access rules and retention as the source
-- topic); the warehouse keeps where the record came from, why it failed, and
-- size and SHA-256 of the payload to find it there. Records that failed
-- inside the pipeline have no Kafka coordinates: they get topic '' and
-- partition/offset -1, and payload_sha256 in the key keeps them apart.
CREATE TABLE dead_letters (
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    kafka_timestamp  timestamptz,
    stage            text        NOT NULL,
    reason           text        NOT NULL,
    detail           text        NOT NULL DEFAULT '',
    event_id         text,
    failed_at        timestamptz NOT NULL,
    payload_size     integer,
    payload_sha256   text        NOT NULL,
    PRIMARY KEY (source_topic, source_partition, source_offset, stage, payload_sha256)
);

CREATE INDEX dead_letters_failed_at_idx ON dead_letters (failed_at);
CREATE INDEX dead_letters_reason_idx ON dead_letters (stage, reason);

-- Account reference data for the enrichment side input.
CREATE TABLE accounts (
    account_id   text        PRIMARY KEY,
    plan         text        NOT NULL,
    tier         text        NOT NULL,
    industry     text,
    company_size integer,                 -- employees
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per pipeline run, for operators: what ran, on which runner, how it ended.
CREATE TABLE pipeline_runs (
    run_id      text        PRIMARY KEY,
    pipeline    text        NOT NULL,
    runner      text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status      text        NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    options     jsonb       NOT NULL DEFAULT '{}'::jsonb,
    counters    jsonb       NOT NULL DEFAULT '{}'::jsonb
);
