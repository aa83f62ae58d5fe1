-- V006: drop pipeline_runs (created by V001). Nothing recorded runs in it:
-- the pipeline never called the bookkeeping functions, which are gone too.
-- A forward migration rather than an edit of V001, whose checksum is recorded
-- wherever it was applied (apply_migrations refuses a changed file).
-- Unqualified names on purpose: apply_migrations sets search_path (see V001).
DROP TABLE IF EXISTS pipeline_runs;
