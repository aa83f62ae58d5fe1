-- V010: identity stitching (docs/identity.md). One row per (device, account)
-- link the pipeline saw: anonymous_key is the pseudonym of a device id,
-- user_key the account's; linked_at the event time of the earliest event that
-- carried both (a signup or login), event_id that event. status: 'linked' for
-- the account the device's anonymous activity was merged into, 'conflict' for
-- a further account the same device identified as (a shared computer).
-- Written by the pipeline's identity stage (transforms/identity.py); the
-- writer keeps the earliest linked_at, so replays and late events leave one
-- row per link. Pseudonyms only; erasure deletes an account's links and the
-- rows of the devices linked to it (transforms/erasure.py).
-- Unqualified names on purpose: apply_migrations sets search_path (see V001).
CREATE TABLE identity_aliases (
    anonymous_key text        NOT NULL,
    user_key      text        NOT NULL,
    linked_at     timestamptz NOT NULL,
    event_id      text        NOT NULL,
    match         text        NOT NULL,
    status        text        NOT NULL,
    PRIMARY KEY (anonymous_key, user_key)
);

CREATE INDEX identity_aliases_user_idx ON identity_aliases (user_key);

-- Events with the identity they resolve to: a device's events count as the
-- account's it was linked to (its first link by event time).
CREATE VIEW identity_links AS
SELECT DISTINCT ON (anonymous_key) anonymous_key, user_key, linked_at
FROM identity_aliases
ORDER BY anonymous_key, linked_at, event_id;

CREATE VIEW events_resolved AS
SELECT e.*, COALESCE(l.user_key, e.user_key) AS resolved_user_key
FROM events e LEFT JOIN identity_links l ON l.anonymous_key = e.user_key;
