-- V008: the right to erasure (docs/security.md, "Right to erasure").
-- erased_users: every pseudonym erased. Warehouse writes skip rows of these
-- users (transforms/warehouse/writer.py joins against it), so a replay or a
-- late relay of the outboxes cannot bring an erased user back.
-- erasure_audit: one row per erasure: who asked, when, where the request came
-- from and how many items each store removed. Only the pseudonym, never the
-- raw user id (the raw id is what the erasure makes unlinkable).
-- Unqualified names on purpose: apply_migrations sets search_path (see V001).
CREATE TABLE erased_users (
    user_key  text        PRIMARY KEY,
    erased_at timestamptz NOT NULL
);

CREATE TABLE erasure_audit (
    erasure_id   text        PRIMARY KEY,
    user_key     text        NOT NULL,
    requested_by text        NOT NULL,
    source       text        NOT NULL,
    requested_at timestamptz NOT NULL,
    completed_at timestamptz NOT NULL,
    removed      jsonb       NOT NULL
);

CREATE INDEX erasure_audit_user_key_idx ON erasure_audit (user_key);
