-- V009: experiment exposures (docs/experiments.md). One row per experiment and
-- user: the variant the personalization API served and when it first served
-- it. The API batches exposures off the request path
-- (runners/api/exposures.py); the writer keeps the earliest served_at when a
-- row is written again (a replayed batch, two servers), so the table is
-- idempotent on (experiment, user_key). user_key is the pseudonym, never the
-- raw id; erasure deletes a user's rows (transforms/erasure.py).
-- Unqualified names on purpose: apply_migrations sets search_path (see V001).
CREATE TABLE experiment_exposures (
    experiment text        NOT NULL,
    user_key   text        NOT NULL,
    variant    text        NOT NULL,
    served_at  timestamptz NOT NULL,
    PRIMARY KEY (experiment, user_key)
);

CREATE INDEX experiment_exposures_variant_idx ON experiment_exposures (experiment, variant);
