-- V005: model version retention (ModelRegistry.prune, `onboardflow models prune`,
-- docs/models-registry.md#retention). The online learner publishes a version
-- every few minutes; pruning drops the payload of old versions but keeps their
-- row, because model_pointers and model_events name versions (foreign keys)
-- and the pointer's history must stay readable: `models list` still shows a
-- pruned version's id, SHA-256, counts and metrics, and says it was pruned.
-- Unqualified names on purpose: apply_migrations sets search_path (see V001).

-- payload is NULL exactly when the version was pruned, and pruned_at says when.
ALTER TABLE model_versions ALTER COLUMN payload DROP NOT NULL;
ALTER TABLE model_versions ADD COLUMN pruned_at timestamptz;
ALTER TABLE model_versions ADD CONSTRAINT model_versions_payload_kept_or_pruned
    CHECK ((payload IS NULL) = (pruned_at IS NOT NULL));

-- The versions that still hold a payload: what a prune looks at. Small once
-- pruning runs, however long the history, so a prune after every publish
-- stays cheap.
CREATE INDEX model_versions_kept_idx ON model_versions (kind, version) WHERE pruned_at IS NULL;
