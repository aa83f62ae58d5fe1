-- V003: the model registry's history (models/registry.py, docs/models-registry.md).
-- Redis serves the current model of each kind; these tables are the durable
-- record: every version ever published (with its payload, so any of them can
-- be served again after Redis lost it), where each kind's serving pointer is,
-- and every move of that pointer (publish, rollback, promote).
-- Unqualified names on purpose: apply_migrations sets search_path (see V001).

-- One row per model version. version counts up per kind from 1 and is never
-- reused; the payload's SHA-256 is unique per kind, which is what makes a
-- retried publish of the same payload return the existing version instead of
-- creating a second one.
CREATE TABLE model_versions (
    kind           text        NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_]{0,31}$'),
    version        integer     NOT NULL CHECK (version > 0),
    payload_sha256 text        NOT NULL CHECK (payload_sha256 ~ '^[0-9a-f]{64}$'),
    payload        bytea       NOT NULL,
    source         text        NOT NULL DEFAULT '',          -- who published it: train, online, ...
    counts         jsonb       NOT NULL DEFAULT '{}'::jsonb, -- training counts (users, snapshots, ...)
    metrics        jsonb       NOT NULL DEFAULT '{}'::jsonb, -- validation metrics (silhouette, ...)
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, version),
    UNIQUE (kind, payload_sha256)
);

-- The serving pointer per kind, mirrored to Redis (obf:model:{kind}:current).
-- generation counts every move, so a slow writer can never put an older
-- pointer back into Redis over a newer one. pinned: set by a rollback, it
-- keeps new publishes from moving the pointer until a promote.
CREATE TABLE model_pointers (
    kind       text        PRIMARY KEY,
    version    integer     NOT NULL,
    generation bigint      NOT NULL CHECK (generation > 0),
    pinned     boolean     NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (kind, version) REFERENCES model_versions (kind, version)
);

-- Every pointer move, oldest first by id: the audit trail of what was served when.
CREATE TABLE model_events (
    id           bigserial   PRIMARY KEY,
    kind         text        NOT NULL,
    action       text        NOT NULL CHECK (action IN ('publish', 'rollback', 'promote')),
    from_version integer,                  -- null for the first publish of a kind
    to_version   integer     NOT NULL,
    generation   bigint      NOT NULL,
    reason       text        NOT NULL DEFAULT '',
    at           timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (kind, to_version) REFERENCES model_versions (kind, version),
    UNIQUE (kind, generation)
);

CREATE INDEX model_events_kind_at_idx ON model_events (kind, at);
